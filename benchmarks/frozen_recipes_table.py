"""One table of the frozen-feature recipes measured by benchmarks/frozen_recipes.sh: per feature folder (stage,
noise draws) and head recipe (linear or MLP head, the best single view or the three best concatenated), the view
chosen on validation, validation and test accuracy, and the extraction's wall time and disk.

    python benchmarks/frozen_recipes_table.py OUT [--out table.md]

It probes each folder of OUT (named in OUT/timings.jsonl) four ways into OUT/<name>/<recipe>/ unless already there,
as `probe --features F [--head mlp] [--concat 3]` does. Every row shares images, noise seeds and head protocol, so the
differences are the recipes'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imagen_transfer import openmp
from imagen_transfer.probe import run_probe

RECIPES = {"linear": dict(head="linear"), "linear, 3 best views": dict(head="linear", concat=3),
           "mlp": dict(head="mlp"), "mlp, 3 best views": dict(head="mlp", concat=3)}  # probe --head H --concat K


def probe(folder: Path, recipe: str) -> dict:
    out = folder / recipe.replace(", ", "-").replace(" ", "-")
    if not (out / "probe-classification.json").is_file():
        run_probe(folder, out=out, progress=False, **RECIPES[recipe])
    return json.loads((out / "probe-classification.json").read_text())


def table(root: Path) -> tuple[str, list[dict]]:
    runs = [json.loads(line) for line in (root / "timings.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for run in runs:
        for recipe in RECIPES:
            best = probe(root / run["name"], recipe)["best"]["source"]
            rows.append(dict(features=run["name"], args=run["args"], recipe=recipe, view=best["view"], lr=best["lr"],
                             val_accuracy=best["val_accuracy"], test_accuracy=best["test"]["accuracy"],
                             test_auc=best["test"]["auc"], features_s=run["features_s"], megabytes=run["bytes"] / 1e6))
    lines = ["| features | head | view chosen | val acc | test acc | test AUC | extraction | disk |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['features']} (`{r['args']}`) | {r['recipe']} | {r['view']} | {r['val_accuracy']:.3f} | "
                     f"{r['test_accuracy']:.3f} | {r['test_auc']:.3f} | {r['features_s'] / 60:.1f} min | "
                     f"{r['megabytes']:.0f} MB |")
    return "\n".join(lines) + "\n", rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the table (and a .json beside it) here")
    args = parser.parse_args()
    # the probes run in this process: their thread count follows the load (or IMAGEN_TRANSFER_THREADS) as the
    # command line's does; at torch's default beside other jobs the MLP heads' small steps ran ~70x slower
    openmp.auto_threads()
    text, rows = table(args.root)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
