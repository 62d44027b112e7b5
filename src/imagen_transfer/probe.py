"""`imagen-transfer probe`: downstream heads on cached features (see features.py), chosen on validation, reported
on test.

Classification: a grid of heads, one per (feature set, view, learning rate), all trained together in one pass over
the cached features (each mini-batch updates every head; the heads share nothing, each draws from its own random
stream, so this equals training them one by one, only faster). Features are standardised with the training split's
statistics. The head with the best validation accuracy per feature set is reported on test: accuracy, AUC
(one-vs-rest macro for more than two classes) and per-class accuracy. A label-efficiency curve retrains each set's
chosen head on 1%, 10% and 100% of the training labels (stratified, several seeds). A heat-map shows validation
accuracy per block x timestep.

Retrieval: test images query the training images by cosine similarity of standardised features; recall@k (a
same-label image among the k nearest), mAP over the whole ranking, and k-NN (k=10) majority-vote accuracy.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from .data import select_subset
from .errors import UserError
from .features import FeatureFolder, open_features
from .openmp import adapt as adapt_threads
from .openmp import record as machine
from .outputs import write_atomic
from .probe_report import LABEL_FRACTIONS, efficiency_plot, heatmap, probe_markdown
from .protocol import check_fuse, choose, standardise

LEARNING_RATES = (1e-3, 3e-3, 1e-2)


def _standardised(tensors: dict[str, torch.Tensor], view: str, splits=("train", "val", "test")):
    return standardise({s: tensors[f"{s}/{view}"].float().flatten(1) for s in splits}, (0,))


def _head(dim: int, classes: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, classes))
    raise UserError(f"unknown head '{kind}' (linear | mlp)")


def _own_rng(state: torch.Tensor, fn, *args):
    """fn(*args) with the global CPU generator at `state` (a head's own stream: its initialisation, its dropout),
    and the state it leaves; the caller's generator is untouched."""
    saved = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        return fn(*args), torch.get_rng_state()
    finally:
        torch.set_rng_state(saved)


def _head_stream(seed: int, name: str, lr: float) -> torch.Tensor:
    """The starting random state of the head (name, lr): from the seed and the head's own key, so a head draws the
    same numbers whichever other heads train beside it."""
    return torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(f"{name}|{lr!r}".encode())).get_state()


def train_heads(inputs: dict[str, torch.Tensor], labels: torch.Tensor, classes: int, *, lrs=LEARNING_RATES,
                head: str = "linear", epochs: int = 30, batch_size: int = 256, seed: int = 0,
                progress: bool = True) -> dict[tuple[str, float], nn.Module]:
    """One head per (input name, lr), trained together: AdamW, cosine schedule, weight decay 1e-4. Each head draws
    its initial weights and dropout from its own random stream (_head_stream) and the mini-batch order is the
    seed's, so a head comes out the same trained alone or beside any others (test)."""
    heads, streams = {}, {}
    for name, x in inputs.items():
        for lr in lrs:
            heads[name, lr], streams[name, lr] = _own_rng(_head_stream(seed, name, lr), _head, x.shape[1],
                                                          classes, head)
    opt = torch.optim.AdamW([dict(params=h.parameters(), lr=lr) for (_, lr), h in heads.items()], weight_decay=1e-4)
    n = len(labels)
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for h in heads.values():
        h.train()
    with tqdm(total=steps, desc=f"probe ({len(heads)} heads)", disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                adapt_threads()
                idx = order[start : start + batch_size]
                loss = 0
                for (name, lr), h in heads.items():
                    logits, streams[name, lr] = _own_rng(streams[name, lr], h, inputs[name][idx])
                    loss = loss + nn.functional.cross_entropy(logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    return {k: h.eval() for k, h in heads.items()}


def classification_scores(probs: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict:
    """Accuracy, AUC and per-class accuracy from class probabilities."""
    pred = probs.argmax(1)
    out = dict(accuracy=float((pred == labels).float().mean()))
    try:
        if probs.shape[1] == 2:
            out["auc"] = float(roc_auc_score(labels.numpy(), probs[:, 1].numpy()))
        else:
            out["auc"] = float(roc_auc_score(labels.numpy(), probs.numpy(), multi_class="ovr", average="macro"))
    except ValueError:  # a split with a single class
        out["auc"] = None
    out["per_class_accuracy"] = {name: float((pred[labels == i] == i).float().mean())
                                 for i, name in enumerate(label_names) if (labels == i).any()}
    return out


@torch.inference_mode()
def _probs(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head(x).softmax(-1)


def classify(manifest: dict, sets: dict, *, head: str = "linear", epochs: int = 30, seed: int = 0,
             fractions=LABEL_FRACTIONS, efficiency_seeds: int = 3, fuse: list[list[str]] | None = None,
             concat: int = 1, progress: bool = True) -> dict:
    """The head grid, the chosen head per feature set with its test scores, and the label-efficiency curve.

    `fuse` = groups of feature-set names: each group becomes one more feature set whose single view concatenates the
    standardised view each member chose on validation (feature fusion: several models, or U-Net and text encoder).
    `concat` = k > 1: each set's k views with the best validation accuracy, concatenated, are one more view of that
    set, in the same grid and chosen on validation like any other (several blocks x timesteps read together, as
    ddpm-segmentation and Diffusion Hyperfeatures do; Baranchuk et al. 2022, Luo et al. 2023).
    """
    labels = {s: torch.tensor(v["labels"]) for s, v in manifest["splits"].items()}
    for split in ("train", "val", "test"):
        if split not in labels:
            raise UserError(f"the feature folder has no '{split}' split (extract with --splits train val test)")
    names = manifest["label_names"]
    inputs, by_key = {}, {}
    for set_name, tensors in sets.items():
        for view in manifest["sets"][set_name]["views"]:
            key = f"{set_name}:{view}"
            by_key[key] = _standardised(tensors, view)
            inputs[key] = by_key[key]["train"]
    heads = train_heads(inputs, labels["train"], len(names), head=head, epochs=epochs, seed=seed, progress=progress)
    grid = _grid_rows(heads, by_key, labels["val"], names)
    for set_name in sets if concat > 1 else ():
        views = top_views(grid, set_name, concat)
        if len(views) < 2:
            continue
        key = f"{set_name}:{'+'.join(views)}"
        by_key[key] = {split: torch.cat([by_key[f"{set_name}:{v}"][split] for v in views], dim=1)
                       for split in ("train", "val", "test")}
        more = train_heads({key: by_key[key]["train"]}, labels["train"], len(names), head=head, epochs=epochs,
                           seed=seed, progress=False)
        heads.update(more)
        grid += _grid_rows(more, by_key, labels["val"], names)
    best = {}
    for set_name in sets:
        rows = [r for r in grid if r["set"] == set_name]
        choice = choose(rows, lambda r: (r["val_accuracy"], r["val_auc"] or 0))
        key = f"{set_name}:{choice['view']}"
        test = classification_scores(_probs(heads[(key, choice["lr"])], by_key[key]["test"]), labels["test"], names)
        best[set_name] = dict(view=choice["view"], lr=choice["lr"], val_accuracy=choice["val_accuracy"],
                              val_auc=choice["val_auc"], test=test)
    for group in check_fuse(fuse, best):
        fused_name, fused_key = "+".join(group), "+".join(group) + ":" + "+".join(best[g]["view"] for g in group)
        by_key[fused_key] = {split: torch.cat([by_key[f"{g}:{best[g]['view']}"][split] for g in group], dim=1)
                             for split in ("train", "val", "test")}
        fused_heads = train_heads({fused_key: by_key[fused_key]["train"]}, labels["train"], len(names), head=head,
                                  epochs=epochs, seed=seed, progress=False)
        rows = _grid_rows(fused_heads, by_key, labels["val"], names)
        grid += rows
        choice = choose(rows, lambda r: (r["val_accuracy"], r["val_auc"] or 0))
        test = classification_scores(_probs(fused_heads[(fused_key, choice["lr"])], by_key[fused_key]["test"]),
                                     labels["test"], names)
        best[fused_name] = dict(view=choice["view"], lr=choice["lr"], val_accuracy=choice["val_accuracy"],
                                val_auc=choice["val_auc"], test=test)
    curve = label_efficiency(best, by_key, labels, names, head=head, epochs=epochs, fractions=fractions,
                             seeds=efficiency_seeds, progress=progress)
    return dict(head=head, epochs=epochs, grid=grid, best=best, label_efficiency=curve)


def _grid_rows(heads: dict, by_key: dict, val_labels: torch.Tensor, names: list[str]) -> list[dict]:
    """One grid row per head keyed ('<set>:<view>', lr): its validation accuracy and AUC."""
    rows = []
    for (key, lr), h in heads.items():
        val = classification_scores(_probs(h, by_key[key]["val"]), val_labels, names)
        set_name, view = key.split(":", 1)
        rows.append(dict(set=set_name, view=view, lr=lr, val_accuracy=val["accuracy"], val_auc=val["auc"]))
    return rows


def top_views(grid: list[dict], set_name: str, k: int) -> list[str]:
    """The k single views of a set with the best validation accuracy (each at its best learning rate)."""
    score = {}
    for r in grid:
        if r["set"] == set_name and "+" not in r["view"]:
            score[r["view"]] = max(score.get(r["view"], -1.0), r["val_accuracy"])
    return sorted(score, key=lambda v: -score[v])[:k]


def label_efficiency(best: dict, by_key: dict, labels: dict, names: list[str], *, head: str, epochs: int,
                     fractions, seeds: int, progress: bool) -> dict:
    """Test accuracy / AUC of each set's chosen (view, lr) retrained on a stratified fraction of the train labels."""
    curve = {}
    for fraction in fractions:
        for s in range(seeds if fraction < 1 else 1):
            idx = select_subset(labels["train"], fraction=fraction, seed=s)
            inputs = {f"{name}:{b['view']}": by_key[f"{name}:{b['view']}"]["train"][idx] for name, b in best.items()}
            # few labels: scale epochs so every run takes about the same number of steps (at least the full one's)
            scaled = max(epochs, int(epochs / max(fraction, 1e-3) ** 0.5))
            for name, b in best.items():
                key = f"{name}:{b['view']}"
                trained = train_heads({key: inputs[key]}, labels["train"][idx], len(names), lrs=(b["lr"],), head=head,
                                      epochs=scaled, seed=s, progress=False)[(key, b["lr"])]
                scores = classification_scores(_probs(trained, by_key[key]["test"]), labels["test"], names)
                curve.setdefault(name, {}).setdefault(str(fraction), []).append(
                    dict(seed=s, n_labels=len(idx), accuracy=scores["accuracy"], auc=scores["auc"]))
    return curve


def retrieval(manifest: dict, sets: dict, ks=(1, 5, 10)) -> dict:
    """Per feature set, the view with the best validation mAP, and its test recall@k, mAP and 10-NN accuracy."""
    labels = {s: torch.tensor(v["labels"]) for s, v in manifest["splits"].items()}
    out = {}
    for set_name, tensors in sets.items():
        scored = []
        for view in manifest["sets"][set_name]["views"]:
            x = _standardised(tensors, view)
            scored.append((retrieval_scores(x["val"], labels["val"], x["train"], labels["train"], ks)["map"], view, x))
        val_map, view, x = max(scored, key=lambda r: r[0])
        out[set_name] = dict(view=view, val_map=val_map,
                             test=retrieval_scores(x["test"], labels["test"], x["train"], labels["train"], ks))
    return out


def retrieval_scores(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 10)) -> dict:
    q = nn.functional.normalize(queries, dim=1)
    g = nn.functional.normalize(gallery, dim=1)
    order = (q @ g.T).argsort(dim=1, descending=True)
    relevant = (gallery_labels[order] == query_labels[:, None]).float()  # (Q, G) in ranked order
    out = {f"recall@{k}": float(relevant[:, :k].amax(1).mean()) for k in ks}
    hits = relevant.cumsum(1)
    ranks = torch.arange(1, relevant.shape[1] + 1).float()
    ap = (relevant * hits / ranks).sum(1) / relevant.sum(1).clamp_min(1)
    out["map"] = float(ap.mean())
    top = gallery_labels[order[:, :10]]
    vote = torch.mode(top, dim=1).values
    out["knn10_accuracy"] = float((vote == query_labels).float().mean())
    return out


VAL_FROM_TRAIN = 0.1  # the share of each class held out of train when a data set has no validation split


def hold_out_val(manifest: dict, sets: dict, share: float = VAL_FROM_TRAIN, seed: int = 0) -> tuple[dict, dict]:
    """For a feature folder with train and test but no val split (CIFAR-10's own split): a seeded, per-class `share`
    of train becomes val, so views and learning rates are chosen on held-out training images and test stays unseen
    (DDAE's protocol, Xiang et al. 2023, sec. 4.1). Returns the new (manifest, sets); others pass through."""
    splits = manifest["splits"]
    if "val" in splits or "train" not in splits or "test" not in splits:
        return manifest, sets
    labels = torch.tensor(splits["train"]["labels"])
    val = select_subset(labels, fraction=share, seed=seed)  # the data layer's seeded per-class draw
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    parts = {"train": (~is_val).nonzero().flatten(), "val": is_val.nonzero().flatten()}
    new_splits = dict(splits, **{name: dict(splits["train"], n=len(idx), labels=labels[idx].tolist())
                                 for name, idx in parts.items()})
    new_sets = {}
    for set_name, tensors in sets.items():
        new_sets[set_name] = {k: v for k, v in tensors.items() if not k.startswith("train/")}
        for key, value in tensors.items():
            if key.startswith("train/"):
                for name, idx in parts.items():
                    new_sets[set_name][name + key[len("train"):]] = value[idx]
    held = dict(share=share, seed=seed, n=len(val), note="val held out of train, per class")
    return dict(manifest, splits=new_splits, val_from_train=held), new_sets


def run_probe(features: str | Path | FeatureFolder, *, task: str = "classification", head: str = "linear", epochs: int = 30,
              out: str | Path | None = None, reference: dict | None = None, fuse: list[list[str]] | None = None,
              concat: int = 1, progress: bool = True) -> dict:
    """Probe a feature folder and write probe.json, probe.md and the plots into `out` (default: the folder)."""
    features = open_features(features)
    manifest, sets = hold_out_val(features.manifest, features.sets)
    out = Path(out or features.path)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(features=str(features), dataset=manifest["dataset"], stage=manifest["stage"],
                  n={s: v["n"] for s, v in manifest["splits"].items()})
    if manifest.get("val_from_train"):
        result["val_from_train"] = manifest["val_from_train"]
    if task == "classification":
        result.update(classify(manifest, sets, head=head, epochs=epochs, fuse=fuse, concat=concat, progress=progress))
        for name in sets:
            if heatmap(result["grid"], name, out / f"heatmap-{name}.png"):
                result.setdefault("plots", []).append(f"heatmap-{name}.png")
        efficiency_plot(result["label_efficiency"], out / "label_efficiency.png")
        result.setdefault("plots", []).append("label_efficiency.png")
    elif task == "retrieval":
        result["retrieval"] = retrieval(manifest, sets)
    else:
        raise UserError(f"unknown task '{task}' (classification | retrieval)")
    if reference:
        result["reference"] = reference
    result["machine"] = machine()  # the CPU, threads and torch the scores and times came from
    write_atomic(out / f"probe-{task}.json", json.dumps(result, indent=1))
    write_atomic(out / f"probe-{task}.md", probe_markdown(result))
    return result
