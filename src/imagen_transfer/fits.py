"""A probe's journal of finished fits, so a probe that takes hours (the dense backbone rows on BCCD: about 11 minutes
of a 2-core CPU per fit, 26 fits) resumes where it stopped instead of starting over.

`OUT/fits.jsonl` holds the probe's settings on its first line, then one line per finished fit: its key (set, label
count, seed, learning rate) and its scores; the weights of each learning-rate grid fit (the candidate for the chosen
head, which the report's overlays draw) go beside it as safetensors, written before the line that names them. A
resumed probe reads every finished fit's scores back and fits only the missing ones; the fits are seeded, so the
result is the one an uninterrupted run would have written, up to the CPU's floating-point order.

The journal never loses work: a fresh probe into a folder whose journal is unfinished is refused (resume it, or
delete OUT/fits.jsonl), a resume whose settings differ is refused with the differences named (all but the
learning-rate grid, which may grow: fits are keyed by their learning rate), and a finished
probe's journal (its last line says so; fits a resume adds after it reopen it) is replaced by a fresh one like the
probe's other files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_model
from torch import nn

from .checkpoint import append_jsonl, drop_torn_last_line, read_jsonl, save_safetensors_atomic
from .errors import UserError
from .outputs import write_atomic

JOURNAL = "fits.jsonl"
# Settings a resume may change: the learning-rate grid (every fit is keyed by its learning rate, so a grid that grows
# when validation picks its edge reuses the finished candidates and fits the new ones).
FREE = ("lrs",)
WEIGHTS = "fits"  # OUT/fits/<key>.safetensors: the grid fits' weights


@dataclass
class FitJournal:
    """The finished fits of one probe (`path` None: nothing is kept, every fit runs)."""

    path: Path | None = None
    done: dict[str, dict] = field(default_factory=dict)
    read_back: int = 0  # fits whose scores came from an earlier run's journal

    def get(self, key: str) -> dict | None:
        """The scores of the finished fit `key`, or None when it has not run."""
        entry = self.done.get(key)
        self.read_back += entry is not None
        return entry

    def put(self, key: str, scores: dict, weights: nn.Module | None = None) -> dict:
        """Record a finished fit (its weights first, when given, so a line always names weights that exist)."""
        if self.path is not None:
            if weights is not None:  # cloned: safetensors refuses tensors sharing memory, load_model takes all names
                save_safetensors_atomic(self.weights_file(key),
                                        {k: v.detach().clone() for k, v in weights.state_dict().items()})
            append_jsonl(self.path, dict(key=key, scores=scores))
        self.done[key] = scores
        return scores

    def weights_file(self, key: str) -> Path:
        return self.path.parent / WEIGHTS / (key.replace("/", "_") + ".safetensors")

    def restore(self, key: str, module: nn.Module) -> nn.Module:
        """`module` (built as the fit `key` built it) with that fit's saved weights."""
        file = None if self.path is None else self.weights_file(key)
        if file is None or not file.is_file():
            raise UserError(f"{file or key}: the weights of a finished fit are missing; delete "
                            f"{self.path or JOURNAL} and run the probe again without --resume")
        load_model(module, str(file))
        return module.eval()


def fit_key(set_name: str, lr: float, subset: str | None = None, seed: int = 0) -> str:
    """The journal's name of one fit: a learning-rate grid candidate (`{set}/grid/lr=..`: every label, seed 0), or
    a labelled subset's fit (`{set}/{subset}/seed=../lr=..`, `subset` `n=<count>` images or `f=<fraction>`)."""
    return f"{set_name}/grid/lr={lr:g}" if subset is None else f"{set_name}/{subset}/seed={seed}/lr={lr:g}"


def _fixed(settings: dict) -> dict:
    """`settings` without the keys a resume may change (FREE), at any depth."""
    return {k: _fixed(v) if isinstance(v, dict) else v for k, v in settings.items() if k not in FREE}


def finish_journal(out: Path) -> None:
    """Mark the journal in `out` finished, once the probe's result files are written (a later fresh probe there
    may replace it)."""
    path = Path(out) / JOURNAL
    records = read_jsonl(path)
    if records and records[-1].get("complete") is not True:
        append_jsonl(path, dict(complete=True))


def open_journal(out: Path | None, settings: dict, resume: bool) -> FitJournal:
    """The journal in `out` for a probe with `settings` (JSON-ready): a fresh one, or with `resume` the earlier
    run's finished fits. Checked before any fit runs; see the module doc for what is refused."""
    if out is None:
        if resume:
            raise UserError("--resume continues a probe in its --out folder; pass the folder the probe wrote")
        return FitJournal()
    path = Path(out) / JOURNAL
    settings = json.loads(json.dumps(settings))  # tuples as lists: compared as they are stored
    records = read_jsonl(path)  # [] when there is none
    finished = bool(records) and records[-1].get("complete") is True
    if not resume:
        if records and not finished and len(records) > 1:
            raise UserError(f"{path} holds {len(records) - 1} finished fits of an interrupted probe: add --resume to "
                            f"continue it, or delete {path} to start over")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(dict(settings=settings)) + "\n")
        return FitJournal(path)
    if not records or "settings" not in records[0]:
        raise UserError(f"{path} is missing or holds no probe's settings: nothing to resume; run without --resume")
    saved, given = _fixed(records[0]["settings"]), _fixed(settings)
    differences = [f"{k}: {saved.get(k)!r} -> {given.get(k)!r}" for k in sorted(set(saved) | set(given))
                   if saved.get(k) != given.get(k)]
    if differences:
        raise UserError(f"{path} was written with other settings ({'; '.join(differences)}): resume with the "
                        "same ones, or pass another --out")
    drop_torn_last_line(path)
    return FitJournal(path, {r["key"]: r["scores"] for r in records[1:] if "key" in r})
