"""TF-Inception in bf16 against fp32 on fixed image sets: the FID / KID shift and the speed-up (issue #39).

The real reference is a split of the data set (all its images, or --n-real); each compared set is fixed and
named: real images of another split (KID near 0), the same images reduced to a quarter of their side and upsampled
bicubically (a blurred set, the distance of a weak generator), and, with --other, another data set's images (a
large distance, as a source model's samples on a new domain). Both precisions see the same pixels; the table gives
each metric in fp32 and bf16 and the KID shift in the KID's own subset std. Timing: features of all images, the
two precisions alternating over --repeats rounds, images/s each and their ratio (one process, the same cores).

    python benchmarks/inception_bf16.py --data pneumoniamnist --other cifar10 --n 128 \\
        --out benchmarks/results/inception_bf16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import imagen_transfer  # noqa: F401  (first: it configures OpenMP before torch loads it)
from imagen_transfer.datasets import load_dataset
from imagen_transfer.metrics import extract_features, fid, kid, load_feature_net, precision_recall
from imagen_transfer.openmp import cpu


def blurred(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) reduced to a quarter of their side and upsampled back bicubically."""
    x = images.permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True)
    back = torch.nn.functional.interpolate(small, size=x.shape[-2:], mode="bicubic")
    return back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--split", default="test", help="the real reference split")
    p.add_argument("--other-split", default="val", help="the split whose images are compared")
    p.add_argument("--other", default=None, help="another data set, compared as a far set (e.g. cifar10)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--n", type=int, default=128, help="images in each compared set")
    p.add_argument("--n-real", type=int, default=None, help="real reference images (default: the whole split)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--feature-net", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    real = load_dataset(args.data, args.split, resolution=args.resolution, channels=3).images[: args.n_real]
    near = load_dataset(args.data, args.other_split, resolution=args.resolution, channels=3).images[: args.n]
    sets = {f"{args.data} {args.other_split} (real)": near, f"{args.data} {args.other_split}, 1/4 side, bicubic":
            blurred(near)}
    if args.other:
        sets[f"{args.other} {args.split}"] = load_dataset(args.other, args.split, resolution=args.resolution,
                                                          channels=3).images[: args.n]
    nets = {"fp32": load_feature_net(args.feature_net)[0], "bf16": load_feature_net(args.feature_net, bf16=True)[0]}
    everything = torch.cat([real, *sets.values()])
    seconds: dict[str, list[float]] = {k: [] for k in nets}
    features: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name in nets if r % 2 == 0 else reversed(nets):
            start = time.perf_counter()
            features[name] = extract_features(nets[name], everything, progress=False)
            seconds[name].append(time.perf_counter() - start)
            print(f"round {r}: {name} {len(everything) / seconds[name][-1]:.2f} images/s", flush=True)
    speed = {k: len(everything) / statistics.median(v) for k, v in seconds.items()}

    rows = []
    for i, (name, images) in enumerate(sets.items()):
        start = len(real) + sum(len(s) for s in list(sets.values())[:i])
        row = dict(set=name, n=len(images))
        for precision, f in features.items():
            r, g = f[: len(real)], f[start : start + len(images)]
            k, k_std, _ = kid(r, g)
            pr = precision_recall(r, g)
            row[precision] = dict(fid=fid(r, g), kid=k, kid_std=k_std, precision=pr[0], recall=pr[1])
        row["kid_shift_in_std"] = (row["bf16"]["kid"] - row["fp32"]["kid"]) / row["fp32"]["kid_std"]
        row["fid_shift"] = row["bf16"]["fid"] - row["fp32"]["fid"]
        rows.append(row)
    drift = (features["bf16"] - features["fp32"]).norm(dim=1) / features["fp32"].norm(dim=1)
    print(f"\n{len(everything)} images; fp32 {speed['fp32']:.2f} images/s, bf16 {speed['bf16']:.2f} "
          f"({speed['bf16'] / speed['fp32']:.2f}x); feature change |bf16 - fp32| / |fp32|: median "
          f"{drift.median():.4f}, max {drift.max():.4f}\n")
    print(f"| set (vs {len(real)} real {args.split} images) | FID fp32 | FID bf16 | KID x1e3 fp32 | KID x1e3 bf16 | "
          "KID shift in std | precision / recall fp32 | bf16 |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, b = row["fp32"], row["bf16"]
        print(f"| {row['set']} | {a['fid']:.2f} | {b['fid']:.2f} | {1e3 * a['kid']:.2f} +- {1e3 * a['kid_std']:.2f} | "
              f"{1e3 * b['kid']:.2f} +- {1e3 * b['kid_std']:.2f} | {row['kid_shift_in_std']:+.2f} | "
              f"{a['precision']:.3f} / {a['recall']:.3f} | {b['precision']:.3f} / {b['recall']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            cpu=cpu(), threads=torch.get_num_threads(), images=len(everything), n_real=len(real),
            images_per_s=speed, speedup=speed["bf16"] / speed["fp32"], seconds=seconds,
            feature_change=dict(median=float(drift.median()), max=float(drift.max())), rows=rows,
            command="python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])), indent=1))


if __name__ == "__main__":
    main()
