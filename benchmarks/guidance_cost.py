"""What autoguidance costs in sampling time against CFG, side by side in one process (issue #38).

CFG runs one U-Net call per step on a doubled batch (conditional + unconditional rows); autoguidance runs two calls
per step on the plain batch (the model, then its guide), the same FLOPs in two smaller calls. The two alternate
(CFG, autoguidance, CFG, ...) on the same captions and seeds; reported: median seconds per image of each and the ratio.

    python benchmarks/guidance_cost.py --model runs/F/cascade --guide runs/F/step-50 --n 64 --repeats 3 \
        --out benchmarks/results/guidance_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from imagen_transfer.interop import open_model
from imagen_transfer.sampling import sample_cascade


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--guide", required=True)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--weight", type=float, default=2.0)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, guide = open_model(args.model), open_model(args.guide)
    prompts = ["chest x-ray, normal", "chest x-ray, pneumonia"] * (args.n // 2)
    seeds = list(range(len(prompts)))
    runs = {"cfg": [], "autoguidance": []}
    for _ in range(args.repeats):
        for name in runs:
            options = dict(guidance=args.cfg) if name == "cfg" else dict(guidance=args.weight, guide=guide)
            start = time.perf_counter()
            sample_cascade(model, prompts, seeds, batch_size=64, progress=False, precision=args.precision, **options)
            runs[name].append((time.perf_counter() - start) / len(prompts))
    cfg, auto = statistics.median(runs["cfg"]), statistics.median(runs["autoguidance"])
    result = dict(model=args.model, guide=args.guide, n=len(prompts), threads=torch.get_num_threads(),
                  precision=args.precision, seconds_per_image=dict(cfg=round(cfg, 4), autoguidance=round(auto, 4)),
                  autoguidance_over_cfg=round(auto / cfg, 3), runs=runs)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
