"""`imagen-transfer report RUN_DIR`: one page per run folder, as `report.html` (self-contained: images embedded as
data URIs, no scripts, no network) and `report.md` (images referenced by relative path).

It reads what a run folder holds: `config.yaml`, `metrics.jsonl` (training loss, validation loss, KID if logged),
`samples/*.png` (training sample grids, a row per prompt), and every `eval*.json` written by `evaluate --out` (their
`*-samples.png` grids too). Nothing here recomputes a metric.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import yaml

from ..checkpoint import read_jsonl
from ..errors import UserError
from ..outputs import check_writable_dir, write_atomic

EVAL_COLUMNS = [("resolution", "px"), ("n_generated", "N gen"), ("n_real", "N real"), ("fid", "FID"), ("kid_mean", "KID"),
                ("kid_std", "KID std"), ("precision", "precision"), ("recall", "recall"),
                ("conditioning_accuracy", "cond. acc."), ("inception_score", "IS")]


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_summaries(rows: list[dict]) -> list[dict]:
    """Per stage: method, trainable %, steps, best validation loss and its step, s/step, peak memory."""
    stages: dict[str, dict] = {}
    for row in rows:
        name = row.get("stage")
        if name is None:
            continue
        s = stages.setdefault(name, dict(stage=name))
        if row.get("event") == "trainable":
            s.update(method=row["method"], trainable_percent=row["percent"])
        if "step" in row and "loss" in row:
            s["steps"] = row["step"]
            s["seconds_per_step"] = row.get("seconds_per_step")
            s["peak_memory_mb"] = max(s.get("peak_memory_mb") or 0, row.get("peak_memory_mb") or 0)
        if row.get("val_loss") is not None and row.get("event") is None:
            if s.get("best_val_loss") is None or row["val_loss"] < s["best_val_loss"]:
                s.update(best_val_loss=row["val_loss"], best_step=row["step"])
        if row.get("early_stop"):
            s["early_stopped_at"] = row["step"]
        if row.get("event") == "restore_best":
            s["restored_step"] = row["step"]
    return list(stages.values())


def plot_curves(rows: list[dict], out: Path) -> Path | None:
    """loss / validation loss / KID against step, one line per stage; None when there is nothing to plot."""
    matplotlib.use("Agg")

    series = [(key, title) for key, title in (("loss", "training loss"), ("val_loss", "validation loss (fixed noise)"),
                                              ("kid", "KID (EMA samples)"),
                                              ("conditioning_accuracy", "conditioning accuracy")) if any(r.get(key) is not None for r in rows)]
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], series):
        for stage in sorted({r["stage"] for r in rows if r.get(key) is not None and "stage" in r}):
            points = [(r["step"], r[key]) for r in rows
                      if r.get("stage") == stage and r.get(key) is not None and r.get("event") is None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `<run_dir>/report.html` and `<run_dir>/report.md`; returns their paths."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    rows = read_jsonl(run / "metrics.jsonl")
    evals = [(p, json.loads(p.read_text())) for p in sorted(run.glob("eval*.json"))]
    if not rows and not evals:
        raise UserError(f"{run} has neither metrics.jsonl nor eval*.json: is it a run folder (train / finetune / "
                        "evaluate --out RUN/eval.json)?")
    check_writable_dir(run)  # report.html / report.md and the plots go here: a read-only run fails before them
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    prompts = _prompts(config)
    curves = plot_curves(rows, run / "curves.png") if rows else None
    images = []  # (title, path, caption)
    if curves:
        images.append(("Curves", curves, "training loss, validation loss (and KID when logged) per stage"))
    for grid in sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []:
        caption = f"rows: {', '.join(prompts)}" if grid.name.startswith("base") and prompts else \
            "SR stage: upsampled low-res input | SR output | real image"
        images.append((f"Samples {grid.stem}", grid, caption))
    for path, result in evals:
        if result.get("samples_grid") and (path.parent / result["samples_grid"]).is_file():
            images.append((f"Evaluation samples ({path.name})", path.parent / result["samples_grid"],
                           "generated for captions drawn from the split, sorted by class"))
    probe_file = run / "features" / "probe-classification.json"
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else None
    for plot in (probe or {}).get("plots", []):
        if (run / "features" / plot).is_file():
            images.append((f"Probe: {Path(plot).stem}", run / "features" / plot,
                           "validation accuracy per block x timestep" if plot.startswith("heatmap") else
                           "test accuracy with 1%, 10%, 100% of the training labels"))
    dense = {}
    for task in ("detection", "segmentation"):
        dense_file = run / "features" / f"probe-{task}.json"
        if dense_file.is_file():
            dense[task] = json.loads(dense_file.read_text())
            for plot in dense[task].get("plots", []):
                if (run / "features" / plot).is_file():
                    images.append((f"{task.capitalize()} probe: {Path(plot).stem}", run / "features" / plot,
                                   "true boxes white, predicted (score >= 0.3) coloured by class" if task == "detection"
                                   else "image | true mask | predicted mask"))
    summaries = stage_summaries(rows)
    tables = _tables(summaries, evals, probe) + _dense_tables(dense)
    html_path, md_path = run / "report.html", run / "report.md"
    write_atomic(html_path, _html(run, tables, evals, images, config))
    write_atomic(md_path, _markdown(run, tables, images, config))
    return html_path, md_path


def _prompts(config_text: str) -> list[str]:
    try:
        return list((yaml.safe_load(config_text) or {}).get("sample", {}).get("prompts") or [])
    except yaml.YAMLError:
        return []


STAGE_COLUMNS = [("stage", "stage"), ("method", "method"), ("trainable_percent", "trainable %"), ("steps", "steps"),
                 ("best_val_loss", "best val loss"), ("best_step", "best step"), ("early_stopped_at", "early stop"),
                 ("restored_step", "restored step"),
                 ("seconds_per_step", "s/step"), ("peak_memory_mb", "peak MB")]


def _tables(summaries: list[dict], evals: list[tuple[Path, dict]],
            probe: dict | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    if summaries:
        tables.append(("Training", [t for _, t in STAGE_COLUMNS],
                       [[_fmt(s.get(k)) for k, _ in STAGE_COLUMNS] for s in summaries]))
    if evals:
        head = ["evaluation", "split"] + [t for _, t in EVAL_COLUMNS]
        body = []
        for p, r in evals:  # an SR cascade's row, then its bar (its base samples upsampled) and its base alone
            body.append([p.name, r.get("split", "")] + [_fmt(r.get(k)) for k, _ in EVAL_COLUMNS])
            for b in filter(None, (r.get("bicubic_baseline"), r.get("base_stage"))):
                body.append([f"{p.name}: {b['generator']}", b.get("split", "")] + [_fmt(b.get(k)) for k, _ in EVAL_COLUMNS])
        tables.append(("Metrics", head, body))
    if probe and probe.get("best"):
        body = [[name, b["view"], _fmt(b["lr"]), _fmt(b["val_accuracy"]), _fmt(b["test"]["accuracy"]),
                 _fmt(b["test"]["auc"])] for name, b in probe["best"].items()]
        body += [[f"{name} (published)", "", "", "", _fmt(r["accuracy"]), _fmt(r["auc"])]
                 for name, r in (probe.get("reference") or {}).items()]
        tables.append(("Probes", ["features", "view", "lr", "val acc", "test acc", "test AUC"], body))
    return tables


def _dense_tables(dense: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The detection / segmentation probes' test scores per feature set (dense_probe.run_dense's JSON)."""
    tables = []
    if "detection" in dense:
        body = [[name, _fmt(r["test"]["map50"]), _fmt(r["test"]["map"])]
                + [_fmt(v["ap50"]) for v in r["test"]["per_class"].values()] for name, r in dense["detection"]["sets"].items()]
        classes = list(next(iter(dense["detection"]["sets"].values()))["test"]["per_class"])
        tables.append(("Detection probe", ["features", "test mAP@0.5", "test mAP@[.5:.95]"]
                       + [f"AP@0.5 {c}" for c in classes], body))
    if "segmentation" in dense:
        body = [[name, _fmt(r["test"]["miou"])] + [_fmt(v["dice"]) for v in r["test"]["per_class"].values()]
                for name, r in dense["segmentation"]["sets"].items()]
        classes = list(next(iter(dense["segmentation"]["sets"].values()))["test"]["per_class"])
        tables.append(("Segmentation probe", ["features", "test mIoU"] + [f"Dice {c}" for c in classes], body))
    return tables


def _html(run: Path, tables, evals, images, config: str) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>imagen-transfer report: {e(run.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
             "img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;"
             "padding:1em;overflow:auto}figure{margin:1em 0}</style></head><body>",
             f"<h1>Run report: {e(run.name)}</h1><p>{e(str(run.resolve()))}</p>"]
    for title, head, body in tables:
        parts.append(f"<h2>{e(title)}</h2><table id='{e(title.lower())}'><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
        parts.append("</table>")
    shown = set()
    for path, result in evals:
        notes = [f"{k}: {result[k]}" for k in result if k.endswith("_absent") and (k, result[k]) not in shown]
        shown |= {(k, result[k]) for k in result if k.endswith("_absent")}
        judge = result.get("judge")
        if judge:
            notes.append(f"judge: {judge['trained_on']}, accuracy on real {judge['real_split']} images "
                         f"{judge['real_accuracy']:.3f}")
        if notes:
            parts.append(f"<p><b>{e(path.name)}</b>: " + "; ".join(e(n) for n in notes) + "</p>")
    for title, path, caption in images:
        parts.append(f"<figure><h2>{e(title)}</h2><img alt='{e(title)}' src='{_data_uri(path)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if config:
        parts.append(f"<h2>Resolved config</h2><pre>{e(config)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(run: Path, tables, images, config: str) -> str:
    lines = [f"# Run report: {run.name}", ""]
    for title, head, body in tables:
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    for title, path, caption in images:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(run).as_posix()})", "", caption, ""]
    if config:
        lines += ["## Resolved config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)
