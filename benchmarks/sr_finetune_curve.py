"""How the fine-tuned cascade's samples move against their bicubic bar as its SR stage trains on the target.

Runs the demo's fine-tuning (jobs/demo.finetune_config: both stages, early stopping off here) with the given SR
steps and learning rate, keeps the cascade every `--every` SR steps (its EMA weights, through the training loop's
validation hook: the learning rate there is mid-way down the cosine to --sr-steps, so a point is not a run that
ends at that step), and evaluates each kept cascade as the demo does (N generated vs every real test image,
guidance 1.5, the same captions and seeds), the first also against its own base samples upsampled bicubically: the
base stage is the same for all of them, so that bar is too. Issue #19: after the demo's old 80 SR steps at 1e-4 the
cascade lost to that bar on X-rays.

    python benchmarks/sr_finetune_curve.py --sr-steps 600 --lr 3e-4 --every 200 --out runs/sr-curve \
        --table benchmarks/results/sr_finetune_curve_cpu.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from imagen_transfer import openmp
from imagen_transfer.cascade import save_cascade
from imagen_transfer.evaluate import evaluate
from imagen_transfer.jobs.demo import FULL, finetune_config
from imagen_transfer.train import train

METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10")
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--steps", type=int, default=FULL["steps"], help="base-stage steps")
    parser.add_argument("--sr-steps", type=int, default=FULL["sr_steps"])
    parser.add_argument("--lr", type=float, default=None, help="default: the method's (1e-4 for full)")
    parser.add_argument("--aug-level", type=int, default=None, help="SR sampling level; default: the source's")
    parser.add_argument("--every", type=int, default=200, help="keep the cascade every N SR steps")
    parser.add_argument("--n", type=int, default=FULL["n_eval"])
    parser.add_argument("--batch", type=int, default=FULL["batch"])
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps; default: the cascade's")
    parser.add_argument("--precision", default="auto", help="sampling precision: no | bf16 | auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    openmp.auto_threads()  # results, not timings: the thread count follows the load as the command line's does
    if args.every < 1 or args.sr_steps < args.every:
        parser.error("--every must be between 1 and --sr-steps")

    settings = {**FULL, "steps": args.steps, "sr_steps": args.sr_steps, "lr": args.lr, "aug_level": args.aug_level,
                "val_every": args.every, "batch": args.batch}
    config = finetune_config(args.out / "run", settings, args.source, args.data)
    config.train.early_stopping_patience = 0  # the whole curve, not its best point
    kept = args.out / "by-step"

    def keep(cascade, stage, step):
        if stage.name == "sr" and step % args.every == 0:
            save_cascade(cascade, kept / f"sr-{step:05d}", overwrite=True)

    started = time.time()
    train(config, on_validation=keep)
    train_s = time.time() - started
    rows, bar = {}, None
    sampling = dict(guidance=1.5, precision=args.precision, steps=args.sample_steps)
    for folder in sorted(kept.iterdir()):
        result = evaluate(str(folder), args.data, split="test", n=args.n, seed=0, progress=False, sampling=sampling,
                          bicubic_baseline=bar is None, out=args.out / f"eval-{folder.name}.json")
        bar = bar or {k: result["bicubic_baseline"].get(k) for k in METRICS}
        step = int(folder.name.split("-")[1])
        rows[step] = {k: result.get(k) for k in METRICS}
        print(folder.name, rows[step], flush=True)
    (args.out / "curve.json").write_text(json.dumps(dict(bar=bar, rows=rows, train_s=train_s, args={
        k: str(v) for k, v in vars(args).items()}), indent=1))
    text = table(args, bar, rows, train_s)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)


def table(args, bar: dict, rows: dict, train_s: float) -> str:
    lr = args.lr if args.lr is not None else "the method's default"
    aug = args.aug_level if args.aug_level is not None else "the source's"
    lines = [f"`{args.source}` fine-tuned on {args.data} ({args.steps} base steps; {args.sr_steps} SR steps, the cascade "
             f"kept every {args.every} (warmup + cosine to step {args.sr_steps}); lr {lr}, batch {args.batch}; SR "
             f"sampling aug level {aug}; training {train_s:.0f} s), each kept cascade evaluated on the test split: "
             f"N={args.n} generated vs all real test images, guidance 1.5, the same captions and seeds.", "",
             "| 32 px images | FID | KID (std) | precision | recall | conditioning acc. |", "|---|---|---|---|---|---|"]
    for label, m in [("base + bicubic (the bar)", bar), *((f"cascade, SR step {s}", rows[s]) for s in sorted(rows))]:
        acc = m.get("conditioning_accuracy")
        lines.append(f"| {label} | {m['fid']:.1f} | {m['kid_mean']:.3f} ({m['kid_std']:.3f}) | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {'-' if acc is None else f'{acc:.3f}'} |")
    flags = f" --lr {args.lr}" if args.lr is not None else ""
    flags += f" --batch {args.batch}" if args.batch != FULL["batch"] else ""
    flags += f" --aug-level {args.aug_level}" if args.aug_level is not None else ""
    lines += ["", f"Reproduce: `python benchmarks/sr_finetune_curve.py --steps {args.steps} --sr-steps {args.sr_steps}"
              f"{flags} --every {args.every} --n {args.n} --out {args.out}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
