"""What the training benchmarks share: our training step exactly as the loop runs it, the one plain diffusers loop
they compare it with, and a timer.

- `our_step`: `step.prepare_stage_training` + `step.training_step`, the function `train_stage` calls each step
  (batch, randomness, min-SNR loss, condition dropout, SR noise augmentation, clipping, fused AdamW, EMA), without
  the loop's logging, validation or checkpoints: benchmarks time the step, not a run folder.
- `phase_profile`: torch.profiler over alternating steps of several contenders, split by the phases the steps
  label (step/forward, backward, update, ema), each phase credited to the step whose range holds it.
- `publish`: print a results table and write it where asked; `publish_fusion`: a fusion table with its command
  and the JSON beside it (each row's name, n, kid, kid_std, fid, precision, recall).
- `plain_diffusers_step`: the loop of diffusers' train_text_to_image example on the same U-Net (add_noise, forward,
  MSE on eps, backward, `torch.optim.AdamW`, fp32): with `encode`, the frozen text encoder runs on each batch's
  captions as in the example; otherwise it is fed the cached caption states. `bf16` adds bf16 autocast, fused AdamW
  and the loop's attention kernel (our levers without our extras). SR stages get the upsampled low-res image
  concatenated and a random noise-augmentation level as their class label, as ours do.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, warmup: int, steps: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds of each of `steps` calls of step(i) after `warmup` untimed ones (the device synchronised around
    each timed call)."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step(i)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


PHASES = ("step/forward", "step/backward", "step/update", "step/ema")


def phase_profile(steps: dict, first: int, count: int) -> dict:
    """{name: (ms per step per labelled phase, the 12 operators with the most self CPU time as (name, ms per step,
    calls per step), ms per profiled step)} from one profiler session over `count` alternating steps of each of
    `steps` (name -> step(i)), so all see the same machine; the profiler's own overhead is included."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(first, first + count):
            for name, step in steps.items() if i % 2 == 0 else reversed(steps.items()):
                with record_function(f"whole/{name}"):
                    step(i)
    events = prof.events()
    result = {}
    for name in steps:
        ranges = [e for e in events if e.name == f"whole/{name}"]
        mine = [e for e in events if any(r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end
                                         for r in ranges)]
        phases, ops = {}, {}
        for e in mine:
            if e.name in PHASES:
                phases[e.name] = phases.get(e.name, 0.0) + e.cpu_time_total / 1e3 / count
            elif not e.name.startswith(("step/", "whole/")):
                total, calls = ops.get(e.name, (0.0, 0))
                ops[e.name] = (total + e.self_cpu_time_total / 1e3 / count, calls + 1)
        top = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:12]
        whole = sum(r.cpu_time_total for r in ranges) / 1e3 / count
        result[name] = (phases, [(k, ms, calls // count) for k, (ms, calls) in top], whole)
    return result


def publish(text: str, out: str | Path | None) -> None:
    """Print a results table and, when a path is given, write it there."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def publish_fusion(title: str, argv: list[str], text: str, rows: list[dict], table: str | Path | None) -> None:
    """Print a fusion table; with `table`, write it under `title` with the command that made it, and a JSON beside
    it holding each row's name, n, kid, kid_std, fid, precision, recall (and any of guide / weight)."""
    print(text)
    if table:
        Path(table).write_text(f"# {title}\n\n```\npython {' '.join(argv)}\n```\n\n{text}")
        keep = ("name", "n", "fid", "precision", "recall", "guide", "weight")
        Path(table).with_suffix(".json").write_text(json.dumps(
            [dict({k: r[k] for k in keep if k in r}, kid=r["kid_mean"], kid_std=r["kid_std"]) for r in rows], indent=1))


def median_images_per_s(times: list[float], batch: int) -> float:
    return batch / statistics.median(times)


def our_step(config, cascade, stage, data, null, accelerator=None):
    """(step(i) -> loss tensor, StageTraining) for `stage` of `cascade` under `config`, data a step.Captioned."""
    from accelerate import Accelerator

    from imagen_transfer.step import prepare_stage_training, training_step
    from imagen_transfer.unet import resolve_precision

    cuda = torch.cuda.is_available()
    accelerator = accelerator or Accelerator(mixed_precision=resolve_precision(config.train.mixed_precision, cuda),
                                             cpu=not cuda)
    index = [s.name for s in cascade.stages].index(stage.name) if cascade is not None else 0  # None: a lone stage
    t = prepare_stage_training(config, stage, index, data, null, accelerator)
    return (lambda i: training_step(t, i)[0]), t


def plain_diffusers_step(stage, images: torch.Tensor, table, caption_ids: torch.Tensor, batch: int, *,
                         bf16: bool = False, encode=None, captions: list[str] | None = None,
                         device: torch.device = torch.device("cpu")):
    """(step(i) -> loss, trained parameters) of the plain loop on `stage.unet` (see the module doc)."""
    from imagen_transfer.data import to_float
    from imagen_transfer.diffusion import upsample
    from imagen_transfer.unet import training_attention

    unet = stage.unet.to(device).train()
    params = list(unet.parameters())
    scheduler = stage.scheduler
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=bf16 or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    attention = (lambda: training_attention(device.type)) if bf16 else nullcontext
    table = table.to(device)

    def step(i):
        idx = torch.randint(0, len(images), (batch,))
        x0 = to_float(images[idx], stage.resolution).to(device)
        if encode is not None:  # diffusers' example encodes each batch's captions with the frozen encoder
            with torch.no_grad():
                text = encode([captions[int(c)] for c in caption_ids[idx]]).to(device)
        else:
            text = table.index(caption_ids[idx].to(device))
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        model_in, class_labels = scheduler.add_noise(x0, noise, t), None
        if stage.kind == "sr":
            low = torch.nn.functional.interpolate(x0, size=stage.lowres, mode="area")
            model_in = torch.cat([model_in, upsample(low, stage.resolution)], 1)
            class_labels = torch.randint(0, 500, (batch,), device=device)
        with autocast, attention():
            with record_function("step/forward"):  # the labels `step.training_step` uses, for side-by-side profiles
                pred = unet(model_in, t, encoder_hidden_states=text.states, encoder_attention_mask=text.mask,
                            class_labels=class_labels).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
            with record_function("step/backward"):
                loss.backward()
        with record_function("step/update"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, params
