"""`train_stage()`: the one training loop (pretraining, resume and transfer), and `train()` around it.

The loop trains one cascade stage at a time (Imagen trains its stages independently), driven by accelerate so the
same code runs on a CPU, one GPU, or `accelerate launch` over many processes. Each step is `step.training_step`
(batch, randomness, gradient accumulation, AdamW, EMA); around it the loop reads the loss once per log window,
computes the validation loss of the EMA weights at fixed noise and timesteps every `val_every` steps (and KID every
`kid_every`), writes a sample grid every `sample_every` steps and an atomic checkpoint every `checkpoint_every`
(checkpoint.py), and stops early through `EarlyStopping`. Records go through `StageLog` (metrics.jsonl,
TensorBoard, the progress bar).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import openmp
from .cascade import Cascade, Stage, save_cascade, set_sampling_aug_level
from .checkpoint import (
    append_jsonl,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    read_jsonl,
    save_checkpoint,
    write_atomic,
)
from .config import RunConfig, config_yaml
from .data import ImageTextData, resize, stage_inputs
from .datasets import load_dataset
from .diffusion import training_loss
from .errors import UserError
from .interop import build_or_load_cascade
from .measure import stage_generator
from .memory import peak_memory_mb, reset_peak_memory
from .metrics import load_feature_net
from .outputs import remove_stale_partials, run_lock
from .quality import QualityProbe, build_quality_probe, measure_quality
from .runs import check_run_dir, prepare_run_dir, run_dir_of
from .sampling import save_grid, to_gray
from .shard import all_finite, gathered_state, like, load_gathered_state, reshard, unsharded
from .sources import DataSource, open_source
from .step import Captioned, StageTraining, check_frozen_dtype, prepare_stage_training, training_step
from .text import (
    EmbeddingCache,
    TextEncoding,
    default_cache_dir,
    load_text_encoder,
)
from .transfer import (
    check_transfer,
    finish_transfer,
    prepare_transfer,
    resolve_transfer_defaults,
)
from .unet import precision_choice, resolve_precision

ValidationHook = Callable[[Cascade, Stage, int], None]


def encode_captions(data: ImageTextData, cache: EmbeddingCache) -> Captioned:
    unique = sorted(set(data.captions))
    index = {c: i for i, c in enumerate(unique)}
    ids = torch.tensor([index[c] for c in data.captions], dtype=torch.long)
    return Captioned(data.images, ids, cache(unique), data.captions)


def validation_loss(stage: Stage, val: Captioned, null: TextEncoding, config: RunConfig, device,
                    batch_size: int) -> float:
    """Mean loss over the validation set at fixed noise, timesteps and augmentation (seed 1234), no dropout."""
    gen = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for start in range(0, len(val.caption_ids), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(val.caption_ids)))
        x0, lowres = stage_inputs(stage, val.images[idx], None, device)
        loss = training_loss(stage.unet, stage.scheduler.alphas_cumprod, x0,
                             val.table.index(val.caption_ids[idx]).to(device), null_text=null,
                             prediction_type=stage.scheduler.config.prediction_type,
                             min_snr_gamma=config.loss.min_snr_gamma, lowres=lowres,
                             aug_level_max=config.loss.aug_level_max, generator=gen)
        total += loss.sum().item()
        count += len(idx)
    return total / count


def sample_settings(s) -> dict:
    """sample_stage's settings from the config's `sample` section (sample grids and KID while training)."""
    return dict(sampler=s.sampler, steps=s.steps, guidance=s.guidance, thresholding=s.thresholding,
                percentile=s.percentile, max_value=s.max_value)


def write_samples(stage: Stage, val: Captioned, null: TextEncoding, config: RunConfig, path: Path | None, device,
                  encode, gray: bool = False) -> None:
    """Base stage: a row per prompt. SR stage: real low-res input | SR output | real image, for validation images.
    `gray`: average the generated images' channels, as sampling does for models trained on gray data."""
    shown = to_gray if gray else (lambda images: images)

    s = config.sample
    if stage.kind == "base":
        prompts = [p for p in s.prompts for _ in range(s.per_prompt)]
        images = stage_generator(stage, encode, null, sample_settings(s))(prompts, list(range(len(prompts))))
        if path is not None:
            save_grid(shown(images), path, nrow=s.per_prompt, scale=4)
        return
    k = min(8, len(val.caption_ids))
    idx = torch.linspace(0, len(val.caption_ids) - 1, k).round().long()
    real, lowres = stage_inputs(stage, val.images[idx], None, device)
    prompts = [val.captions[i] for i in idx.tolist()]
    generate = stage_generator(stage, encode, null, sample_settings(s), lowres_source=val.images[idx])
    out = generate(prompts, list(range(k)))  # image i: seed i, upsampling validation image idx[i]
    upsampled = resize(lowres, stage.resolution)
    if path is not None:  # None: a sharded run's other ranks, which sample with rank 0 but write nothing
        save_grid(torch.cat([upsampled.cpu(), shown(out), real.cpu()]), path, nrow=k, scale=4)


@dataclass
class EarlyStopping:
    """Early stopping and restore-best on one metric (val_loss or kid; lower is better).

    Patience counts measurements without an improvement of more than `min_delta` on the last such value (the
    anchor); restore-best keeps the lowest value seen, however small its margin. `state()` is what a checkpoint
    keeps, so a resumed run continues the count."""

    patience: int
    min_delta: float
    metric: str
    val: float = float("inf")  # the best value so far
    step: int | None = None
    anchor: float | None = None
    stale: int = 0

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """(improved on the best, patience exhausted) after a measurement."""
        anchor = self.val if self.anchor is None else self.anchor
        improved = value < self.val
        if improved:
            self.val, self.step = value, step
        if value < anchor - self.min_delta:
            self.anchor, self.stale = value, 0
        else:
            self.stale += 1
        return improved, bool(self.patience) and self.stale >= self.patience

    def state(self) -> dict:
        return dict(val=self.val, step=self.step, metric=self.metric, anchor=self.anchor, stale=self.stale)

    def load(self, state: dict) -> None:
        self.val, self.step, self.stale = state.get("val", self.val), state.get("step"), state.get("stale", 0)
        self.anchor = state.get("anchor")


class StageLog:
    """Where a stage's records go: metrics.jsonl and TensorBoard (main process), and the progress bar."""

    def __init__(self, run_dir: Path, stage: str, total: int, initial: int, main: bool):
        self.file, self.stage, self.main = run_dir / "metrics.jsonl", stage, main
        self.writer = SummaryWriter(str(run_dir / "tensorboard" / stage)) if main else None
        self.bar = tqdm(total=total, initial=initial, desc=f"train {stage}", disable=not main, dynamic_ncols=True)

    def event(self, **fields) -> None:
        if self.main:
            append_jsonl(self.file, dict(stage=self.stage, **fields, time=time.time()))

    def record(self, record: dict) -> None:
        if not self.main:
            return
        append_jsonl(self.file, record)
        for key, value in record.items():
            if isinstance(value, float) and key != "time":
                self.writer.add_scalar(f"{self.stage}/{key}", value, record["step"])
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "val_loss", "kid", "images_per_s")})

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(f"[{self.stage}] {text}")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


@dataclass
class LossWindow:
    """The training loss summed on the device and read once per log window: a read per step would make the host
    wait for the GPU every step, which a small, launch-bound stage cannot afford."""

    device: torch.device
    loss: torch.Tensor | None = None
    images: int = 0
    start: float = 0.0

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.images, self.start = torch.zeros((), device=self.device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.images += images

    def read(self, steps: int) -> dict:
        """The window's mean loss and speed over its last `steps` steps, then a new window."""
        loss = self.loss.item() / steps
        elapsed = time.perf_counter() - self.start  # after .item(): the window's device work is complete
        values = dict(loss=loss, images_per_s=self.images / elapsed, seconds_per_step=elapsed / steps)
        self.reset()
        return values


@dataclass
class StageRun:
    """What the loop's helpers share: the stage's training state, its inputs and where its records go."""

    config: RunConfig
    cascade: Cascade
    stage: Stage
    t: StageTraining
    val: Captioned
    null: TextEncoding
    run_dir: Path
    encode: Callable
    accelerator: object
    log: StageLog
    stopping: EarlyStopping
    quality: QualityProbe | None
    on_validation: ValidationHook | None
    keep_best: bool
    nonfinite: torch.Tensor  # any NaN / inf loss or gradient norm so far, kept on the device
    early_stopped: bool = False
    best_ema: list | None = None  # the EMA weights of the best measurement (restore_best with early stopping)


def train_stage(config: RunConfig, cascade: Cascade, stage: Stage, train: Captioned, val: Captioned,
                null: TextEncoding, run_dir: Path, *, encode, resume: bool = False, accelerator=None,
                on_validation: ValidationHook | None = None, quality: QualityProbe | None = None) -> dict:
    """Train one stage in place (its U-Net ends holding the EMA weights). Returns a summary dict.

    `encode` maps prompts to a TextEncoding (for sample grids); only parameters with requires_grad are trained.
    `on_validation(cascade, stage, step)` runs on the main process at every validation, while the stage holds its
    EMA weights in eval mode (studies sample there to measure quality against steps).
    """
    tc = config.train
    cuda = torch.cuda.is_available()
    accelerator = accelerator or Accelerator(mixed_precision=resolve_precision(tc.mixed_precision, cuda), cpu=not cuda)
    if tc.kid_every and quality is None:
        raise ValueError("train.kid_every needs a QualityProbe (quality.build_quality_probe)")
    device = accelerator.device
    t = prepare_stage_training(config, stage, [s.name for s in cascade.stages].index(stage.name), train, null,
                               accelerator)
    stopping = EarlyStopping(tc.early_stopping_patience, tc.early_stopping_min_delta, tc.early_stopping_metric)
    keep_best = tc.restore_best and tc.early_stopping_patience > 0
    step, early_stopped, best_ema = 0, False, None
    ckpt = latest_checkpoint(run_dir, stage.name) if resume else None
    if ckpt is not None:
        step, early_stopped, best_ema = _resume(t, ckpt, run_dir, stopping, keep_best)
        if accelerator.is_main_process:
            print(f"[{stage.name}] resumed from {ckpt} at step {step}")
    done = early_stopped  # a stage that reached its budget continues when the budget grew; an early stop stays
    log = StageLog(run_dir, stage.name, tc.steps, step, accelerator.is_main_process)
    run = StageRun(config, cascade, stage, t, val, null, run_dir, encode, accelerator, log, stopping, quality,
                   on_validation, keep_best, nonfinite=torch.zeros((), dtype=torch.bool, device=device),
                   early_stopped=early_stopped, best_ema=best_ema)
    log.event(event="start", step=step, processes=accelerator.num_processes, precision=accelerator.mixed_precision,
              precision_reason=precision_choice(tc.mixed_precision, cuda)[1], device=str(device),
              openmp=openmp.record(), peak_memory_window="stage", **t.held)
    window = LossWindow(device)
    reset_peak_memory(device)
    while step < tc.steps and not done:
        if (threads := openmp.adapt()) is not None and accelerator.is_main_process:
            log.event(event="threads", step=step, threads=threads)
        loss, bad = training_step(t, step)
        window.add(loss, tc.batch_size)
        run.nonfinite |= bad
        step += 1
        log.bar.update(1)
        log_due = step % tc.log_every == 0 or step == tc.steps
        val_due = bool(tc.val_every) and (step % tc.val_every == 0 or step == tc.steps)
        kid_due = bool(tc.kid_every) and (step % tc.kid_every == 0 or step == tc.steps)
        if log_due or val_due or kid_due:  # checkpoint steps check in _save()
            _stop_if_nonfinite(run, step)
        record = None
        if log_due:
            record = dict(stage=stage.name, step=step, **window.read((step - 1) % tc.log_every + 1),
                          lr=t.lr_schedule.get_last_lr()[0], peak_memory_mb=peak_memory_mb(device), time=time.time())
        if val_due or kid_due:
            record = (record or dict(stage=stage.name, step=step, time=time.time())) | _measure(run, step, val_due,
                                                                                                  kid_due)
        improved = False
        if record is not None and record.get(stopping.metric) is not None:
            improved, done = _judge(run, record, step)
        if record is not None:
            log.record(record)
        if (step % tc.checkpoint_every == 0 or step == tc.steps or done or improved and run.keep_best
                or step in tc.keep_steps):
            path = _save(run, step, done=done or step == tc.steps)
            if accelerator.is_main_process and improved:
                mark_best(run_dir, stage.name, path)
    return _finish(run, step)


def _stop_if_nonfinite(run: StageRun, step: int, weights_too: bool = False) -> None:
    """Stop (UserError) once a loss or gradient norm went NaN / inf, or (before a save) a weight did: nothing
    non-finite is ever checkpointed, so the last good checkpoint stays as it was for a --resume."""
    bad = bool(run.nonfinite)  # one host sync, only at log, validation and checkpoint steps
    if weights_too and not bad:
        bad = not all_finite(run.t.params)
    if not bad:
        return
    name = run.stage.name
    last = latest_checkpoint(run.run_dir, name)
    run.log.event(event="nonfinite", step=step)
    raise UserError(f"[{name}] the loss or the weights became non-finite (NaN or inf) by step {step}; "
                    f"training stopped and {'the last good checkpoint ' + str(last) if last else 'no checkpoint'} "
                    "was kept as it was. Lower train.lr, keep train.grad_clip > 0 or set "
                    "train.mixed_precision=no, then start again (or --resume from that checkpoint)")


def _save(run: StageRun, step: int, done: bool) -> Path | None:
    """An atomic checkpoint of the weights, EMA, optimizer and loop state (main process; everyone waits)."""
    _stop_if_nonfinite(run, step, weights_too=True)
    t, path = run.t, None
    model, ema, optimizer = gathered_state(t.raw_unet, t.named, t.ema, t.optimizer)  # sharded: every rank gathers
    if run.accelerator.is_main_process:
        state = dict(stage=run.stage.name, ema_step=t.ema.optimization_step, best=run.stopping.state(), done=done,
                     early_stopped=run.early_stopped)
        path = save_checkpoint(run.run_dir, run.stage.name, step, model=model, ema=ema, optimizer=optimizer,
                               state=state, keep=run.config.train.keep_checkpoints,
                               keep_steps=run.config.train.keep_steps)
    run.accelerator.wait_for_everyone()  # nobody runs ahead while the main process writes
    return path


def _measure(run: StageRun, step: int, val_due: bool, kid_due: bool) -> dict:
    """Validation loss and / or sample quality of the EMA weights (swapped in, then back); the sample grid and the
    on_validation hook run while they are in."""
    t = run.t
    t.ema.store(t.params)
    t.ema.copy_to(t.params)
    t.raw_unet.eval()
    with run.accelerator.autocast() if t.held.get("frozen_parameters") else nullcontext():  # half-precision frozen
        values = _measured(run, step, val_due, kid_due)  # weights run only under autocast
    reshard(t.raw_unet)  # sharded: before the training weights are written back
    t.raw_unet.train()
    t.ema.restore(t.params)
    return values


def _measured(run: StageRun, step: int, val_due: bool, kid_due: bool) -> dict:
    """The measurements of _measure, the EMA weights in place."""
    t, stage, config = run.t, run.stage, run.config
    gray = run.cascade.sampling.get("grayscale", False)
    main, device = run.accelerator.is_main_process, run.accelerator.device
    values = {}
    if val_due:
        values["val_loss"] = validation_loss(stage, run.val, run.null, config, device, batch_size=max(t.micro, 16))
    if kid_due:  # every process measures (same seeds), so an early stop on KID is the same decision everywhere
        values.update(measure_quality(run.quality, stage, run.encode, run.null, sample_settings(config.sample),
                                      gray=gray))
    # a sharded forward is a collective: every rank samples, rank 0 writes
    if (main or t.sharded) and config.train.sample_every and step % config.train.sample_every == 0:
        grid = run.run_dir / "samples" / f"{stage.name}-step-{step:07d}.png" if main else None
        write_samples(stage, run.val, run.null, config, grid, device, run.encode, gray=gray)
    if main and run.on_validation is not None:  # stage.unet is raw_unet: .to() and unwrap_model return the module
        run.on_validation(run.cascade, stage, step)
    return values


def _judge(run: StageRun, record: dict, step: int) -> tuple[bool, bool]:
    """Feed a measurement to early stopping: (improved on the best, stop now). Keeps the best EMA weights when
    restore_best is on, and marks the record when patience ran out."""
    stopping = run.stopping
    improved, exhausted = stopping.update(record[stopping.metric], step)
    if improved and run.keep_best:
        run.best_ema = [p.detach().clone() for p in run.t.ema.shadow_params]
    if exhausted:
        record["early_stop"] = run.early_stopped = True
        anchor = stopping.anchor if stopping.anchor is not None else stopping.val
        run.log.say(f"early stopping at step {step}: {stopping.metric} {record[stopping.metric]:.5f} has not improved "
                    f"on {anchor:.5f} by more than {stopping.min_delta} for {stopping.stale} measurements "
                    f"(best {stopping.val:.5f} at step {stopping.step})")
    return improved, exhausted


def _finish(run: StageRun, step: int) -> dict:
    """Leave the stage holding its (best) EMA weights as an ordinary NCHW module; the summary dict."""
    t, stopping, log = run.t, run.stopping, run.log
    if run.best_ema is not None:
        t.ema.shadow_params = run.best_ema
        metric = stopping.metric
        log.say(f"restored the best EMA weights: step {stopping.step}, {metric} {stopping.val:.5f}")
        log.event(event="restore_best", step=stopping.step, metric=metric, value=stopping.val,
                  **({"val_loss": stopping.val} if metric == "val_loss" else {}))
    log.close()
    t.ema.copy_to(t.params)
    t.raw_unet.eval()
    t.raw_unet = unsharded(t.raw_unet, run.config.transfer)  # sharded: every rank gathers the full weights
    # an ordinary fp32 NCHW module again (frozen weights held in half precision come back as their rounded values)
    run.stage.unet = t.raw_unet.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    history = [r for r in read_jsonl(log.file) if r.get("stage") == run.stage.name]
    metric = stopping.metric
    return dict(stage=run.stage.name, steps=step, early_stopping_metric=metric, best_value=stopping.val,
                best_val_loss=stopping.val if metric == "val_loss" else None, best_step=stopping.step,
                images_per_s=[r["images_per_s"] for r in history if "images_per_s" in r][-1:] or None)


def _resume(t: StageTraining, ckpt: Path, run_dir: Path, stopping: EarlyStopping, keep_best: bool):
    """Load a checkpoint into the stage's training state: (step, early_stopped, best EMA weights or None)."""
    saved = load_checkpoint(ckpt)
    unexpected = load_gathered_state(t.raw_unet, t.named, t.ema, t.optimizer, saved)
    if unexpected:
        raise UserError(f"{ckpt}: weights {unexpected[:3]}... do not fit this model; resume with the same config")
    t.ema.optimization_step = saved["state"]["ema_step"]
    step = saved["state"]["step"]
    early_stopped = saved["state"].get("early_stopped", saved["state"].get("done", False) and step < t.config.train.steps)
    stopping.load(saved["state"].get("best", {}))
    best_ckpt = latest_checkpoint(run_dir, t.stage.name, "best")
    best_ema = None
    if keep_best and best_ckpt is not None:
        best_ema = [like(load_checkpoint(best_ckpt)["ema"][n], p) for n, p in t.named]
    with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            t.lr_schedule.step()
    return step, early_stopped, best_ema


def default_prompts(data: ImageTextData) -> list[str]:
    """One training caption per label (or the first few captions): what sample grids show by default."""
    first: dict[int, str] = {}
    for caption, label in zip(data.captions, data.labels.tolist()):
        first.setdefault(label, caption)
    return list(first.values())[:10]


def train(config: RunConfig, resume: bool = False, on_validation: ValidationHook | None = None,
          data: DataSource | None = None) -> Path:
    """The one entry point for pretraining, resuming and transfer: train the stages in `config.train.stages` one
    after the other (each prepared by `config.transfer`), then write `<run>/cascade`. `on_validation`: see
    train_stage. `data`: config.data.dataset already opened by the caller (a job that reads it again later)."""
    if data is not None and data.spec != str(config.data.dataset):
        raise ValueError(f"train(data=...) opened {data.spec}, but the config trains on {config.data.dataset}")
    if config.train.threads:
        openmp.fix_threads(config.train.threads)
    AcceleratorState._reset_state()  # a process may run several trainings (studies) with different precisions
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=resolve_precision(config.train.mixed_precision, cuda), cpu=not cuda)
    check_frozen_dtype(config.train.frozen_dtype, accelerator.mixed_precision)  # before the run folder exists
    if config.train.shard == "fsdp" and on_validation is not None:  # the hook samples on rank 0 alone: a sharded
        raise UserError("train.shard=fsdp cannot run a study's per-validation hook (it samples on one process, a "
                        "sharded forward needs all); run the study unsharded")  # forward would wait forever
    main = accelerator.is_main_process
    if main:
        check_run_dir(config, resume)
        if not cuda:
            print(openmp.describe())
    torch.manual_seed(config.train.seed)
    cascade = build_or_load_cascade(config, resume)
    set_sampling_aug_level(cascade, config.sample.aug_level)
    if config.train.kid_every:  # a missing feature network fails here, before the run folder exists
        load_feature_net(config.train.kid_feature_net)
    note = resolve_transfer_defaults(config.transfer)
    if note and main:
        print(note)
    for name in config.train.stages:  # a bad stage name or transfer setting fails before the run folder exists
        check_transfer(cascade.stage(name).unet, config.transfer)
    d = config.data
    common = dict(resolution=cascade.resolution, channels=cascade.stages[0].channels, captions=d.captions,
                  skip_bad=d.skip_bad)
    source = open_source(data or d.dataset)  # resolved once for the run: training, validation and KID read it
    train_data = load_dataset(source, d.split, fraction=d.fraction, per_class=d.per_class, seed=d.seed,
                              shards=d.shards, shard=d.shard, **common)
    val_data = load_dataset(source, d.val_split, limit=d.val_size, **common)
    run_dir = run_dir_of(config)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if main else nullcontext():  # one writer per run folder, from here to the end
        if main:
            prepare_run_dir(config, resume)
        accelerator.wait_for_everyone()
        return _train_in(config, resume, on_validation, accelerator, cascade, source, train_data, val_data, run_dir)


def _train_in(config: RunConfig, resume: bool, on_validation, accelerator, cascade: Cascade, source, train_data, val_data,
              run_dir: Path) -> Path:
    """The part of `train` that writes into the (locked) run folder."""
    main = accelerator.is_main_process
    if train_data.grayscale:  # an RGB model trained on gray images samples gray (drops residual colour noise)
        cascade.sampling["grayscale"] = True
    if not config.sample.prompts:
        config.sample.prompts = default_prompts(train_data)
    if main:
        write_atomic(run_dir / "config.yaml", config_yaml(config))
        if train_data.skipped:
            print(f"skipped {train_data.skipped} unreadable file(s) in {train_data.source}")
    encoder = load_text_encoder(cascade.text_encoder)
    cache = EmbeddingCache(encoder, default_cache_dir())
    train_set, val_set = encode_captions(train_data, cache), encode_captions(val_data, cache)
    null = cache([""])
    summaries = []
    for name in config.train.stages:
        stage = cascade.stage(name)
        summary = prepare_transfer(stage.unet, config.transfer)
        if main:
            print(f"[{name}] {summary}")
            append_jsonl(run_dir / "metrics.jsonl", dict(stage=name, event="trainable", method=summary.method,
                                                         trainable=summary.trainable, total=summary.total,
                                                         percent=summary.percent, time=time.time()))
        stage_config = config
        if name in config.train.stage_steps:  # this stage trains for its own number of steps
            stage_config = copy.deepcopy(config)
            stage_config.train.steps = int(config.train.stage_steps[name])
        quality = build_quality_probe(config, stage, val_data, source) if config.train.kid_every else None
        result = train_stage(stage_config, cascade, stage, train_set, val_set, null, run_dir, encode=cache,
                             resume=resume, accelerator=accelerator, on_validation=on_validation, quality=quality)
        finish_transfer(stage.unet)
        summaries.append({**result, "method": summary.method, "trainable_percent": summary.percent})
    cascade.info.update(trained_on=f"{train_data.source} ({len(train_data)} images)", run=str(run_dir),
                        steps={s["stage"]: s["steps"] for s in summaries})
    if config.model.init_from and not config.model.random_init:
        cascade.info.update(source=str(config.model.init_from), method=config.transfer.method)
    if main:
        save_cascade(cascade, run_dir / "cascade", overwrite=True)  # the run's own output
        remove_stale_partials(run_dir / "cascade")  # what a killed earlier save of this run left beside it
        append_jsonl(run_dir / "metrics.jsonl", dict(event="done", summaries=summaries, time=time.time()))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
