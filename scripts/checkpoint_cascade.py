"""A cascade folder from a run's checkpoint (its EMA weights), to look at or ship a long run midway.

The run's own `cascade/` is written only when it finishes; this builds the run's cascade (its config: a fresh
cascade or its `model.init_from` source) and loads one stage's EMA weights from a checkpoint (default: the latest):

    python scripts/checkpoint_cascade.py runs/cifar10-sr-long --stage sr --out /tmp/sr-step-4200 \
        [--checkpoint step-0004200] [--fp16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imagen_transfer.cascade import save_cascade
from imagen_transfer.checkpoint import latest_checkpoint, load_checkpoint, stage_dir
from imagen_transfer.config import load_config
from imagen_transfer.errors import UserError
from imagen_transfer.interop import build_or_load_cascade


def checkpoint_cascade(run: Path, stage: str, out: Path, checkpoint: str | None = None, fp16: bool = False) -> Path:
    """Write the cascade of `run` with `stage`'s EMA weights from `checkpoint` (a step-N folder name) to `out`."""
    path = stage_dir(run, stage) / checkpoint if checkpoint else latest_checkpoint(run, stage)
    if path is None or not path.is_dir():
        raise UserError(f"{run}: no checkpoint {checkpoint or ''} of stage {stage}; list {stage_dir(run, stage)}")
    # resume=True: the run's own checkpoints decide, as when resuming it (older runs recorded `epsilon` for a
    # continued v-prediction stage)
    cascade = build_or_load_cascade(load_config(run / "config.yaml"), resume=True)
    cascade.stage(stage).unet.load_state_dict(load_checkpoint(path)["ema"])
    cascade.info = dict(cascade.info or {}, checkpoint=str(path), stage=stage)
    save_cascade(cascade, out, dtype=torch.float16 if fp16 else None)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, help="a step-N folder name (default: the latest)")
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args()
    used = checkpoint_cascade(args.run, args.stage, args.out, args.checkpoint, args.fp16)
    print(f"{args.out}: stage {args.stage} from {used}")


if __name__ == "__main__":
    main()
