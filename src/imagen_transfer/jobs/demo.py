"""`imagen-transfer demo`: the main job on the embedded default, end to end, into one run folder.

From the shipped CIFAR-10 source cascade to PneumoniaMNIST chest X-rays with report-like captions:
1. fine-tune both stages (full fine-tuning: the best validation loss in benchmarks/results/finetune_methods_cpu.md),
   the SR stage for fewer steps (it costs ~3x more per step), with early stopping on the validation loss
   (`--quick`: the base stage only, see QUICK);
2. evaluate the source and the fine-tuned cascade on the test split (FID, KID, precision / recall, conditioning
   accuracy), each beside its own base stage's samples upsampled bicubically (the bar its SR stage must clear);
3. fuse: autoguidance of the fine-tune by its own run's early checkpoint (step `guide_step`, kept for it;
   Karras et al. 2024), at `guide_weight`, evaluated the same way: the one fusion that beat the single model in
   benchmarks/results/fusion_xray_cpu.md (weight interpolation, guidance between models, the shard soup and
   switching to the source lost there, and left the demo);
4. probe: U-Net features of the source and fine-tuned base stages against raw pixels and random weights;
5. write report.html / report.md.
Every phase prints its progress and wall time; `demo.json` records them with the settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import load_config
from ..errors import UserError
from ..evaluate import evaluate
from ..features import extract
from ..openmp import record as machine
from ..outputs import write_atomic
from ..probe import run_probe
from ..sources import open_source
from ..train import train
from .report import write_report

# The SR stage's recipe on X-rays, each choice measured (docs/results.md "How the SR stage got there"): lr 3e-4 for
# both stages and about 800 SR steps (benchmarks/results/sr_finetune_curve_lr3e-4_cpu.md, demo_v2_sr80_cpu.json for
# the shorter run it replaced), sampling noise-augmentation level 0 chosen on the val split
# (sr_sweep_xray_val_cpu.md), bf16 U-Net calls where native (sampler_parity_cpu.md); min_delta is set for the
# SR stage's validation-loss scale (the curve above).
# The fusion phase's guide: the run's step-100 checkpoint (2/5 of the base stage's steps, 1/8 of the SR stage's) at
# weight 2.5, the best row of benchmarks/results/fusion_xray_cpu.md (the step-50 guide and weights 1.5 / 2 / 3 behind
# it); --quick keeps the base stage's proportion (step 24 of 60).
# feature_precision auto: TF-Inception and the probes' U-Net features in bf16 where the CPU computes it natively
# (TF-Inception 1.87x faster, KID within 0.22 of its std on fixed sets: benchmarks/results/inception_bf16_cpu.json;
# probe accuracies within 0.01 of fp32's). The levers measured and not taken (600 SR steps, 15 sampling steps, SR
# training on crops) and what each cost: benchmarks/results/demo_levers_cpu.json, docs/performance.md "The demo".
FULL = dict(steps=250, sr_steps=800, n_eval=128, n_real=None, feature_limit=800, val_every=50, batch=32,
            probe_epochs=30, sample_steps=None, precision="auto", lr=3e-4, aug_level=0, min_delta=0.00005,
            guide_step=100, guide_weight=2.5, feature_precision="auto")
# --quick: the base stage only (16 px: the SR stage is neither fine-tuned nor sampled), 64 samples per model against
# a seeded subset of 256 real test images, bf16 U-Net calls where native (benchmarks/results/sampler_parity_cpu.md).
# Their times and results: benchmarks/results/demo_quick_cpu.json and demo_cpu.json (this CPU kind: AMD EPYC),
# demo_xeon_cpu.json, demo_fp32_cpu.json and demo_quick_xeon_cpu.json (an Intel Xeon with AMX, before #39).
# probe_timesteps (10,): validation chose t = 10 for every U-Net set in --quick's runs of 2026-12-07, so --quick
# reads that one view of the three (features.DEFAULT_TIMESTEPS), a third of its feature passes.
QUICK = dict(steps=60, sr_steps=0, n_eval=64, n_real=256, feature_limit=240, val_every=20, batch=32, probe_epochs=15,
             sample_steps=None, precision="auto", lr=None, aug_level=None, min_delta=0.0002, guide_step=24,
             guide_weight=2.5, feature_precision="auto", probe_timesteps=(10,))


def _phase(name: str, timings: dict, fn, *args, **kwargs):
    print(f"\n== {name} ==", flush=True)
    start = time.time()
    result = fn(*args, **kwargs)
    timings[name] = round(time.time() - start, 1)
    print(f"== {name}: {timings[name]} s ==", flush=True)
    return result


def default_out() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def finetune_config(out: Path, settings: dict, source: str = "cifar10", data: str = "pneumoniamnist",
                    method: str = "full"):
    """The demo's fine-tuning run (phase 1) as a RunConfig writing to `out`, from its `settings` (FULL / QUICK)."""
    def optional(value):
        return "null" if value is None else value

    overrides = [f"model.init_from={source}", f"data.dataset={data}", "data.split=train", "data.val_split=val",
                 "data.val_size=256", "data.hflip=false", f"transfer.method={method}",
                 "train.stages=[base, sr]" if settings["sr_steps"] else "train.stages=[base]",
                 f"train.stage_steps={{sr: {settings['sr_steps']}}}",
                 f"train.steps={settings['steps']}", f"train.batch_size={settings['batch']}", "train.warmup_steps=10",
                 f"train.mixed_precision={settings.get('precision') or 'auto'}",
                 f"train.log_every={max(1, settings['val_every'] // 2)}", f"train.val_every={settings['val_every']}",
                 f"train.sample_every={settings['steps']}", f"train.checkpoint_every={settings['steps']}",
                 "train.early_stopping_patience=3", f"train.early_stopping_min_delta={settings['min_delta']}",
                 "train.restore_best=true", f"train.lr={optional(settings['lr'])}",
                 f"sample.aug_level={optional(settings['aug_level'])}",
                 'sample.prompts=["chest x-ray, normal", "chest x-ray, pneumonia"]', "sample.per_prompt=8"]
    config = load_config(None, overrides)
    config.out = str(out)
    return config


def run_demo(out: str | Path | None = None, *, quick: bool = False, source: str = "cifar10",
             data: str = "pneumoniamnist", method: str = "full", settings: dict | None = None,
             feature_net: str | None = None) -> Path:
    """Run the five phases (module doc) into `out` (default: runs/demo-<time>); `settings` overrides the sizes
    (tests use tiny ones) and `feature_net` the FID network."""
    settings = {**(QUICK if quick else FULL), **(settings or {})}
    dataset = open_source(data)  # resolved once (a missing file fails here, before any work); the phases read it
    out = Path(out) if out else default_out()
    started, timings = time.time(), {}
    config = finetune_config(out, settings, source, data, method)
    guide_step, guide_weight = int(settings["guide_step"]), float(settings["guide_weight"])
    trained = [settings["steps"]] + ([settings["sr_steps"]] if settings["sr_steps"] else [])
    if guide_step >= min(trained):
        raise UserError(f"--guide-step {guide_step} must be below every stage's steps ({', '.join(map(str, trained))}): "
                        "the guide is an earlier checkpoint of the same run")
    config.train.keep_steps = [guide_step]  # the autoguidance guide of phase 3: an early checkpoint of this run, kept
    run = _phase(f"1/5 fine-tune {source} -> {data} ({method}, {settings['steps']} base / {settings['sr_steps']} SR "
                 "steps)", timings, train, config, data=dataset)
    tuned_dir = run / "cascade"

    n = settings["n_eval"]
    sampling = dict(guidance=1.5, steps=settings["sample_steps"], precision=settings.get("precision"))
    if not settings["sr_steps"]:  # the SR stage was not fine-tuned: evaluate the base stage's images
        sampling["stages"] = ["base"]
    common = dict(split="test", n=n, n_real=settings.get("n_real"), seed=0, sampling=sampling,
                  feature_net=feature_net, feature_precision=settings.get("feature_precision") or "no")

    def evaluate_all():  # through an SR stage, each cascade is also measured against its base upsampled bicubically
        bar = dict(bicubic_baseline=bool(settings["sr_steps"]))
        results = {"source": evaluate(source, dataset, out=run / "eval-0-source.json", **common, **bar),
                   "fine-tuned": evaluate(str(tuned_dir), dataset, out=run / "eval-1-finetuned.json", **common, **bar)}
        return results

    against = f"{settings['n_real']} real" if settings.get("n_real") else "all real"
    results = _phase(f"2/5 evaluate source and fine-tune (N={n} each, {against} test images)", timings, evaluate_all)

    def fuse():
        results[f"autoguidance {guide_weight:g} (step {guide_step})"] = evaluate(
            str(tuned_dir), dataset, out=run / "eval-2-autoguidance.json", guide=str(run / f"step-{guide_step}"),
            **dict(common, sampling=dict(sampling, guidance=guide_weight)))

    _phase(f"3/5 fuse: autoguidance by the run's step-{guide_step} checkpoint (weight {guide_weight:g}), and evaluate",
           timings, fuse)

    def probe():
        folder = extract({"source": source, "fine-tuned": str(tuned_dir)}, dataset, run / "features",
                         limit=settings["feature_limit"], baselines=("pixels", "random"),
                         timesteps=settings.get("probe_timesteps"),
                         precision=settings.get("feature_precision") or "no")
        return run_probe(folder, epochs=settings["probe_epochs"],
                         reference=dataset.known.published or None)

    probe_result = _phase(f"4/5 features and probes (up to {settings['feature_limit']} images per split)", timings,
                          probe)
    html_path, _ = _phase("5/5 report", timings, write_report, run)
    timings["total"] = round(time.time() - started, 1)
    summary = dict(quick=quick, source=source, data=data, method=method, settings=settings, timings_s=timings,
                   machine=machine(),  # what the timings ran on: the CPU, its threads, torch's version
                   kid={k: v["kid_mean"] for k, v in results.items()},
                   conditioning_accuracy={k: v.get("conditioning_accuracy") for k, v in results.items()},
                   precision={k: v.get("precision") for k, v in results.items()},
                   recall={k: v.get("recall") for k, v in results.items()},
                   bicubic_baseline={k: {m: v["bicubic_baseline"].get(m) for m in ("kid_mean", "precision", "recall")}
                                     for k, v in results.items() if v.get("bicubic_baseline")},
                   probe_test_accuracy={k: v["test"]["accuracy"] for k, v in probe_result["best"].items()})
    write_atomic(run / "demo.json", json.dumps(summary, indent=2))
    print(f"\ndemo done in {timings['total']} s: {html_path}")
    for name, value in summary["kid"].items():
        print(f"  {name:20s} KID {value:.4f}  conditioning accuracy {summary['conditioning_accuracy'][name]:.3f}")
    for name, bar in summary["bicubic_baseline"].items():
        print(f"  {name:20s} against its base + bicubic upsampling: KID {summary['kid'][name]:.4f} vs "
              f"{bar['kid_mean']:.4f}")
    return run
