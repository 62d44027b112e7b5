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

from .data import ImageTextData, stage_inputs
from .evaluate import draw_captions, generate_images, reference_features
from .judge import conditioning_accuracy, load_or_train_judge
from .metrics import extract_features, kid, load_feature_net
from .sampling import sample_stage, to_gray
from .sources import DataSource, open_source


@dataclass
class QualityProbe:
    prompts: list[str]
    labels: torch.Tensor  # the class each prompt names (-1: unknown)
    lowres_source: torch.Tensor | None  # SR stages: uint8 real images (N, H, W, C) whose downsampling they upsample
    real_features: torch.Tensor
    net: torch.nn.Module
    judge: torch.nn.Module | None
    judge_classes: list[str]
    feature_network: str


def build_quality_probe(config, stage, val_data: ImageTextData, source: DataSource | None = None,
                        progress: bool = False) -> QualityProbe:
    """Everything a measurement needs that does not change during the stage's training (see module doc); `source`:
    the run's opened data set (default: config.data.dataset, opened here)."""
    tc, d = config.train, config.data
    source = open_source(source or d.dataset)
    net, net_id = load_feature_net(tc.kid_feature_net)
    real, _ = reference_features(source, d.val_split, stage.resolution, net, net_id, batch_size=100,
                                 progress=progress)
    lowres_source = None
    if stage.kind == "sr":
        n = min(tc.kid_samples, len(val_data))
        prompts, labels, lowres_source = val_data.captions[:n], val_data.labels[:n], val_data.images[:n]
    else:
        prompts, labels = draw_captions(val_data, tc.kid_samples, seed=0)
    judge, classes = None, []
    if len(val_data.label_names) >= 2 and bool((labels >= 0).all()):
        try:
            judge, info = load_or_train_judge(source, stage.resolution, split=d.split, eval_split=d.val_split,
                                              progress=progress)
            classes = info["classes"]
        except ValueError:  # the training split has no labels: KID only
            judge = None
    return QualityProbe(prompts, labels, lowres_source, real, net, judge, classes, net_id)


@torch.no_grad()
def measure_quality(probe: QualityProbe, stage, encode, null, sample: dict, gray: bool = False,
                    batch_size: int = 64) -> dict:
    """KID (mean, std) of the stage's current weights against the real validation features, and conditioning
    accuracy where the data has labels. `encode`: prompts -> TextEncoding; `sample`: sample_stage settings.
    Images come through evaluate.generate_images (seed 0: image i uses seed i), as in `evaluate` and studies."""
    device = next(stage.unet.parameters()).device

    def generate(chunk: list[str], seeds: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        lowres = None
        if probe.lowres_source is not None:  # seed i is image i of the validation images
            _, lowres = stage_inputs(stage, probe.lowres_source[seeds], None, device)
        x = sample_stage(stage, encode(chunk), null, gens, lowres=lowres, progress=False, **sample)
        return (to_gray(x) if gray else x).cpu()

    images = generate_images(generate, probe.prompts, seed=0, chunk=batch_size, progress=False)
    fake = extract_features(probe.net, images, batch_size=100, progress=False)
    kid_mean, kid_std, _ = kid(probe.real_features, fake, seed=0)
    result = dict(kid=kid_mean, kid_std=kid_std, kid_n=len(fake))
    if probe.judge is not None:
        result["conditioning_accuracy"] = conditioning_accuracy(probe.judge, images, probe.labels,
                                                                probe.judge_classes)["conditioning_accuracy"]
    return result
