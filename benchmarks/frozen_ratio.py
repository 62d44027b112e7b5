"""How much faster is a training step with frozen early blocks than a full fine-tuning step? Paired, in one process.

    python benchmarks/frozen_ratio.py --pairs 40 --out benchmarks/results/frozen_ratio_cpu.md

`peers.py` times each contender in its own process for a few steps; on a shared 2-core VM the step time drifts by
2x within seconds, so its frozen / full ratio moved between 1.2x and 1.4x from run to run. Here both models live in
one process and their steps alternate (full, frozen, full, frozen, ...), each pair on the same batch, so a drift
hits both sides of a pair alike; the result is the median of the per-pair ratios with its interquartile range.

Each step is our training step reduced to its model work: `diffusion.training_loss` (min-SNR weights, condition
dropout) under the loop's autocast and attention settings, backward, gradient clipping and fused AdamW over the
trainable parameters, on the source's base stage prepared by `transfer.prepare_transfer`. Each step is also split
into forward, backward and update times, which bound the speed-up: freezing saves the frozen blocks' backward, their
optimizer work and some forward time (no activations kept for autograd), and leaves the up path's backward untouched.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch


def make_step(unet, alphas, null, precision: str):
    from imagen_transfer.diffusion import training_loss
    from imagen_transfer.unet import training_attention

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(x0, text, generator) -> tuple[float, float, float]:
        """Seconds spent in the forward pass, the backward pass and the update (clipping + AdamW)."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), training_attention("cpu"):
            loss = training_loss(unet, alphas, x0, text, null_text=null, cond_drop_prob=0.1,
                                 generator=generator).mean()
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward - start, backward - forward, time.perf_counter() - backward

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=40, help="timed (full, frozen) pairs per frozen depth")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="freeze_first_k values")
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16" if torch.cpu._is_amx_tile_supported()
                        else "no")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.config import TransferConfig
    from imagen_transfer.text import TextEncoding
    from imagen_transfer.transfer import prepare_transfer

    torch.set_num_threads(args.threads)
    stage = load_cascade(args.source).stages[0]
    alphas = stage.scheduler.alphas_cumprod
    unet = stage.unet.train()
    dim, length, res = unet.config.encoder_hid_dim, 32, stage.resolution
    data = torch.Generator().manual_seed(0)
    text = TextEncoding(torch.randn(args.batch, length, dim, generator=data), torch.ones(args.batch, length),
                        torch.randn(args.batch, dim, generator=data))
    null = TextEncoding(torch.zeros(1, length, dim), torch.ones(1, length), torch.zeros(1, dim))
    x0 = torch.rand(args.batch, 3, res, res, generator=data) * 2 - 1

    full = copy.deepcopy(unet)
    summary = prepare_transfer(full, TransferConfig(method="full"))
    full_step = make_step(full, alphas, null, args.precision)
    rows = []
    started = time.time()
    for k in args.depths:
        frozen = copy.deepcopy(unet)
        frozen_summary = prepare_transfer(frozen, TransferConfig(method="freeze", freeze_first_k=k))
        frozen_step = make_step(frozen, alphas, null, args.precision)
        ratios, phases = [], {"full": [], "frozen": []}
        for i in range(args.warmup + args.pairs):
            g_full, g_frozen = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
            if i % 2 == 0:  # alternate which goes first, so neither always runs on a warmer cache
                a = full_step(x0, text, g_full)
                b = frozen_step(x0, text, g_frozen)
            else:
                b = frozen_step(x0, text, g_frozen)
                a = full_step(x0, text, g_full)
            if i >= args.warmup:
                ratios.append(sum(a) / sum(b))
                phases["full"].append(a)
                phases["frozen"].append(b)
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        ms = {arm: [1e3 * statistics.median(p[j] for p in steps) for j in range(3)] for arm, steps in phases.items()}
        rows.append(dict(k=k, trainable=frozen_summary.percent, ratio=median, q1=q1, q3=q3, phases_ms=ms,
                         full_images_per_s=args.batch / statistics.median(map(sum, phases["full"])),
                         frozen_images_per_s=args.batch / statistics.median(map(sum, phases["frozen"]))))
        print(rows[-1], flush=True)
        del frozen, frozen_step
    lines = [f"# Frozen early blocks against full fine-tuning: paired steps in one process ({args.source} base stage, "
             f"batch {args.batch}, {args.precision}, {args.threads} threads)", "",
             f"{summary.total:,} parameters; {args.pairs} timed pairs per depth after {args.warmup} warm-up pairs, "
             f"the order within a pair alternating; wall time {time.time() - started:.0f} s.", "",
             "| frozen | trainable % | full images/s | frozen images/s | frozen speed-up (median of pair ratios) | IQR "
             "| full ms: forward / backward / update | frozen ms: forward / backward / update |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full_ms, frozen_ms = ("{:.0f} / {:.0f} / {:.0f}".format(*r["phases_ms"][arm]) for arm in ("full", "frozen"))
        whole = " (the whole down path)" if r["k"] >= len(unet.down_blocks) else ""
        lines.append(f"| stem + first {r['k']} down block{'s' if r['k'] > 1 else ''}{whole} | {r['trainable']:.1f} | "
                     f"{r['full_images_per_s']:.1f} | {r['frozen_images_per_s']:.1f} | **{r['ratio']:.2f}x** | "
                     f"{r['q1']:.2f}-{r['q3']:.2f} | {full_ms} | {frozen_ms} |")
    lines += ["", f"Command: `python benchmarks/frozen_ratio.py --batch {args.batch} --pairs {args.pairs} --depths "
              f"{' '.join(map(str, args.depths))} --precision {args.precision} --threads {args.threads}`"]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out)


if __name__ == "__main__":
    main()
