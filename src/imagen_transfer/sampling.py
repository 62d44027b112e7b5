"""One sampling loop for every stage and for the whole cascade.

The pieces, each small (after k-diffusion's cut): a *denoiser* is a function (x_t, t) -> prediction; classifier-free
guidance is a wrapper that builds one from a U-Net and two text encodings (Ho & Salimans 2022:
pred = pred_uncond + w (pred_cond - pred_uncond)); the *scheduler* (diffusers DDPM, DDIM or DPM-Solver++) turns
predictions into steps and applies Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3: s = the p-th
percentile of |x0|, s = max(s, 1), x0 = clip(x0, -s, s) / s; diffusers also caps s at `sample_max_value`).

Every image has its own torch.Generator seeded from its own seed, and all of its random draws (initial noise, DDPM
step noise, the SR stage's augmentation noise) come from it, so an image does not depend on which batch it is in.
A fresh scheduler is made per call because diffusers' schedulers keep state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from .config import SAMPLERS, THRESHOLDING
from .diffusion import condition_lowres, denoise
from .errors import UserError
from .openmp import adapt as adapt_threads
from .text import TextEncoding, cat_encodings, load_text_encoder
from .unet import resolve_precision

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(training_config: dict, sampler: str = "dpmpp", thresholding: str = "dynamic",
                   percentile: float = 0.95, max_value: float = 1.5):
    """A fresh sampling scheduler on the stage's training noise schedule.

    `static` thresholding clips x0 to [-1, 1] (diffusers' thresholding with s capped at 1); `dynamic` is Imagen's.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")
    if thresholding not in THRESHOLDING:
        raise UserError(f"unknown thresholding '{thresholding}'; use one of {', '.join(THRESHOLDING)}")
    if not 0 < percentile <= 1 or max_value < 1:
        raise UserError(f"thresholding needs 0 < percentile <= 1 and max_value >= 1 (got {percentile}, {max_value})")
    common = dict(thresholding=thresholding != "off", dynamic_thresholding_ratio=percentile,
                  sample_max_value=1.0 if thresholding == "static" else max_value)
    # the model boundary returns C channels, so a learned-variance (IF) training config samples with fixed variance
    config = {k: v for k, v in dict(training_config).items() if not k.startswith("_") and k != "variance_type"}
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, variance_type="fixed_small", **common)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing", **common)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **common)


def guided_denoiser(unet, text: TextEncoding, null_text: TextEncoding, guidance: float,
                    lowres: torch.Tensor | None = None, aug_level: torch.Tensor | None = None) -> Denoiser:
    """Classifier-free guidance as a wrapper: both branches in one batched U-Net call."""
    if guidance < 0:
        raise UserError(f"guidance scale must be >= 0 (got {guidance})")
    n = text.states.shape[0]
    both_text = cat_encodings([text, null_text.repeat(n)])
    both_lowres = None if lowres is None else torch.cat([lowres, lowres])
    both_level = None if aug_level is None else torch.cat([aug_level, aug_level])

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_batch = t.expand(2 * n) if t.dim() == 0 else t.repeat(2)
        cond, uncond = denoise(unet, torch.cat([x, x]), t_batch, both_text, both_lowres, both_level).chunk(2)
        return uncond + guidance * (cond - uncond)

    return predict


def conditional_denoiser(unet, text: TextEncoding, lowres: torch.Tensor | None = None,
                         aug_level: torch.Tensor | None = None) -> Denoiser:
    """The model's conditional prediction alone, one U-Net call (what CFG at weight 1 equals, at half the cost)."""
    n = text.states.shape[0]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoise(unet, x, t.expand(n) if t.dim() == 0 else t, text, lowres, aug_level)

    return predict


def autoguided_denoiser(model: Denoiser, guide: Denoiser, weight: float) -> Denoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507):
    D = D_guide + w (D_model - D_guide), where the guide is a
    weaker version of the model trained on the same data and conditions (an early checkpoint, a shorter run or a
    smaller network), both conditional. It is CFG's formula with the guide in the unconditional branch's place:
    w = 1 is the model alone, and a guide that is the model's unconditional branch gives CFG exactly."""
    if weight < 0:
        raise UserError(f"autoguidance weight must be >= 0 (got {weight})")

    return mixed_denoiser([model, guide], [weight, 1 - weight])  # w D_model + (1 - w) D_guide, the same sum


def switched_denoiser(main: Denoiser, other: Denoiser, boundary: int) -> Denoiser:
    """Per-noise-level expert switching (eDiff-I, Balaji et al. 2022; DeMe, 2024): `other` predicts at the noisy
    steps, timestep t >= `boundary` (the image's layout), `main` at the rest (its details); one model per step, so
    it costs what one model costs."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return other(x, t) if int(t.reshape(-1)[0]) >= boundary else main(x, t)

    return predict


def mixed_denoiser(denoisers: list[Denoiser], weights: list[float]) -> Denoiser:
    """Output-space fusion: sum_i w_i D_i(x, t) with weights summing to 1. Two models with weights (1 - w, w) are
    guidance between models, D = D_ref + w (D_model - D_ref) (w > 1 extrapolates away from the reference, as in
    autoguidance, Karras et al. 2024); equal weights are an ensemble."""
    if abs(sum(weights) - 1) > 1e-6:
        raise UserError(f"mixture weights must sum to 1 (got {weights})")
    if len(denoisers) == 1:
        return denoisers[0]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sum(w * d(x, t) for d, w in zip(denoisers, weights))

    return predict


def _autocast(predict: Denoiser, device_type: str) -> Denoiser:
    def autocast_predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return predict(x, t).float()

    return autocast_predict


def randn(shape: tuple[int, ...], generators: list[torch.Generator], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Noise with row i drawn from generators[i]: independent of batch composition."""
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generators]).to(device)


def run_sampler(predict: Denoiser, scheduler, shape: tuple[int, ...], generators: list[torch.Generator],
                steps: int, device="cpu", progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """The sampling loop: x_T ~ N(0, I), then one scheduler step per timestep. Returns x_0 clipped to [-1, 1]."""
    scheduler.set_timesteps(steps, device=device)
    x = randn(shape, generators, device) * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        adapt_threads()
        prediction = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(prediction, t, x, generator=generators).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_stage(stage, text: TextEncoding, null_text: TextEncoding, generators: list[torch.Generator], *,
                 lowres: torch.Tensor | None = None, sampler: str = "dpmpp", steps: int = 25, guidance: float = 3.0,
                 thresholding: str = "dynamic", percentile: float = 0.95, max_value: float = 1.5,
                 mix: list[tuple[object, float]] | None = None, guide=None, switch: tuple | None = None,
                 progress: bool = True, precision: str = "no") -> torch.Tensor:
    """Sample one stage: a base stage from text alone, an SR stage from text and the previous stage's images.
    `mix` = [(other stage, weight)]: their guided predictions are mixed in (see mixed_denoiser); this stage gets
    1 - sum(weights). `guide` (another stage of the same kind): autoguidance at weight `guidance` instead of CFG
    (see autoguided_denoiser). `switch` = (other stage, boundary): the other stage (with the same CFG) predicts
    the steps at timesteps >= boundary (switched_denoiser). `precision` (no | bf16 | auto, see
    unet.resolve_precision): the U-Net calls' autocast; the sampler's own arithmetic stays fp32."""
    if steps < 1:
        raise UserError(f"steps must be >= 1 (got {steps})")
    device = next(stage.unet.parameters()).device
    n = len(generators)
    shape = (n, stage.channels, stage.resolution, stage.resolution)
    level = None
    if stage.kind == "sr":
        if lowres is None:
            raise ValueError(f"stage {stage.name} is a super-resolution stage and needs the low-res images")
        level = torch.full((n,), stage.aug_level_sample, device=device, dtype=torch.long)
        aug_noise = randn(shape, generators, device)
        lowres = condition_lowres(lowres.to(device), stage.resolution, level, aug_noise, stage.scheduler.alphas_cumprod)
    for other in _partners(mix, guide, switch):
        if other.scheduler.config.prediction_type != stage.scheduler.config.prediction_type:
            raise UserError(f"stage {stage.name}: cannot combine a {other.scheduler.config.prediction_type} model "
                            f"with a {stage.scheduler.config.prediction_type} one")
    if sum(bool(f) for f in (mix, guide is not None, switch)) > 1:
        raise UserError("--mix, --guide-model and --switch are three ways of fusing models at sampling time; use one")
    if guide is not None:
        predict = autoguided_denoiser(conditional_denoiser(stage.unet, text.to(device), lowres, level),
                                      conditional_denoiser(guide.unet, text.to(device), lowres, level), guidance)
    else:
        predict = guided_denoiser(stage.unet, text.to(device), null_text.to(device), guidance, lowres, level)
    if switch:
        other, boundary = switch
        predict = switched_denoiser(predict, guided_denoiser(other.unet, text.to(device), null_text.to(device),
                                                             guidance, lowres, level), boundary)
    if mix:
        others = [guided_denoiser(o.unet, text.to(device), null_text.to(device), guidance, lowres, level)
                  for o, _ in mix]
        predict = mixed_denoiser([predict, *others], [1 - sum(w for _, w in mix), *(w for _, w in mix)])
    if precision not in ("no", "bf16", "auto"):
        raise UserError(f"sampling precision must be no, bf16 or auto (got {precision})")
    if resolve_precision(precision, device.type == "cuda") == "bf16":
        predict = _autocast(predict, device.type)
    scheduler = make_scheduler(stage.scheduler.config, sampler, thresholding, percentile, max_value)
    return run_sampler(predict, scheduler, shape, generators, steps, device, progress, desc=f"stage {stage.name}")


def sample_cascade(cascade, prompts: list[str], seeds: list[int], *, stages: list[str] | None = None,
                   batch_size: int = 16, mix: list[tuple[object, float]] | None = None, guide=None,
                   switch: tuple | None = None, progress: bool = True,
                   on_stage: Callable[[str, torch.Tensor, list[int]], None] | None = None,
                   **options) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for N prompts, one seed each, through every stage (or the named ones).

    `options` override the cascade's sampling defaults (sampler, steps, guidance, thresholding, percentile,
    max_value, grayscale: average the colour channels of the final images, set for models trained on gray data).
    Prompts are processed in batches of `batch_size`; the results do not depend on it. `mix` = [(other cascade,
    weight)] mixes other models' predictions into every stage they share (output-space fusion, see mixed_denoiser);
    `guide` (another cascade) autoguides every stage it shares at the `guidance` weight (autoguided_denoiser), the
    others keep their CFG; `switch` = (other cascade, boundary) hands it the noisy steps of every stage it shares.
    `on_stage(name, images, seeds)` sees every stage's output per batch, as sampling only up to that stage would
    return it (grayscale applied): how evaluation reuses the base samples of a cascade instead of drawing them again.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    settings = {**cascade.sampling, **{k: v for k, v in options.items() if v is not None}}
    grayscale = settings.pop("grayscale", False)
    use = _stages_to_run(cascade, stages)
    encoder = load_text_encoder(cascade.text_encoder)
    for other in _partners(mix, guide, switch):
        if other.text_encoder != cascade.text_encoder:
            raise UserError("models combined at sampling time (--mix, --guide-model, --switch) must share a text "
                            "encoder")
    if guide is not None and not any(s.name == g.name for s in use for g in guide.stages):
        raise UserError(f"the guide model has none of the stages sampled ({', '.join(s.name for s in use)}); its "
                        f"stages: {', '.join(g.name for g in guide.stages)}")
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        enc = encoder(list(chunk) + [""])
        text, null = enc.index(slice(0, len(chunk))), enc.index(slice(len(chunk), len(chunk) + 1))
        x = None
        for stage in use:
            partners = [(o.stage(stage.name), w) for o, w in mix or [] if any(s.name == stage.name for s in o.stages)]
            guiding = _same_stage(guide, stage.name)
            switching = (_same_stage(switch[0], stage.name), switch[1]) if switch else None
            x = sample_stage(stage, text, null, generators, lowres=x, mix=partners, guide=guiding,
                             switch=switching if switching and switching[0] is not None else None, progress=progress,
                             **settings)
            if on_stage is not None:
                on_stage(stage.name, (to_gray(x) if grayscale else x).cpu(), list(seeds[start : start + batch_size]))
        if grayscale:
            x = to_gray(x)
        outputs.append(x.cpu())
    return torch.cat(outputs)


def _partners(mix, guide, switch) -> list:
    """Every other model a sampling call combines with the main one (--mix, --guide-model, --switch)."""
    return [o for o, _ in mix or []] + [o for o in (guide, switch and switch[0]) if o is not None]


def _same_stage(cascade, name: str):
    """The stage of `cascade` (or None) named `name`."""
    return None if cascade is None else next((s for s in cascade.stages if s.name == name), None)


def _stages_to_run(cascade, names: list[str] | None) -> list:
    """The stages to sample: all, or a leading run of them (each SR stage needs the output of the one before it)."""
    if names is None:
        return list(cascade.stages)
    known = [s.name for s in cascade.stages]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"no stage {', '.join(map(repr, unknown)) or '(none given)'} in this cascade; stages: "
                        f"{', '.join(known)}")
    use = [s for s in cascade.stages if s.name in names]
    if use != cascade.stages[: len(use)]:
        raise UserError(f"stages {' '.join(names)}: a super-resolution stage needs the stage before it to make its "
                        f"low-res input; give a leading run of the cascade's stages, e.g. --stages {known[0]} or "
                        f"--stages {' '.join(known)}")
    return use


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with every channel set to the channel mean: how models trained on gray data are sampled."""
    return images.mean(dim=1, keepdim=True).expand_as(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W, C)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1):
    """Write images in [-1, 1] as one PNG grid (nrow images per row), optionally enlarged by `scale`."""

    pixels = to_uint8(images).numpy()
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = Image.new("RGB", (nrow * (w + 2) + 2, rows * (h + 2) + 2), (255, 255, 255))
    for i, img in enumerate(pixels):
        tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
        grid.paste(tile, (2 + (i % nrow) * (w + 2), 2 + (i // nrow) * (h + 2)))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
