"""Is the default sampler (DPM-Solver++, 25 steps) as good as 250 ancestral DDPM steps? KID and FID of each sampler on
the same captions and seeds, against the same real images, in one run; with generation images/s.

DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models") is a
second-order multistep solver of the probability-flow ODE built for guided sampling; DDPM (Ho et al. 2020, alg. 2)
is the ancestral sampler the models are trained for. Each setting is `sampler:steps[:bf16]` (bf16: the U-Net calls
under bf16 autocast, see sampling.sample_stage's `precision`). The real images are a seeded subset of the split, at
the sampled stage's resolution; all settings share it and its cached features.

    python benchmarks/sampler_parity.py --out benchmarks/results/sampler_parity_cpu.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imagen_transfer.cascade import load_cascade
from imagen_transfer.evaluate import cascade_generator, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--stages", default="base", help="comma-separated stages to sample (default: the base stage)")
    parser.add_argument("--settings", default="ddpm:250,dpmpp:25,dpmpp:25:bf16,dpmpp:15")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cascade = load_cascade(args.model)
    stages = args.stages.split(",")
    resolution = [s for s in cascade.stages if s.name in stages][-1].resolution
    rows, started = [], time.time()
    for setting in args.settings.split(","):
        sampler, steps, *rest = setting.split(":")
        precision = rest[0] if rest else "no"
        generate = cascade_generator(cascade, batch_size=64, progress=False, stages=stages, sampler=sampler,
                                     steps=int(steps), precision=precision)
        result = evaluate(args.model, args.data, n=args.n, n_real=args.n_real, seed=0, generate=generate,
                          resolution=resolution, progress=False)
        row = dict(setting=setting, sampler=sampler, steps=int(steps), precision=precision, kid=result["kid_mean"],
                   kid_std=result["kid_std"], fid=result["fid"], conditioning_accuracy=result["conditioning_accuracy"],
                   generation_s=result["timing_s"]["generation"])
        rows.append(row)
        print(row, flush=True)
    reference = rows[0]
    lines = [f"# Sampler parity: `{args.model}` stages {stages} ({resolution} px) on `{args.data}` test",
             "", f"{args.n} generated images (the same captions and seeds for every setting) against {args.n_real} real "
             f"test images; guidance and thresholding: the cascade's defaults; CPU, {args.threads} threads, torch "
             f"{torch.__version__}; wall time {time.time() - started:.0f} s.", "",
             f"| sampler | steps | U-Net precision | KID x1e3 (+- subset std) | KID - {reference['setting']} in stds | FID "
             "| conditioning accuracy | generation images/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = (r["kid"] - reference["kid"]) / max(r["kid_std"], reference["kid_std"])
        acc = r["conditioning_accuracy"]
        # eval.json times generation to 0.1 s: a tiny run can read 0.0, too fast to give a rate
        rate = f"{args.n / r['generation_s']:.2f}" if r["generation_s"] > 0 else "-"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['precision']} | {r['kid'] * 1e3:.1f} +- "
                     f"{r['kid_std'] * 1e3:.1f} | {gap:+.2f} | {r['fid']:.1f} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {rate} |")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    lines += ["", f"Command: `python benchmarks/sampler_parity.py {flags}{' --out ' + args.out if args.out else ''}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
