"""Run folders: where a run writes, when a new run may start there, what a resumed run may change, and the clean-up
after an interrupted one. The folder's contents (config.yaml, metrics.jsonl, checkpoints/, samples/, cascade/) are
described in checkpoint.py; the training loop (train.py) holds the folder's lock while it writes."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import clean_partial, drop_torn_last_line
from .config import RunConfig, config_by_key, load_config
from .errors import UserError
from .outputs import check_writable_dir


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.out or "runs/pretrain")


# What a resumed run may change: budgets, intervals and threads (the step budget can grow, logging can thin out).
# Anything else (data, model, loss, optimiser, stages, transfer) would silently train a different run.
RESUMABLE_KEYS = ("out", "train.steps", "train.stage_steps", "train.log_every", "train.val_every", "train.kid_every",
                  "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.threads",
                  "train.early_stopping_patience", "train.early_stopping_min_delta", "train.gradient_checkpointing",
                  "sample.")


def resume_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """`key: saved -> given` for each setting a resume may not change (see RESUMABLE_KEYS)."""
    old, new = config_by_key(saved), config_by_key(given)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not any(key == k or k.endswith(".") and key.startswith(k)
                                                       for k in RESUMABLE_KEYS)]


def check_run_dir(config: RunConfig, resume: bool) -> Path:
    """The run folder, if a new run may start there (empty or absent) or `resume` may continue it with a config
    that differs only in RESUMABLE_KEYS; creates and writes nothing."""
    run_dir = run_dir_of(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume and not _never_started(run_dir):
        raise UserError(f"run folder {run_dir} already exists; pass --resume to continue it, or choose another --out")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} holds no run (no config.yaml)")
        changed = resume_differences(load_config(run_dir / "config.yaml"), config)
        if changed:
            raise UserError(f"--resume: the config differs from the run's {run_dir / 'config.yaml'} in "
                            f"{'; '.join(changed)}. Resume with the run's own settings (only "
                            f"{', '.join(k.rstrip('.') for k in RESUMABLE_KEYS[1:])} may change), or start a new run "
                            "in another --out")
    else:
        check_writable_dir(run_dir)
    return run_dir


def _never_started(run_dir: Path) -> bool:
    """True for a run folder that a failed start left with nothing trained in it (only the lock and config.yaml,
    empty folders): a corrected command may start there instead of being blocked by it."""
    files = [p for p in run_dir.rglob("*") if not p.is_dir()]
    return all(p.parent == run_dir and p.name in (".lock", "config.yaml") for p in files)


def prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    """Clean up after an interrupted run (the caller holds the run's lock)."""
    run_dir = run_dir_of(config)
    (run_dir / "samples").mkdir(exist_ok=True)
    removed = clean_partial(run_dir)
    if removed:
        print(f"removed {removed} partial checkpoint(s) left by an interrupted save")
    if resume and drop_torn_last_line(run_dir / "metrics.jsonl"):
        print(f"warning: dropped the unfinished last line of {run_dir / 'metrics.jsonl'} (a write cut short)")
    return run_dir
