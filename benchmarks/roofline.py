"""How far from this CPU's own limit each job runs (issue #39): measured peaks, counted FLOPs, achieved fractions.

1. Peak: a large GEMM (2048^3) and a large 3x3 convolution (32 x 256 -> 256 channels at 32 x 32), fp32 and bf16,
   1 and 2 threads; the best of several timed calls (GFLOP/s, a multiply-add counted as 2 FLOPs).
2. Work: FLOPs counted with torch.utils.flop_counter (matmuls and convolutions; what a roofline compares) for a
   training image of each shipped U-Net stage (forward + backward), a sampling step (one CFG-batched U-Net call per
   image), the FID network's pass (TF-Inception at 299 px) and the conditioning judge.
3. Achieved: each timed at the run's own settings (threads, `auto` precision), as GFLOP/s and as a fraction of
   the convolution peak at that precision and thread count (the U-Nets, Inception and the judge are convolution
   networks; the GEMM peak is beside).
4. Where the rest goes: a profile of the base stage's training step, self CPU time by operator family.

    python benchmarks/roofline.py --out benchmarks/results/roofline_cpu.json --table benchmarks/results/roofline_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import our_step, publish  # noqa: E402

from imagen_transfer.cascade import load_cascade  # noqa: E402
from imagen_transfer.config import load_config  # noqa: E402
from imagen_transfer.diffusion import denoise  # noqa: E402
from imagen_transfer.openmp import cpu  # noqa: E402
from imagen_transfer.step import Captioned  # noqa: E402
from imagen_transfer.text import cat_encodings, load_text_encoder  # noqa: E402
from imagen_transfer.unet import precision_choice  # noqa: E402

FAMILIES = {  # operator name fragments -> family, first match wins
    "convolution / matmul (compute-bound)": ("convolution", "mkldnn_conv", "::mm", "bmm", "addmm", "matmul", "linear"),
    "optimizer and EMA (foreach, fused AdamW)": ("_foreach", "adam", "lerp", "addcdiv", "addcmul"),
    "normalisation (GroupNorm, LayerNorm)": ("group_norm", "layer_norm"),
    "activations and elementwise": ("gelu", "silu", "add", "mul", "sub", "div", "softmax", "exp", "sigmoid", "where"),
    "copies and layout": ("copy_", "_to_copy", "contiguous", "cat", "clone", "fill_", "zero_", "empty"),
}


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def peaks(n: int = 2048) -> list[dict]:
    """GEMM n^3 and a 3x3 convolution of n / 8 channels at 32 x 32 (batch 32), per thread count and dtype."""
    rows, c = [], n // 8
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            gemm = 2 * n ** 3 / best_seconds(lambda a=a, b=b: a @ b) / 1e9
            conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype)
            x = torch.randn(32, c, 32, 32, dtype=dtype)
            flops = 2 * 32 * c * 32 * 32 * c * 9
            rows.append(dict(threads=threads, dtype=str(dtype).split(".")[1], gemm_gflops=round(gemm, 1),
                             conv_gflops=round(flops / best_seconds(lambda conv=conv, x=x: conv(x), 3) / 1e9, 1)))
            print(rows[-1], flush=True)
    return rows


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training(cascade, stage, text, null, batch: int, steps: int) -> dict:
    images = torch.randint(0, 256, (256, stage.resolution, stage.resolution, 3), dtype=torch.uint8)
    config = load_config(None, [f"train.steps={steps + 4}", f"train.batch_size={batch}"])
    step, _ = our_step(config, cascade, stage, Captioned(images, torch.arange(256) % 2, text, []), null)
    flops = counted(lambda: step(0)) / batch
    step(1)
    start = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    return dict(flops_per_image=flops, images_per_s=steps * batch / (time.perf_counter() - start))


@torch.inference_mode()
def sampling_step(stage, text, null, batch: int, precision: str) -> dict:
    unet, r = stage.unet.eval(), stage.resolution
    enc = cat_encodings([text.index([0]).repeat(batch), null.repeat(batch)])  # CFG: both branches in one call
    x = torch.randn(2 * batch, 3, r, r)
    t = torch.full((2 * batch,), 500)
    lowres = torch.randn_like(x) if stage.kind == "sr" else None
    level = torch.zeros_like(t) if stage.kind == "sr" else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def call():
        with autocast:
            denoise(unet, x, t, enc, lowres, level)

    flops = counted(call) / batch
    return dict(flops_per_image=flops, images_per_s=batch / best_seconds(call, 3))


@torch.inference_mode()
def network_pass(net, size: int, batch: int) -> dict:
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    flops = counted(lambda: net(x)) / batch
    return dict(flops_per_image=flops, images_per_s=batch / best_seconds(lambda: net(x), 3))


def profile_families(step, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(100 + i)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        family = next((f for f, keys in FAMILIES.items() if any(k in event.key for k in keys)), "other")
        totals[family] = totals.get(family, 0.0) + event.self_cpu_time_total / 1e3 / steps
    whole = sum(totals.values())
    return {f: dict(ms_per_step=round(v, 1), share=round(v / whole, 3)) for f, v in sorted(totals.items(),
                                                                                        key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", default="cifar10", help="the cascade whose stages are measured")
    p.add_argument("--feature-net", default=None, help="the FID network (default TF-Inception)")
    p.add_argument("--peak-size", type=int, default=2048, help="the peak GEMM's n (the convolution has n / 8 channels)")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None)
    args = p.parse_args()
    started = time.time()
    machine = cpu()
    peak = peaks(args.peak_size)
    torch.set_num_threads(args.threads)
    precision = precision_choice("auto", False)[0]
    dtype = "bfloat16" if precision == "bf16" else "float32"

    def peak_of(kind: str, of: str) -> float:
        return next(r[kind] for r in peak if r["threads"] == args.threads and r["dtype"] == of)
    cascade = load_cascade(args.model)
    encoder = load_text_encoder(cascade.text_encoder)
    text, null = encoder(["chest x-ray, normal", "chest x-ray, pneumonia"]), encoder([""])
    work = {}
    for stage in cascade.stages:
        work[f"training, {stage.name} ({stage.resolution} px)"] = training(cascade, stage, text, null, args.batch,
                                                                         args.steps)
        work[f"sampling step, {stage.name} (CFG batch)"] = sampling_step(stage, text, null, 64, precision)
    from imagen_transfer.judge import build_judge
    from imagen_transfer.metrics import load_feature_net

    inception, _ = load_feature_net(args.feature_net)
    work["FID network (TF-Inception, 299 px)"] = network_pass(inception.eval(), 32, 50)
    judge = build_judge(2).eval()
    work["conditioning judge (32 px)"] = network_pass(lambda x: judge(x.float() / 127.5 - 1), 32, 256)
    rows = []
    for name, w in work.items():
        gflops = w["flops_per_image"] * w["images_per_s"] / 1e9
        of = dtype if ("training" in name or "sampling" in name) else "float32"  # Inception and the judge run fp32
        rows.append(dict(job=name, dtype=of, gflop_per_image=round(w["flops_per_image"] / 1e9, 3),
                         images_per_s=round(w["images_per_s"], 1), achieved_gflops=round(gflops, 1),
                         of_conv_peak=round(gflops / peak_of("conv_gflops", of), 3),
                         of_gemm_peak=round(gflops / peak_of("gemm_gflops", of), 3)))
        print(rows[-1], flush=True)
    base = cascade.stages[0]
    images = torch.randint(0, 256, (256, base.resolution, base.resolution, 3), dtype=torch.uint8)
    config = load_config(None, [f"train.steps={200}", f"train.batch_size={args.batch}"])
    step, _ = our_step(config, cascade, base, Captioned(images, torch.arange(256) % 2, text, []), null)
    step(99)
    families = profile_families(step)
    result = dict(cpu=machine, threads=args.threads, precision=precision, peaks=peak, jobs=rows,
                  training_step_profile=families, seconds=round(time.time() - started))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    lines = [f"# Roofline on {machine['name']} ({machine['cores']} cores; flags {', '.join(machine['flags'])})", "",
             "```", f"python {' '.join(sys.argv)}", "```", "",
             "Peaks (best of several calls; GFLOP/s):", "",
             f"| threads | dtype | GEMM {args.peak_size}^3 | conv 3x3, {args.peak_size // 8} ch, 32 px |",
             "|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['dtype']} | {r['gemm_gflops']} | {r['conv_gflops']} |" for r in peak]
    lines += ["", f"Jobs at {args.threads} threads, precision {precision} (U-Net calls; Inception and the judge in "
              "fp32 as evaluation runs them), against the peaks at the job's dtype and thread count:", "",
              "| job | dtype | GFLOP / image | images/s | achieved GFLOP/s | of conv peak | of GEMM peak |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['dtype']} | {r['gflop_per_image']} | {r['images_per_s']} | {r['achieved_gflops']} | "
              f"{100 * r['of_conv_peak']:.0f}% | {100 * r['of_gemm_peak']:.0f}% |" for r in rows]
    lines += ["", f"Where the base stage's training step spends its time (batch {args.batch}, self CPU time under "
              "torch.profiler, its overhead included):", "", "| operator family | ms / step | share |", "|---|---|---|"]
    lines += [f"| {f} | {v['ms_per_step']} | {100 * v['share']:.0f}% |" for f, v in families.items()]
    publish("\n".join(lines) + "\n", args.table)


if __name__ == "__main__":
    main()
