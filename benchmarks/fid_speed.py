"""FID's matrix square root: ours (a symmetric eigenproblem, metrics.fid) against torchmetrics' general eigenvalues
of the d x d covariance product, on the set sizes the toolkit's evaluations use (issue #39).

Features are synthetic (ReLU of correlated Gaussians at TF-Inception's d = 2048): the cost of the square root does not
depend on their values. Both are timed in one process on the same cores, alternating over --repeats rounds, each
from the raw features (covariances included); the table gives the medians, their ratio and the two values' gap.

    python benchmarks/fid_speed.py --out benchmarks/results/fid_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchmetrics.image.fid import _compute_fid

import imagen_transfer  # noqa: F401  (first: it configures OpenMP before torch loads it)
from imagen_transfer.metrics import fid
from imagen_transfer.openmp import cpu

# (real, generated): --quick's evaluation, the demo's, `evaluate` on cifar10 (N = 500 against its 10k test images),
# and two sets larger than d
SIZES = ((256, 64), (624, 128), (10_000, 500), (3_000, 3_000))


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    return float(_compute_fid(fake.mean(0), torch.cov(fake.T), real.mean(0), torch.cov(real.T)))


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="pairs: real generated real generated ...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = list(zip(args.sizes[::2], args.sizes[1::2])) if args.sizes else SIZES
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(args.dim, args.dim, generator=g, dtype=torch.float64) / args.dim ** 0.5
    rows = []
    for n_real, n_fake in sizes:
        real = torch.relu(torch.randn(n_real, args.dim, generator=g, dtype=torch.float64) @ mix)
        fake = torch.relu(torch.randn(n_fake, args.dim, generator=g, dtype=torch.float64) @ mix + 0.05)
        times = {"ours": [], "torchmetrics": []}
        for _ in range(args.repeats):
            ours, t = timed(fid, real, fake)
            times["ours"].append(t)
            theirs, t = timed(torchmetrics_fid, real, fake)
            times["torchmetrics"].append(t)
        median = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(n_real=n_real, n_fake=n_fake, ours_s=round(median["ours"], 4),
                         torchmetrics_s=round(median["torchmetrics"], 4),
                         speedup=round(median["torchmetrics"] / median["ours"], 2), fid=ours, gap=abs(ours - theirs)))
    print("| real | generated | ours s | torchmetrics s | speed-up | FID | gap |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_real']} | {r['n_fake']} | {r['ours_s']:.3f} | {r['torchmetrics_s']:.3f} | {r['speedup']:.1f}x "
              f"| {r['fid']:.4f} | {r['gap']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps(dict(
            machine=f"{cpu()['name']}, {torch.get_num_threads()} threads, torch {torch.__version__}", dim=args.dim,
            repeats=args.repeats, command="python benchmarks/fid_speed.py " + " ".join(argv or sys.argv[1:]),
            rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
