"""The denoising objective: one function, per-example losses, for base and super-resolution stages.

Forward process (Ho et al. 2020, eq. 4): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t the cumulative
product of the stage's cosine schedule (Nichol & Dhariwal 2021). Targets: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
(Salimans & Ho 2022, sec. 4). Min-SNR-gamma weighting (Hang et al. 2023): w_t = min(SNR_t, gamma) / SNR_t for an eps
target and min(SNR_t, gamma) / (SNR_t + 1) for a v target, SNR_t = a_t / (1 - a_t). Condition dropout replaces the
text with the empty caption's encoding with probability p, which trains the unconditional model that classifier-free
guidance needs (Ho & Salimans 2022). SR stages see their low-res input upsampled and noised to a random level in
[0, aug_level_max] (noise-conditioning augmentation, Imagen sec. 2.5 / Ho et al. 2022 "Cascaded diffusion"), and the
level is given to the U-Net as `class_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .text import TextEncoding


def denoise(unet, x_t: torch.Tensor, t: torch.Tensor, text: TextEncoding, lowres: torch.Tensor | None = None,
            aug_level: torch.Tensor | None = None) -> torch.Tensor:
    """The one call signature at the model boundary: the U-Net's prediction (eps or v) for x_t.

    SR stages get `lowres` (already upsampled to x_t's size and noise-augmented) concatenated on channels.
    Models with a learned variance (DeepFloyd IF: 2C output channels) return their first C channels.
    """
    model_in = x_t if lowres is None else torch.cat([x_t, lowres.to(x_t.dtype)], dim=1)
    out = unet(model_in, t, encoder_hidden_states=text.states.to(x_t.dtype), encoder_attention_mask=text.mask,
               class_labels=aug_level, return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
    a = alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def upsample(lowres: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of the low-res image, as DeepFloyd IF's super-resolution pipeline does."""
    return F.interpolate(lowres, size=(size, size) if isinstance(size, int) else size, mode="bilinear",
                         align_corners=True)


def condition_lowres(lowres: torch.Tensor, size: int | tuple[int, int], level: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Upsample a low-res image and noise it to `level` (noise-conditioning augmentation)."""
    return add_noise(upsample(lowres, size), level, noise, alphas_cumprod)


@dataclass
class Draws:
    """All random draws of one loss evaluation: timesteps, noise, condition dropout, SR augmentation."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor  # bool: replace the caption with the empty one
    aug_level: torch.Tensor | None = None
    aug_noise: torch.Tensor | None = None

    def slice(self, start: int, stop: int) -> Draws:
        values = (getattr(self, f.name) for f in fields(self))
        return Draws(*(None if v is None else v[start:stop] for v in values))


def draw(n: int, shape: tuple[int, ...], num_steps: int, *, cond_drop_prob: float = 0.0, aug_level_max: int | None = None,
         generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Draws:
    """Draw the randomness for n examples of image shape `shape` (C, H, W); from `generator` if given.

    Drawing for a whole global batch and slicing per process makes a multi-process step equal a one-process step.
    """
    where = generator.device if generator is not None else device
    kw = dict(generator=generator, device=where)
    t = torch.randint(0, num_steps, (n,), **kw)
    noise = torch.randn((n, *shape), **kw)
    drop = torch.rand(n, **kw) < cond_drop_prob
    level = aug_noise = None
    if aug_level_max is not None:
        level = torch.randint(0, aug_level_max + 1, (n,), **kw)
        aug_noise = torch.randn((n, *shape), **kw)
    moved = (None if v is None else v.to(device) for v in (t, noise, drop, level, aug_noise))
    return Draws(*moved)


def training_loss(
    unet,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    text: TextEncoding,
    *,
    null_text: TextEncoding | None = None,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = 5.0,
    cond_drop_prob: float = 0.0,
    lowres: torch.Tensor | None = None,
    aug_level_max: int = 0,
    generator: torch.Generator | None = None,
    draws: Draws | None = None,
) -> torch.Tensor:
    """Per-example weighted MSE (shape (B,)) of the U-Net's prediction for images x0 in [-1, 1].

    All randomness (timesteps, noise, dropout, augmentation level) is `draws`, or drawn from `generator`, so a
    fixed generator gives a validation loss at fixed noise and timesteps. `lowres` (SR stages) is the clean
    low-res image; it is upsampled and augmented here.
    """
    n, num_steps = x0.shape[0], alphas_cumprod.shape[0]
    if draws is None:
        draws = draw(n, tuple(x0.shape[1:]), num_steps, cond_drop_prob=cond_drop_prob,
                     aug_level_max=aug_level_max if lowres is not None else None, generator=generator, device=x0.device)
    t, noise = draws.t, draws.noise
    x_t = add_noise(x0, t, noise, alphas_cumprod)

    if draws.drop.any():
        if null_text is None:
            raise ValueError("condition dropout needs null_text (the empty caption's encoding)")
        drop = draws.drop
        null = null_text.to(x0.device).repeat(n)
        text = TextEncoding(
            torch.where(drop[:, None, None], null.states, text.states),
            torch.where(drop[:, None], null.mask, text.mask),
            torch.where(drop[:, None], null.pooled, text.pooled),
        )

    aug_level = None
    if lowres is not None:
        aug_level = draws.aug_level
        lowres = condition_lowres(lowres, x0.shape[-1], aug_level, draws.aug_noise, alphas_cumprod)

    prediction = denoise(unet, x_t, t, text, lowres, aug_level).float()
    a = alphas_cumprod.to(x0.device)[t].float()
    if prediction_type == "epsilon":
        target = noise.float()
    elif prediction_type == "v_prediction":
        view = (-1, *([1] * (x0.dim() - 1)))
        target = a.sqrt().view(view) * noise.float() - (1 - a).sqrt().view(view) * x0.float()
    else:
        raise ValueError(f"unknown prediction_type '{prediction_type}'; use epsilon or v_prediction")
    loss = (prediction - target).square().mean(dim=tuple(range(1, x0.dim())))
    if min_snr_gamma:
        snr = a / (1 - a)
        clipped = snr.clamp(max=min_snr_gamma)
        loss = loss * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1))
    return loss
