"""One table per dense task from several probe runs (`probe --task detection|segmentation` JSON files): every feature
set's test scores and label-efficiency curve side by side, with each run's head, steps and wall time.

    python benchmarks/dense_tables.py runs/dense/bccd/probe-detection.json runs/dense/bccd-scratch/probe-detection.json

Probe runs of the same task and data (for example the feature sets in one folder, the scratch competitor in
another, a fine-tuned model's features in a third) are merged; a set name met twice (same head) is one row: the
first run's scores, with the label counts of later runs added where the first did not measure them. A run whose task
size differs from the first run's is labelled with its size (a different protocol, never merged). A flip-tested
run (`probe --flip-test`) gives each set a "flip test" row and, from the same heads, a row without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"


def _count(s: dict) -> str:
    return f"{s['parameters']:,}" if "parameters" in s else "n/a"


def _entries(r: dict):
    """A run's (set name, label suffix, scores): a flip-tested run gives each set twice, flip-tested and, from the
    same heads, without the flip test (`without_flip_test`), so the pair measures the flip test alone."""
    for name, s in r["sets"].items():
        if not r.get("flip_test"):
            yield name, "", s
            continue
        yield name, ", flip test", s
        if "without_flip_test" in s:
            yield name, "", dict(s, **s["without_flip_test"])


def tables(results: list[dict]) -> str:
    task = results[0]["task"]
    detection = task == "detection"
    key = "map50" if detection else "miou"
    rows, counts, seen = [], [], {}
    for r in results:
        size = r.get("size")  # a run that read the images at another size is another protocol: its own rows
        at_size = "" if size in (None, results[0].get("size")) else f", {size[0]}x{size[1]}"
        for name, flip, s in _entries(r):
            label = f"scratch{at_size}{flip}" if name == "scratch" else f"{name} ({r['head']}{at_size}{flip})"
            counts += [c for c in s["label_efficiency"] if c not in counts]
            if label in seen:  # a later run of the same set adds the label counts the first did not measure
                first = seen[label]["label_efficiency"]
                first.update({c: v for c, v in s["label_efficiency"].items() if c not in first})
                continue
            seen[label] = dict(s, label_efficiency=dict(s["label_efficiency"]))
            rows.append((label, r, seen[label]))
    counts.sort(key=lambda c: float("inf") if c == "all" else int(c))
    classes = list(rows[0][2]["test"]["per_class"])
    lines = [f"## {task.capitalize()}: {Path(results[0]['dataset']).name}, test split", ""]
    if detection:
        lines += ["| features (head) | trained parameters | steps | test mAP@0.5 | test mAP@[.5:.95] | "
                  + " | ".join(f"AP@0.5 {c}" for c in classes) + " |", "|---|---|---|---|---|" + "---|" * len(classes)]
        for label, r, s in rows:
            steps = r.get("scratch", {}).get("steps", r["steps"]) if label.startswith("scratch") else r["steps"]
            lines.append(f"| {label} | {_count(s)} | {steps} | {s['test']['map50']:.3f} | "
                         f"{s['test']['map']:.3f} | "
                         + " | ".join(f"{s['test']['per_class'][c]['ap50']:.3f}" for c in classes) + " |")
    else:
        lines += ["| features (head) | trained parameters | steps | test mIoU | "
                  + " | ".join(f"IoU / Dice {c}" for c in classes) + " |", "|---|---|---|---|" + "---|" * len(classes)]
        for label, r, s in rows:
            steps = r.get("scratch", {}).get("steps", r["steps"]) if label.startswith("scratch") else r["steps"]
            per = " | ".join(f"{s['test']['per_class'][c]['iou']:.3f} / {s['test']['per_class'][c]['dice']:.3f}"
                             for c in classes)
            lines.append(f"| {label} | {_count(s)} | {steps} | {s['test']['miou']:.3f} | {per} |")
    metric = "mAP@0.5" if detection else "mIoU"
    lines += ["", f"Label efficiency: test {metric} with N labelled training images (mean +- std over seeds):", "",
              "| features (head) | " + " | ".join(f"{c}" for c in counts) + " |", "|---|" + "---|" * len(counts)]
    for label, _, s in rows:
        cells = [_cell([p[key] for p in s["label_efficiency"].get(c, [])]) for c in counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not detection:
        fg = classes[1:]
        lines += ["", f"Dice of {' / '.join(fg)} with N labelled images:", "",
                  "| features (head) | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
        for label, _, s in rows:
            cells = []
            for c in counts:
                points = s["label_efficiency"].get(c, [])
                cells.append(" / ".join(_cell([p["per_class"][k]["dice"] for p in points]) for k in fg)
                             if points else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="probe-detection.json / probe-segmentation.json files")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    loaded = [json.loads(p.read_text()) for p in args.results]
    by_task: dict[str, list[dict]] = {}
    for r in loaded:
        by_task.setdefault(r["task"], []).append(r)
    text = "\n".join(tables(rs) for rs in by_task.values())
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
