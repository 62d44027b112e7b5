"""Semantic segmentation heads on feature grids, trained with cross-entropy over the pixels that have a class
(masks.IGNORE pixels left out).

- an ensemble of pixel MLPs as in ddpm-segmentation (Baranchuk et al. 2022; 256-128 hidden, ReLU + BatchNorm),
  trained on pixels sampled bilinearly from the grid (the same values an upsampled map would give), their softmax
  averaged;
- a small convolutional head on the grid whose logits are upsampled;
- the scratch U-Net (scratch.py) under a 1x1 classifier.

Scored by torchmetrics over the whole split: IoU (Jaccard) and Dice (F1) per class, mIoU over all classes and over
the foreground. The probe protocol that fits and scores these heads is dense_probe.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex
from tqdm.auto import tqdm

from .data import random_window
from .masks import IGNORE
from .openmp import adapt as adapt_threads
from .scratch import ScratchSegmenter

HEADS = ("mlp", "conv")  # --head for --task segmentation; the first is the default


class PixelMLP(nn.Module):
    """ddpm-segmentation's pixel classifier: C -> 256 -> 128 -> K, ReLU + BatchNorm."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, 256), nn.ReLU(), nn.BatchNorm1d(256), nn.Linear(256, 128),
                                 nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)


class ConvSegHead(nn.Module):
    """Two 3x3 convs and a 1x1 classifier on the grid; logits upsampled bilinearly to the mask size."""

    def __init__(self, channels: int, classes: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(width, classes, 1))

    def forward(self, x, size):
        return F.interpolate(self.net(x), size=size, mode="bilinear", align_corners=False)


def sample_pixels(x: torch.Tensor, masks: torch.Tensor, count: int, gen: torch.Generator):
    """`count` random pixels of random images: their features interpolated bilinearly from the grid, exactly as
    F.interpolate(mode="bilinear", align_corners=False) would upsample them (without building the full-size maps),
    and their mask labels."""
    n, (gh, gw), (mh, mw) = len(x), x.shape[2:], masks.shape[1:]
    i = torch.randint(n, (count,), generator=gen)
    py, px = torch.randint(mh, (count,), generator=gen), torch.randint(mw, (count,), generator=gen)

    def source(p, size_in, size_out):  # PyTorch's source index for align_corners=False, clamped at 0
        src = ((p.float() + 0.5) * size_in / size_out - 0.5).clamp_min(0)
        low = src.floor().long().clamp_max(size_in - 1)
        return low, (low + 1).clamp_max(size_in - 1), (src - low).clamp(0, 1).unsqueeze(1)

    y0, y1, wy = source(py, gh, mh)
    x0, x1, wx = source(px, gw, mw)
    cells = x.permute(0, 2, 3, 1)
    top = cells[i, y0, x0] * (1 - wx) + cells[i, y0, x1] * wx
    bottom = cells[i, y1, x0] * (1 - wx) + cells[i, y1, x1] * wx
    return top * (1 - wy) + bottom * wy, masks[i, py, px].long()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels that have a class (masks.IGNORE pixels left out); 0, not NaN, when a
    batch has none."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


def train_segmenter(kind: str, x: torch.Tensor, masks: torch.Tensor, classes: int, *, lr: float, steps: int,
                    seed: int = 0, ensemble: int = 3, pixels: int = 4096, batch_size: int = 8,
                    model: nn.Module | None = None, optimizer=None,
                    crop: tuple[int, int] | None = None, desc: str | None = None) -> list[nn.Module]:
    """`ensemble` pixel MLPs (different seeds), one conv head, or (kind "scratch", `x` the images) a small U-Net
    trained end to end, or (kind "model", `x` the images) a given grid `model` with the (x, size) signature and its
    `optimizer(model) -> (opt, schedule)` (a fine-tuned backbone); AdamW + cosine schedule by default,
    cross-entropy; every path but the pixel MLPs flips left-right. `crop` (h, w): grid paths train each batch on one
    random window of the images and masks (at a multiple of 4 pixels), a fraction of the pixels' cost. `desc`: a
    progress bar of the steps under that name (the end-to-end fits take minutes on a CPU)."""
    heads = []
    for member in range(ensemble if kind == "mlp" else 1):
        torch.manual_seed(seed * 100 + member)
        head = model if kind == "model" else {"mlp": PixelMLP, "conv": ConvSegHead, "scratch": ScratchSegmenter}[kind](
            x.shape[1], classes)
        if optimizer is not None:
            opt, sched = optimizer(head)
        else:
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed * 100 + member)
        head.train()
        for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=desc is None):
            adapt_threads()
            if kind == "mlp":
                feats, target = sample_pixels(x, masks, pixels, gen)
                loss = masked_cross_entropy(head(feats), target)
            else:
                idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
                flip = (torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1)
                xb, mb = torch.where(flip, x[idx].flip(-1), x[idx]), masks[idx].long()
                mb = torch.where(flip[:, 0], mb.flip(-1), mb)
                if crop is not None:
                    (y0, x0), (ch, cw) = random_window(tuple(mb.shape[-2:]), crop, 4, gen), crop
                    xb, mb = xb[..., y0:y0 + ch, x0:x0 + cw], mb[:, y0:y0 + ch, x0:x0 + cw]
                loss = masked_cross_entropy(head(xb, mb.shape[1:]), mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        heads.append(head.eval())
    return heads


@torch.inference_mode()
def segment(heads: list[nn.Module], kind: str, x: torch.Tensor, size: tuple[int, int],
            flip_test: bool = False) -> torch.Tensor:
    """Class index per pixel (N, H, W): the heads' softmax averaged; with `flip_test` also over the mirror image
    (its probabilities mirrored back). Pixel MLPs see one pixel's features at a time, so mirroring cannot change
    their output: the flip test applies to grid heads (conv, scratch)."""
    out = []
    for xi in x.split(4):
        if kind == "mlp":
            up = F.interpolate(xi, size=size, mode="bilinear", align_corners=False)
            flat = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])
            probs = sum(h(flat).softmax(-1) for h in heads).reshape(len(xi), *size, -1)
        else:
            probs = sum(h(xi, size).softmax(1) for h in heads)
            if flip_test:
                probs = probs + sum(h(xi.flip(-1), size).softmax(1).flip(-1) for h in heads)
            probs = probs.permute(0, 2, 3, 1)
        out.append(probs.argmax(-1))
    return torch.cat(out)


def segmentation_scores(pred: torch.Tensor, masks: torch.Tensor, class_names: list[str]) -> dict:
    """IoU and Dice per class over the whole split (torchmetrics), mIoU over all classes and over foreground."""
    k = len(class_names)
    truth = masks.long().flatten()
    scored = truth != IGNORE  # void and stray pixels (masks.py) are not scored
    pred, truth = pred.flatten()[scored], truth[scored]
    iou = MulticlassJaccardIndex(k, average=None)(pred, truth)
    dice = MulticlassF1Score(k, average=None)(pred, truth)
    return dict(miou=float(iou.mean()), miou_foreground=float(iou[1:].mean()) if k > 1 else float(iou.mean()),
                per_class={n: dict(iou=float(iou[i]), dice=float(dice[i])) for i, n in enumerate(class_names)})


def kind_of(heads: list[nn.Module]) -> str:
    """How `segment` applies a head list: pixel MLPs on upsampled features, anything else on the grid."""
    return "mlp" if isinstance(heads[0], PixelMLP) else "conv"
