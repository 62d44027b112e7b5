"""The dense probe protocol (protocol.py) on frozen multi-block U-Net maps (features.extract_dense): detection
(detection.py: a CenterNet head) and segmentation (segmentation.py: pixel MLPs or a conv head), and the scratch
U-Net (scratch.py) trained end to end on the same labels as the honest competitor.

Every feature set's views (block x timestep maps on one grid) are stacked as channels and standardised with the
training split's per-channel statistics; the heads are small and trained from scratch, the features never change.
The learning rate is chosen on validation (mAP@0.5 or mIoU); test scores are reported for that choice. Label
efficiency retrains the chosen head on 5 / 10 / 20 / all training images, several seeds (the images drawn by seed;
with all images the seed draws only the head's initial weights and batches, and that spread is the yardstick for
comparing two rows' all-label scores: benchmarks/results/dense_cpu.md gives it for BCCD and WBC).
`flip_test` scores every head (the scratch U-Net's too) on the input and its mirror image, averaged (CenterNet's flip
test): the heads train on mirrored inputs already, so it costs one more forward pass and no training. The same
heads' test scores without it are kept beside (`without_flip_test`), so its gain is measured on identical fits.
The report writers (markdown, overlays) are probe_report.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .backbone import (
    BACKBONE_LR_RATIO,
    BACKBONE_T,
    WARMUP_SHARE,
    BackboneSegmenter,
    make_backbone,
    optimizer_for,
)
from .backbone import SETS as BACKBONE_SETS
from .data import to_float
from .dense import load_dense
from .detection import CenterNetHead, boxes_of, centernet_targets, coco_map, predict, train_detector
from .errors import UserError
from .features import FeatureFolder, downsampling_factor, open_features
from .fits import FitJournal, finish_journal, fit_key, open_journal
from .interop import open_model
from .openmp import record as machine
from .outputs import write_atomic
from .probe_report import dense_markdown, overlays
from .protocol import check_fuse, choose, labelled_subset, standardise
from .scratch import ScratchUNet
from .segmentation import ConvSegHead, kind_of, segment, segmentation_scores, train_segmenter
from .text import load_text_encoder

DETECTION_LRS = (1e-3, 3e-3)
SEGMENTATION_LRS = (1e-3, 3e-3)
LABELLED_IMAGES = (5, 10, 20, None)  # None: all training images


def load_targets(folder: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    if manifest.get("task") not in ("detection", "segmentation"):
        raise UserError(f"{folder} holds {manifest.get('task', 'pooled')} features; extract a detection or "
                        "segmentation data set (bccd, wbc-seg) with `imagen-transfer features --data ...`")
    return load_file(Path(folder) / manifest["targets"])


def stacked_views(tensors: dict[str, torch.Tensor], views: list[str], splits) -> dict[str, torch.Tensor]:
    """{split: (N, C, h, w) float}: the views concatenated as channels, standardised by the training split."""
    return standardise({s: torch.cat([tensors[f"{s}/{v}"].float() for v in views], 1) for s in splits}, (0, 2, 3))


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
    backbone: dict | None = None  # stage, text, blocks, t, steps: the fine-tuned backbone rows (backbone.py)
    progress: bool = False  # a bar per end-to-end fit (scratch, backbone rows: minutes each on a CPU)

    @property
    def key(self) -> str:
        return "map50" if self.detection else "miou"

    def fit(self, set_name: str, x: torch.Tensor, index: torch.Tensor, lr: float, seed: int, *, train: bool = True):
        """A head on the train images `index`: on a feature set's maps, or trained end to end on the images (the
        scratch U-Net, the fine-tuned backbone rows). `train` False: built as the fit builds it (a backbone
        calibrated on the images), not trained: the frame a saved fit's weights are loaded into."""
        kind, steps, extra = self.kind, self.steps, {}
        if set_name == "scratch":
            kind, steps = "scratch", self.scratch_steps
        elif set_name in BACKBONE_SETS:
            kind, steps, extra = "model", self.backbone["steps"], self._backbone(set_name, x[index], lr, seed)
        steps = steps if train else 0
        if self.progress and kind in ("scratch", "model"):
            extra["desc"] = f"{set_name} ({len(index)} labelled, lr {lr:g}, seed {seed})"
        if self.detection:
            return train_detector(x[index], {k: v[index] for k, v in self.train_target.items()}, len(self.names),
                                  lr=lr, steps=steps, seed=seed, scratch=kind == "scratch", stride=self.stride,
                                  **extra)
        return train_segmenter(kind, x[index], self.truth["train"][index], len(self.names), lr=lr, steps=steps,
                               seed=seed, ensemble=self.ensemble, **extra)

    def _backbone(self, set_name: str, x: torch.Tensor, lr: float, seed: int) -> dict:
        """The trainer arguments of a backbone row: the stage's U-Net (or, for backbone-scratch, the same network
        freshly initialised) calibrated on the train images `x` under the task's grid head, and its recipe."""
        b = self.backbone
        torch.manual_seed(seed)
        trunk = make_backbone(b["stage"], b["text"], b["blocks"], pretrained=set_name == "backbone", seed=seed,
                              stride=self.stride, t=b["t"], freeze=tuple(b.get("freeze", ())))
        trunk.calibrate(x)
        model = (nn.Sequential(trunk, CenterNetHead(trunk.channels, len(self.names))) if self.detection
                 else BackboneSegmenter(trunk, ConvSegHead(trunk.channels, len(self.names))))
        return dict(model=model, optimizer=optimizer_for(lr, b["steps"]), batch_size=b.get("batch_size", 8),
                    crop=b.get("crop"))

    def score(self, head, x: torch.Tensor, split: str, flip_test: bool | None = None) -> dict:
        """The head's scores on `split` (with the task's flip-test setting unless `flip_test` overrides it)."""
        flip = self.flip_test if flip_test is None else flip_test
        if self.detection:
            return coco_map(predict(head, x, self.stride, flip), *self.truth[split], self.names, self.size)
        return segmentation_scores(segment(head, kind_of(head), x, self.size, flip), self.truth[split], self.names)

    def test_scores(self, head, x: torch.Tensor) -> dict:
        """{"test": the test scores, "plain": the same without the flip test (None when the task has none)}."""
        return dict(test=self.score(head, x, "test"),
                    plain=self.score(head, x, "test", flip_test=False) if self.flip_test else None)


def dense_task(manifest: dict, targets: dict, steps: int | None, scratch_steps: int | None, kind: str,
               ensemble: int, flip_test: bool = False, backbone: dict | None = None,
               progress: bool = False) -> DenseTask:
    detection = manifest["task"] == "detection"
    names, stride = manifest["label_names"], manifest["stride"]
    steps = steps or (600 if detection else 300)
    if detection:
        truth = {s: boxes_of(targets, s) for s in SPLITS}
        train_target = centernet_targets(*truth["train"], len(names), tuple(manifest["grid"]), stride)
    else:
        truth, train_target = {s: targets[f"{s}/masks"] for s in SPLITS}, None
    return DenseTask(detection, names, stride, tuple(manifest["size"]), truth, train_target, steps,
                     scratch_steps or steps, kind, ensemble, flip_test, backbone, progress)


def probe_dense(folder: str | Path | FeatureFolder, *, steps: int | None = None, seeds: int = 3, lrs=None, kind: str = "mlp",
                ensemble: int = 3, labelled=LABELLED_IMAGES, scratch: bool = False, scratch_steps: int | None = None,
                only: list[str] | None = None, fuse: list[list[str]] | None = None, flip_test: bool = False,
                backbone: dict | None = None, progress: bool = True, out: str | Path | None = None,
                resume: bool = False) -> tuple[dict, dict]:
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
    backbone = open_backbone(backbone, manifest) if backbone else None
    task = dense_task(manifest, load_targets(folder.path, manifest), steps, scratch_steps, kind, ensemble, flip_test,
                      backbone, progress)
    lrs = tuple(lrs or (DETECTION_LRS if task.detection else SEGMENTATION_LRS))
    inputs = {name: (lambda n=name: stacked_views(sets[n], manifest["sets"][n]["views"], SPLITS))
              for name in sets}  # each set read when its turn comes (or never, when --sets leaves it out)
    for group in check_fuse(fuse, inputs):
        inputs["+".join(group)] = lambda g=tuple(group), parts=dict(inputs): _fused([parts[n]() for n in g])
    images = functools.cache(lambda: _images(manifest))  # read once for every end-to-end row
    if scratch:
        inputs["scratch"] = images
    for name in BACKBONE_SETS if backbone else ():
        inputs[name] = images
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
    if backbone:
        result["backbone"] = {k: v for k, v in backbone.items() if k not in ("stage", "text")}
        result["backbone"].update(lr_ratio=BACKBONE_LR_RATIO, warmup_share=WARMUP_SHARE)
    journal = open_journal(out, dict(features=_digest(manifest), steps=task.steps, scratch_steps=task.scratch_steps,
                                     kind=kind, ensemble=ensemble, flip_test=flip_test, lrs=list(lrs),
                                     backbone=result.get("backbone")), resume)
    n_train = manifest["splits"]["train"]["n"]
    counts = [c for c in labelled if c is not None and c < n_train]
    chosen = {}
    lrs_of = {name: tuple(backbone.get("lrs") or lrs) if name in BACKBONE_SETS else lrs for name in inputs}
    grids = sum(len(v) for v in lrs_of.values())
    with tqdm(total=grids + len(inputs) * (seeds * len(counts) + seeds - 1), desc=f"{manifest['task']} heads",
              disable=not progress, unit="head") as bar:
        for set_name, load in inputs.items():
            x = load()
            result["sets"][set_name], head = _probe_set(task, set_name, x, n_train, lrs_of[set_name], counts, seeds,
                                                        bar, journal)
            chosen[set_name] = (head, x["test"])
    if journal.read_back:
        result["fits_read_back"] = journal.read_back  # finished by an earlier, interrupted run (fits.jsonl)
    return result, chosen


def open_backbone(spec: dict, manifest: dict) -> dict:
    """The backbone rows' settings with their stage and the empty prompt's encoding: `spec` names the model (a
    cascade folder or shipped name), and optionally stage (default: the feature folder's), blocks (default: the
    folder's), t, steps, batch_size, freeze, lrs (their learning-rate grid; default: the heads')."""
    cascade = open_model(spec["model"])
    stage = cascade.stage(spec.get("stage") or manifest["stage"])
    text = load_text_encoder(cascade.text_encoder)([""])
    crop = [int(c) for c in spec["crop"]] if spec.get("crop") else None
    size, step = tuple(manifest["size"]), max(manifest["stride"], downsampling_factor(stage.unet))
    if crop is not None and (len(crop) != 2 or any(c % step or c > s for c, s in zip(crop, size))):
        raise UserError(f"--backbone-crop {crop} must be two multiples of {step} no larger than the task size {size}")
    return dict(spec, model=str(spec["model"]), stage=stage, text=text, blocks=list(spec.get("blocks") or manifest["blocks"]),
                t=int(spec.get("t", BACKBONE_T)), steps=int(spec.get("steps") or 300), crop=crop)


def _digest(manifest: dict) -> str:
    """The feature folder's identity in a journal's settings: a hash of its manifest (the data, model, views)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _fused(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{split: maps}: the parts' (already standardised) maps concatenated as channels, split by split."""
    return {split: torch.cat([part[split] for part in parts], 1) for split in parts[0]}


def _probe_set(task: DenseTask, set_name: str, x: dict, n_train: int, lrs, counts, seeds: int, bar,
               journal: FitJournal):
    """One feature set: the learning rate chosen on val with every label, then test scores per label count x seed
    (each fit read from `journal` when an earlier run finished it). Returns (its result entry, the chosen head)."""
    grid = []
    for lr in lrs:
        grid.append(_grid_fit(task, set_name, x, n_train, lr, journal))
        bar.update()
    best = choose(grid, lambda g: g["val"][task.key])
    efficiency, plain = {}, {}  # plain: the same heads' test scores without the flip test (its gain, same fits)

    def score_test(scores: dict, count: str):
        efficiency.setdefault(count, []).append(scores["test"])
        if task.flip_test:
            plain.setdefault(count, []).append(scores["plain"])

    def fitted(count: str, index: torch.Tensor, seed: int) -> dict:
        key = fit_key(set_name, best["lr"], f"n={count}", seed)
        scores = journal.get(key) or journal.put(key, task.test_scores(
            task.fit(set_name, x["train"], index, best["lr"], seed), x["test"]))
        bar.update()
        return scores

    for count in counts:
        for seed in range(seeds):
            score_test(fitted(str(count), labelled_subset(n_train, count, seed), seed), str(count))
    score_test(best, "all")
    for seed in range(1, seeds):  # every label, other seeds: the spread of the all-label score
        score_test(fitted("all", torch.arange(n_train), seed), "all")
    entry = dict(lr=best["lr"], val=best["val"], test=efficiency["all"][0],
                 grid=[dict(lr=g["lr"], val=g["val"][task.key]) for g in grid], label_efficiency=efficiency,
                 parameters=best["parameters"])
    if task.flip_test:
        entry["without_flip_test"] = dict(test=plain["all"][0], label_efficiency=plain)
    head = best.get("head")
    if head is None:  # the chosen fit ran in an earlier process: its saved weights, for the overlays
        head = task.fit(set_name, x["train"], torch.arange(n_train), best["lr"], 0, train=False)
        journal.restore(best["key"], _module(head))
    return entry, head


def _grid_fit(task: DenseTask, set_name: str, x: dict, n_train: int, lr: float, journal: FitJournal) -> dict:
    """A candidate of the learning-rate grid, every label, seed 0: its val and test scores (the test ones are the
    all-label row's first seed if it is chosen), parameter count, and the head when it was fitted here."""
    key = fit_key(set_name, lr)
    scores = journal.get(key)
    if scores is not None:
        return dict(scores, lr=lr, key=key)
    head = task.fit(set_name, x["train"], torch.arange(n_train), lr, 0)
    scores = journal.put(key, dict(val=task.score(head, x["val"], "val"), parameters=_parameters(head),
                                   **task.test_scores(head, x["test"])), weights=_module(head))
    return dict(scores, lr=lr, key=key, head=head)


def _module(head) -> nn.Module:
    """A fitted head as one module (an ensemble of pixel MLPs as a ModuleList), for its weights."""
    return nn.ModuleList(head) if isinstance(head, list) else head


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


def run_dense(features: str | Path | FeatureFolder, out: str | Path | None = None, *, task: str, **kwargs) -> dict:
    """Probe a dense feature folder and write probe-<task>.json / .md and the overlays into `out`."""
    features = open_features(features)
    manifest = features.manifest
    if manifest.get("task") != task:
        raise UserError(f"{features} holds {manifest.get('task') or 'pooled classification'} features, not {task}; "
                        f"extract a {task} data set with `imagen-transfer features --data ...`")
    out = Path(out or features.path)
    result, chosen = probe_dense(features, out=out, **kwargs)
    result.update(features=str(features), dataset=manifest["dataset"], stage=manifest["stage"],
                  machine=machine())  # this process's CPU and threads (a resumed probe's earlier fits: its journal's)
    test = _extracted(manifest, "test")  # None when the data set changed since extraction: no wrong pairs drawn
    result["plots"] = [] if test is None else overlays(manifest, chosen, test, out, flip_test=result["flip_test"])
    write_atomic(out / f"probe-{task}.json", json.dumps(result, indent=1))
    write_atomic(out / f"probe-{task}.md", dense_markdown(result))
    finish_journal(out)
    return result
