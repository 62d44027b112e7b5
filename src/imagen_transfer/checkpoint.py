"""Run folders and checkpoints that survive a crash at any moment.

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl`, `tensorboard/`, `samples/`,
`checkpoints/<stage>/step-NNNNNNN/` and, when a run ends, `cascade/` (the trained cascade, EMA weights).

A checkpoint is written into `step-NNNNNNN.tmp/`, renamed into place, and only then named by the `latest` pointer
file (itself replaced atomically). A kill at any moment therefore leaves `latest` naming a complete checkpoint;
half-written `.tmp` folders are removed on the next start. Nothing is pickled: weights and the optimizer's tensors are
safetensors, the optimizer's hyperparameters and scalar state JSON in that file's metadata (`optimizer_to_safetensors`).
Checkpoints of earlier versions (`optimizer.pt`) still load, through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .outputs import disk_full_as_oserror, nbytes, replaced_atomically, require_space, write_atomic


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (made contiguous) to a temporary file, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, nbytes(tensors)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def cached_pieces(items: torch.Tensor, piece_size: int, file_for, compute, *, progress: bool = True,
                  desc: str = "pieces") -> tuple[list[dict[str, torch.Tensor]], list[Path]]:
    """`compute(start, piece)` (a dict of tensors) for each run of `piece_size` items, each kept at
    `file_for(start, piece)` (atomic safetensors) and read back instead of computed when it is there: work killed
    midway, or repeated on the same items, redoes only the missing pieces. Returns the pieces and their files."""
    parts, files = [], []
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(items), piece_size):
            piece = items[start : start + piece_size].contiguous()
            file = file_for(start, piece)
            if file.is_file():
                part = load_file(file)
            else:
                part = compute(start, piece)
                save_safetensors_atomic(file, part)
            parts.append(part)
            files.append(file)
            bar.update(len(piece))
    return parts, files


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (after a newline of its own if a killed writer left the last line unfinished)."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line that is not a JSON object (a write torn by a kill or a full disk) is
    skipped with a warning naming it, so a log never makes a run unreadable or unresumable."""
    if not Path(path).is_file():
        return []
    records = []
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            warnings.warn(f"{path} line {lineno} is not a JSON record (a torn write?); skipped", stacklevel=2)
            continue
        records.append(record)
    return records


def _record(line: bytes) -> dict | None:
    """One JSON-lines record, or None when the line is not a JSON object (torn, or not UTF-8)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def drop_torn_last_line(path: Path) -> bool:
    """On resume: remove an unfinished last line of a JSON-lines log (a kill mid-write), atomically. True if one was."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if not lines:
        return False
    if _record(lines[-1]) is not None:  # a whole record whose newline was cut off: append_jsonl adds it later
        return False
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(b"".join(lines[:-1]))
    return True


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def save_checkpoint(run_dir: Path, stage: str, step: int, *, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], optimizer: dict, state: dict, keep: int = 2,
                    keep_steps=()) -> Path:
    """Write one checkpoint atomically and point `latest` at it; keep the newest `keep`, `best` and the steps in
    `keep_steps`."""
    root = stage_dir(run_dir, stage)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f"{step_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tensors, metadata = optimizer_to_safetensors(optimizer)
    needed = sum(nbytes(d) for d in (model, ema, tensors))
    require_space(root, needed, f"checkpoint {final}")  # a full disk stops here, the last checkpoint intact
    tmp.mkdir()
    try:
        with disk_full_as_oserror(tmp, needed):
            save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, tmp / "model.safetensors")
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            save_file(tensors, tmp / "optimizer.safetensors", metadata=metadata)
            (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=2))
            for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written folder; `latest` still names a whole one
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name)
    _prune(root, keep, protect={final.name, _read_pointer(root / "best")} | {step_name(s) for s in keep_steps})
    return final


def mark_best(run_dir: Path, stage: str, checkpoint: Path) -> None:
    write_atomic(stage_dir(run_dir, stage) / "best", checkpoint.name)


def _read_pointer(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _prune(root: Path, keep: int, protect: set) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir: Path) -> int:
    """Remove `.tmp` leftovers of a checkpoint write that was killed; returns how many."""
    removed = 0
    for tmp in Path(run_dir).glob("checkpoints/*/step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed


def latest_checkpoint(run_dir: Path, stage: str, which: str = "latest") -> Path | None:
    name = _read_pointer(stage_dir(run_dir, stage) / which)
    if name is None:
        return None
    path = stage_dir(run_dir, stage) / name
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> dict:
    """{'model', 'ema', 'optimizer', 'state'} of a checkpoint folder; refuses pickled objects."""
    path = Path(path)
    return dict(
        model=load_file(path / "model.safetensors"),
        ema=load_file(path / "ema.safetensors"),
        optimizer=load_optimizer_state(path),
        state=json.loads((path / "state.json").read_text()),
    )


def optimizer_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a torch optimizer state dict into tensors (`state.<param index>.<name>`) and JSON metadata (the param
    groups and any non-tensor per-parameter state), so it is stored without pickle."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars),
                "format": "imagen-transfer optimizer v1"}
    return tensors, metadata


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state dict of a checkpoint folder (inverse of `optimizer_to_safetensors`)."""
    path = Path(checkpoint) / "optimizer.safetensors"
    if not path.is_file() and (Path(checkpoint) / "optimizer.pt").is_file():  # written before the safetensors format
        return torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True, map_location="cpu")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if "param_groups" not in metadata:
            raise ValueError(f"{path} is not an optimizer state written by imagen-transfer (no param_groups metadata)")
        state: dict[int, dict] = {}
        for key in f.keys():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = f.get_tensor(key)
    for index, entries in json.loads(metadata["scalars"]).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": dict(sorted(state.items())), "param_groups": json.loads(metadata["param_groups"])}
