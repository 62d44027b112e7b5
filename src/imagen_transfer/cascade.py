"""A cascade: a text encoder spec and a list of stages (a base stage, then super-resolution stages).

On disk a cascade is one folder, laid out like DeepFloyd IF's diffusers folders so each stage loads with
diffusers alone:

    cascade.json                    text encoder spec, stage list (resolution, kind, augmentation levels), sampling defaults
    <stage>/unet/config.json        UNet2DConditionModel.save_pretrained
    <stage>/unet/diffusion_pytorch_model.safetensors
    <stage>/scheduler/scheduler_config.json   the training noise schedule (DDPMScheduler)

Loading reads JSON and safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .outputs import check_output_dir, disk_full_as_oserror, fresh_sibling, nbytes, replace_dir, require_space
from .text import TextEncoderSpec, text_dim
from .unet import build_unet, count_parameters

FORMAT_VERSION = 1
WEIGHTS = "diffusion_pytorch_model.safetensors"
SHIPPED_DIR = Path(__file__).parent / "models"

# preset -> (text encoder, [(stage name, kind, resolution, U-Net preset)])
CASCADE_PRESETS: dict[str, tuple[str, list[tuple[str, str, int, str]]]] = {
    "tiny": ("tiny", [("base", "base", 16, "tiny"), ("sr", "sr", 32, "tiny")]),
    "small": ("minilm", [("base", "base", 16, "small"), ("sr", "sr", 32, "small-sr")]),
    "base64": ("minilm", [("base", "base", 64, "base64"), ("sr", "sr", 256, "small")]),
}

DEFAULT_SAMPLING = dict(sampler="dpmpp", steps=25, guidance=3.0, thresholding="dynamic", percentile=0.95, max_value=1.5)


@dataclass
class Stage:
    """One U-Net of the cascade with its training noise schedule. SR stages also know their input resolution."""

    name: str
    kind: str  # base | sr
    resolution: int
    unet: Any  # diffusers.UNet2DConditionModel
    scheduler: Any  # diffusers.DDPMScheduler: the training schedule
    lowres: int | None = None
    aug_level_sample: int = 100  # noise-augmentation level of the low-res input at sampling (Imagen sec. 2.5)

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels // (2 if self.kind == "sr" else 1)

    def meta(self) -> dict:
        return dict(name=self.name, kind=self.kind, resolution=self.resolution, lowres=self.lowres,
                    aug_level_sample=self.aug_level_sample, parameters=count_parameters(self.unet))


@dataclass
class Cascade:
    text_encoder: TextEncoderSpec
    stages: list[Stage]
    sampling: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    info: dict = field(default_factory=dict)  # free-form provenance (source, training run)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"no stage '{name}' in this cascade; stages: {', '.join(s.name for s in self.stages)}")

    @property
    def resolution(self) -> int:
        return self.stages[-1].resolution


def training_scheduler(prediction_type: str = "epsilon"):
    """Imagen's cosine schedule (Nichol & Dhariwal 2021) over 1000 steps, as diffusers' DDPMScheduler."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         clip_sample=False, variance_type="fixed_small")


def check_text_length(max_length: int) -> None:
    """diffusers' SimpleCrossAttn pads the text mask only when its length differs from the number of spatial
    tokens (Attention.prepare_attention_mask); a square length such as 16 or 64 can collide with it and crash."""
    if math.isqrt(max_length) ** 2 == max_length:
        raise UserError(f"max_text_length {max_length} is a perfect square, which diffusers' SimpleCrossAttn "
                        "mishandles; use e.g. 20, 32 or 77")


def init_cascade(preset: str, *, text_encoder: str | None = None, max_text_length: int = 20,
                 prediction_type: str = "epsilon", seed: int = 0) -> Cascade:
    """A randomly initialised cascade from a named preset (the same seed gives the same weights)."""
    if preset not in CASCADE_PRESETS:
        raise UserError(f"unknown preset '{preset}'; known: {', '.join(CASCADE_PRESETS)}")
    check_text_length(max_text_length)
    default_encoder, layout = CASCADE_PRESETS[preset]
    spec = TextEncoderSpec.parse(text_encoder or default_encoder, max_text_length)
    dim = text_dim(spec)
    torch.manual_seed(seed)
    stages, previous = [], None
    for name, kind, resolution, unet_preset in layout:
        unet = build_unet(unet_preset, kind=kind, resolution=resolution, text_dim=dim)
        stages.append(Stage(name, kind, resolution, unet, training_scheduler(prediction_type),
                            lowres=previous if kind == "sr" else None))
        previous = resolution
    return Cascade(spec, stages, info={"preset": preset, "seed": seed})


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating-point tensors in `dtype` (fp16 for shipping)."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def cascade_files(folder: Path) -> set[str] | None:
    """The files a cascade folder written by `save_cascade` consists of (relative posix paths), or None when the
    folder is not one (no readable cascade.json of ours)."""
    try:
        meta = json.loads((Path(folder) / "cascade.json").read_text())
        names = [entry["name"] for entry in meta["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("format") != "imagen-transfer-cascade":
        return None
    files = {"cascade.json"}
    for name in names:
        files |= {f"{name}/unet/config.json", f"{name}/scheduler/scheduler_config.json"}
        files |= {f"{name}/unet/{w}" for w in weight_files(Path(folder) / name / "unet")}
    return files


def weight_files(unet_dir: Path) -> list[str]:
    """The safetensors files of a saved U-Net: one file, or an index and the shards it names (diffusers shards a
    stage larger than `max_shard_size`, 10 GB by default: IF-I-XL in fp32 is 17 GB)."""
    index = unet_dir / (WEIGHTS + ".index.json")
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [index.name]
        return [index.name, *shards]
    return [WEIGHTS]


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' loading chatter off (progress bars, warnings) for one block: our own checks speak instead."""
    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()


def check_weights_cover(unet: torch.nn.Module, unet_dir: Path) -> None:
    """Refuse a U-Net whose saved weights leave some of its tensors out: `from_pretrained` would start those from
    random values with only a generic warning (a sharded index missing an entry, a shard missing a tensor)."""
    index = unet_dir / (WEIGHTS + ".index.json")
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err!r}); re-save or copy the cascade again") from None
        stored, files = set(weight_map), sorted(set(weight_map.values()))
    elif (unet_dir / WEIGHTS).is_file():
        files, stored = [WEIGHTS], None
    else:
        return  # not safetensors (an IF folder's .bin): from_pretrained checked what it could
    held = set()
    for name in files:
        with safe_open(unet_dir / name, "pt") as f:
            held |= set(f.keys())
    missing = sorted(set(unet.state_dict()) - (held if stored is None else stored & held))
    if missing:
        raise UserError(f"{unet_dir}: {len(missing)} of the U-Net's weights are not in its safetensors files "
                        f"(first: {missing[0]}); they would start from random values: re-save or copy the model again")


def is_cascade_folder(folder: Path) -> bool:
    """True when `folder` holds a cascade this tool wrote and nothing else (so `--overwrite` loses no user file)."""
    expected = cascade_files(folder)
    if expected is None:
        return False
    present = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}
    return present <= expected


def check_cascade_out(out: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an --out that would cost the user files (see outputs.check_output_dir)."""
    check_output_dir(Path(out), what="cascade", overwrite=overwrite, is_ours=is_cascade_folder)


def save_cascade(cascade: Cascade, out: str | Path, dtype: torch.dtype | None = None, *,
                 overwrite: bool = False, max_shard_size: str | int = "10GB") -> Path:
    """Write a cascade folder (see module doc). `dtype=torch.float16` halves the size for shipping; a stage whose
    weights exceed `max_shard_size` is written as safetensors shards with an index (diffusers' layout, which
    `from_pretrained` reads back).

    `out` must be absent, empty, or (with `overwrite`) a cascade folder written by this tool and holding nothing
    else; the new folder is written beside it and renamed into place."""
    out = Path(out)
    check_cascade_out(out, overwrite)
    needed = sum(nbytes(s.unet.state_dict()) for s in cascade.stages)
    require_space(out.parent, needed, f"cascade {out}")  # the weights are written in their own dtype first
    tmp = fresh_sibling(out)
    try:
        with disk_full_as_oserror(tmp, needed):
            _write_stages(cascade, tmp, dtype, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written folder
        raise
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder (the user's mkdir): nothing in it to keep
    replace_dir(tmp, out)
    return out


def _write_stages(cascade: Cascade, tmp: Path, dtype: torch.dtype | None, max_shard_size: str | int) -> None:
    """The files of a cascade folder (see save_cascade), into `tmp`."""
    for stage in cascade.stages:
        unet_dir = tmp / stage.name / "unet"
        stage.unet.save_pretrained(unet_dir, safe_serialization=True, max_shard_size=max_shard_size)
        if dtype is not None:
            for name in weight_files(unet_dir):
                if name.endswith(".safetensors"):
                    _cast_safetensors(unet_dir / name, dtype)
        stage.scheduler.save_pretrained(tmp / stage.name / "scheduler")
    meta = dict(format="imagen-transfer-cascade", format_version=FORMAT_VERSION,
                text_encoder=cascade.text_encoder.to_dict(), stages=[s.meta() for s in cascade.stages],
                sampling=cascade.sampling, info=cascade.info)
    (tmp / "cascade.json").write_text(json.dumps(meta, indent=2))


def resolve_model(name_or_path: str | Path) -> Path:
    """A cascade folder, or a short name of a shipped cascade (e.g. `cifar10`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = SHIPPED_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    known = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()) if SHIPPED_DIR.is_dir() else []
    raise UserError(f"model folder not found: {name_or_path} (shipped cascades: {', '.join(known) or 'none'})")


def read_cascade_json(folder: Path) -> dict:
    meta_file = folder / "cascade.json"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a cascade folder written by `imagen-transfer init`")
    if not meta_file.is_file():
        raise UserError(f"{folder} is not a cascade: it has no cascade.json (create one with `imagen-transfer init`)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_file} is not valid JSON: {err}") from None
    if meta.get("format") != "imagen-transfer-cascade":
        raise UserError(f"{meta_file} is not an imagen-transfer cascade description")
    return meta


def load_cascade(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Cascade:
    """Read a cascade folder (JSON + safetensors only) into fp32 (default) modules in eval mode. (Commands open
    models through `interop.open_model`, which also takes DeepFloyd IF folders.)"""
    folder = resolve_model(name_or_path)
    if (folder / "model_index.json").is_file() and not (folder / "cascade.json").is_file():
        raise UserError(f"{folder} is a diffusers pipeline folder, not a cascade: open it with "
                        "interop.open_model (every command does) or convert it with `imagen-transfer import-if`")
    meta = read_cascade_json(folder)
    meta_file = folder / "cascade.json"
    entries = meta.get("stages")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and {"name", "kind", "resolution"} <= set(e) for e in entries):
        raise UserError(f"{meta_file}: 'stages' must be a non-empty list of {{name, kind, resolution}} entries; the "
                        "file is damaged: re-save the cascade")
    try:
        spec = TextEncoderSpec(**meta["text_encoder"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{meta_file}: no valid 'text_encoder' entry ({err}); the file is damaged: re-save the "
                        "cascade") from None
    stages = []
    for entry in entries:
        unet_dir = folder / entry["name"] / "unet"
        for needed in ("config.json", "diffusion_pytorch_model.safetensors"):
            if not (unet_dir / needed).is_file() and not (unet_dir / (needed + ".index.json")).is_file():
                raise UserError(f"{folder} is incomplete: missing {unet_dir / needed}")
        try:
            with quiet_diffusers():  # shard progress bars and "newly initialized": check_weights_cover says it
                unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, torch_dtype=dtype)
            scheduler = DDPMScheduler.from_pretrained(folder / entry["name"] / "scheduler")
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt file: one line naming it, not a traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"{folder / entry['name']}: cannot load the stage ({type(err).__name__}: {first[:200]}); a "
                            "weight or config file is truncated or corrupt: re-save or copy the cascade again") from None
        check_weights_cover(unet, unet_dir)
        stages.append(Stage(entry["name"], entry["kind"], entry["resolution"], unet.to(device).eval(), scheduler,
                            lowres=entry.get("lowres"), aug_level_sample=entry.get("aug_level_sample", 100)))
    return Cascade(spec, stages, sampling={**DEFAULT_SAMPLING, **meta.get("sampling", {})}, info=meta.get("info", {}))


def describe(cascade: Cascade) -> str:
    """A short human-readable summary (for `imagen-transfer info`)."""
    spec = cascade.text_encoder
    lines = [f"text encoder: {spec.kind}{':' + spec.name_or_path if spec.name_or_path else ''} "
             f"(max {spec.max_length} tokens)"]
    for s in cascade.stages:
        c = s.unet.config
        src = f"{s.lowres}->{s.resolution}px, aug level {s.aug_level_sample}" if s.kind == "sr" else f"{s.resolution}px"
        lines.append(f"stage {s.name} ({s.kind}, {src}): {count_parameters(s.unet) / 1e6:.2f}M parameters, "
                     f"channels {list(c.block_out_channels)}, prediction {s.scheduler.config.prediction_type}")
    lines.append("sampling defaults: " + ", ".join(f"{k}={v}" for k, v in cascade.sampling.items()))
    for k, v in cascade.info.items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def set_sampling_aug_level(cascade: Cascade, level: int | None) -> None:
    """Give every SR stage `level` as its sampling noise-augmentation level (sample.aug_level; None: unchanged)."""
    if level is None:
        return
    for stage in [s for s in cascade.stages if s.kind == "sr"]:
        steps = len(stage.scheduler.alphas_cumprod)
        if level >= steps:
            raise UserError(f"sample.aug_level={level} is outside stage {stage.name}'s {steps} noise levels; use 0 to "
                            f"{steps - 1}")
        stage.aug_level_sample = level
