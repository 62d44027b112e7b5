"""`imagen-transfer features`: a diffusion U-Net as a feature extractor (and the baselines to judge it by).

Following "Denoising Diffusion Autoencoders are Unified Self-supervised Learners" (Xiang et al. 2023) and
"Diffusion Hyperfeatures" (Luo et al. 2023): noise a clean image to timestep t with fixed noise, run the U-Net once,
and read the activations of named blocks through forward hooks (`down0..`, `mid`, `up0..`), globally average-pooled
(or kept as spatial maps). The conditioning text is the empty prompt by default, so the label never leaks in.

A feature folder holds one safetensors file per feature set (a model, or a baseline: raw pixels, the same U-Net with
random weights, the captions' text-encoder embeddings) with tensors named `<split>/<view>` (a view is `down1@t100`,
`pixels` or `text`), plus `manifest.json` (dataset, splits with their labels, views, dimensions, settings).

Image i of a split always gets the noise of generator seed `seed * 1_000_000 + i`, so features do not depend on the
batch size or on how the images are sharded across processes (`accelerate launch ... imagen-transfer features`).

The U-Net runs in pieces of PIECE_BATCHES batches, each piece's features cached (under the cache root) by the hash
of the weights, the settings, the piece's first index and its pixels: a run killed after an hour of a 60,000-image
extraction, rerun with the same command, redoes only the pieces it had not finished. A set's pieces are deleted once
its file is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .cascade import resolve_model
from .checkpoint import cached_pieces, save_safetensors_atomic
from .data import ImageTextData, resize, to_float
from .datasets import load_dataset
from .dense import load_dense
from .diffusion import add_noise, condition_lowres, denoise
from .errors import UserError
from .interop import open_model
from .openmp import adapt as adapt_threads
from .outputs import cache_root, write_atomic
from .sampling import randn
from .sources import DataSource, open_source
from .task_size import DEFAULT_BUDGET_S, expected_seconds, gflop_rate, object_side, plan_size
from .text import load_text_encoder
from .unet import resolve_precision

DEFAULT_TIMESTEPS = (10, 100, 300)


def block_names(unet) -> list[str]:
    return ([f"down{i}" for i in range(len(unet.down_blocks))] + ["mid"]
            + [f"up{i}" for i in range(len(unet.up_blocks))])


def _block(unet, name: str):
    if name == "mid":
        return unet.mid_block
    kind, index = name[: 2 if name.startswith("up") else 4], name[2 if name.startswith("up") else 4 :]
    blocks = {"down": unet.down_blocks, "up": unet.up_blocks}.get(kind)
    if blocks is None or not index.isdigit() or int(index) >= len(blocks):
        raise UserError(f"unknown block '{name}'; this U-Net has {', '.join(block_names(unet))}")
    return blocks[int(index)]


@torch.inference_mode()
def unet_features(stage, images: torch.Tensor, *, blocks: list[str], timesteps: list[int], text,
                  first_index: int = 0, seed: int = 0, batch_size: int = 64, pool: bool = True,
                  size: int | tuple[int, int] | None = None, grid: tuple[int, int] | None = None,
                  draws: int = 1, precision: str = "no", progress: bool = True,
                  desc: str = "features") -> dict[str, torch.Tensor]:
    """{'<block>@t<t>': (N, C) pooled, or (N, C, h, w)} for uint8 images (N, H, W, C).

    The U-Net runs at `size` (default: the stage's resolution; it is convolutional, so a dense task may choose a
    larger, non-square size divisible by its downsampling factor). With `grid` (and pool=False) every map is brought
    to that (h, w) grid (area averaging to shrink, bilinear to enlarge) and kept in fp16, so several blocks and
    timesteps stack into one multi-block map. `text` is a one-row TextEncoding (the conditioning prompt);
    `first_index` is image 0's index in its split (its noise seed). SR stages see the image's own downsampled copy
    (by the stage's factor) as their clean low-res input. With `draws` > 1 every view is the mean over that many
    noise draws (DIFT's ensemble, Tang et al. 2023: 8 draws), draw d being the d-th noise of the image's generator
    (draw 0 is the single-draw noise); the cost grows with `draws`, the files do not. `precision` "bf16": the U-Net
    runs under bf16 autocast (as sampling does where the hardware computes bf16 natively), the maps kept in fp32.
    """

    unet = stage.unet.eval()
    device = next(unet.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    size = size or stage.resolution
    hw = (size, size) if isinstance(size, int) else tuple(size)
    lowres_hw = None if stage.kind != "sr" else (hw[0] * stage.lowres // stage.resolution,
                                                 hw[1] * stage.lowres // stage.resolution)

    def hook(name):
        def keep(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if pool:
                captured[name] = out.float().mean(dim=(2, 3))
            else:
                captured[name] = out.float() if grid is None else resize(out.float(), grid).half()
        return keep

    handles = [_block(unet, name).register_forward_hook(hook(name)) for name in blocks]
    alphas = stage.scheduler.alphas_cumprod
    out: dict[str, list[torch.Tensor]] = {f"{b}@t{t}": [] for b in blocks for t in timesteps}
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
            adapt_threads()
            x0 = to_float(images[start : start + batch_size], hw).to(device)
            n = len(x0)
            gens = [torch.Generator().manual_seed(seed * 1_000_000 + first_index + start + i) for i in range(n)]
            lowres = level = None
            if stage.kind == "sr":
                level = torch.zeros(n, dtype=torch.long, device=device)
                small = to_float(images[start : start + batch_size], lowres_hw).to(device)
                lowres = condition_lowres(small, hw, level, torch.zeros_like(x0), alphas)
            sums: dict[str, torch.Tensor] = {}
            for _ in range(draws):
                noise = randn(tuple(x0.shape), gens, device)  # one noise per image and draw, shared by the timesteps
                for t in timesteps:
                    tt = torch.full((n,), int(t), dtype=torch.long, device=device)
                    with autocast:
                        denoise(unet, add_noise(x0, tt, noise, alphas), tt, text.repeat(n).to(device), lowres, level)
                    for b in blocks:
                        view, value = f"{b}@t{t}", captured[b].cpu()
                        sums[view] = value.float() if view not in sums else sums[view] + value.float()
            for b in blocks:
                for t in timesteps:
                    view = f"{b}@t{t}"
                    out[view].append((sums[view] / draws).to(captured[b].dtype))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


PIECE_BATCHES = 8  # batches per cached piece: ~15-30 s of a 32 px U-Net on one CPU thread at the default batch


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def features_key(stage, text, **settings) -> str:
    """A digest of everything a stage's features depend on but the images: its U-Net weights, noise schedule, kind
    and sizes, the conditioning text and the extraction settings (blocks, timesteps, seed, pooling, size, grid)."""
    digest = hashlib.sha1(repr((stage.kind, stage.resolution, stage.lowres,
                                sorted(settings.items()))).encode())
    for name, tensor in stage.unet.state_dict().items():
        digest.update(name.encode() + _tensor_bytes(tensor))
    for tensor in (stage.scheduler.alphas_cumprod, *text):
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:24]


def cached_unet_features(stage, images: torch.Tensor, *, key: str, first_index: int = 0, batch_size: int = 64,
                         progress: bool = True, desc: str = "features",
                         **kwargs) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """unet_features in pieces of PIECE_BATCHES batches (the same batches as one pass, so the same numbers), each
    piece kept in `cache_root()/unet-features/<key>/` under its first index and pixels' hash; pieces already there
    are read, not computed. `key` is features_key of the stage and settings. Returns the features and the pieces."""
    if len(images) == 0:
        return unet_features(stage, images, first_index=first_index, batch_size=batch_size, progress=False,
                             **kwargs), []
    folder = cache_root() / "unet-features" / key

    def file_for(start: int, piece: torch.Tensor) -> Path:
        pixels = hashlib.sha1(f"{tuple(piece.shape)}|{piece.dtype}|".encode() + piece.numpy().tobytes())
        return folder / f"{first_index + start}-b{batch_size}-{pixels.hexdigest()[:20]}.safetensors"

    def compute(start: int, piece: torch.Tensor) -> dict[str, torch.Tensor]:
        return unet_features(stage, piece, first_index=first_index + start, batch_size=batch_size, progress=False,
                             **kwargs)

    parts, files = cached_pieces(images, batch_size * PIECE_BATCHES, file_for, compute, progress=progress, desc=desc)
    return {view: torch.cat([part[view] for part in parts]) for view in parts[0]}, files


def drop_pieces(files: list[Path]) -> None:
    """Delete cached pieces (and their folders, once empty) after the feature files they make up are written."""
    for file in files:
        file.unlink(missing_ok=True)
    for folder in {file.parent for file in files}:
        try:
            folder.rmdir()
        except OSError:  # not empty: another extraction's pieces share the key
            pass


def pixel_features(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Raw pixels at `resolution`, flattened, in [-1, 1]: the baseline every representation must beat."""
    return to_float(images, resolution).flatten(1)


def random_like(stage, seed: int = 0):
    """The same stage with freshly initialised U-Net weights (the 'architecture only' baseline)."""

    torch.manual_seed(seed)
    clone = copy.copy(stage)
    clone.unet = UNet2DConditionModel.from_config(stage.unet.config).to(stage.unet.device).eval()
    return clone


def _shard(n: int, state):
    """(indices of this process, gather function) under accelerate; everything in one process otherwise.
    Shards are contiguous and padded to equal size, so gathering in rank order and cutting to n restores the order."""
    if state.num_processes == 1:
        return list(range(n)), lambda t: t

    with state.split_between_processes(list(range(n)), apply_padding=True) as idx:
        mine = list(idx)
    return mine, lambda t: gather(t.contiguous().to(state.device)).cpu()[:n]


def extract(models: dict[str, str], dataset: str | DataSource, out: str | Path, *, splits: tuple[str, ...] = ("train", "val", "test"),
            stage_name: str = "base", blocks: list[str] | None = None, timesteps: list[int] | None = None,
            prompt: str = "", baselines: tuple[str, ...] = ("pixels", "random"), seed: int = 0,
            batch_size: int = 64, pool: bool = True, limit: int | None = None, draws: int = 1,
            precision: str = "no", progress: bool = True) -> Path:
    """Write a feature folder for each model in `models` (name -> cascade) plus the baselines; see module doc.
    `draws` > 1: each U-Net view averaged over that many noise draws (unet_features); `precision`: the U-Net's
    autocast, "no" (fp32), "bf16" or "auto" (bf16 where native: unet.resolve_precision)."""
    dataset = open_source(dataset)
    precision = resolve_precision(precision, torch.cuda.is_available())
    state, cascades, blocks, timesteps = _open_models(models, stage_name, blocks, timesteps, DEFAULT_TIMESTEPS)
    first = next(iter(cascades.values()))
    stage0 = first.stage(stage_name)
    out = Path(out)
    data: dict[str, ImageTextData] = {s: load_dataset(dataset, s, resolution=stage0.resolution, channels=3,
                                                      limit=limit) for s in splits}
    sets, pieces = _unet_sets(cascades, stage_name, {s: d.images for s, d in data.items()}, state, blocks=blocks,
                              timesteps=timesteps, prompt=prompt, baselines=baselines, seed=seed,
                              batch_size=batch_size, progress=progress, pool=pool, **_draws(draws),
                              **_precision(precision))
    encoder = load_text_encoder(first.text_encoder)
    if "pixels" in baselines:
        sets["pixels"] = {f"{s}/pixels": pixel_features(d.images, stage0.resolution) for s, d in data.items()}
    if "text" in baselines:
        sets["text"] = {f"{s}/text": encoder(d.captions).pooled.float() for s, d in data.items()}
    if state.is_main_process:
        first_data = next(iter(data.values()))
        _write(out, sets, dict(models={k: str(resolve_model(v)) for k, v in models.items()},
                               dataset=str(dataset.path), stage=stage_name, resolution=stage0.resolution,
                               blocks=blocks, timesteps=timesteps, prompt=prompt, seed=seed, pool=pool,
                               draws=draws, precision=precision, label_names=first_data.label_names,
                               splits={s: dict(n=len(d), source=d.source, labels=d.labels.tolist())
                                       for s, d in data.items()}))
    state.wait_for_everyone()
    drop_pieces(pieces)
    return out


def _draws(draws: int) -> dict:
    """unet_features' `draws` setting, left out at 1 so single-draw features keep their cache keys."""
    if draws < 1:
        raise UserError(f"--noise-draws must be at least 1 (got {draws})")
    return {} if draws == 1 else dict(draws=draws)


def _precision(precision: str) -> dict:
    """unet_features' `precision` setting, left out when fp32 so fp32 features keep their cache keys."""
    if precision not in ("no", "bf16"):
        raise UserError(f"feature precision {precision!r}: use no, bf16 or auto")
    return {} if precision == "no" else dict(precision=precision)


def _open_models(models: dict[str, str], stage_name: str, blocks, timesteps, default_timesteps):
    """(accelerate state, {name: cascade}, blocks, timesteps) with the blocks and timesteps checked."""

    if not models:
        raise UserError("give at least one --model")
    state = PartialState(cpu=not torch.cuda.is_available())
    cascades = {name: open_model(path, device=state.device) for name, path in models.items()}
    stage0 = next(iter(cascades.values())).stage(stage_name)
    blocks = blocks or block_names(stage0.unet)
    for name in blocks:
        _block(stage0.unet, name)  # an unknown block fails here, naming the valid ones
    timesteps = [int(t) for t in (timesteps or default_timesteps)]
    bad = [t for t in timesteps if not 0 <= t < len(stage0.scheduler.alphas_cumprod)]
    if bad:
        raise UserError(f"timesteps must be in [0, {len(stage0.scheduler.alphas_cumprod) - 1}] (got {bad})")
    return state, cascades, blocks, timesteps


def _unet_sets(cascades: dict, stage_name: str, images: dict[str, torch.Tensor], state, *, blocks, timesteps,
               prompt: str, baselines, seed: int, batch_size: int, progress: bool,
               **kwargs) -> tuple[dict[str, dict], list[Path]]:
    """({set name: {'<split>/<view>': tensor}}, cached pieces) for each model's stage and (for the first) its
    random-weights twin, sharded over accelerate processes; `kwargs` go to unet_features (pool, size, grid)."""
    sets, pieces = {}, []
    for name, cascade in cascades.items():
        stage = cascade.stage(stage_name)
        sources = [(name, stage)] + ([("random", random_like(stage, 1000 + seed))] if "random" in baselines and
                                     name == next(iter(cascades)) else [])
        text = load_text_encoder(cascade.text_encoder)([prompt])
        for set_name, st in sources:
            settings = dict(blocks=blocks, timesteps=timesteps, seed=seed, **kwargs)
            key = features_key(st, text, **settings)
            tensors = {}
            for split, split_images in images.items():
                mine, gather = _shard(len(split_images), state)
                feats, files = cached_unet_features(st, split_images[mine], key=key,
                                                    first_index=mine[0] if mine else 0, batch_size=batch_size,
                                                    progress=progress, desc=f"{set_name} {split}", text=text,
                                                    **settings)
                tensors.update({f"{split}/{view}": gather(v) for view, v in feats.items()})
                pieces += files
            sets[set_name] = tensors
    return sets, pieces


DENSE_BLOCKS = ("mid", "up0", "up1")  # decoder blocks, as ddpm-segmentation reads (Baranchuk et al. 2022)
DENSE_TIMESTEPS = (50, 150)  # in ddpm-segmentation's best range (t = 50-250 of 1000)
DENSE_STRIDE = 4  # the common grid: 1/4 of the task size (CenterNet's output stride)


def downsampling_factor(unet) -> int:
    """How many times the U-Net halves its input: a dense task's size must be a multiple of it."""
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def extract_dense(models: dict[str, str], dataset: str | DataSource, out: str | Path, *,
                  splits: tuple[str, ...] = ("train", "val", "test"), stage_name: str = "sr",
                  blocks: list[str] | None = None, timesteps: list[int] | None = None,
                  size: tuple[int, int] | None = None, stride: int = DENSE_STRIDE, prompt: str = "",
                  baselines: tuple[str, ...] = ("pixels", "random"), seed: int = 0, batch_size: int = 16,
                  limit: int | None = None, tile: tuple[int, int] | None = None, draws: int = 1,
                  budget_s: float = DEFAULT_BUDGET_S, progress: bool = True) -> Path:
    """A feature folder of multi-block maps for a detection or segmentation data set (dense.py).

    The U-Net runs on each image at the task size (h, w), or on its non-overlapping `tile`s, their maps stitched back
    (self-attention costs the square of the token count: at 240 x 320 the SR U-Net's attention is 16x its cost at
    120 x 160, tiled it is 4x; a U-Net trained on 32 px crops never attended over a whole smear anyway); every block x
    timestep map is brought to the common grid (h / stride, w / stride) and stored in fp16, one view each. The pixel
    baseline is the image itself at that grid, space-to-depth (each stride x stride patch's 3 * stride^2 values as
    channels, nothing lost). Targets (boxes, box labels, masks) go to `targets.safetensors`; the manifest records the
    task, classes, sizes, tile, faults and cost. A data set with no size of ours (and no `size` / `tile`) is read at
    the size and tiles task_size.plan_size picks from its objects' scale and `budget_s`; the choice and the
    expected time are printed before any pass.
    """
    dataset = open_source(dataset)
    state, cascades, blocks, timesteps = _open_models(models, stage_name, list(blocks or DENSE_BLOCKS), timesteps,
                                                      DENSE_TIMESTEPS)
    stage0 = next(iter(cascades.values())).stage(stage_name)
    factor = downsampling_factor(stage0.unet)
    text = load_text_encoder(next(iter(cascades.values())).text_encoder)([prompt])
    passes = (len(cascades) + ("random" in baselines)) * len(timesteps) * draws
    rate = gflop_rate(stage0, text)
    first = load_dense(dataset, splits[0], size=size)
    if size is None and tile is None and not dataset.known.task_size:  # a set we have no size for: plan one
        n = min(limit or len(first), len(first)) * len(splits)
        plan = plan_size(stage0, tuple(first.images.shape[1:3]), object_side(first), n, passes,
                         max(factor, stride), text, budget_s, rate)
        print(f"features: {dataset.path.name} has no task size of ours: {plan.note}", flush=True)
        size, tile = plan.size, plan.tile
        first = load_dense(dataset, splits[0], size=size)
    size = tuple(first.images.shape[1:3])  # without --size the first split's, so every split shares one grid
    data = {s: first if s == splits[0] else load_dense(dataset, s, size=size) for s in splits}
    if limit is not None:
        data = {s: d.subset(range(min(limit, len(d)))) for s, d in data.items()}
    h, w = next(iter(data.values())).images.shape[1:3]
    if h % max(factor, stride) or w % max(factor, stride):
        raise UserError(f"task size {h}x{w} must be a multiple of {max(factor, stride)} (the U-Net halves its input "
                        f"{factor.bit_length() - 1} times; the grid stride is {stride}); pass --size H W")
    grid = (h // stride, w // stride)
    th, tw = tile or (h, w)
    if h % th or w % tw or th % max(factor, stride) or tw % max(factor, stride):
        raise UserError(f"tile {th}x{tw} must divide the task size {h}x{w} and be a multiple of {max(factor, stride)}; "
                        f"pass --tile H W accordingly")
    rows, cols = h // th, w // tw
    images = sum(len(d) for d in data.values())
    seconds = expected_seconds(stage0, (h, w), (th, tw), passes * images, text, rate)
    print(f"features: {h}x{w}, tile {th}x{tw}, {images} images x {passes} U-Net passes: "
          f"expected ~{seconds:.0f} s at {rate:.0f} GFLOP/s", flush=True)
    tiles = {s: to_tiles(d.images, th, tw) for s, d in data.items()}
    sets, pieces = _unet_sets(cascades, stage_name, tiles, state, blocks=blocks, timesteps=timesteps, prompt=prompt,
                              baselines=baselines, seed=seed, batch_size=batch_size, progress=progress, pool=False,
                              size=(th, tw), grid=(th // stride, tw // stride), **_draws(draws))
    sets = {name: {k: from_tiles(v, rows, cols) for k, v in tensors.items()} for name, tensors in sets.items()}
    if "pixels" in baselines:
        sets["pixels"] = {f"{s}/pixels": torch.nn.functional.pixel_unshuffle(to_float(d.images), stride).half()
                          for s, d in data.items()}
    if state.is_main_process:
        first_data = next(iter(data.values()))
        Path(out).mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(Path(out) / "targets.safetensors", _dense_targets(data))
        _write(Path(out), sets, dict(
            models={k: str(resolve_model(v)) for k, v in models.items()}, dataset=str(dataset.path),
            stage=stage_name, size=[h, w], tile=[th, tw], stride=stride, grid=list(grid), blocks=blocks,
            timesteps=timesteps, prompt=prompt, seed=seed, pool=False, draws=draws, task=first_data.task,
            layout=first_data.layout,
            label_names=first_data.class_names, targets="targets.safetensors",
            splits={s: dict(n=len(d), source=d.source, names=d.names, faults=d.faults) for s, d in data.items()}))
    state.wait_for_everyone()
    drop_pieces(pieces)
    return Path(out)


def to_tiles(images: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """(N, H, W, C) -> (N * rows * cols, th, tw, C): each image's tiles in row-major order."""
    n, h, w, c = images.shape
    tiles = images.reshape(n, h // th, th, w // tw, tw, c).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(-1, th, tw, c)


def from_tiles(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(N * rows * cols, C, gh, gw) maps of row-major tiles -> (N, C, rows * gh, cols * gw): to_tiles undone."""
    _, c, gh, gw = maps.shape
    return maps.reshape(-1, rows, cols, c, gh, gw).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, rows * gh, cols * gw)


def _dense_targets(data: dict) -> dict[str, torch.Tensor]:
    """`targets.safetensors`: per split the boxes (concatenated, with per-image counts) and box labels, or masks."""
    targets = {}
    for split, d in data.items():
        if d.task == "detection":
            targets[f"{split}/box_counts"] = torch.tensor([len(b) for b in d.boxes], dtype=torch.long)
            targets[f"{split}/boxes"] = torch.cat(d.boxes).reshape(-1, 4)
            targets[f"{split}/box_labels"] = torch.cat(d.box_labels).long()
        else:
            targets[f"{split}/masks"] = d.masks.to(torch.int16)  # class indices and masks.IGNORE (-1)
    return targets


def _write(out: Path, sets: dict, manifest: dict) -> None:
    """Each feature set as `<name>.safetensors` and `manifest.json`: the given fields (settings, splits) plus each
    set's file, views, dimensions and size."""
    out.mkdir(parents=True, exist_ok=True)
    split = next(iter(manifest["splits"]))
    manifest = dict(manifest, sets={})
    for name, tensors in sets.items():
        save_safetensors_atomic(out / f"{name}.safetensors", tensors)
        views = [k.split("/", 1)[1] for k in tensors if k.startswith(f"{split}/")]
        manifest["sets"][name] = dict(file=f"{name}.safetensors", views=views,
                                      dims={v: list(tensors[f"{split}/{v}"].shape[1:]) for v in views},
                                      megabytes=round(sum(t.numel() * t.element_size() for t in tensors.values())
                                                      / 2**20, 1))
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))  # written last: it marks the folder complete


class FeatureSets(Mapping):
    """A feature folder's sets by name, each file read on first use and kept: a probe of a few sets reads only those
    (a BCCD U-Net set is about 0.5 GB)."""

    def __init__(self, folder: Path, manifest: dict):
        self._folder, self._loaded = folder, {}
        self._files = {name: info["file"] for name, info in manifest["sets"].items()}

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._loaded:
            self._loaded[name] = load_file(self._folder / self._files[name])
        return self._loaded[name]

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@dataclass(frozen=True, eq=False)
class FeatureFolder:
    """A feature folder opened once per command: its manifest, and its sets loaded lazily (FeatureSets)."""

    path: Path
    manifest: dict
    sets: FeatureSets

    def __str__(self) -> str:
        return str(self.path)


def open_features(folder: str | Path | FeatureFolder) -> FeatureFolder:
    """The FeatureFolder of a path (an opened one is returned as it is): the manifest read once, no set yet."""
    if isinstance(folder, FeatureFolder):
        return folder
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise UserError(f"{folder} is not a feature folder (no manifest.json); write one with `imagen-transfer features`")
    manifest = json.loads((folder / "manifest.json").read_text())
    return FeatureFolder(folder, manifest, FeatureSets(folder, manifest))


def load_features(folder: str | Path | FeatureFolder) -> tuple[dict, FeatureSets]:
    """(manifest, {set name: {'<split>/<view>': tensor}}) of a feature folder, the sets read on first use."""
    opened = open_features(folder)
    return opened.manifest, opened.sets
