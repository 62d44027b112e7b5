"""What a probe writes besides its JSON: the markdown tables (classification, retrieval, detection, segmentation),
the label-efficiency table both protocols share, and the figures (validation heat-map, label-efficiency curve,
detection / segmentation overlays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .detection import predict
from .masks import IGNORE
from .segmentation import kind_of, segment

LABEL_FRACTIONS = (0.01, 0.1, 1.0)  # classification's label-efficiency points (fractions of the training labels)


def efficiency_table(curves: dict[str, dict[str, list[float]]], title: str) -> list[str]:
    """Markdown lines: per feature set, the scores per label-efficiency point, mean +- std over seeds (a single
    value as it is, an empty cell where nothing was measured)."""
    columns = list(next(iter(curves.values())))
    lines = ["", title, "", "| features | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, curve in curves.items():
        cells = []
        for column in columns:
            v = torch.tensor(curve.get(column, []))
            cells.append("" if not len(v) else f"{v.mean():.3f}" if len(v) == 1 else
                         f"{v.mean():.3f} +- {v.std(unbiased=False):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def probe_markdown(result: dict) -> str:
    held = result.get("val_from_train")
    lines = [f"# Probe of {result['features']} ({result['dataset']}, stage {result['stage']})", "",
             "n: " + ", ".join(f"{k} {v}" for k, v in result["n"].items())
             + (f" (val: {held['share']:.0%} of train per class, seed {held['seed']}, held out)" if held else ""), ""]
    if "best" in result:
        lines += [f"Head: {result['head']}, {result['epochs']} epochs; chosen on validation accuracy.", "",
                  "| features | view | lr | val acc | test acc | test AUC | per-class test acc |", "|---|---|---|---|---|---|---|"]
        for name, b in result["best"].items():
            t = b["test"]
            per = ", ".join(f"{k} {v:.3f}" for k, v in t["per_class_accuracy"].items())
            auc = f"{t['auc']:.3f}" if t["auc"] is not None else "n/a"
            lines.append(f"| {name} | {b['view']} | {b['lr']:g} | {b['val_accuracy']:.3f} | {t['accuracy']:.3f} | "
                         f"{auc} | {per} |")
        for name, ref in (result.get("reference") or {}).items():
            lines.append(f"| {name} (published) | | | | {ref['accuracy']:.3f} | {ref['auc']:.3f} | |")
        curves = {name: {f"{float(f) * 100:g}% labels": [p["accuracy"] for p in points.get(str(f), [])]
                         for f in LABEL_FRACTIONS} for name, points in result["label_efficiency"].items()}
        lines += efficiency_table(curves, "Label efficiency (test accuracy, mean +- std over seeds):")
    if "retrieval" in result:
        lines += ["| features | view | " + " | ".join(k for k in next(iter(result["retrieval"].values()))["test"]) + " |"]
        lines.append("|---|---|" + "---|" * len(next(iter(result["retrieval"].values()))["test"]))
        for name, r in result["retrieval"].items():
            lines.append(f"| {name} | {r['view']} | " + " | ".join(f"{v:.3f}" for v in r["test"].values()) + " |")
    return "\n".join(lines) + "\n"


def dense_markdown(result: dict) -> str:
    detection = result["task"] == "detection"
    key, label = ("map50", "mAP@0.5") if detection else ("miou", "mIoU")
    lines = [f"# {result['task'].capitalize()} probe of {result['features']} ({result['dataset']}, stage "
             f"{result['stage']})", "",
             f"Head: {result['head']}, {result['steps']} steps, lr chosen on validation {label} from "
             f"{', '.join(f'{lr:g}' for lr in result['lrs'])}; task size {result['size'][0]}x{result['size'][1]}, "
             f"grid stride {result['stride']}; n: " + ", ".join(f"{k} {v}" for k, v in result["n"].items())
             + ("; flip test (scores averaged with the mirror image's)" if result.get("flip_test") else ""), ""]
    if "scratch" in result:
        lines += [f"`scratch`: a U-Net (widths {result['scratch']['widths']}) trained end to end from the pixels on "
                  f"the same labels, {result['scratch']['steps']} steps, the same head and protocol.", ""]
    if detection:
        columns = ["val mAP@0.5", "test mAP@0.5", "test mAP@[.5:.95]", "per-class test AP@0.5"]

        def cells(r):
            per = ", ".join(f"{k} {v['ap50']:.3f}" for k, v in r["test"]["per_class"].items())
            return [r["val"]["map50"], r["test"]["map50"], r["test"]["map"]], per
    else:
        columns = ["val mIoU", "test mIoU", "test mIoU (foreground)", "per-class test IoU / Dice"]

        def cells(r):
            per = ", ".join(f"{k} {v['iou']:.3f} / {v['dice']:.3f}" for k, v in r["test"]["per_class"].items())
            return [r["val"]["miou"], r["test"]["miou"], r["test"]["miou_foreground"]], per
    lines += ["| features | trained parameters | lr | " + " | ".join(columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for name, r in result["sets"].items():
        scores, per = cells(r)
        lines.append(f"| {name} | {r['parameters']:,} | {r['lr']:g} | " + " | ".join(f"{v:.3f}" for v in scores)
                     + f" | {per} |")
    curves = {name: {c: [s[key] for s in scores] for c, scores in r["label_efficiency"].items()}
              for name, r in result["sets"].items()}
    lines += efficiency_table(curves, f"Label efficiency (test {label}, mean +- std over seeds; labelled training "
                                      "images):")
    if result.get("flip_test"):
        plain = {name: {c: [s[key] for s in scores] for c, scores in r["without_flip_test"]["label_efficiency"].items()}
                 for name, r in result["sets"].items()}
        lines += efficiency_table(plain, f"The same heads without the flip test (test {label}):")
    return "\n".join(lines) + "\n"


def heatmap(grid: list[dict], set_name: str, out: Path) -> Path | None:
    """Validation accuracy (best lr) per block x timestep for one feature set, as a PNG."""
    import matplotlib  # here, not at the top: the Agg backend is chosen only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use

    cells = {}
    for r in grid:
        if r["set"] == set_name and "@t" in r["view"] and "+" not in r["view"]:  # single views, not concatenations
            block, t = r["view"].split("@t")
            cells[(block, int(t))] = max(cells.get((block, int(t)), 0), r["val_accuracy"])
    if not cells:
        return None
    blocks = list(dict.fromkeys(b for b, _ in cells))
    steps = sorted({t for _, t in cells})
    values = torch.tensor([[cells.get((b, t), float("nan")) for t in steps] for b in blocks])
    fig, ax = plt.subplots(figsize=(1.2 * len(steps) + 2.5, 0.45 * len(blocks) + 1.5))
    im = ax.imshow(values.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(steps)), [f"t={t}" for t in steps])
    ax.set_yticks(range(len(blocks)), blocks)
    for i in range(len(blocks)):
        for j in range(len(steps)):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(f"{set_name}: validation accuracy (linear probe)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def efficiency_plot(curve: dict, out: Path) -> Path:
    import matplotlib  # here, not at the top: the Agg backend is chosen only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curve.items():
        xs = sorted(points, key=float)
        means = [torch.tensor([p["accuracy"] for p in points[x]]).mean().item() for x in xs]
        stds = [torch.tensor([p["accuracy"] for p in points[x]]).std(unbiased=False).item() for x in xs]
        ax.errorbar([float(x) * 100 for x in xs], means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("% of training labels")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def overlays(manifest: dict, chosen: dict, test, out: Path, *, count: int = 4, min_score: float = 0.3,
             flip_test: bool = False) -> list[str]:
    """One PNG per feature set: test images (`test`, the DenseData the features were read from) with true (thin,
    white) and predicted (thick, by class) boxes, or image | truth | prediction rows for segmentation. Returns the
    file names."""
    count = min(count, len(test))
    files = []
    for set_name, (head, x) in chosen.items():
        if manifest["task"] == "detection":
            preds = predict(head, x[:count], manifest["stride"], flip_test)
            tiles = []
            for i in range(count):
                img = Image.fromarray(test.images[i].numpy()).resize((test.images.shape[2] * 2,
                                                                      test.images.shape[1] * 2))
                draw = ImageDraw.Draw(img)
                for box in test.boxes[i].tolist():
                    draw.rectangle([v * 2 for v in box], outline=(255, 255, 255), width=1)
                p = preds[i]
                for box, s, k in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                    if s >= min_score:
                        draw.rectangle([v * 2 for v in box], outline=PALETTE[k % len(PALETTE)], width=2)
                tiles.append(np.asarray(img))
            grid = np.concatenate(tiles, 1)
        else:
            pred = segment(head, kind_of(head), x[:count], tuple(manifest["size"]), flip_test)
            rows = [np.concatenate([test.images[i].numpy(), paint(test.masks[i].numpy()), paint(pred[i].numpy())], 1)
                    for i in range(count)]
            grid = np.concatenate(rows, 0)
        name = f"overlay-{manifest['task']}-{set_name}.png"
        Image.fromarray(grid).save(out / name)
        files.append(name)
    return files


def paint(mask: np.ndarray) -> np.ndarray:
    """Class indices (H, W) as colours (background black), ignored pixels (masks.IGNORE) mid-gray."""
    colours = np.array([(0, 0, 0)] + PALETTE, dtype=np.uint8)
    return np.where(mask[..., None] == IGNORE, np.uint8(128), colours[mask % len(colours)])
