"""How much faster is a training step with frozen early blocks than a full fine-tuning step? Paired, in one process.

    python benchmarks/frozen_ratio.py --pairs 40 --out benchmarks/results/frozen_ratio_cpu.md

`peers.py` times each contender in its own process for a few steps; on a shared 2-core VM the step time drifts by
2x within seconds, so its frozen / full ratio moved between 1.2x and 1.4x from run to run. Here both models live in
one process and their steps alternate (full, frozen, full, frozen, ...), each pair on the same batch, so a drift
hits both sides of a pair alike; the result is the median of the per-pair ratios with its interquartile range.

Each step is the loop's own training step (`step.training_step` through `common.our_step`: batch, min-SNR loss,
condition dropout, autocast and attention settings, clipping, fused AdamW, EMA) on the source's base stage, each arm
prepared by `transfer.prepare_transfer` from the same weights and fed the same cached caption states. A few more
alternating steps per arm run under torch.profiler (`common.phase_profile`) and split the step by its labelled phases (forward, backward, update, EMA),
which bound the speed-up: freezing saves the frozen blocks' backward, their optimizer and EMA work and some forward
time (no activations kept for autograd), and leaves the up path's backward untouched.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PHASES, median_images_per_s, our_step, phase_profile, publish, timed_steps  # noqa: E402

from imagen_transfer.cascade import load_cascade  # noqa: E402
from imagen_transfer.config import load_config  # noqa: E402
from imagen_transfer.step import Captioned  # noqa: E402
from imagen_transfer.text import TextEncoding  # noqa: E402
from imagen_transfer.transfer import prepare_transfer  # noqa: E402


def arm(cascade, stage, data, null, transfer: list[str], args):
    """(step(i) -> loss, StageTraining): the loop's training step on a fresh copy of `stage` under `transfer`."""
    config = load_config(None, [*transfer, f"train.batch_size={args.batch}", f"train.steps={10**6}",
                                f"train.mixed_precision={args.precision}", "train.lr=1e-4"])
    copied = copy.copy(stage)
    copied.unet = copy.deepcopy(stage.unet)
    prepare_transfer(copied.unet, config.transfer)
    return our_step(config, cascade, copied, data, null)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=40, help="timed (full, frozen) pairs per frozen depth")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="freeze_first_k values")
    parser.add_argument("--precision", choices=["bf16", "no", "auto"], default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps per arm profiled for the phase split")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cascade = load_cascade(args.source)
    stage = cascade.stages[0]
    dim, length, res = stage.unet.config.encoder_hid_dim, 32, stage.resolution
    gen = torch.Generator().manual_seed(0)
    table = TextEncoding(torch.randn(8, length, dim, generator=gen), torch.ones(8, length), torch.randn(8, dim, generator=gen))
    null = TextEncoding(torch.zeros(1, length, dim), torch.ones(1, length), torch.zeros(1, dim))
    images = torch.randint(0, 256, (max(256, args.batch), res, res, 3), dtype=torch.uint8, generator=gen)
    data = Captioned(images, torch.arange(len(images)) % 8, table, [])

    full_step, full_t = arm(cascade, stage, data, null, ["transfer.method=full"], args)
    total = sum(p.numel() for p in full_t.raw_unet.parameters())
    rows = []
    started = time.time()
    for k in args.depths:
        frozen_step, frozen_t = arm(cascade, stage, data, null,
                                    ["transfer.method=freeze", f"transfer.freeze_first_k={k}"], args)
        trainable = 100 * sum(p.numel() for p in frozen_t.params) / total
        ratios, times = [], {"full": [], "frozen": []}
        for i in range(args.warmup + args.pairs):  # both arms take step i: the same batch and noise
            order = [("full", full_step), ("frozen", frozen_step)]
            if i % 2:  # alternate which goes first, so neither always runs on a warmer cache
                order.reverse()
            pair = {name: timed_steps(lambda _, s=step, j=i: s(j), 0, 1)[0] for name, step in order}
            if i >= args.warmup:
                ratios.append(pair["full"] / pair["frozen"])
                for name in pair:
                    times[name].append(pair[name])
        first = args.warmup + args.pairs
        profiled = phase_profile({"full": full_step, "frozen": frozen_step}, first, args.profile_steps)
        phases = {arm: [profiled[arm][0].get(name, 0.0) for name in PHASES] for arm in profiled}
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        rows.append(dict(k=k, trainable=trainable, ratio=median, q1=q1, q3=q3, phases_ms=phases,
                         full_images_per_s=median_images_per_s(times["full"], args.batch),
                         frozen_images_per_s=median_images_per_s(times["frozen"], args.batch)))
        print(rows[-1], flush=True)
        del frozen_step, frozen_t
    lines = [f"# Frozen early blocks against full fine-tuning: paired steps in one process ({args.source} base stage, "
             f"batch {args.batch}, {args.precision}, {args.threads} threads)", "",
             f"{total:,} parameters; {args.pairs} timed pairs per depth after {args.warmup} warm-up pairs, the order "
             f"within a pair alternating; phases from {args.profile_steps} more alternating steps per arm under the profiler; wall time "
             f"{time.time() - started:.0f} s.", "",
             "| frozen | trainable % | full images/s | frozen images/s | frozen speed-up (median of pair ratios) | IQR "
             "| full ms: forward / backward / update / EMA | frozen ms: forward / backward / update / EMA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full_ms, frozen_ms = (" / ".join(f"{v:.1f}" for v in r["phases_ms"][name]) for name in ("full", "frozen"))
        whole = " (the whole down path)" if r["k"] >= len(stage.unet.down_blocks) else ""
        lines.append(f"| stem + first {r['k']} down block{'s' if r['k'] > 1 else ''}{whole} | {r['trainable']:.1f} | "
                     f"{r['full_images_per_s']:.1f} | {r['frozen_images_per_s']:.1f} | **{r['ratio']:.2f}x** | "
                     f"{r['q1']:.2f}-{r['q3']:.2f} | {full_ms} | {frozen_ms} |")
    lines += ["", f"Command: `python benchmarks/frozen_ratio.py --batch {args.batch} --pairs {args.pairs} --depths "
              f"{' '.join(map(str, args.depths))} --precision {args.precision} --threads {args.threads} --profile-steps {args.profile_steps}`"]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
