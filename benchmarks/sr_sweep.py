"""Why does the SR stage lose to bicubic upsampling? Its sampling settings swept on fixed base samples (issue #19).

The base stage samples N images once (captions drawn from the evaluated split, image i with seed i, the cascade's
sampling settings); every row then super-resolves those same 16 px images with one SR setting (noise-augmentation
level of the low-res input, guidance, thresholding, steps), with the same SR noise seeds, and is measured against the
same real images (TF-Inception features: FID, KID, precision / recall). The first row is the bar: the same base
images upsampled bicubically. Settings cost minutes; training costs hours, so this comes first.

`--real-lowres SPLIT` replaces the base samples by another split's real images shrunk to the base's size (area
averaging, as training shrinks them), captioned as they are, measured against `--split` as usual: it separates the SR
stage's own skill from the base samples' faults (if the SR stage loses to bicubic even on real low-res images, no
sampling setting of the base will save it).
`--guidance` sets the guidance weight of the base and of every row (default: the cascade's).

    python benchmarks/sr_sweep.py --model cifar10 --data cifar10 --n 256 --n-real 1000 \
        --out benchmarks/results/sr_sweep_cifar10_cpu.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imagen_transfer import openmp
from imagen_transfer.cascade import load_cascade
from imagen_transfer.data import resize, to_float
from imagen_transfer.datasets import load_dataset
from imagen_transfer.measure import draw_captions, reference_features
from imagen_transfer.metrics import extract_features, fid, kid, load_feature_net, precision_recall
from imagen_transfer.sampling import sample_stage, to_gray, to_uint8
from imagen_transfer.sources import open_source
from imagen_transfer.text import EmbeddingCache, default_cache_dir, load_text_encoder

# (label, SR sampling overrides, noise-augmentation level at sampling)
SETTINGS = [
    ("aug level 100, the cascade's other settings", {}, 100),
    ("aug level 0", {}, 0),
    ("aug level 50", {}, 50),
    ("aug level 250", {}, 250),
    ("guidance 1", {"guidance": 1.0}, 100),
    ("guidance 1, aug level 0", {"guidance": 1.0}, 0),
    ("static thresholding", {"thresholding": "static"}, 100),
    ("no thresholding", {"thresholding": "off"}, 100),
]


def measure(images: torch.Tensor, real: torch.Tensor, net) -> dict:
    fake = extract_features(net, images, batch_size=64, progress=False)
    kid_mean, kid_std, _ = kid(real, fake, seed=0)
    precision, recall = precision_recall(real, fake, k=3)
    return dict(fid=fid(real, fake), kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", nargs="*", type=int, default=None, help="indices of SETTINGS to run")
    parser.add_argument("--real-lowres", default=None, metavar="SPLIT",
                        help="super-resolve this split's real images, shrunk (not --split: its images are the "
                        "reference)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the cascade's")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    if args.real_lowres == args.split:
        parser.error("--real-lowres needs a split other than --split (whose images are the reference)")

    cascade = load_cascade(args.model)
    base, sr = cascade.stages[0], cascade.stages[-1]
    settings = dict(cascade.sampling)
    gray = settings.pop("grayscale", False)
    if args.guidance is not None:
        settings["guidance"] = args.guidance
    source = open_source(args.data)  # resolved once for the sweep
    data = load_dataset(source, args.split, resolution=sr.resolution, channels=3)
    if args.real_lowres:
        lowres_data = load_dataset(source, args.real_lowres, resolution=sr.resolution, channels=3)
        picked = torch.randperm(len(lowres_data), generator=torch.Generator().manual_seed(0))[: args.n]
        prompts = [lowres_data.captions[i] for i in picked.tolist()]
    else:
        prompts, _ = draw_captions(data, args.n, seed=0)
    encode = EmbeddingCache(load_text_encoder(cascade.text_encoder), default_cache_dir())
    null = encode([""])
    net, net_id = load_feature_net(None)
    real, info = reference_features(source, args.split, sr.resolution, net, net_id, n_real=args.n_real, seed=0,
                                    data=data, progress=True)

    started = time.time()
    if args.real_lowres:
        low = resize(to_float(lowres_data.images[picked]), base.resolution)
    else:
        lows = []
        for start in range(0, args.n, args.batch):
            chunk = prompts[start : start + args.batch]
            gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            lows.append(sample_stage(base, encode(chunk), null, gens, progress=False, **settings))
        low = torch.cat(lows)
    base_s = time.time() - started
    bicubic = torch.nn.functional.interpolate(low, size=(sr.resolution,) * 2, mode="bicubic").clamp(-1, 1)
    bar = "real low-res + bicubic (the bar)" if args.real_lowres else "base + bicubic (the bar)"
    rows = [(bar, measure(to_uint8(to_gray(bicubic) if gray else bicubic), real, net), 0.0)]
    print(rows[-1], flush=True)
    chosen = [SETTINGS[i] for i in args.only] if args.only is not None else SETTINGS
    for label, overrides, level in chosen:
        sr.aug_level_sample = level
        t0 = time.time()
        outs = []
        for start in range(0, args.n, args.batch):
            chunk = prompts[start : start + args.batch]
            gens = [torch.Generator().manual_seed(10**6 + start + i) for i in range(len(chunk))]
            x = sample_stage(sr, encode(chunk), null, gens, lowres=low[start : start + args.batch], progress=False,
                             **{**settings, **overrides})
            outs.append(to_gray(x) if gray else x)
        rows.append((label, measure(to_uint8(torch.cat(outs)), real, net), time.time() - t0))
        print(rows[-1], flush=True)

    inputs = (f"{args.n} real {args.real_lowres} images shrunk to {base.resolution} px (area) with their captions"
              if args.real_lowres else f"{args.n} base samples ({base.resolution} px, the cascade's base settings, "
              f"seeds 0..{args.n - 1})")
    lines = [f"SR sampling settings on `{args.model}`, {args.data} {args.split}: the same {inputs}, guidance "
             f"{settings['guidance']}, super-resolved to {sr.resolution} px per "
             f"row, against {info['n_real']} real images (TF-Inception; KID std over 100 subsets). "
             f"Base sampling {base_s:.0f} s; torch threads {torch.get_num_threads()}.", "",
             "| SR setting | FID | KID (std) | precision | recall | SR seconds |", "|---|---|---|---|---|---|"]
    for label, m, seconds in rows:
        lines.append(f"| {label} | {m['fid']:.1f} | {m['kid']:.3f} ({m['kid_std']:.3f}) | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {seconds:.0f} |")
    flags = " --only " + " ".join(map(str, args.only)) if args.only is not None else ""
    flags += f" --real-lowres {args.real_lowres}" if args.real_lowres else ""
    flags += f" --guidance {args.guidance}" if args.guidance is not None else ""
    lines += ["", "Reproduce: `python benchmarks/sr_sweep.py --model " + args.model + f" --data {args.data} --split "
              f"{args.split} --n {args.n} --n-real {args.n_real}{flags} --out {args.out}`"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, args={k: str(v) for k, v in
                                                                              vars(args).items()}), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
