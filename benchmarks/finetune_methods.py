"""Fine-tune the source cascade with every transfer method and tabulate what each costs and reaches.

Each method runs as its own `imagen-transfer finetune` process (so peak memory is per method), from the same source,
data, steps, batch and seed; the table is read back from the run folders' metrics.jsonl:

    python benchmarks/finetune_methods.py --source cifar10 --data pneumoniamnist --out runs/methods \
        --table benchmarks/results/finetune_methods_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from imagen_transfer.checkpoint import read_jsonl

METHODS = ["full", "freeze", "bitfit", "difffit", "lora"]


def summarise(run: Path) -> dict:
    rows = read_jsonl(run / "metrics.jsonl")
    trainable = next(r for r in rows if r.get("event") == "trainable")
    train_rows = [r for r in rows if "seconds_per_step" in r]
    vals = [r for r in rows if "val_loss" in r]
    best = min(vals, key=lambda r: r["val_loss"])
    stop = next((r["step"] for r in rows if r.get("early_stop")), None)
    return dict(trainable=trainable["trainable"], percent=trainable["percent"],
                seconds_per_step=statistics.median(r["seconds_per_step"] for r in train_rows),
                peak_mb=max(r["peak_memory_mb"] for r in train_rows), best_val=best["val_loss"], best_step=best["step"],
                first_val=vals[0]["val_loss"], stopped=stop, steps=train_rows[-1]["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10")
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--config", default="configs/finetune-pneumonia.yaml")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for method in args.methods:
        run = args.out / method
        if not (run / "cascade" / "cascade.json").is_file():
            command = [sys.executable, "-m", "imagen_transfer", "finetune", "--source", args.source, "--data",
                       args.data, "--method", method, "--config", args.config, "--out", str(run)]
            if args.set:
                command += ["--set", *args.set]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        results[method] = summarise(run)
    lines = [f"# Transfer methods: {args.source} -> {args.data} ({args.config}{', ' + ' '.join(args.set) if args.set else ''})",
             "", "| method | trainable | trainable % | s / step | peak memory (MB) | first val loss | best val loss (step) | early stop |",
             "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['trainable']:,} | {r['percent']:.3f}% | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_mb']:.0f} | {r['first_val']:.4f} | {r['best_val']:.4f} ({r['best_step']}) | "
                     f"{'step ' + str(r['stopped']) if r['stopped'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)


if __name__ == "__main__":
    main()
