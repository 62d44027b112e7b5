"""The size (and tiles) at which `features` reads a detection / segmentation set the project does not know (#39).

A U-Net trained on 32 px images has no use for a 300 x 300 smear at full size, and cannot afford it: its
self-attention costs the square of the token count (the SR U-Net: 1.05 GFLOP per image at 32 px, 25 at 120 x 120,
537 at 300 x 300, 85% of it attention), so a first run at the first image's size did not finish 16 images in 4
minutes. The plan, printed before any work:

1. scale: the largest size (never above the images' own) at which the median object is at most MAX_OBJECT px
   (detection: a box's shorter side; segmentation: the square root of each class's area per image, the smallest
   class's median). The registry's sizes for bccd (120 x 160: boxes ~24 px) and wbc-seg (120 x 120: nuclei ~41 px)
   satisfy the same rule.
2. tiles: where attention is more than ATTENTION_SHARE of the U-Net's FLOPs at that size, the image is cut into
   k x k tiles, k the smallest with attention at most that share in a tile: cost linear in the image area.
3. budget: the expected time (FLOPs counted on a meta-device copy of the U-Net, at the FLOP rate of one measured
   pass at the stage's resolution) against `budget_s`; over it, the size shrinks (down to objects of MIN_OBJECT px)
   and the line says what remains over.
`--size` / `--tile` override every step; the registry's own sizes are kept.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .diffusion import denoise

MAX_OBJECT = 48  # px: about the 32 px U-Net's view of an object (CIFAR-10's fill 16-32 px of the frame)
MIN_OBJECT = 12  # px: smaller than this and a 4-px feature grid cannot place the object
ATTENTION_SHARE = 0.5
DEFAULT_BUDGET_S = 600.0


@dataclass
class SizePlan:
    size: tuple[int, int]
    tile: tuple[int, int]
    seconds: float
    note: str


def object_side(data) -> float | None:
    """The median object side (px) of a dense split at its current size (see module doc), None if it has none."""
    if data.task == "detection":
        boxes = [b for b in data.boxes if len(b)]
        if not boxes:
            return None
        b = torch.cat(boxes)
        return float(torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).median())
    medians = []
    for c in range(1, len(data.class_names)):  # class 0 is the background
        area = (data.masks == c).flatten(1).sum(1).float()
        if (area > 0).any():
            medians.append(float(area[area > 0].sqrt().median()))
    return min(medians) if medians else None


def unet_gflops(stage, hw: tuple[int, int], text, meta=None) -> tuple[float, float]:
    """(total, attention) GFLOPs of one U-Net forward on one image at `hw`, counted on a meta-device copy (`meta`,
    made here if not given: no memory, no time, so the count at 300 x 300 is as cheap as at 32)."""
    unet = meta if meta is not None else copy.deepcopy(stage.unet).to("meta")
    x = torch.zeros(1, unet.config.out_channels, *hw, device="meta")
    lowres = torch.zeros_like(x) if stage.kind == "sr" else None
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        denoise(unet, x, t, text.to("meta"), lowres, t if stage.kind == "sr" else None)
    ops = counter.get_flop_counts()["Global"]
    attention = sum(v for k, v in ops.items() if "bmm" in str(k) or "scaled_dot" in str(k))
    return counter.get_total_flops() / 1e9, attention / 1e9


@torch.inference_mode()
def gflop_rate(stage, text, batch: int = 8) -> float:
    """GFLOP/s of this machine on the stage's U-Net at its own resolution (timed passes after a warm-up)."""
    unet, r = stage.unet.eval(), stage.resolution
    device = next(unet.parameters()).device
    x = torch.zeros(batch, unet.config.out_channels, r, r, device=device)
    lowres = torch.zeros_like(x) if stage.kind == "sr" else None
    t = torch.full((batch,), 100, dtype=torch.long, device=device)
    level = torch.zeros_like(t) if stage.kind == "sr" else None
    texts = text.repeat(batch).to(device)
    denoise(unet, x, t, texts, lowres, level)
    seconds = []
    for _ in range(2):  # the faster of two timed passes: a busy moment on a shared machine is not the rate
        start = time.perf_counter()
        denoise(unet, x, t, texts, lowres, level)
        seconds.append(time.perf_counter() - start)
    return batch * unet_gflops(stage, (r, r), text)[0] / max(min(seconds), 1e-6)


def _multiple(value: float, unit: int) -> int:
    return max(unit, int(value) // unit * unit)


def _tile(stage, hw, unit: int, text, meta) -> tuple[int, int]:
    """The largest tile (h / k, w / k: the image cut into k x k, each side a multiple of `unit`) whose attention
    share is at most ATTENTION_SHARE; the smallest such cut if none is."""
    h, w = hw
    cuts = [(h // k, w // k) for k in range(1, min(h, w) // unit + 1)
            if h % k == 0 and w % k == 0 and (h // k) % unit == 0 and (w // k) % unit == 0]
    for th, tw in cuts:
        total, attention = unet_gflops(stage, (th, tw), text, meta)
        if attention <= ATTENTION_SHARE * total:
            return th, tw
    return cuts[-1] if cuts else hw


def expected_seconds(stage, size, tile, passes: int, text, rate: float, meta=None) -> float:
    """Seconds for `passes` U-Net passes over images of `size` read in `tile`s, at `rate` GFLOP/s."""
    tiles = (size[0] // tile[0]) * (size[1] // tile[1])
    return passes * tiles * unet_gflops(stage, tuple(tile), text, meta)[0] / rate


def plan_size(stage, native: tuple[int, int], side: float | None, images: int, passes: int, unit: int, text,
              budget_s: float = DEFAULT_BUDGET_S, rate: float | None = None) -> SizePlan:
    """The task size and tile for `images` images x `passes` U-Net passes each (models x timesteps x draws), from
    the images' own size `native` and their median object side there (module doc)."""
    rate = rate or gflop_rate(stage, text)
    meta = copy.deepcopy(stage.unet).to("meta")
    scale = min(1.0, MAX_OBJECT / side) if side else 1.0
    why = (f"objects' median side {side:.0f} px at {native[0]}x{native[1]}" if side else
           f"no objects to measure at {native[0]}x{native[1]}")
    while True:
        size = (_multiple(native[0] * scale, unit), _multiple(native[1] * scale, unit))
        tile = _tile(stage, size, unit, text, meta)
        seconds = expected_seconds(stage, size, tile, images * passes, text, rate, meta)
        smaller = scale * 0.8
        if seconds <= budget_s or not side or side * smaller < MIN_OBJECT or min(size) <= unit:
            break
        scale = smaller
    objects = f", objects ~{side * scale:.0f} px" if side else ""
    over = "" if seconds <= budget_s else f", over the {budget_s:.0f} s budget (--size / --tile / --budget to change)"
    note = (f"task size {size[0]}x{size[1]} ({why}{objects}), tile {tile[0]}x{tile[1]}; expected ~{seconds:.0f} s for "
            f"{images} images x {passes} U-Net passes at {rate:.0f} GFLOP/s{over}")
    return SizePlan(size, tile, seconds, note)
