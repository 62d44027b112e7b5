"""Every fusion against the single fine-tuned model, one table, the same evaluation protocol for all.

Inputs: the source (`cifar10`), a fine-tune of both stages (F), and a second fine-tune of the base stage (G, e.g. on
5% of the data). Weight-space fusions act on the base stage and keep F's SR stage:

    python benchmarks/fusion_pneumonia.py --finetuned runs/pneumonia-full-sr/cascade \
        --second runs/pneumonia-5pct-full/cascade --out runs/fusion --n 256 \
        --table benchmarks/results/fusion_pneumonia_cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imagen_transfer import openmp
from imagen_transfer.cascade import load_cascade, save_cascade
from imagen_transfer.evaluate import evaluate
from imagen_transfer.fusion import merge_cascades


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="cifar10")
    p.add_argument("--finetuned", required=True)
    p.add_argument("--second", required=True)
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=None, help="sampling steps per stage (default: the fine-tune's own)")
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="no",
                   help="autocast of the U-Net calls while sampling (no: fp32; auto: bf16 where the CPU runs it "
                        "natively, same KID and faster: docs/performance.md)")
    p.add_argument("--out", default="runs/fusion")
    p.add_argument("--table", default=None)
    args = p.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source, tuned, second = load_cascade(args.source), load_cascade(args.finetuned), load_cascade(args.second)
    keep_sr = {"sr": tuned}
    models = {
        "fine-tuned F (single model)": (tuned, None),
        "interpolation 0.5 source + 0.5 F": (merge_cascades([source, tuned], ["source", "F"], weights=[0.5, 0.5],
                                                           stage_from=keep_sr), None),
        "interpolation 0.25 source + 0.75 F": (merge_cascades([source, tuned], ["source", "F"],
                                                             weights=[0.25, 0.75], stage_from=keep_sr), None),
        "uniform soup F + G": (merge_cascades([tuned, second], ["F", "G"], stage_from=keep_sr), None),
        "TIES (density 0.5) F + G on source": (merge_cascades([tuned, second], ["F", "G"], method="ties", base=source,
                                                              density=0.5, stage_from=keep_sr), None),
        "guidance between models 1.5 F - 0.5 source": (tuned, [(source, -0.5)]),
        "ensemble 0.5 F + 0.5 G (outputs)": (tuned, [(merge_cascades([second], ["G"], stage_from=keep_sr), 0.5)]),
    }
    rows = []
    for i, (name, (cascade, mix)) in enumerate(models.items()):
        folder = out / f"model-{i}"
        cascade.sampling = dict(tuned.sampling)
        save_cascade(cascade, folder, overwrite=True)
        print(f"\n== {name} ==", flush=True)
        sampling = dict(guidance=args.guidance, steps=args.steps, precision=args.precision)
        result = evaluate(str(folder), args.data, n=args.n, sampling=sampling, mix=mix, out=out / f"eval-{i}.json")
        rows.append((name, result))
    steps = args.steps or tuned.sampling["steps"]
    lines = [f"Fusions on {args.data} test (N={args.n} generated per row vs {rows[0][1]['n_real']} real, guidance "
             f"{args.guidance}, {steps} steps per stage, precision {args.precision}, seed 0, same captions and seeds "
             "for every row). Lower FID / KID is better.", "",
             "| model | FID | KID (x1e3) | precision | recall | conditioning acc. |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} +- {1e3 * r['kid_std']:.1f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['conditioning_accuracy']:.3f} |")
    judge = rows[0][1].get("judge", {})
    lines += ["", f"Judge: {judge.get('trained_on')}, accuracy on real test images {judge.get('real_accuracy', 0):.3f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "fusion.json").write_text(json.dumps({n: r for n, r in rows}, indent=1))
    if args.table:
        Path(args.table).write_text(f"# Fusion vs the single fine-tuned model\n\n```\npython {' '.join(sys.argv)}\n```\n\n"
                                    + text)


if __name__ == "__main__":
    main()
