"""One table from classification probes of the same data at several feature seeds: each feature set's test accuracy
and AUC as mean +- std over the seeds, and its lead over the random-weights row against the seed spread.

    python benchmarks/probe_seeds.py runs/pneumonia/seed0/probe-classification.json runs/pneumonia/seed1/... \
        [--out table.md]

A feature seed changes the noise drawn for every image and the random-weights U-Net's initialisation (`features
--seed`), so the spread over seeds is what a difference between two rows must exceed to be more than chance. The
head (view, learning rate) is chosen on validation per seed, as `probe` does; the views chosen are listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_table(results: list[dict], reference: str = "random") -> str:
    """Markdown: per set, test accuracy and AUC over the runs (mean +- sample std), the views chosen, and for every
    set but `reference` the per-seed paired lead in accuracy over it (mean +- std)."""
    names = list(results[0]["best"])
    lines = [f"Feature seeds: {len(results)}; test n = {results[0]['n']['test']}; head {results[0]['head']}, view and "
             "learning rate chosen on validation per seed.", "",
             f"| features | test acc | test AUC | lead over {reference} (acc, paired) | views chosen |",
             "|---|---|---|---|---|"]
    for name in names:
        best = [r["best"][name] for r in results]
        acc, auc = (_mean_std([b["test"][k] for b in best]) for k in ("accuracy", "auc"))
        lead = ""
        if name != reference and all(reference in r["best"] for r in results):
            diffs = [r["best"][name]["test"]["accuracy"] - r["best"][reference]["test"]["accuracy"] for r in results]
            lead = "{:+.3f} +- {:.3f}".format(*_mean_std(diffs))
        views = ", ".join(b["view"] for b in best)
        lines.append(f"| {name} | {acc[0]:.3f} +- {acc[1]:.3f} | {auc[0]:.3f} +- {auc[1]:.3f} | {lead} | {views} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="probe-classification.json files, one per seed")
    parser.add_argument("--reference", default="random", help="the row every other set's lead is measured against")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = seed_table([json.loads(p.read_text()) for p in args.results], args.reference)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
