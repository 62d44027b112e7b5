"""One optimisation step of one cascade stage: what the training loop runs, and what every benchmark times.

`prepare_stage_training` builds what the steps share (the U-Net prepared by accelerate, AdamW over the trainable
parameters with warmup + cosine, the EMA, the caption table on the device); `training_step(t, step)` then:

1. picks the global batch from a per-epoch permutation (seeded: resume needs no data-loader state);
2. draws all randomness of the global batch (flips, timesteps, noise, dropout, augmentation) from a generator seeded
   by (seed, stage, step), and keeps this process's slice: N processes then compute exactly the one-process step;
3. accumulates gradients over micro-batches, clips, steps AdamW and the schedule, and updates the EMA.

It returns the step's mean loss and whether a loss or the gradient norm was non-finite, both left on the device:
reading them is the caller's choice (a read per step would make the host wait for a GPU every step).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import EMAModel
from torch.profiler import record_function

from .cascade import Stage
from .config import RunConfig
from .data import stage_inputs
from .diffusion import draw, training_loss
from .errors import UserError
from .shard import replicated, shard_unet
from .text import TextEncoding
from .transfer import DEFAULT_LR, parameter_groups
from .unet import training_attention


@dataclass
class Captioned:
    """Images with caption indices into a table of encoded unique captions (each caption encoded once)."""

    images: torch.Tensor  # uint8 (N, H, W, C)
    caption_ids: torch.Tensor  # (N,)
    table: TextEncoding  # (U, L, D)
    captions: list[str]  # image i's caption (caption_ids[i] indexes it in the table)


@dataclass
class StageTraining:
    """What the optimisation steps of one stage share (built by prepare_stage_training)."""

    config: RunConfig
    stage: Stage
    stage_index: int
    accelerator: object
    unet: torch.nn.Module  # as the step calls it (prepared by accelerate, maybe compiled)
    raw_unet: torch.nn.Module  # the plain module (checkpoints, validation, sampling)
    named: list[tuple[str, torch.nn.Parameter]]  # the trained parameters
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    ema: object  # diffusers EMAModel over the trained parameters
    data: Captioned
    table: TextEncoding  # the caption table on the device
    null: TextEncoding  # the empty caption on the device
    alphas: torch.Tensor
    local: int  # this process's share of the global batch
    micro: int  # one micro-batch (local / grad_accum)
    held: dict = field(default_factory=dict)  # what train.frozen_dtype did (hold_frozen_in)
    sharded: bool = False  # train.shard=fsdp over several processes (shard.py)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def epoch_batch(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of `step`: consecutive slices of a seeded permutation per epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < batch_size:
        perm = perm.repeat(math.ceil(batch_size / n))
    return perm[k * batch_size : (k + 1) * batch_size]


def named_trainable(unet) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_frozen_dtype(dtype_name: str, precision: str) -> None:
    """Half-precision frozen weights need autocast: without it an fp32 input meets a bf16 / fp16 weight."""
    if dtype_name != "fp32" and precision == "no":
        raise UserError(f"train.frozen_dtype={dtype_name} needs autocast, but this run trains in fp32 "
                        "(train.mixed_precision resolved to no); set train.mixed_precision=bf16 (or fp16 on a GPU), "
                        "or train.frozen_dtype=fp32")


NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def hold_frozen_in(unet, dtype_name: str) -> dict:
    """Cast the parameters that do not train to `dtype_name` in place (`train.frozen_dtype`), leaving the trained
    ones in fp32, and the normalisation layers' too (a few thousand values; CPU kernels refuse an fp32 input with
    a half-precision norm weight, and mixed-precision practice keeps norms in fp32 anyway). Returns what the cast
    did: the count of values held and the largest absolute change (0 for an fp16 source held in fp16), so the run
    log says whether the frozen weights were rounded."""
    dtype = FROZEN_DTYPES[dtype_name]
    count, change = 0, 0.0
    for module in unet.modules():
        if isinstance(module, NORMS):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad or p.dtype == dtype or not p.numel():
                continue
            held = p.data.to(dtype)
            change = max(change, (held.float() - p.data.float()).abs().max().item())
            p.data = held
            count += p.numel()
    return dict(frozen_dtype=dtype_name, frozen_parameters=count, frozen_max_abs_change=change)


def prepare_stage_training(config: RunConfig, stage: Stage, stage_index: int, data: Captioned, null: TextEncoding,
                           accelerator) -> StageTraining:
    """The U-Net in training mode on the accelerator's device (gradient checkpointing and channels-last as
    configured), AdamW (fused) with per-group learning-rate multipliers, warmup + cosine, and an EMA made after
    accelerate's broadcast, so every process starts from rank 0's weights."""
    tc = config.train
    device, world = accelerator.device, accelerator.num_processes
    if tc.batch_size % (world * tc.grad_accum):
        raise UserError(f"train.batch_size {tc.batch_size} must be divisible by processes x grad_accum "
                        f"({world} x {tc.grad_accum})")
    check_frozen_dtype(tc.frozen_dtype, accelerator.mixed_precision)
    unet = stage.unet.to(device).train()
    held = hold_frozen_in(unet, tc.frozen_dtype)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if tc.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    sharded = tc.shard == "fsdp" and world > 1
    if sharded:  # before the optimizer: FSDP2 replaces the parameters by sharded ones
        unet = shard_unet(unet)
    named = named_trainable(unet)
    if not named:
        raise UserError(f"stage {stage.name}: no trainable parameters")
    base_lr = tc.lr if tc.lr is not None else DEFAULT_LR[config.transfer.method]
    groups = parameter_groups(named, base_lr, tc.lr_multipliers)
    if tc.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=base_lr, weight_decay=tc.weight_decay)
    else:  # fused: one kernel for all tensors (CPU too); sharded parameters take the foreach kernels
        optimizer = torch.optim.AdamW(groups, lr=base_lr, weight_decay=tc.weight_decay, fused=not sharded or None)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.steps))
    if not sharded:
        unet, optimizer = accelerator.prepare(unet, optimizer)  # with several processes: rank 0's weights everywhere
    raw_unet = accelerator.unwrap_model(unet)
    if tc.compile:  # the training step only: validation and sampling call the eager module
        unet = torch.compile(unet, mode=tc.compile_mode)
    ema = EMAModel([p for _, p in named], decay=tc.ema_decay, use_ema_warmup=True, power=2 / 3,
                   foreach=not sharded)  # DTensor has no sharding rule for _foreach_copy_
    local = tc.batch_size // world
    return StageTraining(config, stage, stage_index, accelerator, unet, raw_unet, named, optimizer, lr_schedule, ema,
                         data, data.table.to(device), null.to(device), stage.scheduler.alphas_cumprod.to(device),
                         local, local // tc.grad_accum, held, sharded)


def lr_lambda(warmup: int, total: int):
    """Linear warmup to the base rate over `warmup` steps, then cosine decay to zero at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def training_step(t: StageTraining, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run optimisation step `step` (0-based); returns (mean loss, non-finite flag) as device tensors.

    Its phases are labelled for torch.profiler (step/forward, step/backward, step/update, step/ema: no cost when no
    profiler runs), so a profile of a run or a benchmark splits the step the same way."""
    config, stage, accelerator, device = t.config, t.stage, t.accelerator, t.device
    tc = config.train
    gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + t.stage_index * 100_003 + step)
    idx = epoch_batch(len(t.data.caption_ids), tc.batch_size, step, tc.seed + t.stage_index)
    flips = (torch.rand(tc.batch_size, generator=gen, device=device) < 0.5) if config.data.hflip else None
    draws = draw(tc.batch_size, (stage.channels, stage.resolution, stage.resolution), t.alphas.shape[0],
                 cond_drop_prob=config.loss.cond_drop_prob,
                 aug_level_max=config.loss.aug_level_max if stage.kind == "sr" else None, generator=gen, device=device)
    step_loss = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    lo = accelerator.process_index * t.local
    for k in range(tc.grad_accum):
        a, b = lo + k * t.micro, lo + (k + 1) * t.micro
        x0, lowres = stage_inputs(stage, t.data.images[idx[a:b]], None if flips is None else flips[a:b], device)
        text = t.table.index(t.data.caption_ids[idx[a:b]].to(device))
        last = k == tc.grad_accum - 1  # sharded: gradients are reduce-scattered at every micro-batch
        sync = nullcontext() if last or t.sharded else accelerator.no_sync(t.unet)
        if tc.compile:  # a new step for CUDA graph trees (reduce-overhead): the last step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with sync, accelerator.autocast(), training_attention(device.type):
            with record_function("step/forward"):
                loss = training_loss(t.unet, t.alphas, x0, text, null_text=t.null,
                                     prediction_type=stage.scheduler.config.prediction_type,
                                     min_snr_gamma=config.loss.min_snr_gamma, lowres=lowres,
                                     aug_level_max=config.loss.aug_level_max, draws=draws.slice(a, b)).mean()
            with record_function("step/backward"):
                accelerator.backward(loss / tc.grad_accum)
        step_loss += loss.detach().float() / tc.grad_accum
        nonfinite |= ~torch.isfinite(loss.detach())
    with record_function("step/update"):
        if tc.grad_clip:
            nonfinite |= ~torch.isfinite(replicated(accelerator.clip_grad_norm_(t.params, tc.grad_clip)))
        t.optimizer.step()
        t.lr_schedule.step()
        t.optimizer.zero_grad(set_to_none=True)
    with record_function("step/ema"):
        t.ema.step(t.params)
    return step_loss, nonfinite
