"""Dense probes on frozen multi-block U-Net maps (features.extract_dense): object detection and segmentation.

Every feature set's views (block x timestep maps on one grid) are stacked as channels and standardised with the
training split's per-channel statistics; the heads are small and trained from scratch, the features never change.

- **Detection**: a CenterNet head ("Objects as Points", Zhou et al. 2019): per class a centre heat-map (focal loss
  with alpha 2, beta 4 against Gaussian-splatted centres, radius from the box size at IoU 0.7), plus box size and
  sub-cell offset (L1 at the centres, weights 0.1 and 1). Decoding is a 3x3 max-pool peak pick and the top 100
  peaks: no NMS. Scored COCO-style by pycocotools (the reference implementation; torchmetrics' mean AP needs
  torchvision, which does not install beside the CPU torch): mAP@[.5:.95], mAP@0.5 and per-class AP.
- **Segmentation**: an ensemble of pixel MLPs as in ddpm-segmentation (Baranchuk et al. 2022; 256-128 hidden,
  ReLU + BatchNorm), trained on pixels sampled bilinearly from the grid (the same values an upsampled map would
  give), their softmax averaged; and a small convolutional head on the grid whose logits are upsampled. Scored by
  torchmetrics over the whole test split: IoU (Jaccard) and Dice (F1) per class, mIoU over all classes.

The learning rate is chosen on validation (mAP@0.5 or mIoU); test scores are reported for that choice. Label
efficiency retrains the chosen head on 5 / 10 / 20 / all training images, several seeds (the images drawn by seed;
with all images the seed draws only the head's initial weights and batches, and that spread is the yardstick for
comparing two rows' all-label scores: benchmarks/results/dense_cpu.md gives it for BCCD and WBC).
`flip_test` scores every head (the scratch U-Net's too) on the input and its mirror image, averaged (CenterNet's flip
test): the heads train on mirrored inputs already, so it costs one more forward pass and no training. The same
heads' test scores without it are kept beside (`without_flip_test`), so its gain is measured on identical fits.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex
from tqdm.auto import tqdm

from .data import to_float
from .dense import load_dense
from .errors import UserError
from .features import FeatureFolder, open_features
from .masks import IGNORE

DETECTION_LRS = (1e-3, 3e-3)
SEGMENTATION_LRS = (1e-3, 3e-3)
LABELLED_IMAGES = (5, 10, 20, None)  # None: all training images
MAX_DETECTIONS = 100


def load_targets(folder: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    if manifest.get("task") not in ("detection", "segmentation"):
        raise UserError(f"{folder} holds {manifest.get('task', 'pooled')} features; extract a detection or "
                        "segmentation data set (bccd, wbc-seg) with `imagen-transfer features --data ...`")
    return load_file(Path(folder) / manifest["targets"])


def stacked_views(tensors: dict[str, torch.Tensor], views: list[str], splits) -> dict[str, torch.Tensor]:
    """{split: (N, C, h, w) float}: the views concatenated as channels, standardised by the training split."""
    x = {s: torch.cat([tensors[f"{s}/{v}"].float() for v in views], 1) for s in splits}
    mean = x["train"].mean(dim=(0, 2, 3), keepdim=True)
    std = x["train"].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return {s: (v - mean) / std for s, v in x.items()}


def boxes_of(targets: dict, split: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    counts = targets[f"{split}/box_counts"].tolist()
    return (list(targets[f"{split}/boxes"].split(counts)), list(targets[f"{split}/box_labels"].split(counts)))


# ------------------------------------------------------------------------------------------------ detection


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """CenterNet's Gaussian radius (Law & Deng 2018, CornerNet): the largest corner shift that keeps IoU >=
    min_overlap, the smallest of its three cases."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + (b1**2 - 4 * c1).clamp_min(0).sqrt()) / 2
    b2, c2 = 2 * (height + width), 4 * (1 - min_overlap) * width * height
    r2 = (b2 + (b2**2 - 16 * c2).clamp_min(0).sqrt()) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + (b3**2 - 4 * a3 * c3).clamp_min(0).sqrt()) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def centernet_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], classes: int, grid: tuple[int, int],
                      stride: int) -> dict[str, torch.Tensor]:
    """Heat-maps (N, K, h, w), size and offset maps (N, 2, h, w) and the centre mask (N, h, w) of pixel boxes."""
    n, (gh, gw) = len(boxes), grid
    heat = torch.zeros(n, classes, gh, gw)
    size, offset, mask = torch.zeros(n, 2, gh, gw), torch.zeros(n, 2, gh, gw), torch.zeros(n, gh, gw, dtype=torch.bool)
    ys, xs = torch.arange(gh).view(-1, 1).float(), torch.arange(gw).view(1, -1).float()
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        if not len(b):
            continue
        g = b / stride
        cx, cy = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2
        w, h = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        radius = gaussian_radius(h.ceil(), w.ceil()).floor().clamp_min(0)
        px, py = cx.floor().clamp(0, gw - 1), cy.floor().clamp(0, gh - 1)
        for j in range(len(b)):
            sigma = (2 * radius[j] + 1) / 6
            blob = torch.exp(-((xs - px[j]) ** 2 + (ys - py[j]) ** 2) / (2 * sigma**2))
            heat[i, lab[j]] = torch.maximum(heat[i, lab[j]], blob)
            y, x = int(py[j]), int(px[j])
            size[i, :, y, x] = torch.stack([w[j], h[j]])
            offset[i, :, y, x] = torch.stack([cx[j] - px[j], cy[j] - py[j]])
            mask[i, y, x] = True
    return dict(heat=heat, size=size, offset=offset, mask=mask)


class CenterNetHead(nn.Module):
    """1x1 bottleneck, 3x3 conv, then heat-map (K), size (2) and offset (2) branches."""

    def __init__(self, channels: int, classes: int, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(channels, width, 1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                   nn.ReLU())
        self.heat, self.size, self.offset = nn.Conv2d(width, classes, 1), nn.Conv2d(width, 2, 1), nn.Conv2d(width, 2, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - 0.1) / 0.1))  # CenterNet: prior probability 0.1

    def forward(self, x):
        y = self.trunk(x)
        return self.heat(y), self.size(y), self.offset(y)


def centernet_loss(out, target) -> torch.Tensor:
    """Focal loss on the heat-map (alpha 2, beta 4) per object, plus 0.1 x size L1 and 1 x offset L1 at centres."""
    heat, size, offset = out
    p = heat.sigmoid().clamp(1e-4, 1 - 1e-4)
    gt = target["heat"]
    pos = gt.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - gt) ** 4 * (1 - pos)).sum()
    m = target["mask"].unsqueeze(1).float()
    objects = m.sum().clamp_min(1)
    size_loss = ((size - target["size"]).abs() * m).sum() / objects
    offset_loss = ((offset - target["offset"]).abs() * m).sum() / objects
    return (pos_loss + neg_loss) / objects + 0.1 * size_loss + offset_loss


@torch.inference_mode()
def detection_maps(head: nn.Module, x: torch.Tensor, flip_test: bool = False):
    """The head's heat-map probabilities, sizes and offsets for `x`. With `flip_test`, CenterNet's flip test (Zhou
    et al. 2019, sec. 5): the heat-maps and sizes of `x` and of its mirror image (mapped back) averaged, the offsets
    from `x` alone (a mirrored sub-cell offset is not the same cell's)."""
    heat, size, offset = head(x)
    heat = heat.sigmoid()
    if flip_test:
        heat_mirror, size_mirror, _ = head(x.flip(-1))
        heat, size = (heat + heat_mirror.sigmoid().flip(-1)) / 2, (size + size_mirror.flip(-1)) / 2
    return heat, size, offset


@torch.inference_mode()
def decode(maps, stride: int, top: int = MAX_DETECTIONS) -> list[dict[str, torch.Tensor]]:
    """Per image: boxes (xyxy pixels), scores and labels of the `top` heat-map peaks (3x3 max-pool, no NMS), from
    detection_maps' (heat-map probabilities, sizes, offsets)."""
    heat, size, offset = maps
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    n, k, h, w = heat.shape
    scores, idx = heat.reshape(n, -1).topk(min(top, k * h * w))
    labels, cell = idx // (h * w), idx % (h * w)
    y, x = (cell // w).float(), (cell % w).float()
    results = []
    for i in range(n):
        off = offset[i].reshape(2, -1)[:, cell[i]]
        wh = size[i].reshape(2, -1)[:, cell[i]].clamp_min(0)
        cx, cy = x[i] + off[0], y[i] + off[1]
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], 1) * stride
        results.append(dict(boxes=boxes, scores=scores[i], labels=labels[i]))
    return results


def coco_map(predictions: list[dict], boxes: list[torch.Tensor], labels: list[torch.Tensor], class_names: list[str],
             size: tuple[int, int]) -> dict:
    """mAP@[.5:.95], mAP@0.5 and per-class AP / AP50 by pycocotools' COCOeval (100 detections per image)."""
    h, w = size
    gt = dict(images=[dict(id=i, width=w, height=h) for i in range(len(boxes))],
              categories=[dict(id=k + 1, name=n) for k, n in enumerate(class_names)], annotations=[])
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        for box, k in zip(b.tolist(), lab.tolist()):
            bw, bh = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append(dict(id=len(gt["annotations"]) + 1, image_id=i, category_id=k + 1,
                                          bbox=[box[0], box[1], bw, bh], area=bw * bh, iscrowd=0))
    dets = [dict(image_id=i, category_id=int(k) + 1, score=float(s),
                 bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])])
            for i, p in enumerate(predictions) for b, s, k in zip(p["boxes"], p["scores"], p["labels"])]
    if not dets:  # nothing detected: every AP is 0 (pycocotools cannot load an empty result list)
        return dict(map=0.0, map50=0.0, per_class={n: dict(ap=0.0, ap50=0.0) for n in class_names})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max dets)

    def mean_valid(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    per_class = {n: dict(ap=mean_valid(precision[:, :, k, 0, -1]), ap50=mean_valid(precision[0, :, k, 0, -1]))
                 for k, n in enumerate(class_names)}
    return dict(map=float(evaluator.stats[0]), map50=float(evaluator.stats[1]), per_class=per_class)


def train_detector(x: torch.Tensor, target: dict, classes: int, *, lr: float, steps: int, batch_size: int = 16,
                   seed: int = 0, scratch: bool = False, stride: int = 4) -> nn.Module:
    """AdamW (weight decay 1e-4), cosine schedule, random horizontal flips of inputs and targets. `x` is a feature
    grid for a CenterNet head, or (scratch) the images themselves for a small U-Net + the same head."""
    torch.manual_seed(seed)
    head = (nn.Sequential(ScratchUNet(x.shape[1], stride=stride), CenterNetHead(ScratchUNet.width_at(stride), classes))
            if scratch else CenterNetHead(x.shape[1], classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        xb, tb = x[idx], {k: v[idx] for k, v in target.items()}
        flip = torch.rand(len(idx), generator=gen) < 0.5
        if flip.any():
            xb, tb = _flip(xb, tb, flip)
        loss = centernet_loss(head(xb), tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def _flip(x: torch.Tensor, t: dict, flip: torch.Tensor):
    """Mirror features and CenterNet targets left-right where `flip`; the sub-cell x offset mirrors to 1 - offset
    (the centre moves from cell p + o to cell (w - 1 - p) + (1 - o))."""
    f4 = flip.view(-1, 1, 1, 1)
    x = torch.where(f4, x.flip(-1), x)
    out = {k: torch.where(f4 if v.dim() == 4 else flip.view(-1, 1, 1), v.flip(-1), v) for k, v in t.items()}
    mirrored_x = torch.where(out["mask"], 1 - out["offset"][:, 0], out["offset"][:, 0])
    out["offset"] = torch.stack([torch.where(flip.view(-1, 1, 1), mirrored_x, out["offset"][:, 0]),
                                 out["offset"][:, 1]], 1)
    return x, out


def _predict(head, x: torch.Tensor, stride: int, flip_test: bool = False, batch_size: int = 32) -> list[dict]:
    return [p for start in range(0, len(x), batch_size)
            for p in decode(detection_maps(head, x[start:start + batch_size], flip_test), stride)]


# ------------------------------------------------------------------------------------------------ segmentation


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
                    seed: int = 0, ensemble: int = 3, pixels: int = 4096, batch_size: int = 8) -> list[nn.Module]:
    """`ensemble` pixel MLPs (different seeds), one conv head, or (kind "scratch", `x` the images) a small U-Net
    trained end to end; AdamW + cosine schedule, cross-entropy; the conv and scratch paths flip left-right."""
    heads = []
    for member in range(ensemble if kind == "mlp" else 1):
        torch.manual_seed(seed * 100 + member)
        head = {"mlp": PixelMLP, "conv": ConvSegHead, "scratch": ScratchSegmenter}[kind](x.shape[1], classes)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed * 100 + member)
        head.train()
        for _ in range(steps):
            if kind == "mlp":
                feats, target = sample_pixels(x, masks, pixels, gen)
                loss = masked_cross_entropy(head(feats), target)
            else:
                idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
                flip = (torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1)
                xb, mb = torch.where(flip, x[idx].flip(-1), x[idx]), masks[idx].long()
                mb = torch.where(flip[:, 0], mb.flip(-1), mb)
                loss = masked_cross_entropy(head(xb, masks.shape[1:]), mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        heads.append(head.eval())
    return heads


class ScratchUNet(nn.Module):
    """The honest competitor: a small U-Net trained end to end from pixels (levels at strides 1, 2, 4, 8 with widths
    16, 32, 64, 128; two 3x3 convs + GroupNorm + SiLU per level), its decoder stopping at `stride`."""

    WIDTHS = (16, 32, 64, 128)

    @classmethod
    def width_at(cls, stride: int) -> int:
        return cls.WIDTHS[stride.bit_length() - 1]

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = self.WIDTHS
        self.down = nn.ModuleList([block(channels, w[0])] + [block(w[i - 1], w[i]) for i in range(1, len(w))])
        levels = len(w) - stride.bit_length()  # decoder steps from stride 8 back to `stride`
        self.up = nn.ModuleList([block(w[-1 - i] + w[-2 - i], w[-2 - i]) for i in range(levels)])

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for i, block in enumerate(self.up):
            skip = skips[-2 - i]
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return x


class ScratchSegmenter(nn.Module):
    """ScratchUNet at full resolution and a 1x1 classifier (the signature of ConvSegHead)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.net, self.classify = ScratchUNet(channels, stride=1), nn.Conv2d(ScratchUNet.WIDTHS[0], classes, 1)

    def forward(self, x, size):
        return F.interpolate(self.classify(self.net(x)), size=size, mode="bilinear", align_corners=False)


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


# ------------------------------------------------------------------------------------------------ the probe


def _subset(n: int, count: int | None, seed: int) -> torch.Tensor:
    if count is None or count >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


SPLITS = ("train", "val", "test")


@dataclass
class DenseTask:
    """One feature folder's dense task: its truth per split and how a head is fitted and scored on it."""

    detection: bool
    names: list[str]
    stride: int
    size: tuple[int, int]
    truth: dict  # split -> (boxes, labels) for detection, masks for segmentation
    train_target: dict | None  # CenterNet targets of the train split (detection)
    steps: int
    scratch_steps: int
    kind: str
    ensemble: int
    flip_test: bool = False

    @property
    def key(self) -> str:
        return "map50" if self.detection else "miou"

    def fit(self, set_name: str, x: torch.Tensor, index: torch.Tensor, lr: float, seed: int):
        """A head on the train images `index` (the scratch U-Net when set_name is 'scratch')."""
        from_scratch = set_name == "scratch"
        n_steps = self.scratch_steps if from_scratch else self.steps
        if self.detection:
            return train_detector(x[index], {k: v[index] for k, v in self.train_target.items()}, len(self.names),
                                  lr=lr, steps=n_steps, seed=seed, scratch=from_scratch, stride=self.stride)
        return train_segmenter("scratch" if from_scratch else self.kind, x[index], self.truth["train"][index],
                               len(self.names), lr=lr, steps=n_steps, seed=seed, ensemble=self.ensemble)

    def score(self, head, x: torch.Tensor, split: str, flip_test: bool | None = None) -> dict:
        """The head's scores on `split` (with the task's flip-test setting unless `flip_test` overrides it)."""
        flip = self.flip_test if flip_test is None else flip_test
        if self.detection:
            return coco_map(_predict(head, x, self.stride, flip), *self.truth[split], self.names, self.size)
        return segmentation_scores(segment(head, _kind_of(head), x, self.size, flip), self.truth[split], self.names)


def dense_task(manifest: dict, targets: dict, steps: int | None, scratch_steps: int | None, kind: str,
               ensemble: int, flip_test: bool = False) -> DenseTask:
    detection = manifest["task"] == "detection"
    names, stride = manifest["label_names"], manifest["stride"]
    steps = steps or (600 if detection else 300)
    if detection:
        truth = {s: boxes_of(targets, s) for s in SPLITS}
        train_target = centernet_targets(*truth["train"], len(names), tuple(manifest["grid"]), stride)
    else:
        truth, train_target = {s: targets[f"{s}/masks"] for s in SPLITS}, None
    return DenseTask(detection, names, stride, tuple(manifest["size"]), truth, train_target, steps,
                     scratch_steps or steps, kind, ensemble, flip_test)


def probe_dense(folder: str | Path | FeatureFolder, *, steps: int | None = None, seeds: int = 3, lrs=None, kind: str = "mlp",
                ensemble: int = 3, labelled=LABELLED_IMAGES, scratch: bool = False, scratch_steps: int | None = None,
                only: list[str] | None = None, fuse: list[list[str]] | None = None, flip_test: bool = False,
                progress: bool = True) -> tuple[dict, dict]:
    """Train and score the dense head on every feature set of `folder` (and, with `scratch`, a small U-Net trained
    end to end on the images, the same protocol); see the module doc. `fuse` = groups of set names: each group is
    one more set whose maps are the group's standardised maps concatenated as channels (feature fusion, e.g. U-Net
    features + pixels for objects a few grid cells wide). Returns the result (JSON-ready) and {set name: (chosen
    head, its test-split inputs)} for the overlays."""
    folder = open_features(folder)
    manifest, sets = folder.manifest, folder.sets
    for split in SPLITS:
        if split not in manifest["splits"]:
            raise UserError(f"{folder} has no '{split}' split (extract with --splits train val test)")
    task = dense_task(manifest, load_targets(folder.path, manifest), steps, scratch_steps, kind, ensemble, flip_test)
    lrs = tuple(lrs or (DETECTION_LRS if task.detection else SEGMENTATION_LRS))
    inputs = {name: (lambda n=name: stacked_views(sets[n], manifest["sets"][n]["views"], SPLITS))
              for name in sets}  # each set read when its turn comes (or never, when --sets leaves it out)
    for group in fuse or []:
        if len(group) < 2 or not set(group) <= set(inputs):
            raise UserError(f"--fuse needs two or more of {', '.join(inputs)} (got {'+'.join(group)})")
        inputs["+".join(group)] = lambda g=tuple(group), parts=dict(inputs): _fused([parts[n]() for n in g])
    if scratch:
        inputs["scratch"] = lambda: _images(manifest)
    if only:
        unknown = sorted(set(only) - set(inputs))
        if unknown:
            raise UserError(f"no feature set {', '.join(unknown)} in {folder} (it has {', '.join(inputs)}"
                            f"{'' if scratch else '; scratch needs --scratch'})")
        inputs = {k: v for k, v in inputs.items() if k in only}
    result = dict(task=manifest["task"], head="centernet" if task.detection else kind, steps=task.steps,
                  lrs=list(lrs), flip_test=flip_test, classes=task.names, size=list(task.size), stride=task.stride,
                  n={s: manifest["splits"][s]["n"] for s in SPLITS}, sets={})
    if scratch:
        result["scratch"] = dict(steps=task.scratch_steps, widths=list(ScratchUNet.WIDTHS))
    n_train = manifest["splits"]["train"]["n"]
    counts = [c for c in labelled if c is not None and c < n_train]
    chosen = {}
    with tqdm(total=len(inputs) * (len(lrs) + seeds * len(counts) + seeds - 1), desc=f"{manifest['task']} heads",
              disable=not progress, unit="head") as bar:
        for set_name, load in inputs.items():
            x = load()
            result["sets"][set_name], head = _probe_set(task, set_name, x, n_train, lrs, counts, seeds, bar)
            chosen[set_name] = (head, x["test"])
    return result, chosen


def _fused(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{split: maps}: the parts' (already standardised) maps concatenated as channels, split by split."""
    return {split: torch.cat([part[split] for part in parts], 1) for split in parts[0]}


def _probe_set(task: DenseTask, set_name: str, x: dict, n_train: int, lrs, counts, seeds: int, bar):
    """One feature set: the learning rate chosen on val with every label, then test scores per label count x seed.
    Returns (its result entry, the chosen head)."""
    grid = []
    for lr in lrs:
        head = task.fit(set_name, x["train"], torch.arange(n_train), lr, 0)
        grid.append(dict(lr=lr, val=task.score(head, x["val"], "val"), head=head))
        bar.update()
    best = max(grid, key=lambda g: g["val"][task.key])
    efficiency, plain = {}, {}  # plain: the same heads' test scores without the flip test (its gain, same fits)

    def score_test(head, count: str):
        efficiency.setdefault(count, []).append(task.score(head, x["test"], "test"))
        if task.flip_test:
            plain.setdefault(count, []).append(task.score(head, x["test"], "test", flip_test=False))

    for count in counts:
        for seed in range(seeds):
            score_test(task.fit(set_name, x["train"], _subset(n_train, count, seed), best["lr"], seed), str(count))
            bar.update()
    score_test(best["head"], "all")
    for seed in range(1, seeds):  # every label, other seeds: the spread of the all-label score
        score_test(task.fit(set_name, x["train"], torch.arange(n_train), best["lr"], seed), "all")
        bar.update()
    entry = dict(lr=best["lr"], val=best["val"], test=efficiency["all"][0],
                 grid=[dict(lr=g["lr"], val=g["val"][task.key]) for g in grid], label_efficiency=efficiency,
                 parameters=_parameters(best["head"]))
    if task.flip_test:
        entry["without_flip_test"] = dict(test=plain["all"][0], label_efficiency=plain)
    return entry, best["head"]


def _parameters(head) -> int:
    modules = head if isinstance(head, list) else [head]
    return sum(p.numel() for m in modules for p in m.parameters())


def _extracted(manifest: dict, split: str):
    """The split's images as the features were read from them (DenseData), or None when the data set has changed
    since (other files under the extracted names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the faults were reported when the features were extracted
        data = load_dense(manifest["dataset"], split, size=tuple(manifest["size"]))
    wanted = manifest["splits"][split]["names"]
    return data.subset(range(len(wanted))) if data.names[:len(wanted)] == wanted else None


def _images(manifest: dict) -> dict[str, torch.Tensor]:
    """The feature folder's images per split as floats in [-1, 1] (the scratch competitor's input)."""
    out = {}
    for split in ("train", "val", "test"):
        data = _extracted(manifest, split)
        if data is None:
            raise UserError(f"{manifest['dataset']} changed since its features were extracted (split {split}); "
                            "extract them again")
        out[split] = to_float(data.images).contiguous()  # NCHW memory, as the features are
    return out


# ------------------------------------------------------------------------------------------------ report

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def overlays(manifest: dict, chosen: dict, out: Path, *, count: int = 4, min_score: float = 0.3,
             flip_test: bool = False) -> list[str]:
    """One PNG per feature set: test images with true (thin, white) and predicted (thick, by class) boxes, or
    image | truth | prediction rows for segmentation. Returns the file names."""
    test = _extracted(manifest, "test")
    if test is None:
        return []  # the data set changed since extraction: drawing would pair the wrong images
    count = min(count, len(test))
    files = []
    for set_name, (head, x) in chosen.items():
        if manifest["task"] == "detection":
            preds = _predict(head, x[:count], manifest["stride"], flip_test)
            tiles = []
            for i in range(count):
                img = Image.fromarray(test.images[i].numpy()).resize((test.images.shape[2] * 2,
                                                                      test.images.shape[1] * 2))
                draw = ImageDraw.Draw(img)
                for box in test.boxes[i].tolist():
                    draw.rectangle([v * 2 for v in box], outline=(255, 255, 255), width=1)
                p = preds[i]
                for box, s, k in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                    if s >= min_score:
                        draw.rectangle([v * 2 for v in box], outline=PALETTE[k % len(PALETTE)], width=2)
                tiles.append(np.asarray(img))
            grid = np.concatenate(tiles, 1)
        else:
            pred = segment(head, _kind_of(head), x[:count], tuple(manifest["size"]), flip_test)
            rows = [np.concatenate([test.images[i].numpy(), _paint(test.masks[i].numpy()), _paint(pred[i].numpy())], 1)
                    for i in range(count)]
            grid = np.concatenate(rows, 0)
        name = f"overlay-{manifest['task']}-{set_name}.png"
        Image.fromarray(grid).save(out / name)
        files.append(name)
    return files


def _kind_of(heads: list[nn.Module]) -> str:
    """How `segment` applies a head list: pixel MLPs on upsampled features, anything else on the grid."""
    return "mlp" if isinstance(heads[0], PixelMLP) else "conv"


def dense_markdown(result: dict) -> str:
    detection = result["task"] == "detection"
    key, label = ("map50", "mAP@0.5") if detection else ("miou", "mIoU")
    lines = [f"# {result['task'].capitalize()} probe of {result['features']} ({result['dataset']}, stage "
             f"{result['stage']})", "",
             f"Head: {result['head']}, {result['steps']} steps, lr chosen on validation {label} from "
             f"{', '.join(f'{lr:g}' for lr in result['lrs'])}; task size {result['size'][0]}x{result['size'][1]}, "
             f"grid stride {result['stride']}; n: " + ", ".join(f"{k} {v}" for k, v in result["n"].items())
             + ("; flip test (scores averaged with the mirror image's)" if result.get("flip_test") else ""), ""]
    if "scratch" in result:
        lines += [f"`scratch`: a U-Net (widths {result['scratch']['widths']}) trained end to end from the pixels on "
                  f"the same labels, {result['scratch']['steps']} steps, the same head and protocol.", ""]
    if detection:
        columns = ["val mAP@0.5", "test mAP@0.5", "test mAP@[.5:.95]", "per-class test AP@0.5"]

        def cells(r):
            per = ", ".join(f"{k} {v['ap50']:.3f}" for k, v in r["test"]["per_class"].items())
            return [r["val"]["map50"], r["test"]["map50"], r["test"]["map"]], per
    else:
        columns = ["val mIoU", "test mIoU", "test mIoU (foreground)", "per-class test IoU / Dice"]

        def cells(r):
            per = ", ".join(f"{k} {v['iou']:.3f} / {v['dice']:.3f}" for k, v in r["test"]["per_class"].items())
            return [r["val"]["miou"], r["test"]["miou"], r["test"]["miou_foreground"]], per
    lines += ["| features | trained parameters | lr | " + " | ".join(columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for name, r in result["sets"].items():
        scores, per = cells(r)
        lines.append(f"| {name} | {r['parameters']:,} | {r['lr']:g} | " + " | ".join(f"{v:.3f}" for v in scores)
                     + f" | {per} |")
    lines += _efficiency_table(result, key, f"Label efficiency (test {label}, mean +- std over seeds; labelled "
                                            "training images):", lambda r: r["label_efficiency"])
    if result.get("flip_test"):
        lines += _efficiency_table(result, key, f"The same heads without the flip test (test {label}):",
                                   lambda r: r["without_flip_test"]["label_efficiency"])
    return "\n".join(lines) + "\n"


def _efficiency_table(result: dict, key: str, title: str, curve) -> list[str]:
    """Markdown lines: per feature set, `curve(set entry)`'s scores per label count, mean +- std over seeds."""
    counts = list(curve(next(iter(result["sets"].values()))))
    lines = ["", title, "", "| features | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for name, r in result["sets"].items():
        cells = []
        for c in counts:
            v = torch.tensor([s[key] for s in curve(r)[c]])
            cells.append(f"{v.mean():.3f} +- {v.std(unbiased=False):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def run_dense(features: str | Path | FeatureFolder, out: str | Path | None = None, *, task: str, **kwargs) -> dict:
    """Probe a dense feature folder and write probe-<task>.json / .md and the overlays into `out`."""
    features = open_features(features)
    manifest = features.manifest
    if manifest.get("task") != task:
        raise UserError(f"{features} holds {manifest.get('task') or 'pooled classification'} features, not {task}; "
                        f"extract a {task} data set with `imagen-transfer features --data ...`")
    out = Path(out or features.path)
    result, chosen = probe_dense(features, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    result.update(features=str(features), dataset=manifest["dataset"], stage=manifest["stage"])
    result["plots"] = overlays(manifest, chosen, out, flip_test=result["flip_test"])
    (out / f"probe-{task}.json").write_text(json.dumps(result, indent=1))
    (out / f"probe-{task}.md").write_text(dense_markdown(result))
    return result


def _paint(mask: np.ndarray) -> np.ndarray:
    """Class indices (H, W) as colours (background black), ignored pixels (masks.IGNORE) mid-gray."""
    colours = np.array([(0, 0, 0)] + PALETTE, dtype=np.uint8)
    return np.where(mask[..., None] == IGNORE, np.uint8(128), colours[mask % len(colours)])
