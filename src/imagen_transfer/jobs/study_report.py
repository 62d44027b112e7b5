"""The transfer study's plots and its markdown write-up (results.md), read from study.json alone."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from ..outputs import write_atomic


def _pm(cell: dict, scale: float = 1.0, digits: int = 1) -> str:
    if cell is None or cell.get("mean") is None:
        return "-"
    return f"{cell['mean'] * scale:.{digits}f} ± {cell['std'] * scale:.{digits}f} (n={cell['n']})"


def plot_curves(summary: dict, key: str, path: Path, ylabel: str, scale: float = 1.0) -> Path:
    """One panel per data fraction: mean over seeds against steps, a band of +- one std, per arm."""
    matplotlib.use("Agg")

    fractions = summary["plan"]["fractions"]
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 3.4), sharey=True, squeeze=False)
    step0 = summary["source_step0"].get(key)  # None for the validation loss (not measured at step 0)
    for ax, f in zip(axes[0], fractions):
        for arm, colour in (("transfer", "tab:blue"), ("scratch", "tab:orange")):
            cell = summary["cells"][f"{arm}@{f:g}"]
            points = [(s, v["mean"] * scale, v["std"] * scale) for s, v in zip(cell[f"{key}_steps"], cell[key])
                      if v["mean"] is not None]
            if arm == "transfer" and step0 is not None:
                points = [(0, step0 * scale, 0.0), *points]
            if not points:
                continue
            xs, ms, ss = zip(*points)
            counts = sorted({v["n"] for v in cell[key] if v["mean"] is not None})  # seeds behind each point
            seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            ax.plot(xs, ms, marker="o", ms=3, color=colour, label=f"{arm} (n={seeds})")
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=colour,
                            alpha=0.2)
        ax.set_title(f"{f:.0%} of the target data")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")  # per panel: the seed counts differ between fractions when a study is cut short
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_markdown(summary: dict, plots: dict[str, str]) -> str:
    plan, cells, measure = summary["plan"], summary["cells"], summary.get("measure", {})
    lines = [
        "# Transfer study: CIFAR-10 source cascade -> PneumoniaMNIST, against training from scratch",
        "",
        f"Base stage ({measure.get('resolution', '?')} px), budget {plan['steps']} steps x batch {plan['batch_size']}, "
        f"evaluated every {plan['eval_every']} steps on {plan['n_eval']} images (the same captions from the "
        f"{plan['eval_split']} split and the same noise seeds in every run) against all {measure.get('n_real', '?')} "
        f"{plan['eval_split']} images. KID is x 10^3 (lower is better); conditioning accuracy is the share of images "
        f"a judge CNN assigns to the class their caption names (the judge is right on "
        f"{measure.get('judge_real_accuracy', float('nan')):.1%} of real {plan['eval_split']} images). "
        f"Mean ± std over seeds {plan['seeds']}.",
        "",
        f"## Quality at step {summary['compare_step']}"
        + (" (the budget)" if summary["compare_step"] == plan["steps"] else
           f" (the last measured step every run reached; the budget was {plan['steps']})"),
        "",
        "| data | images | transfer KID | scratch KID | transfer cond. acc. | scratch cond. acc. | transfer val loss "
        "| scratch val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in plan["fractions"]:
        t, s = cells[f"transfer@{f:g}"], cells[f"scratch@{f:g}"]
        lines.append(f"| {f:.0%} | {summary.get('images', {}).get(f'{f:g}', '')} | {_pm(t['final_kid'], 1e3)} | "
                     f"{_pm(s['final_kid'], 1e3)} | {_pm(t['final_conditioning_accuracy'], 1, 3)} | "
                     f"{_pm(s['final_conditioning_accuracy'], 1, 3)} | {_pm(t['final_val_loss'], 1, 4)} | "
                     f"{_pm(s['final_val_loss'], 1, 4)} |")
    src = summary["source_step0"]
    if src.get("kid") is not None:
        lines += ["", f"The untrained source (step 0 of the transfer arm): KID {src['kid'] * 1e3:.1f}, conditioning "
                  f"accuracy {src['conditioning_accuracy']:.3f}."]
    lines += ["", f"## Steps for transfer to reach scratch's KID at step {summary['compare_step']}", "",
              "| data | scratch KID | transfer: first step at or below it (per seed) | mean ± std | compared up to |",
              "|---|---|---|---|---|"]
    for f, r in summary["steps_to_reach"].items():
        per_seed = ", ".join("never" if s is None else str(s) for s in r["per_seed"])
        mean = "-" if r["mean"] is None else f"{r['mean']:.0f} ± {r['std']:.0f}"
        lines.append(f"| {float(f):.0%} | {r['target_scratch_final_kid'] * 1e3:.1f} | {per_seed} | {mean} | "
                     f"{r['budget']} |")
    lines += ["", "## Verdicts", ""]
    for promise, v in summary["verdicts"].items():
        detail = ", ".join(f"{float(k):.0%}: {'yes' if x else 'no' if x is not None else 'n/a'}"
                           for k, x in v["per_fraction"].items())
        verdict = "not measured" if v["confirmed"] is None else "confirmed" if v["confirmed"] else "not confirmed"
        lines.append(f"- **{promise.replace('_', ' ')}**: {verdict} "
                     f"{f'({detail})' if detail else '(no fraction to judge)'}"
                     f"{' - ' + v['meaning'] if 'meaning' in v else ''}")
    if summary["methods"]:
        lines += ["", f"## Transfer methods ({plan['method_fraction']:.0%} of the data, seed {plan['seeds'][0]})", "",
                  "| method | trainable % | s / step | peak memory (MB) | KID x1e3 | cond. acc. | val loss (best) | step |",
                  "|---|---|---|---|---|---|---|---|"]

        def shown(value, form: str, scale: float = 1.0) -> str:
            return "-" if value is None else format(value * scale if scale != 1.0 else value, form)

        for method, m in summary["methods"].items():
            lines.append(f"| {method} | {shown(m['trainable_percent'], '.2f')} | {shown(m['seconds_per_step'], '.4f')} "
                         f"| {shown(m['peak_memory_mb'], '.0f')} | {shown(m['final_kid'], '.1f', 1e3)} | "
                         f"{shown(m['final_conditioning_accuracy'], '.3f')} | {shown(m.get('final_val_loss'), '.4f')} "
                         f"({shown(m.get('best_val_loss'), '.4f')}) | {shown(m.get('steps'), 'd')} |")
        device = next(iter(summary["methods"].values())).get("device")
        lines += ["", f"Seconds per step and peak memory on {device}"
                  + (f", with {summary['jobs']} runs sharing it (contended: compare them with each other only)."
                     if summary["jobs"] > 1 else ".")]
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def write_results(summary: dict, out: Path, results: str | Path | None = None) -> Path:
    """Plots beside the results file, then the markdown (default <out>/results.md)."""
    path = Path(results) if results else out / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = "study" if results is None else path.stem
    plots = {}
    if any(cell["steps"] for cell in summary["cells"].values()):
        for key, label, scale in (("kid", "KID x 1e3", 1e3), ("conditioning_accuracy", "conditioning accuracy", 1.0),
                                  ("val_loss", "validation loss", 1.0)):
            file = plot_curves(summary, key, path.parent / f"{stem}-{key.replace('_', '-')}.png", label, scale)
            plots[label] = os.path.relpath(file, path.parent)
    write_atomic(path, results_markdown(summary, plots))
    return path
