"""A soup of shard fine-tunes against one fine-tune on all the data, at the same total compute (issue #38).

K fine-tunes of the same source, each on one of K disjoint class-balanced shards of the training images
(`data.shards=K data.shard=k`) for steps / K steps, averaged weight by weight (`merge`, uniform), against one
fine-tune on every image for `steps` steps (Diffusion Soup, Biggs et al. 2024). Early stopping is off in every run so
the compute is equal; every model is evaluated with the same captions, seeds and real images:

    python benchmarks/shard_soup.py --source cifar10 --data pneumoniamnist --config configs/finetune-pneumonia.yaml \
        --shards 2 --steps 400 --n 512 --out runs/soup --table benchmarks/results/shard_soup_pneumonia_cpu.md

`--single CASCADE` reuses a fine-tune on all the data made with the same config (e.g. the demo's, whose resolved
`config.yaml` is then `--config`), `--parts` also scores each shard's fine-tune alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import publish_fusion

from imagen_transfer import openmp
from imagen_transfer.cascade import load_cascade, save_cascade
from imagen_transfer.config import load_config
from imagen_transfer.evaluate import evaluate
from imagen_transfer.fusion import merge_cascades
from imagen_transfer.train import train

FIELDS = ("fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy")


def finetune(args, name: str, parts: int, *overrides: str) -> Path:
    """Fine-tune the source for 1 / `parts` of the config's steps (each stage's, `train.stage_steps` included)."""
    run = Path(args.out) / name
    if (run / "cascade" / "cascade.json").is_file():
        return run / "cascade"  # a rerun reuses what finished
    steps = args.steps // parts
    config = load_config(args.config, [f"model.init_from={args.source}", f"data.dataset={args.data}",
                                       f"train.steps={steps}", "train.early_stopping_patience=0", "train.keep_steps=[]",
                                       f"train.checkpoint_every={steps}", f"train.sample_every={steps}", *overrides,
                                       *args.set])
    config.train.stage_steps = {k: v // parts for k, v in config.train.stage_steps.items()}
    config.out = str(run)
    return train(config) / "cascade"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="cifar10")
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--config", default=None, help="the fine-tuning config (e.g. configs/finetune-pneumonia.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--steps", type=int, default=400, help="the total step budget (each shard gets steps / shards)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--n-real", type=int, default=None)
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="auto")
    p.add_argument("--guidance", type=float, default=None, help="CFG weight of every row (default: each model's own)")
    p.add_argument("--single", default=None, help="a fine-tune on all the data with the same config (skips training it)")
    p.add_argument("--parts", action="store_true", help="also evaluate each shard's fine-tune alone")
    p.add_argument("--out", default="runs/soup")
    p.add_argument("--table", default=None)
    args = p.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    whole = Path(args.single) if args.single else finetune(args, "all", 1)
    parts = [finetune(args, f"shard-{k}", args.shards, f"data.shards={args.shards}",
                      f"data.shard={k}") for k in range(args.shards)]
    cascades = [load_cascade(part) for part in parts]
    soup = merge_cascades(cascades, [f"shard-{k}" for k in range(args.shards)])
    soup.sampling = dict(cascades[0].sampling)
    save_cascade(soup, Path(args.out) / "soup", overwrite=True)
    models = {"single": whole, f"soup of {args.shards} shard fine-tunes": Path(args.out) / "soup",
              **({f"shard {k} alone": part for k, part in enumerate(parts)} if args.parts else {})}
    rows = []
    for i, (name, folder) in enumerate(models.items()):
        r = evaluate(str(folder), args.data, n=args.n, n_real=args.n_real, sampling=dict(guidance=args.guidance, precision=args.precision),
                     out=Path(args.out) / f"eval-{i}.json", progress=False)
        rows.append(dict(name=name, n=r["n_generated"], n_real=r["n_real"], **{k: r[k] for k in FIELDS}))
    lines = [f"{args.data} test, N = {rows[0]['n']} generated per row against {rows[0]['n_real']} real images; "
             f"the same fine-tuning steps in all for each of the first two rows (a shard: 1 / {args.shards} of each "
             "stage's). Lower FID / KID is better.", "",
             "| model | FID | KID (x1e3) | precision | recall |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} +- {1e3 * r['kid_std']:.1f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |" for r in rows]
    (Path(args.out) / "soup.json").write_text(json.dumps(rows, indent=1))
    publish_fusion("A soup of shard fine-tunes", sys.argv, "\n".join(lines) + "\n", rows, args.table)


if __name__ == "__main__":
    main()
