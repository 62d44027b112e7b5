"""A cascade stage's U-Net as a task backbone fine-tuned end to end (issue #37), under the probes' heads.

Frozen U-Net features plus a small head lose to a small U-Net trained from scratch with few labels on this
project's data (docs/results.md); practitioners start the task network from the pretrained weights instead and
fine-tune it (Huang et al. 2024, arXiv 2402.15216; Rousseau et al. 2023, arXiv 2307.14066). `UNetBackbone` is that
network: the images at the task size enter the stage's U-Net at a fixed timestep `t` (scaled by sqrt(alpha_bar_t),
without noise, so the input is deterministic), conditioned on a fixed text encoding (the empty prompt's); SR stages
get the image's own downsampled copy as their low-res input, as in features.unet_features. The chosen blocks' maps
are brought to the task grid, concatenated and standardised with statistics of the training images measured once
before training (`calibrate`), so at step 0 a head sees what the frozen-feature probe sees.

The recipe (`param_groups`, `warmup_cosine`): AdamW with the backbone at `BACKBONE_LR_RATIO` of the head's learning
rate (discriminative fine-tuning), weight decay on both, a linear warm-up over `WARMUP_SHARE` of the steps then a
cosine decay; optionally frozen early blocks (`freeze`). `backbone-scratch` is the identical network and recipe
from freshly initialised weights: the control that isolates what pretraining contributes.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .data import resize
from .diffusion import condition_lowres, denoise
from .errors import UserError
from .features import _block, random_like
from .text import TextEncoding

BACKBONE_T = 50  # the timestep the images enter at (the dense features' first default timestep)
BACKBONE_LR_RATIO = 0.1  # backbone learning rate / head learning rate
WARMUP_SHARE = 0.1  # share of the steps with a linear warm-up
WEIGHT_DECAY = 1e-4
SETS = ("backbone", "backbone-scratch")  # the probe rows: pretrained weights, and the same network from scratch
ORDER = ("down", "mid", "up")  # the order a U-Net runs its blocks in
CONDITIONING = ("empty", "learned")  # the text the trunk is conditioned on: the empty prompt's, or learnt from it


class _Enough(Exception):
    """Raised by the hook of the last block a backbone reads: the rest of the U-Net is not run (nor back-propagated)."""


def last_block(blocks: list[str]) -> str:
    """The block of `blocks` the U-Net runs last (down<i> in i, then mid, then up<i> in i)."""
    def rank(name: str):
        kind = next(k for k in ORDER if name.startswith(k))
        return ORDER.index(kind), int(name[len(kind):] or 0)
    return max(blocks, key=rank)


def block_channels(unet, name: str) -> int:
    """Output channels of a named block (down<i>, mid, up<i>) of a diffusers U-Net, from its config."""
    widths = list(unet.config.block_out_channels)
    if name == "mid":
        return widths[-1]
    if name.startswith("down"):
        return widths[int(name[4:])]
    return list(reversed(widths))[int(name[2:])]


def unused_after(unet, last: str) -> list[nn.Module]:
    """The modules a U-Net runs after block `last` (the later blocks and the output layers)."""
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    if last.startswith("down"):
        later = downs[int(last[4:]) + 1:] + [unet.mid_block] + ups
    elif last == "mid":
        later = ups
    else:
        later = ups[int(last[2:]) + 1:]
    return later + [m for m in (unet.conv_norm_out, unet.conv_out) if m is not None]


class UNetBackbone(nn.Module):
    """See the module doc. `forward(x)`: float images (N, C, H, W) in [-1, 1] -> standardised maps (N, channels,
    H / stride, W / stride), or with `pool` each block's map averaged over the grid (N, channels, 1, 1): the
    classification trunk. The U-Net stops after the last block read (`last_block`): a trunk of the down path and
    the middle costs about half of a full forward and backward pass."""

    def __init__(self, stage, text: TextEncoding, blocks: list[str], *, t: int = BACKBONE_T, stride: int = 4,
                 freeze: tuple[str, ...] = (), pool: bool = False, conditioning: str = "empty"):
        super().__init__()
        self.unet = copy.deepcopy(stage.unet).float().train()
        self.sr, self.factor = stage.kind == "sr", (stage.lowres / stage.resolution if stage.kind == "sr" else 1.0)
        self.blocks, self.t, self.stride, self.pool = list(blocks), int(t), stride, pool
        for name in blocks:
            _block(self.unet, name)  # an unknown block name is one error line, before any training
        self.last = last_block(self.blocks)
        for module in unused_after(self.unet, self.last):  # never run: not trained, not counted
            for p in module.parameters():
                p.requires_grad_(False)
        alphas = stage.scheduler.alphas_cumprod.float()
        self.register_buffer("alphas", alphas.clone())
        if conditioning not in CONDITIONING:
            raise UserError(f"unknown backbone conditioning '{conditioning}' ({' | '.join(CONDITIONING)})")
        states = text.states[:1].float().clone()
        if conditioning == "learned":  # a task embedding in the text's place, starting from the empty prompt's
            self.states = nn.Parameter(states)
        else:
            self.register_buffer("states", states)
        self.register_buffer("mask", text.mask[:1].clone())
        self.channels = sum(block_channels(self.unet, b) for b in blocks)
        self.register_buffer("mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("std", torch.ones(1, self.channels, 1, 1))
        for name in freeze:  # early blocks kept as pretrained ("stem": the input convolution)
            module = self.unet.conv_in if name == "stem" else _block(self.unet, name)
            for p in module.parameters():
                p.requires_grad_(False)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' maps on the task grid, before standardisation."""
        n, (h, w) = len(x), x.shape[-2:]
        captured = {}

        def keep(name, out):
            captured[name] = out[0] if isinstance(out, tuple) else out
            if name == self.last:
                raise _Enough

        handles = [_block(self.unet, b).register_forward_hook(lambda _m, _i, out, b=b: keep(b, out))
                   for b in self.blocks]
        try:
            tt = torch.full((n,), self.t, dtype=torch.long, device=x.device)
            x_t = self.alphas[self.t].sqrt() * x
            lowres = level = None
            if self.sr:
                level = torch.zeros(n, dtype=torch.long, device=x.device)
                small = resize(x, (round(h * self.factor), round(w * self.factor)))
                lowres = condition_lowres(small, (h, w), level, torch.zeros_like(x), self.alphas)
            text = TextEncoding(self.states.expand(n, -1, -1), self.mask.expand(n, -1), self.states.mean(1).expand(n, -1))
            denoise(self.unet, x_t, tt, text, lowres, level)
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if self.pool:
            return torch.cat([captured[b].float().mean((2, 3), keepdim=True) for b in self.blocks], 1)
        grid = (h // self.stride, w // self.stride)
        return torch.cat([resize(captured[b].float(), grid) for b in self.blocks], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.mean) / self.std

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int = 16) -> None:
        """Per-channel mean and std of the raw maps over training images `x` (the frozen probe's standardisation)."""
        was = self.training
        self.eval()
        maps = torch.cat([self.raw(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        self.mean.copy_(maps.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(maps.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        self.train(was)


class BackboneSegmenter(nn.Module):
    """A backbone and a grid segmentation head, with the heads' (x, size) signature (segmentation.segment)."""

    def __init__(self, trunk: UNetBackbone, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x, size):
        return self.head(self.trunk(x), size)


def optimizer_for(lr: float, steps: int):
    """The recipe's optimiser and schedule for a model holding a UNetBackbone (see module doc)."""

    def build(model: nn.Module):
        opt = torch.optim.AdamW(param_groups(model, lr), weight_decay=WEIGHT_DECAY)
        return opt, warmup_cosine(opt, steps)

    return build


def make_backbone(stage, text: TextEncoding, blocks: list[str], *, pretrained: bool, seed: int, stride: int = 4,
                  t: int = BACKBONE_T, freeze: tuple[str, ...] = (), pool: bool = False,
                  conditioning: str = "empty") -> UNetBackbone:
    """The `backbone` (the stage's weights) or `backbone-scratch` (the same architecture, weights drawn by `seed`)."""
    return UNetBackbone(stage if pretrained else random_like(stage, seed), text, blocks, t=t, stride=stride,
                        freeze=freeze, pool=pool, conditioning=conditioning)


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """AdamW groups: the pretrained U-Net's trainable weights at BACKBONE_LR_RATIO x lr, the new parameters (the head,
    a learned conditioning) at lr."""
    backbone = {id(p) for m in model.modules() if isinstance(m, UNetBackbone) for p in m.unet.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in trainable if id(p) in backbone], lr=lr * BACKBONE_LR_RATIO),
            dict(params=[p for p in trainable if id(p) not in backbone], lr=lr)]


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_share: float = WARMUP_SHARE):
    """A linear warm-up over `warmup_share` of the steps, then a cosine decay to 0 (per group, from its own lr)."""
    warmup = max(1, round(warmup_share * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
