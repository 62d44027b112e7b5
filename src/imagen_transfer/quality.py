"""Sample quality during training: KID and conditioning accuracy of the EMA weights every `train.kid_every` steps.

Validation loss at fixed noise says how well a stage denoises, not how good its samples look; users of fine-tuning
tools ask for a sample metric while training and early stopping on it (diffusers #5364, #7249). A `QualityProbe` is
built once per stage (real features of the validation split, fixed captions and seeds, the conditioning judge) and
`measure_quality` then costs one batch of samples plus their features:

- base stage: `kid_samples` images for captions drawn (seeded) from the validation split, image i with seed i;
- SR stage: the first `kid_samples` validation images downsampled to its input resolution and super-resolved, so
  the SR stage is judged on real low-res inputs, independently of the base stage.

Both use the sample-grid settings (`sample.*`). KID is the unbiased MMD^2 of Binkowski et al. 2018 (metrics.kid) on
TF-Inception features (or `train.kid_feature_net`); with ~100-250 images its spread (kid_std) is large, so patience
over several measurements matters more than one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ImageTextData
from .measure import Reference, draw_captions, generate_images, reference, stage_generator
from .sources import DataSource, open_source


@dataclass
class QualityProbe:
    prompts: list[str]
    labels: torch.Tensor  # the class each prompt names (-1: unknown)
    lowres_source: torch.Tensor | None  # SR stages: uint8 real images (N, H, W, C) whose downsampling they upsample
    reference: Reference  # the validation split's features and the judge (measure.py)
    with_judge: bool  # conditioning accuracy is measured (labelled data with two classes or more)


def build_quality_probe(config, stage, val_data: ImageTextData, source: DataSource | None = None,
                        progress: bool = False) -> QualityProbe:
    """Everything a measurement needs that does not change during the stage's training (see module doc); `source`:
    the run's opened data set (default: config.data.dataset, opened here)."""
    tc, d = config.train, config.data
    source = open_source(source or d.dataset)
    ref = reference(source, d.val_split, stage.resolution, feature_net=tc.kid_feature_net, batch_size=100,
                    judge_split=d.split, progress=progress)
    lowres_source = None
    if stage.kind == "sr":
        n = min(tc.kid_samples, len(val_data))
        prompts, labels, lowres_source = val_data.captions[:n], val_data.labels[:n], val_data.images[:n]
    else:
        prompts, labels = draw_captions(val_data, tc.kid_samples, seed=0)
    with_judge = len(val_data.label_names) >= 2 and bool((labels >= 0).all())
    if with_judge:
        with_judge = ref.judge()[0] is not None  # trained now, before the loop; no labels in train: KID only
    return QualityProbe(prompts, labels, lowres_source, ref, with_judge)


@torch.no_grad()
def measure_quality(probe: QualityProbe, stage, encode, null, sample: dict, gray: bool = False,
                    batch_size: int = 64) -> dict:
    """KID (mean, std) of the stage's current weights against the real validation features, and conditioning
    accuracy where the data has labels. `encode`: prompts -> TextEncoding; `sample`: sample_stage settings.
    Images come through measure.generate_images (seed 0: image i uses seed i), as in `evaluate` and studies."""
    generate = stage_generator(stage, encode, null, sample, gray=gray, lowres_source=probe.lowres_source)
    images = generate_images(generate, probe.prompts, seed=0, chunk=batch_size, progress=False)
    scores = probe.reference.score(images, probe.labels if probe.with_judge else None, batch_size=100)
    result = dict(kid=scores["kid_mean"], kid_std=scores["kid_std"], kid_n=len(images))
    if probe.with_judge:
        result["conditioning_accuracy"] = scores["conditioning_accuracy"]
    return result
