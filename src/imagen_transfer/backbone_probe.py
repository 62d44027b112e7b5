"""`imagen-transfer probe --model M --data SPEC --task classification --backbone`: a cascade stage's U-Net
fine-tuned end to end as an image classifier (issue #37), read from a data set, not a feature folder.

The trunk is backbone.UNetBackbone with `pool`: the chosen blocks' maps averaged over the grid, standardised by the
training images, under a linear (or MLP) head; the U-Net stops after the last block it reads. Two rows, one recipe
(backbone.optimizer_for: the backbone at a tenth of the head's learning rate, warm-up then cosine, AdamW with weight
decay; random left-right flips for both): `backbone` starts from the cascade's weights, `backbone-scratch` from the
same architecture freshly initialised, so their gap is what pretraining contributes. The protocol is the probes'
(protocol.py): the learning rate chosen on validation accuracy with every label (seed 0), then label efficiency on
stratified fractions of the training labels (1% / 10% / all), several seeds, the same number of steps for each.
A data set without a validation split gives a seeded 10% of each training class to validation (probe.hold_out_val's
rule), so test stays unseen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .backbone import (
    BACKBONE_LR_RATIO,
    BACKBONE_T,
    SETS,
    WARMUP_SHARE,
    WEIGHT_DECAY,
    make_backbone,
    optimizer_for,
)
from .data import select_subset, to_float
from .datasets import load_dataset
from .errors import MissingSplit, UserError
from .fits import finish_journal, fit_key, open_journal
from .interop import open_model
from .openmp import adapt as adapt_threads
from .openmp import record as machine
from .outputs import write_atomic
from .probe import VAL_FROM_TRAIN, _head, classification_scores
from .probe_report import LABEL_FRACTIONS, efficiency_table
from .protocol import choose
from .sources import DataSource, open_source
from .text import load_text_encoder

CLASSIFICATION_LRS = (1e-3, 3e-3)
CLASSIFICATION_BLOCKS = ("mid", "up0")  # the frozen probe's usual winners on the base stage (probe_pneumonia_*.md)
STEPS = 300
BATCH_SIZE = 32


class BackboneClassifier(nn.Module):
    """A pooled UNetBackbone and a head on its (N, channels) vector."""

    def __init__(self, trunk, classes: int, head: str = "linear"):
        super().__init__()
        self.trunk, self.head = trunk, _head(trunk.channels, classes, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).flatten(1))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int,
                     batch_size: int = BATCH_SIZE, seed: int = 0, flip: bool = True) -> nn.Module:
    """Cross-entropy fine-tuning with the backbone recipe: batches drawn epoch by epoch from a generator seeded by
    `seed`, each image mirrored left-right with probability 1/2 (`flip`)."""
    opt, schedule = optimizer_for(lr, steps)(model)
    gen = torch.Generator().manual_seed(seed)
    order, at = torch.randperm(len(x), generator=gen), 0
    model.train()
    for _ in range(steps):
        adapt_threads()
        if at + batch_size > len(order):  # a new epoch (a set smaller than a batch: the whole set each step)
            order, at = torch.randperm(len(x), generator=gen), 0
        idx = order[at:at + batch_size]
        at += batch_size
        xb = x[idx]
        if flip:
            mirror = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(mirror[:, None, None, None], xb.flip(-1), xb)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


@torch.inference_mode()
def class_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])


def load_splits(source: DataSource, resolution: int) -> tuple[dict, list[str], dict | None]:
    """{split: (images in [-1, 1] (N, 3, R, R), labels)}, the class names, and the validation hold-out (or None)."""
    splits = {}
    for split in ("train", "val", "test"):
        try:
            d = load_dataset(source, split, resolution=resolution, channels=3)
        except MissingSplit:
            if split == "val":  # held out of train below; any other fault of a val split is the user's to fix
                continue
            raise
        if (d.labels < 0).any() or not d.label_names:
            raise UserError(f"{source.path} split '{split}' has images without a class label; --task classification needs "
                            "a labelled data set (class folders, labels in metadata, or an npz with labels)")
        splits[split] = (to_float(d.images), d.labels.long())
        names = d.label_names
    held = None
    if "val" not in splits:
        x, y = splits["train"]
        val = select_subset(y, fraction=VAL_FROM_TRAIN, seed=0)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[val] = False
        splits["train"], splits["val"] = (x[keep], y[keep]), (x[val], y[val])
        held = dict(share=VAL_FROM_TRAIN, seed=0, n=len(val), note="val held out of train, per class")
    return splits, names, held


def probe_backbone(model: str, data: str | DataSource, *, stage: str = "base", blocks=CLASSIFICATION_BLOCKS, t: int = BACKBONE_T,
                   steps: int = STEPS, batch_size: int = BATCH_SIZE, lrs=CLASSIFICATION_LRS, head: str = "linear",
                   fractions=LABEL_FRACTIONS, seeds: int = 3, sets=SETS, conditioning: str = "empty",
                   progress: bool = True, out: str | Path | None = None, resume: bool = False) -> dict:
    """The two backbone rows on a labelled data set, by the protocol in the module doc (JSON-ready result). `out`:
    where the journal of finished fits goes (fits.py), `resume`: continue the one there."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise UserError(f"no set {', '.join(unknown)} for a classification backbone probe (sets: {', '.join(SETS)})")
    source = open_source(data)
    cascade = open_model(model)
    chosen_stage = cascade.stage(stage)
    text = load_text_encoder(cascade.text_encoder)([""])
    splits, names, held = load_splits(source, chosen_stage.resolution)
    (x, y), classes = splits["train"], len(names)

    def fit(set_name: str, index: torch.Tensor, lr: float, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        trunk = make_backbone(chosen_stage, text, list(blocks), pretrained=set_name == "backbone", seed=seed, t=t,
                              pool=True, conditioning=conditioning)
        trunk.calibrate(x[index])
        net = BackboneClassifier(trunk, classes, head)
        return train_classifier(net, x[index], y[index], lr=lr, steps=steps, batch_size=batch_size, seed=seed)

    def scores(net: nn.Module, split: str) -> dict:
        return classification_scores(class_probs(net, splits[split][0]), splits[split][1], names)

    result = dict(task="classification", model=str(model), dataset=source.name, stage=stage, blocks=list(blocks), t=t,
                  conditioning=conditioning, head=head, steps=steps, batch_size=batch_size, lrs=list(lrs), lr_ratio=BACKBONE_LR_RATIO,
                  warmup_share=WARMUP_SHARE, weight_decay=WEIGHT_DECAY, resolution=chosen_stage.resolution,
                  classes=names, n={s: len(v[1]) for s, v in splits.items()}, sets={})
    if held:
        result["val_from_train"] = held
    journal = open_journal(out, dict({k: v for k, v in result.items() if k != "sets"}, data=source.fingerprint),
                           resume)

    def fitted(key: str, set_name: str, index: torch.Tensor, lr: float, seed: int, grid: bool = False) -> dict:
        """The fit's scores (test; val and parameter count for a grid candidate), from the journal or fitted."""
        done = journal.get(key)
        if done is None:
            net = fit(set_name, index, lr, seed)
            done = journal.put(key, dict(test=scores(net, "test"), **(dict(
                val=scores(net, "val"), parameters=sum(p.numel() for p in net.parameters() if p.requires_grad))
                if grid else {})))
        bar.update()
        return done

    partial = [f for f in fractions if f < 1]
    total = len(sets) * (len(lrs) + seeds * len(partial) + (seeds - 1 if len(partial) < len(fractions) else 0))
    with tqdm(total=total, desc="backbone fits", disable=not progress, unit="fit") as bar:
        for set_name in sets:
            start = time.perf_counter()
            grid = [dict(fitted(fit_key(set_name, lr), set_name, torch.arange(len(y)), lr, 0, grid=True),
                         lr=lr) for lr in lrs]
            best = choose(grid, lambda g: (g["val"]["accuracy"], g["val"]["auc"] or 0))
            curve = {}
            for fraction in fractions:
                for seed in range(seeds):
                    if fraction >= 1 and seed == 0:
                        s, n_labels = best["test"], len(y)
                    else:
                        idx = select_subset(y, fraction=fraction, seed=seed)
                        s, n_labels = fitted(fit_key(set_name, best["lr"], f"f={fraction:g}", seed), set_name,
                                             idx, best["lr"], seed)["test"], len(idx)
                    curve.setdefault(str(fraction), []).append(dict(seed=seed, n_labels=n_labels,
                                                                    accuracy=s["accuracy"], auc=s["auc"]))
            result["sets"][set_name] = dict(
                lr=best["lr"], val=best["val"], test=best["test"],
                grid=[dict(lr=g["lr"], val_accuracy=g["val"]["accuracy"], val_auc=g["val"]["auc"]) for g in grid],
                label_efficiency=curve, parameters=best["parameters"],
                wall_s=round(time.perf_counter() - start, 1))  # this process's share when resumed
    if journal.read_back:
        result["fits_read_back"] = journal.read_back  # finished by an earlier, interrupted run (fits.jsonl)
    return result


def backbone_markdown(result: dict, reference: dict | None = None) -> str:
    held = result.get("val_from_train")
    lines = [f"# Classification backbone probe: {result['model']} ({result['stage']} stage) on {result['dataset']}", "",
             f"Blocks {' + '.join(result['blocks'])} pooled at t = {result['t']}, conditioned on "
             f"{'a learned embedding' if result.get('conditioning') == 'learned' else 'the empty prompt'}, "
             f"{result['head']} head; "
             f"{result['steps']} steps of {result['batch_size']} images at {result['resolution']} px, backbone lr "
             f"{result['lr_ratio']:g} x the head's, lr chosen on validation accuracy from "
             f"{', '.join(f'{lr:g}' for lr in result['lrs'])}; n: " + ", ".join(f"{k} {v}" for k, v in result["n"].items())
             + (f" (val: {held['share']:.0%} of train per class, held out)" if held else ""), "",
             "| set | lr | val acc | test acc | test AUC | trained parameters | wall |", "|---|---|---|---|---|---|---|"]
    for name, r in result["sets"].items():
        auc = f"{r['test']['auc']:.3f}" if r["test"]["auc"] is not None else "n/a"
        lines.append(f"| {name} | {r['lr']:g} | {r['val']['accuracy']:.3f} | {r['test']['accuracy']:.3f} | {auc} | "
                     f"{r['parameters']:,} | {r['wall_s']:.0f} s |")
    for name, ref in (reference or {}).items():
        lines.append(f"| {name} (published) | | | {ref['accuracy']:.3f} | {ref['auc']:.3f} | | |")
    fractions = list(next(iter(result["sets"].values()))["label_efficiency"])
    for metric in ("accuracy", "auc"):
        curves = {name: {f"{float(f) * 100:g}% labels": [p[metric] for p in r["label_efficiency"][f]]
                         for f in fractions} for name, r in result["sets"].items()}
        lines += efficiency_table(curves, f"Label efficiency (test {metric}, mean +- std over seeds):")
    return "\n".join(lines) + "\n"


def run_backbone(model: str, data: str | DataSource, out: str | Path, *, reference: dict | None = None, **kwargs) -> dict:
    """probe_backbone, then probe-classification.json / .md in `out` (and its journal of fits, fits.py)."""
    result = probe_backbone(model, data, out=out, **kwargs)
    if reference:
        result["reference"] = reference
    result["machine"] = machine()  # this process's CPU and threads (a resumed probe's earlier fits: its journal's)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "probe-classification.json", json.dumps(result, indent=1))
    write_atomic(out / "probe-classification.md", backbone_markdown(result, reference))
    finish_journal(out)
    return result
