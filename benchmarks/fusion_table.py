"""One fusion table on the X-ray target (issue #38): every fusion route against the single fine-tuned cascade.

Rows already measured by benchmarks/autoguidance.py (the single model, its bicubic bar, the autoguidance sweep) and
benchmarks/shard_soup.py (the soup of shard fine-tunes) are read from their JSON files; the routes that fuse with the
source are evaluated here under the same protocol (same N, captions, seeds, real images, the single model's own
sampling settings): weight interpolation towards the source (base stage; the fine-tune's SR stage kept), guidance
between models (F - source at the single model's guidance) and per-noise switching (the source at the noisiest
steps). Each evaluation is kept as eval-<i>.json in --out and reused by a rerun.

    python benchmarks/fusion_table.py --single runs/F/cascade --autoguidance runs/ag/autoguidance.json \
        --soup runs/soup/soup.json --n 512 --out runs/fusion-table --table benchmarks/results/fusion_xray_cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import publish_fusion

from imagen_transfer import openmp
from imagen_transfer.cascade import load_cascade, save_cascade
from imagen_transfer.evaluate import evaluate
from imagen_transfer.fusion import merge_cascades

FIELDS = ("fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy")


def source_rows(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuned, source = load_cascade(args.single), load_cascade(args.source)
    interpolated = merge_cascades([source, tuned], ["source", "F"], weights=[0.25, 0.75], stage_from={"sr": tuned})
    interpolated.sampling = dict(tuned.sampling)
    save_cascade(interpolated, out / "interpolation", overwrite=True)
    plans = [("interpolation 0.25 source + 0.75 F (base; F's SR)", dict(model=out / "interpolation")),
             (f"guidance between models {1 + args.away:g} F - {args.away:g} source",
              dict(model=args.single, mix=[(source, -args.away)])),
             (f"switch: source at t >= {args.switch_at}, F below", dict(model=args.single,
                                                                        switch=(args.source, args.switch_at)))]
    rows = []
    for i, (name, plan) in enumerate(plans):
        path = out / f"eval-{i}.json"
        if path.is_file():
            r = json.loads(path.read_text())
        else:
            print(f"== {name} ==", flush=True)
            r = evaluate(str(plan.pop("model")), args.data, n=args.n, n_real=args.n_real, judge=not args.no_judge,
                         sampling=dict(guidance=args.guidance, steps=args.steps, precision=args.precision),
                         out=path, progress=False, **plan)
        rows.append(dict(name=name, n=r["n_generated"], n_real=r["n_real"], **{k: r.get(k) for k in FIELDS}))
    return rows


def read_rows(path: str | None) -> list[dict]:
    """A benchmark's rows; a row without conditioning accuracy takes it from its eval-<i>.json beside (row i)."""
    if not path:
        return []
    rows = json.loads(Path(path).read_text())
    for i, row in enumerate(rows):
        beside = Path(path).parent / f"eval-{i}.json"
        if "conditioning_accuracy" not in row and beside.is_file():
            row["conditioning_accuracy"] = json.loads(beside.read_text()).get("conditioning_accuracy")
    return rows


def table(rows: list[dict], n: int, n_real: int) -> str:
    single = next(r for r in rows if r["name"] == "single")
    lines = [f"pneumoniamnist test, N = {n} generated per row against {n_real} real images, seed 0, the same captions "
             "and seeds in every row. Lower FID / KID is better; `vs single` is the KID change against the single "
             "fine-tuned cascade (negative: better), in its own std (sqrt of the two squared stds).", "",
             "| row | FID | KID (x1e3) | vs single | precision | recall | conditioning acc. |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cond = f"{r['conditioning_accuracy']:.3f}" if r.get("conditioning_accuracy") is not None else "n/a"
        diff = r["kid_mean"] - single["kid_mean"]
        std = (r["kid_std"] ** 2 + single["kid_std"] ** 2) ** 0.5
        vs = "" if r is single else f"{100 * diff / single['kid_mean']:+.0f}% ({diff / std:+.1f} std)"
        lines.append(f"| {r['name']} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} +- {1e3 * r['kid_std']:.1f} | {vs} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {cond} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--single", required=True, help="the fine-tuned cascade F (autoguidance.py's --model)")
    p.add_argument("--source", default="cifar10")
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--autoguidance", nargs="+", required=True,
                   help="autoguidance.py's autoguidance.json files (one sweep split over processes: the first holds "
                        "the single row; a row name seen before is skipped)")
    p.add_argument("--soup", default=None, help="shard_soup.py's soup.json")
    p.add_argument("--guidance", type=float, default=1.5, help="the CFG weight of the rows evaluated here (as the "
                   "single row's: autoguidance.py --cfg, shard_soup.py --guidance)")
    p.add_argument("--away", type=float, default=0.5, help="guidance between models: (1 + a) F - a source")
    p.add_argument("--switch-at", type=int, default=900)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--n-real", type=int, default=None, help="as the other rows' (default: the whole split)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per stage (default: the model's)")
    p.add_argument("--no-judge", action="store_true")
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="auto")
    p.add_argument("--out", default="runs/fusion-table")
    p.add_argument("--table", default=None)
    args = p.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    rows = []
    for path in [*args.autoguidance, args.soup]:  # the soup's single is autoguidance's, the same model and protocol
        rows += [r for r in read_rows(path) if r["name"] not in {seen["name"] for seen in rows}]
    rows += source_rows(args)
    if {r["n"] for r in rows} != {args.n}:
        raise SystemExit(f"rows with different N: {sorted({r['n'] for r in rows})}; rerun them at --n {args.n}")
    publish_fusion("Every fusion against the single fine-tuned X-ray cascade", sys.argv,
                   table(rows, args.n, rows[0]["n_real"]), rows, args.table)


if __name__ == "__main__":
    main()
