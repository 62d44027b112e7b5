"""`imagen-transfer study transfer`: does transfer from the source cascade need less target data, train faster and end
better than training the same model from scratch? Measured, with seeds, on one step budget.

Design:
- Two arms. `transfer`: the source cascade fine-tuned in full (transfer.method=full, its default learning rate).
  `scratch`: the source's exact architecture, text encoder and noise schedule with fresh random weights
  (`model.random_init`), trained with every parameter at the from-scratch default learning rate. Each arm uses its
  own default rate; everything else (data, steps, batch, schedule, EMA, loss) is the same.
- Target data fractions (default 1%, 10%, 100% of the training split, class-stratified) x seeds (default 0, 1, 2:
  the seed picks the data subset, scratch's initial weights and every noise draw). The base stage only: it is where
  the text conditioning and the image content are learnt (the SR stage adds detail) and it keeps the study cheap.
- Every `eval_every` steps the EMA weights draw `n_eval` images for the same captions (drawn from the test split)
  with the same per-image seeds in every run (common random numbers: the arms differ by their weights alone). They
  are measured afterwards: KID (Binkowski et al. 2018) against every test image at the base resolution with
  TF-Inception features, and conditioning accuracy (the judge CNN, judge.py). The untrained source is measured on
  the same captions and seeds as step 0 of the transfer arm.
- The transfer methods (full, freeze, bitfit, difffit, lora) run at one fraction with seed 0 for the cost table.

Three phases, each resumable: train (finished runs are skipped, interrupted ones resume from their checkpoint),
measure (per-file results kept in each run's measures.json), summarise (study.json, plots, results.md).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..checkpoint import read_jsonl, save_safetensors_atomic
from ..config import load_config
from ..datasets import load_dataset
from ..errors import UserError
from ..interop import open_model
from ..measure import draw_captions, generate_images, reference, stage_generator
from ..outputs import check_output_dir, write_atomic
from ..sources import open_source
from ..text import EmbeddingCache, default_cache_dir, load_text_encoder
from ..train import train
from .study_report import write_results

ARMS = ("transfer", "scratch")
SAMPLES_PREFIX = "samples-step-"


@dataclass
class StudyPlan:
    """Everything that defines a study; written to `<out>/plan.json` and checked when a study is resumed."""

    source: str = "cifar10"
    data: str = "pneumoniamnist"
    config: str | None = "configs/finetune-pneumonia.yaml"
    overrides: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 600
    batch_size: int = 128
    eval_every: int = 100
    n_eval: int = 256
    eval_split: str = "test"
    methods: list[str] = field(default_factory=lambda: ["full", "freeze", "bitfit", "difffit", "lora"])
    method_fraction: float = 0.1
    mixed_precision: str = "no"


@dataclass(frozen=True)
class RunSpec:
    arm: str  # transfer | scratch
    method: str  # the transfer method (scratch: none)
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        label = self.arm if self.arm == "scratch" or self.method == "full" else f"transfer-{self.method}"
        return f"{label}-f{self.fraction:g}-s{self.seed}"


def plan_runs(plan: StudyPlan) -> list[RunSpec]:
    """Seed-major order, so a study cut short still holds every (arm, fraction) cell with fewer seeds."""
    runs = [RunSpec(arm, "full" if arm == "transfer" else "none", f, s)
            for s in plan.seeds for f in plan.fractions for arm in ARMS]
    for method in plan.methods:
        spec = RunSpec("transfer", method, plan.method_fraction, plan.seeds[0])
        if spec not in runs:
            runs.append(spec)
    return runs


def run_config(plan: StudyPlan, spec: RunSpec, out: Path):
    """The RunConfig of one run: the study's config file and overrides, then what the study fixes."""
    fixed = [f"model.init_from={plan.source}", f"model.random_init={spec.arm == 'scratch'}",
             f"data.dataset={plan.data}", f"data.fraction={spec.fraction}", f"data.seed={spec.seed}",
             f"transfer.method={spec.method}", "train.stages=[base]", f"train.steps={plan.steps}",
             f"train.batch_size={plan.batch_size}", f"train.val_every={plan.eval_every}", "train.sample_every=0",
             f"train.checkpoint_every={max(plan.eval_every, plan.steps // 2)}", "train.keep_checkpoints=1",
             f"train.log_every={min(50, plan.eval_every)}", "train.early_stopping_patience=0",
             f"train.seed={spec.seed}", f"train.mixed_precision='{plan.mixed_precision}'"]
    config = load_config(plan.config, [*plan.overrides, *fixed])
    config.out = str(out / spec.name)
    return config


def eval_prompts(plan: StudyPlan, resolution: int) -> tuple[list[str], torch.Tensor]:
    """The captions (and their labels) every run draws its evaluation images for."""
    return draw_captions(load_dataset(plan.data, plan.eval_split, resolution=resolution), plan.n_eval, seed=0)


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
    """uint8 images (N, H, W, 3) and the labels their captions name, written atomically."""
    save_safetensors_atomic(path, {"images": images, "labels": labels}, metadata={"step": str(step)})


@functools.cache
def _caption_cache(spec, root: str):
    """One EmbeddingCache per (text encoder, cache folder) and process: every evaluation of a run re-uses its
    in-memory entries instead of re-reading them from disk."""
    return EmbeddingCache(load_text_encoder(spec), root)


def sample_for_eval(cascade, stage, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, H, W, 3) images of one stage for `prompts`, image i with seed i, at the cascade's sampling settings
    (measure.generate_images with seed 0, so a study's samples follow the evaluation protocol)."""
    settings = dict(cascade.sampling)
    gray = settings.pop("grayscale", False)
    encode = _caption_cache(cascade.text_encoder, str(default_cache_dir()))
    generate = stage_generator(stage, encode, encode([""]), settings, gray=gray)
    return generate_images(generate, prompts, seed=0, chunk=batch_size, progress=False)


def _train_run(plan_dict: dict, spec_dict: dict, out: str, threads: int | None) -> str:
    """One training run with its evaluation samples (a top-level function: it runs in worker processes)."""
    plan, spec, out = StudyPlan(**plan_dict), RunSpec(**spec_dict), Path(out)
    if threads:
        torch.set_num_threads(threads)
    config = run_config(plan, spec, out)
    run_dir = Path(config.out)
    resume = (run_dir / "config.yaml").is_file()
    prompts, labels = None, None

    def hook(cascade, stage, step):
        nonlocal prompts, labels
        if prompts is None:
            prompts, labels = eval_prompts(plan, stage.resolution)
        images = sample_for_eval(cascade, stage, prompts)
        save_samples(run_dir / "study" / f"{SAMPLES_PREFIX}{step:07d}.safetensors", images, labels, step)

    if not resume and run_dir.exists():
        raise UserError(f"{run_dir} exists but holds no run; remove it")
    train(config, resume=resume, on_validation=hook)
    return spec.name


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "cascade" / "cascade.json").is_file()


def train_all(plan: StudyPlan, out: Path, jobs: int = 1, progress: bool = True) -> list[str]:
    """Train every run not finished yet, `jobs` at a time (worker processes; each one's output goes to its
    train.log). With jobs > 1 runs share the device: seconds per step are then contended (study.json says so)."""

    pending = [s for s in plan_runs(plan) if not is_finished(out / s.name)]
    if not pending:
        return []
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    done = []
    bar = tqdm(total=len(pending), desc="study runs", unit="run", disable=not progress)
    if jobs <= 1:
        for spec in pending:
            bar.set_postfix_str(spec.name)
            done.append(_train_run(asdict(plan), asdict(spec), str(out), threads))
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_quiet_worker,
                                 initargs=(str(out),)) as pool:
            futures = {pool.submit(_train_run, asdict(plan), asdict(s), str(out), threads): s for s in pending}
            for future in as_completed(futures):
                done.append(future.result())  # a failed run raises here, naming its log
                bar.set_postfix_str(futures[future].name)
                bar.update()
    bar.close()
    return done


def _quiet_worker(out: str) -> None:
    """Worker processes write their progress to <out>/worker-<pid>.log instead of the terminal."""
    log = open(Path(out) / f"worker-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115 (open for the worker's life)
    sys.stdout = sys.stderr = log
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def sample_source(plan: StudyPlan, out: Path) -> None:
    """Step 0 of the transfer arm: the untrained source base stage on the evaluation captions and seeds."""
    path = out / "source" / "study" / f"{SAMPLES_PREFIX}{0:07d}.safetensors"
    if path.is_file():
        return
    cascade = open_model(plan.source, device="cuda" if torch.cuda.is_available() else "cpu")
    stage = cascade.stages[0]
    if plan.data and "grayscale" not in cascade.sampling:
        cascade.sampling["grayscale"] = load_dataset(plan.data, plan.eval_split, resolution=stage.resolution).grayscale
    prompts, labels = eval_prompts(plan, stage.resolution)
    save_samples(path, sample_for_eval(cascade, stage, prompts), labels, 0)


def measure(plan: StudyPlan, out: Path, feature_net: str | None = None, progress: bool = True) -> None:
    """KID and conditioning accuracy of every sample file not yet measured, kept in <run>/measures.json."""

    files = sorted(out.glob(f"*/study/{SAMPLES_PREFIX}*.safetensors"))
    todo = [f for f in files if f.name not in _read_measures(f.parent.parent)]
    if not todo:
        return
    resolution = load_file(todo[0])["images"].shape[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would move the Inception features by ~1e-3
    ref = reference(plan.data, plan.eval_split, resolution, feature_net=feature_net, batch_size=250, device=device,
                    progress=progress)
    judge, judge_info = ref.judge()
    if judge is None:
        raise UserError(f"a transfer study measures conditioning accuracy: {judge_info['absent']}")
    for file in tqdm(todo, desc="measure", unit="file", disable=not progress):
        saved = load_file(file)
        scores = ref.score(saved["images"], saved["labels"], batch_size=250)
        run_dir = file.parent.parent
        measures = _read_measures(run_dir)
        measures[file.name] = dict(step=int(file.stem.removeprefix(SAMPLES_PREFIX)), kid=scores["kid_mean"],
                                   kid_std=scores["kid_std"], kid_subset_size=scores["kid_subset_size"],
                                   conditioning_accuracy=scores["conditioning_accuracy"], n=len(saved["images"]))
        write_atomic(run_dir / "measures.json", json.dumps(measures, indent=1))
    info = dict(feature_network=ref.net_id, n_real=len(ref.features), judge_real_accuracy=judge_info["real_accuracy"],
                resolution=int(resolution))
    write_atomic(out / "measure-info.json", json.dumps(info, indent=1))


def _read_measures(run_dir: Path) -> dict:
    path = run_dir / "measures.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None, n=0)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def _curve(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in _read_measures(run_dir).values()}


def _cost(run_dir: Path) -> dict:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trainable = next((r for r in rows if r.get("event") == "trainable"), {})
    start = next((r for r in rows if r.get("event") == "start"), {})
    timed = [r for r in rows if "seconds_per_step" in r][1:]  # the first window holds start-up and compilation
    # Runs logged before peaks were reset per stage report the whole process's peak (every earlier run sharing it)
    per_run_peak = start.get("peak_memory_window") == "stage"
    return dict(trainable_percent=trainable.get("percent"),
                seconds_per_step=statistics.median(r["seconds_per_step"] for r in timed) if timed else None,
                peak_memory_mb=max((r["peak_memory_mb"] for r in timed), default=None) if per_run_peak else None,
                device=start.get("device"))


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step whose KID is at or below `target` (None: never within the budget)."""
    return next((step for step in sorted(curve) if curve[step] <= target), None)


def _val_curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r}


def summarise(plan: StudyPlan, out: Path, jobs: int = 1) -> dict:
    """study.json: curves (mean +- std over seeds), values at the comparison step, steps-to-reach, the methods table
    and the verdicts. The comparison step is the budget when every run finished; when a study was cut short it is
    the last measured step that every run reached (so every seed of every cell is compared at one step)."""
    runs = {}
    for f in plan.fractions:
        for arm in ARMS:
            specs = [RunSpec(arm, "full" if arm == "transfer" else "none", f, s) for s in plan.seeds]
            runs[f"{arm}@{f:g}"] = [out / s.name for s in specs if (out / s.name / "measures.json").is_file()]
    curves = {d: dict(kid=_curve(d, "kid"), conditioning_accuracy=_curve(d, "conditioning_accuracy"),
                      val_loss=_val_curve(d)) for dirs in runs.values() for d in dirs}
    shared = [set(c["kid"]) & set(c["val_loss"]) for c in curves.values()]
    compare = max(set.intersection(*shared), default=None) if shared else None
    cells = {}
    for key, dirs in runs.items():
        arm, f = key.split("@")
        cell = dict(arm=arm, fraction=float(f), seeds=[d.name.rsplit("-s", 1)[1] for d in dirs],
                    complete_seeds=[d.name.rsplit("-s", 1)[1] for d in dirs if plan.steps in curves[d]["kid"]])
        for metric in ("kid", "conditioning_accuracy", "val_loss"):
            steps = sorted(set().union(*(curves[d][metric] for d in dirs))) if dirs else []
            cell[f"{metric}_steps"] = steps
            cell[metric] = [_mean_std([curves[d][metric].get(s) for d in dirs]) for s in steps]
            cell[f"final_{metric}"] = _mean_std([curves[d][metric].get(compare) for d in dirs])
        cell["steps"] = cell["kid_steps"]
        cell["per_seed_final_kid"] = [curves[d]["kid"].get(compare) for d in dirs]
        cells[key] = cell
    source = _curve(out / "source", "kid")
    source_acc = _curve(out / "source", "conditioning_accuracy")
    reach = {}
    for f in plan.fractions:
        scratch, transfer_dirs = cells[f"scratch@{f:g}"], runs[f"transfer@{f:g}"]
        if scratch["final_kid"]["mean"] is None or not transfer_dirs:
            continue
        target = scratch["final_kid"]["mean"]
        per_seed = [steps_to_reach({k: v for k, v in {**source, **curves[d]["kid"]}.items() if k <= compare}, target)
                    for d in transfer_dirs]
        reached = [s for s in per_seed if s is not None]
        reach[f"{f:g}"] = dict(target_scratch_final_kid=target, per_seed=per_seed, **_mean_std(reached),
                               reached=len(reached), budget=compare)
    methods = {}
    for method in plan.methods:
        run_dir = out / RunSpec("transfer", method, plan.method_fraction, plan.seeds[0]).name
        if not (run_dir / "measures.json").is_file():  # cascades may be left behind (device archives skip them)
            continue
        kid_curve, acc_curve = _curve(run_dir, "kid"), _curve(run_dir, "conditioning_accuracy")
        val_curve = _val_curve(run_dir)
        methods[method] = dict(**_cost(run_dir), final_kid=kid_curve[max(kid_curve)] if kid_curve else None,
                               final_conditioning_accuracy=acc_curve[max(acc_curve)] if acc_curve else None,
                               final_val_loss=val_curve[max(val_curve)] if val_curve else None,
                               best_val_loss=min(val_curve.values(), default=None), steps=max(kid_curve, default=None))
    info = json.loads((out / "measure-info.json").read_text()) if (out / "measure-info.json").is_file() else {}
    summary = dict(plan=asdict(plan), jobs=jobs, measure=info, compare_step=compare,
                   images={f"{f:g}": _training_images(plan, f) for f in plan.fractions},
                   source_step0=dict(kid=source.get(0), conditioning_accuracy=source_acc.get(0)), cells=cells,
                   steps_to_reach=reach, methods=methods, verdicts=verdicts(cells, reach, plan))
    write_atomic(out / "study.json", json.dumps(summary, indent=1))
    return summary


def _training_images(plan: StudyPlan, fraction: float) -> int:
    """How many training images a run at `fraction` sees (the subset is class-stratified, data.select_subset)."""
    return len(load_dataset(plan.data, "train", resolution=8, fraction=fraction, seed=plan.seeds[0]))


def verdicts(cells: dict, reach: dict, plan: StudyPlan) -> dict:
    """Each promise confirmed or refuted from the measured means and stds (a difference counts when the means are
    further apart than the larger std); `confirmed` is None where the plan measures nothing that could decide it
    (e.g. less target data in a study of one fraction)."""
    def better(a: dict, b: dict) -> bool | None:  # a's KID clearly below b's
        if a["mean"] is None or b["mean"] is None:
            return None
        return a["mean"] + max(a["std"], b["std"]) < b["mean"]

    full = f"{max(plan.fractions):g}"
    out = {}
    quality = {f"{f:g}": better(cells[f"transfer@{f:g}"]["final_kid"], cells[f"scratch@{f:g}"]["final_kid"])
               for f in plan.fractions}
    out["better_final_quality"] = dict(per_fraction=quality, confirmed=_verdict(quality, all))
    data = {f"{f:g}": better(cells[f"transfer@{f:g}"]["final_kid"], cells[f"scratch@{full}"]["final_kid"])
            for f in plan.fractions if f < max(plan.fractions)}
    out["less_target_data"] = dict(per_fraction=data, confirmed=_verdict(data, any),
                                   meaning=f"transfer at a fraction ends with a clearly lower KID than scratch at {max(plan.fractions):.0%}")
    faster = {f: r["mean"] is not None and r["reached"] == len(r["per_seed"]) and r["mean"] < r["budget"]
              for f, r in reach.items()}
    out["faster_training"] = dict(per_fraction=faster, confirmed=_verdict(faster, all),
                                  meaning="every transfer seed reaches scratch's KID at the comparison step before that step")
    return out


def _verdict(per_fraction: dict, combine) -> bool | None:
    """all / any over the fractions that were measured; None when none was."""
    measured = [v for v in per_fraction.values() if v is not None]
    return combine(measured) if measured else None


def study_transfer(plan: StudyPlan, out: str | Path, *, jobs: int = 1, train_runs: bool = True,
                   measure_runs: bool = True, feature_net: str | None = None, results: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Run (or resume) the whole study; returns the summary (also <out>/study.json, plots, results.md)."""
    out = Path(out)
    check_output_dir(out, what="study", overwrite=True, is_ours=lambda folder: (folder / "plan.json").is_file())
    out.mkdir(parents=True, exist_ok=True)
    open_source(plan.data)  # a missing dataset fails here, before any work
    saved = out / "plan.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(plan):
        raise UserError(f"{out} holds a study with another plan ({saved}); choose another --out or repeat its options")
    write_atomic(saved, json.dumps(asdict(plan), indent=1))
    started = time.time()
    if train_runs:
        sample_source(plan, out)
        train_all(plan, out, jobs=jobs, progress=progress)
    if measure_runs:
        measure(plan, out, feature_net=feature_net, progress=progress)
    summary = summarise(plan, out, jobs=jobs)

    write_results(summary, out, results)
    if progress:
        print(f"study: {len(plan_runs(plan))} runs in {out} ({time.time() - started:.0f} s this call); "
              f"results: {results or out / 'results.md'}")
    return summary
