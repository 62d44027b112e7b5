"""One measurement path: generated images scored against a reference, the same way in `evaluate`, in KID while
training (quality.py) and in studies.

- `Reference`: what generated images are compared with, built once per measurement setting: the real split's
  features under the feature network (cached on disk, keyed by data content, split, resolution, network, real subset)
  and, where the data has labels, the judge CNN for conditioning accuracy (judge.py), trained on first use.
  `Reference.score(images, labels)` gives KID (Binkowski et al. 2018) and conditioning accuracy, and with
  `full=True` FID (Heusel et al. 2017) and precision / recall (Kynkaanniemi et al. 2019, k = 3) too.
- `draw_captions` and `generate_images`: the protocol of what is generated: N captions drawn with replacement from
  the split (seeded), image i sampled with seed `seed * 1_000_000 + i` whatever the chunking.
- `stage_generator`: one cascade stage as a generator for `generate_images` (per-image generators; SR stages fed
  the downsampled real images whose index is the seed), the one way a single stage is sampled for measurement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import cached_pieces, save_safetensors_atomic
from .data import ImageTextData, stage_inputs
from .datasets import load_dataset
from .judge import conditioning_accuracy, load_or_train_judge
from .metrics import InceptionFeatures, extract_features, fid, kid, load_feature_net, precision_recall
from .outputs import cache_root
from .sampling import sample_stage, to_gray, to_uint8
from .sources import DataSource, open_source
from .unet import resolve_precision

Generator = Callable[[list[str], list[int]], torch.Tensor]  # prompts, seeds -> images in [-1, 1] (N, C, H, W)


def draw_captions(data: ImageTextData, n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """n captions (and their labels) drawn with replacement from a split, seeded."""
    idx = torch.randint(len(data), (n,), generator=torch.Generator().manual_seed(seed))
    return [data.captions[i] for i in idx.tolist()], data.labels[idx]


def generate_images(generate: Generator, prompts: list[str], seed: int, chunk: int = 64, progress: bool = True,
                    done: torch.Tensor | None = None, on_chunk: Callable[[torch.Tensor], None] | None = None
                    ) -> torch.Tensor:
    """uint8 images (N, H, W, 3), generated in chunks with an overall progress bar; image i uses seed
    `seed * 1_000_000 + i` whatever the chunking. `done`: the first images, already generated (a resumed run: they are
    the images this call would make, so it starts after them); `on_chunk(images so far)` runs after every chunk."""
    out = [done] if done is not None and len(done) else []
    first = len(out[0]) if out else 0
    with tqdm(total=len(prompts), initial=first, desc="generate", unit="img", disable=not progress) as bar:
        for start in range(first, len(prompts), chunk):
            part = prompts[start : start + chunk]
            seeds = [seed * 1_000_000 + start + i for i in range(len(part))]
            images = to_uint8(generate(part, seeds))
            out.append(images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images)
            bar.update(len(part))
            if on_chunk is not None:
                on_chunk(torch.cat(out))
    return torch.cat(out)


FEATURE_CHUNK = 250  # images per cached piece: about a minute of TF-Inception on one CPU thread


def cached_features(net, net_id: str, images: torch.Tensor, *, batch_size: int = 50, progress: bool = True,
                    desc: str = "features") -> tuple[torch.Tensor, list[Path]]:
    """Features of uint8 images (N, H, W, C), computed FEATURE_CHUNK images at a time, each piece cached on disk
    under the hash of its pixels and the network (`net_id`): a run killed while measuring, or a rerun on the same
    images, computes only the pieces still missing. Returns the features and the pieces' files."""
    folder = cache_root() / "features" / "pieces"

    def file_for(start: int, piece: torch.Tensor) -> Path:
        digest = hashlib.sha1(f"{net_id}|{tuple(piece.shape)}|{piece.dtype}|".encode() + piece.numpy().tobytes())
        return folder / f"{digest.hexdigest()[:32]}.safetensors"

    def compute(start: int, piece: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": extract_features(net, piece, batch_size=batch_size, progress=False)}

    parts, files = cached_pieces(images, FEATURE_CHUNK, file_for, compute, progress=progress, desc=desc)
    out = [part["features"] for part in parts]
    return (torch.cat(out) if out else extract_features(net, images, progress=False)), files


def _reference_file(dataset: DataSource, split: str, resolution: int, net_id: str, n_real: int | None,
                    seed: int) -> Path:
    key = f"{dataset.fingerprint}|{split}|{resolution}|{net_id}|{n_real}|{seed}|v1"
    return cache_root() / "features" / (hashlib.sha1(key.encode()).hexdigest()[:24] + ".safetensors")


def reference_features(dataset: str | DataSource, split: str, resolution: int, net, net_id: str, *, n_real: int | None = None,
                       seed: int = 0, batch_size: int = 50, data: ImageTextData | None = None,
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Features of the real images of a split (all of them, or a seeded subset of n_real), cached on disk.
    `data`: the split already loaded at `resolution` (read here only on a cache miss otherwise)."""
    dataset = open_source(dataset)
    file = _reference_file(dataset, split, resolution, net_id, n_real, seed)
    if file.is_file():
        features = load_file(file)["features"]
        return features, dict(n_real=len(features), reference_cache=str(file), reference_cached=True)
    if data is None:
        data = load_dataset(dataset, split, resolution=resolution, channels=3)
    images = data.images
    if n_real is not None and n_real < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_real]]
    features, parts = cached_features(net, net_id, images, batch_size=batch_size, progress=progress,
                                      desc=f"features {split} (real)")
    save_safetensors_atomic(file, {"features": features})
    for part in parts:  # the whole split's file holds them now
        part.unlink(missing_ok=True)
    return features, dict(n_real=len(features), reference_cache=str(file), reference_cached=False)


@dataclass
class Reference:
    """The fixed side of a measurement (see module doc). Build it with `reference(...)`."""

    features: torch.Tensor  # the real images' features
    net: torch.nn.Module
    net_id: str  # the feature network's sha256 prefix
    info: dict  # n_real, the reference cache file, whether it was cached
    dataset: DataSource
    split: str
    resolution: int
    judge_split: str = "train"
    progress: bool = False
    _judge: dict = field(default_factory=dict, repr=False)  # built on the first labelled score

    def judge(self) -> tuple[torch.nn.Module | None, dict]:
        """The judge and its facts, trained on first use; (None, {"absent": why}) where the data has no labels."""
        if not self._judge:
            try:
                model, info = load_or_train_judge(self.dataset, self.resolution, split=self.judge_split,
                                                  eval_split=self.split, progress=self.progress)
                self._judge.update(model=model, info=info)
            except ValueError as err:  # the judge's training split has no labels
                self._judge.update(model=None, info=dict(absent=str(err)))
        return self._judge["model"], self._judge["info"]

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, full: bool = False, seed: int = 0,
              batch_size: int = 50, cached: bool = False, progress: bool = False) -> dict:
        """KID (mean, std over 100 subsets, subset size) of uint8 images (N, H, W, 3) against the reference, and
        conditioning accuracy where `labels` (the class each image was asked for) are all known and the judge
        exists; `full`: FID and precision / recall too. `cached`: feature pieces cached on disk (cached_features),
        so a killed measurement resumes."""
        if cached:
            fake, _ = cached_features(self.net, self.net_id, images, batch_size=batch_size, progress=progress,
                                      desc="features (generated)")
        else:
            fake = extract_features(self.net, images, batch_size=batch_size, progress=False)
        result = {}
        if full:
            result["fid"] = fid(self.features, fake)
        kid_mean, kid_std, subset = kid(self.features, fake, seed=seed)
        result.update(kid_mean=kid_mean, kid_std=kid_std, kid_subset_size=subset, kid_subsets=100)
        if full and min(len(self.features), len(fake)) > PR_K:
            result["precision"], result["recall"] = precision_recall(self.features, fake, k=PR_K)
            result["precision_recall_k"] = PR_K
        result.update(self.conditioning(images, labels))
        return result

    def conditioning(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        """Conditioning accuracy (overall and per class) with the judge's facts, or why it is absent."""
        if labels is None:
            return {}
        if (labels < 0).any():
            return dict(conditioning_accuracy=None, conditioning_accuracy_absent="the split has unlabelled images")
        judge, info = self.judge()
        if judge is None:
            return dict(conditioning_accuracy=None, conditioning_accuracy_absent=info["absent"])
        return dict(**conditioning_accuracy(judge, images, labels, info["classes"]),
                    judge=dict(real_accuracy=info["real_accuracy"], real_split=info["real_split"],
                               trained_on=info["trained_on"], epochs=info["epochs"]))


PR_K = 3  # precision / recall neighbourhood size (Kynkaanniemi et al. 2019)


def feature_network(feature_net: str | None = None, feature_precision: str = "no") -> tuple[InceptionFeatures, str]:
    """The feature network (default TF-Inception) computing in `feature_precision` (see `reference`), and its id."""
    return load_feature_net(feature_net, bf16=resolve_precision(feature_precision, torch.cuda.is_available()) == "bf16")


def preview_reference(dataset: DataSource, split: str, resolution: int, data: ImageTextData, net, net_id: str, *,
                      n_real: int = FEATURE_CHUNK, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Real features under (net, net_id) for a first look (evaluate's `preview`), as reference_features reads them:
    the whole split's when they are cached already, else those of a seeded random subset of `n_real` images (one
    cached piece: a rerun reads it). Returns them and how many real images they stand for."""
    file = _reference_file(dataset, split, resolution, net_id, None, seed)
    if file.is_file():
        features = load_file(file)["features"]
        return features, len(features)
    pick = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(seed))[:n_real].sort().values
    features, _ = cached_features(net, net_id, data.images[pick], progress=False)  # in the split's order
    return features, len(features)


def reference(dataset: str | DataSource, split: str, resolution: int, *, feature_net: str | None = None,
              n_real: int | None = None, seed: int = 0, batch_size: int = 50, data: ImageTextData | None = None,
              judge_split: str = "train", device: str | torch.device | None = None,
              feature_precision: str = "no", progress: bool = True) -> Reference:
    """The Reference of a split at `resolution` under a feature network (default TF-Inception); `data`: the split
    already loaded at that resolution; `n_real`: a seeded subset of the real images. `feature_precision`: the
    network's compute, "no" (fp32, as published FID / KID), "bf16", or "auto" (bf16 where the CPU computes it
    natively; the shift it makes: benchmarks/results/inception_bf16_cpu.json)."""
    dataset = open_source(dataset)
    net, net_id = feature_network(feature_net, feature_precision)
    if device is not None:
        net.to(device)
    features, info = reference_features(dataset, split, resolution, net, net_id, n_real=n_real, seed=seed,
                                        batch_size=batch_size, data=data, progress=progress)
    return Reference(features, net, net_id, info, dataset, split, resolution, judge_split, progress)


def stage_generator(stage, encode, null, sampling: dict, *, gray: bool = False,
                    lowres_source: torch.Tensor | None = None) -> Generator:
    """One cascade stage as a Generator: image i of a call is sampled with its own torch.Generator seeded with its
    seed (so results do not depend on batching); SR stages upsample `lowres_source[seed]` (uint8 real images,
    downsampled to the stage's low resolution). `encode`: prompts -> TextEncoding; `gray`: average the channels."""
    device = next(stage.unet.parameters()).device

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        lowres = None
        if lowres_source is not None:
            _, lowres = stage_inputs(stage, lowres_source[seeds], None, device)
        x = sample_stage(stage, encode(prompts), null, gens, lowres=lowres, progress=False, **sampling)
        return (to_gray(x) if gray else x).cpu()

    return generate
