"""Object detection heads on feature grids: CenterNet ("Objects as Points", Zhou et al. 2019).

Per class a centre heat-map (focal loss with alpha 2, beta 4 against Gaussian-splatted centres, radius from the box
size at IoU 0.7), plus box size and sub-cell offset (L1 at the centres, weights 0.1 and 1). Decoding is a 3x3
max-pool peak pick and the top 100 peaks: no NMS. Scored COCO-style by pycocotools (the reference implementation;
torchmetrics' mean AP needs torchvision, which does not install beside the CPU torch): mAP@[.5:.95], mAP@0.5 and
per-class AP. The probe protocol that fits and scores these heads is dense_probe.py.
"""

from __future__ import annotations

import contextlib
import io
import math

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import random_window
from .openmp import adapt as adapt_threads
from .scratch import ScratchUNet

HEADS = ("centernet",)  # the head --task detection trains (always)
MAX_DETECTIONS = 100


def boxes_of(targets: dict, split: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    counts = targets[f"{split}/box_counts"].tolist()
    return (list(targets[f"{split}/boxes"].split(counts)), list(targets[f"{split}/box_labels"].split(counts)))


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
                   seed: int = 0, scratch: bool = False, stride: int = 4, model: nn.Module | None = None,
                   optimizer=None, crop: tuple[int, int] | None = None, desc: str | None = None) -> nn.Module:
    """AdamW (weight decay 1e-4), cosine schedule, random horizontal flips of inputs and targets. `x` is a feature
    grid for a CenterNet head, or (scratch) the images themselves for a small U-Net + the same head, or the images
    for a given `model` ending in a CenterNet head (a fine-tuned backbone) with its `optimizer(model) -> (opt,
    schedule)`. `crop` (h, w), multiples of `stride`: each batch trains on one random grid-aligned window of its
    images and target maps (objects whose centre falls outside it are left out), a fraction of the pixels' cost.
    `desc`: a progress bar of the steps under that name (the end-to-end fits take minutes on a CPU)."""
    torch.manual_seed(seed)
    head = model if model is not None else (
        nn.Sequential(ScratchUNet(x.shape[1], stride=stride), CenterNetHead(ScratchUNet.width_at(stride), classes))
        if scratch else CenterNetHead(x.shape[1], classes))
    if optimizer is not None:
        opt, sched = optimizer(head)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=desc is None):
        adapt_threads()
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        xb, tb = x[idx], {k: v[idx] for k, v in target.items()}
        if crop is not None:
            xb, tb = crop_window(xb, tb, crop, stride, gen)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        if flip.any():
            xb, tb = flip_targets(xb, tb, flip)
        loss = centernet_loss(head(xb), tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def crop_window(x: torch.Tensor, t: dict, crop: tuple[int, int], stride: int, gen: torch.Generator):
    """One random window of size `crop` (pixels, multiples of `stride`) at a grid-aligned position, cut from the
    images `x` (N, C, H, W) and from the target maps on the stride grid alike."""
    (y, x0), (ch, cw) = random_window(tuple(x.shape[-2:]), crop, stride, gen), crop
    gy, gx = y // stride, x0 // stride
    window = {k: v[..., gy:gy + ch // stride, gx:gx + cw // stride] for k, v in t.items()}
    return x[..., y:y + ch, x0:x0 + cw], window


def flip_targets(x: torch.Tensor, t: dict, flip: torch.Tensor):
    """Mirror features and CenterNet targets left-right where `flip`; the sub-cell x offset mirrors to 1 - offset
    (the centre moves from cell p + o to cell (w - 1 - p) + (1 - o))."""
    f4 = flip.view(-1, 1, 1, 1)
    x = torch.where(f4, x.flip(-1), x)
    out = {k: torch.where(f4 if v.dim() == 4 else flip.view(-1, 1, 1), v.flip(-1), v) for k, v in t.items()}
    mirrored_x = torch.where(out["mask"], 1 - out["offset"][:, 0], out["offset"][:, 0])
    out["offset"] = torch.stack([torch.where(flip.view(-1, 1, 1), mirrored_x, out["offset"][:, 0]),
                                 out["offset"][:, 1]], 1)
    return x, out


def predict(head, x: torch.Tensor, stride: int, flip_test: bool = False, batch_size: int = 32) -> list[dict]:
    """Decoded detections of every image of `x`, in batches."""
    return [p for start in range(0, len(x), batch_size)
            for p in decode(detection_maps(head, x[start:start + batch_size], flip_test), stride)]
