"""Where a training step spends its time: our step (`step.training_step`) against the plain diffusers loop with the
same levers (bf16 autocast, fused AdamW, the math attention kernel: `common.plain_diffusers_step(bf16=True)`), side
by side in one process, split by the phases both label (forward, backward, update; ours also EMA) and by the
operators that cost the most.

    python benchmarks/step_profile.py --out benchmarks/results/step_profile_cpu.md

The two steps alternate (ours, plain, ours, ...) so a drifting machine hits both; each is timed by wall clock over
`--steps` steps after `--warmup`, then `--profile-steps` more of each run under torch.profiler. "Outside the
phases" is the step's wall time less its labelled phases: batch assembly, noise and timestep draws, bookkeeping.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PHASES, our_step, phase_profile, plain_diffusers_step, publish  # noqa: E402

from imagen_transfer.cascade import init_cascade  # noqa: E402
from imagen_transfer.config import load_config  # noqa: E402
from imagen_transfer.step import Captioned  # noqa: E402
from imagen_transfer.text import load_text_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="wall-clock timed steps of each")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto",
                        help="ours: train.mixed_precision; plain takes bf16 autocast and our levers when ours runs bf16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cascade = init_cascade(args.preset, max_text_length=32 if args.preset != "tiny" else 20)
    stage = cascade.stages[0]
    encoder = load_text_encoder(cascade.text_encoder)
    table = encoder([f"a photo of a {c}" for c in ("cat", "dog", "ship", "truck")])
    null = encoder([""])
    images = torch.randint(0, 256, (512, stage.resolution, stage.resolution, 3), dtype=torch.uint8)
    ids = torch.arange(len(images)) % 4
    config = load_config(None, [f"train.batch_size={args.batch}", f"train.steps={10**6}",
                                f"train.mixed_precision={args.precision}"])
    ours, t = our_step(config, cascade, stage, Captioned(images, ids, table, []), null)
    precision = t.accelerator.mixed_precision
    plain_stage = init_cascade(args.preset, max_text_length=32 if args.preset != "tiny" else 20).stages[0]
    plain, _ = plain_diffusers_step(plain_stage, images, table, ids, args.batch, bf16=precision == "bf16")
    times = {"ours": [], "plain": []}
    started = time.time()
    for i in range(args.warmup + args.steps):
        for name, step in (("ours", ours), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            step(i)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    wall = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    first = args.warmup + args.steps
    profiles = phase_profile({"ours": ours, "plain": plain}, first, args.profile_steps)
    lines = [f"# One training step, ours against the plain diffusers loop with the same levers (preset `{args.preset}`, "
             f"batch {args.batch}, {args.threads} threads, {precision})", "",
             f"Wall time: median of {args.steps} alternating steps each after {args.warmup} warm-up; phases from "
             f"{args.profile_steps} more alternating steps each under the profiler (its overhead included); run "
             f"{time.time() - started:.0f} s.", "",
             f"| ms per step | ours | plain ({'bf16, fused AdamW, math attention' if precision == 'bf16' else 'fp32, as diffusers runs it'}) | ours - plain |", "|---|---|---|---|"]
    for phase in PHASES:
        o, p = profiles["ours"][0].get(phase, 0.0), profiles["plain"][0].get(phase, 0.0)
        lines.append(f"| {phase.split('/')[1]} | {o:.1f} | {p:.1f} | {o - p:+.1f} |")
    outside = {name: profiles[name][2] - sum(profiles[name][0].values()) for name in profiles}
    lines.append(f"| outside the phases (profiled step - phases) | {outside['ours']:.1f} | {outside['plain']:.1f} | "
                 f"{outside['ours'] - outside['plain']:+.1f} |")
    lines.append(f"| profiled step | {profiles['ours'][2]:.1f} | {profiles['plain'][2]:.1f} | "
                 f"{profiles['ours'][2] - profiles['plain'][2]:+.1f} |")
    lines.append(f"| **whole step (wall clock)** | **{wall['ours']:.1f}** | **{wall['plain']:.1f}** | "
                 f"**{wall['ours'] - wall['plain']:+.1f}** (ours {wall['plain'] / wall['ours']:.2f}x plain's speed) |")
    for name in ("ours", "plain"):
        lines += ["", f"Top operators, {name} (self CPU ms per step, calls per step):", "",
                  "| operator | ms | calls |", "|---|---|---|"]
        lines += [f"| `{key}` | {ms:.1f} | {calls} |" for key, ms, calls in profiles[name][1]]
    lines += ["", f"Command: `python benchmarks/step_profile.py --preset {args.preset} --batch {args.batch} --warmup "
              f"{args.warmup} --steps {args.steps} --profile-steps {args.profile_steps} --threads {args.threads} --precision {args.precision}`"]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
