"""Autoguidance against the model's own CFG sampling, one table, one evaluation protocol (issue #38).

The model (a cascade, or a run's `RUN/step-N`) is sampled with its own classifier-free guidance (`single`), then
autoguided by each guide (weaker versions of it on the same data: earlier checkpoints of its run kept with
`train.keep_steps`, or a shorter run's cascade) at each weight (Karras et al. 2024: guide + w (model - guide)).
Every row draws the same captions and seeds and is scored against the same real images:

    python benchmarks/autoguidance.py --model runs/xray/cascade --guides runs/xray/step-100 runs/xray/step-300 \
        --weights 1.5 2 2.5 3 --data pneumoniamnist --n 512 --out runs/autoguidance \
        --table benchmarks/results/autoguidance_pneumonia_cpu.md

Beside the table, a JSON with each row's name, n, kid, kid_std, fid, precision, recall (and the guide and weight).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import publish_fusion

from imagen_transfer import openmp
from imagen_transfer.evaluate import evaluate

FIELDS = ("fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy")


def rows_of(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(n=args.n, n_real=args.n_real, feature_net=args.feature_net, judge=not args.no_judge,
                  progress=False)
    plans = [dict(name="single", guide=None, weight=args.cfg)]
    plans += [dict(name=f"single, CFG {w:g}", guide=None, weight=w) for w in args.cfg_sweep]
    plans += [dict(name=f"autoguidance w={w:g}, guide {Path(g).name}", guide=g, weight=w)
              for g in args.guides for w in args.weights]
    rows = []
    for i, plan in enumerate(plans):
        print(f"== {plan['name']} ==", flush=True)
        sampling = dict(guidance=plan["weight"], steps=args.steps, precision=args.precision)
        r = evaluate(args.model, args.data, sampling=sampling, guide=plan["guide"], out=out / f"eval-{i}.json",
                     bicubic_baseline=args.bicubic and i == 0, **common)
        rows.append(dict(plan, n=r["n_generated"], n_real=r["n_real"], **{k: r.get(k) for k in FIELDS}))
        if args.bicubic and i == 0 and r.get("bicubic_baseline"):
            b = r["bicubic_baseline"]
            rows.append(dict(name="bicubic (single's base samples upsampled)", guide=None, weight=args.cfg,
                             n=r["n_generated"], n_real=r["n_real"], **{k: b.get(k) for k in FIELDS}))
    return rows


def table(rows: list[dict], args) -> str:
    lines = [f"{args.data} test, N = {rows[0]['n']} generated per row against {rows[0]['n_real']} real images, "
             f"seed 0, the same captions and seeds in every row; `single` is the model with its own CFG "
             f"(w = {args.cfg:g}). Lower FID / KID is better.", "",
             "| row | FID | KID (x1e3) | precision | recall | conditioning acc. |", "|---|---|---|---|---|---|"]
    for r in rows:
        cond = f"{r['conditioning_accuracy']:.3f}" if r.get("conditioning_accuracy") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} +- {1e3 * r['kid_std']:.1f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {cond} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a cascade folder, shipped name or RUN/step-N")
    p.add_argument("--guides", nargs="+", required=True, help="weaker versions of it: cascades or RUN/step-N")
    p.add_argument("--weights", nargs="+", type=float, default=[1.5, 2.0, 2.5, 3.0])
    p.add_argument("--cfg", type=float, default=None, help="the single model's CFG weight (default: its own)")
    p.add_argument("--cfg-sweep", nargs="*", type=float, default=[], help="more rows: the single model at these CFG weights")
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--n-real", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="auto")
    p.add_argument("--feature-net", default=None)
    p.add_argument("--no-judge", action="store_true")
    p.add_argument("--bicubic", action="store_true", help="also the bicubic bar from the single row's base samples")
    p.add_argument("--out", default="runs/autoguidance")
    p.add_argument("--table", default=None)
    args = p.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    rows = rows_of(args)
    if args.cfg is None:
        args.cfg = json.loads((Path(args.out) / "eval-0.json").read_text())["sampling"]["guidance"]
        for r in rows:
            r["weight"] = args.cfg if r["guide"] is None else r["weight"]
    (Path(args.out) / "autoguidance.json").write_text(json.dumps(rows, indent=1))
    publish_fusion("Autoguidance against CFG", sys.argv, table(rows, args), rows, args.table)


if __name__ == "__main__":
    main()
