"""What a transfer run trains: freezing, BitFit, DiffFit, LoRA, full fine-tuning, and per-group learning rates.

`prepare_transfer(unet, config)` sets `requires_grad` (and adds DiffFit scales or LoRA layers) before training;
`finish_transfer(unet)` folds whatever was added back into plain weights afterwards, so a fine-tuned stage is an
ordinary diffusers U-Net again. The training loop hands only trainable parameters to the optimizer, so frozen ones
get no gradient and no optimizer state.

- `full`: every U-Net parameter trains.
- `freeze`: parameters matching `freeze_patterns` (globs over names) stay fixed, and with `freeze_first_k = k` so do
  the stem (conv_in, the time / text embeddings, the text projection) and the first k down blocks; with neither
  given, the stem and the first down block (`resolve_transfer_defaults`). Nothing trainable
  then feeds those modules, so autograd runs no backward pass through them.
- `bitfit`: biases and normalisation parameters only (Ben Zaken et al. 2022).
- `difffit`: BitFit plus learnable per-channel scales, initialised at 1, on the residual and attention branches of the
  chosen blocks (Xie et al. 2023, "DiffFit"); `difffit_blocks` = all | early (down blocks and mid) | late (up blocks
  and mid). The scales multiply a conv / linear output, so `finish_transfer` folds them exactly into its weights.
- `lora`: low-rank adapters through peft (Hu et al. 2022) on the attention projections and the ResNet convolutions
  (`lora_targets`; attention alone could not make a colour -> X-ray shift); merged into the weights at the end.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from .config import TRANSFER_METHODS
from .errors import UserError

METHODS = TRANSFER_METHODS  # declared with the config field (config.TransferConfig.method)
# Learning rates when `train.lr` is not given: pretraining, small for full fine-tuning, ~10x that for the
# parameter-efficient methods (DiffFit, Xie et al. 2023, sec. 4: 10x the full fine-tuning rate).
DEFAULT_LR = {"none": 2e-4, "full": 1e-4, "freeze": 1e-4, "bitfit": 1e-3, "difffit": 1e-3, "lora": 1e-3}
STEM = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "encoder_hid_proj.")
DIFFFIT_ATTR = "difffit_scale"
DIFFFIT_BLOCKS = {"all": ("down_blocks.", "mid_block.", "up_blocks."), "early": ("down_blocks.", "mid_block."),
                  "late": ("up_blocks.", "mid_block.")}  # difffit_blocks -> where the scales go


@dataclass
class TransferSummary:
    method: str
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"{self.method}: {self.trainable:,} of {self.total:,} parameters trainable ({self.percent:.3f}%)"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


DEFAULT_FREEZE_FIRST_K = 1  # `freeze` alone: the stem and the first down block (the text encoder is always frozen)


def resolve_transfer_defaults(config) -> str | None:
    """`method: freeze` with nothing named to freeze gets the default this kind of tool has: the stem and the first
    down block (`freeze_first_k: 1`), written into the config so the run folder records it. Returns a note, or
    None when nothing was filled in."""
    if config.method == "freeze" and not config.freeze_first_k and not config.freeze_patterns:
        config.freeze_first_k = DEFAULT_FREEZE_FIRST_K
        return (f"transfer.method=freeze with nothing named: freezing the stem and the first "
                f"{DEFAULT_FREEZE_FIRST_K} down block(s) (transfer.freeze_first_k={DEFAULT_FREEZE_FIRST_K})")
    return None


def check_transfer(unet, config) -> None:
    """Refuse a transfer config that would silently do something else than asked: `freeze` with nothing to freeze
    (that is full fine-tuning), a `freeze_first_k` beyond the U-Net's down blocks, and freeze / train patterns or LoRA
    targets that name nothing (a typo would be a no-op). Cheap: `train` calls it before it creates a run folder."""
    if config.method not in METHODS:
        raise UserError(f"unknown transfer method '{config.method}'; use one of {', '.join(METHODS[1:])}")
    if config.method == "difffit" and config.difffit_blocks not in DIFFFIT_BLOCKS:
        raise UserError(f"transfer.difffit_blocks must be all, early or late (got {config.difffit_blocks})")
    if config.method == "freeze" and not config.freeze_first_k and not config.freeze_patterns:
        raise UserError("transfer method 'freeze' freezes nothing: set transfer.freeze_first_k (the stem and the first "
                        "k down blocks: --set transfer.freeze_first_k=1) or transfer.freeze_patterns (globs over "
                        "parameter names, e.g. 'down_blocks.0.*')")
    blocks = len(unet.down_blocks)
    if config.method == "freeze" and not 0 <= config.freeze_first_k <= blocks:
        raise UserError(f"transfer.freeze_first_k is {config.freeze_first_k} but this U-Net has {blocks} down blocks; "
                        f"use 0-{blocks}")
    names = [n for n, _ in unet.named_parameters()]
    patterns = [*(config.freeze_patterns if config.method == "freeze" else []), *config.train_patterns]
    for pattern in patterns:
        if not any(_matches(n, [pattern]) for n in names):
            raise UserError(f"transfer pattern '{pattern}' matches no parameter of the U-Net; names look like "
                            f"'{names[len(names) // 2]}' (globs: '*' matches dots too)")
    if config.method == "lora":
        modules = [n for n, _ in unet.named_modules()]
        for target in config.lora_targets:  # peft's rule: the module's name is the target or ends with ".target"
            if not any(n == target or n.endswith("." + target) for n in modules):
                raise UserError(f"transfer.lora_targets: '{target}' names no module of the U-Net (e.g. to_q, to_k, "
                                "to_v, to_out.0, add_k_proj, add_v_proj, conv1, conv2)")


def _norm_parameter_names(unet) -> set[str]:
    names = set()
    for module_name, module in unet.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def _scale_output(module, inputs, output):
    scale = getattr(module, DIFFFIT_ATTR)
    return output * (scale.view(1, -1, 1, 1) if output.dim() == 4 else scale)


def add_difffit_scales(unet, blocks: str = "all") -> int:
    """Per-channel scales (init 1) on residual branches (ResNet conv2) and attention branches (to_out.0)."""
    if blocks not in DIFFFIT_BLOCKS:
        raise UserError(f"transfer.difffit_blocks must be all, early or late (got {blocks})")
    added = 0
    for name, module in unet.named_modules():
        if not name.startswith(DIFFFIT_BLOCKS[blocks]):
            continue
        if name.endswith(".conv2") and isinstance(module, nn.Conv2d) or name.endswith(".to_out.0") and isinstance(module, nn.Linear):
            channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            module.register_parameter(DIFFFIT_ATTR, nn.Parameter(torch.ones(channels, device=module.weight.device)))
            module._difffit_hook = module.register_forward_hook(_scale_output)
            added += 1
    return added


def fold_difffit_scales(unet) -> int:
    """Multiply each scale into its layer's weight and bias (exact), then remove the scale and its hook."""
    folded = 0
    for module in unet.modules():
        scale = getattr(module, DIFFFIT_ATTR, None)
        if scale is None:
            continue
        with torch.no_grad():
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            module.weight.mul_(scale.view(shape))
            if module.bias is not None:
                module.bias.mul_(scale)
        module._difffit_hook.remove()
        del module._difffit_hook
        del module._parameters[DIFFFIT_ATTR]
        folded += 1
    return folded


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def guard_group_norms(unet) -> None:
    """Give every GroupNorm a contiguous input. With torch 2.13 on CPU, GroupNorm's channels-last backward kernel
    segfaulted on the transposed (B, C, L) text states diffusers normalises (`norm_cross`) once the text projection
    before it was frozen; a contiguous copy takes the ordinary kernel (a no-op for inputs already contiguous)."""
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm) and not hasattr(module, "_contiguous_hook"):
            module._contiguous_hook = module.register_forward_pre_hook(_contiguous_input)


def prepare_transfer(unet, config) -> TransferSummary:
    """Set which parameters train for `config.method` (a TransferConfig). Returns counts for the log."""
    method = config.method
    check_transfer(unet, config)
    guard_group_norms(unet)
    if method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
    elif method == "difffit":
        add_difffit_scales(unet, config.difffit_blocks)
    norms = _norm_parameter_names(unet)
    for name, param in unet.named_parameters():
        if method in ("none", "full"):
            train = True
        elif method == "freeze":
            early = config.freeze_first_k and (name.startswith(STEM) or any(
                name.startswith(f"down_blocks.{i}.") for i in range(config.freeze_first_k)))
            train = not early and not _matches(name, config.freeze_patterns)
        elif method in ("bitfit", "difffit"):
            train = name.endswith(".bias") or name in norms or name.endswith(DIFFFIT_ATTR)
        else:  # lora: peft marked its own parameters trainable
            train = param.requires_grad
        if config.train_patterns and _matches(name, config.train_patterns):
            train = True
        param.requires_grad_(train)
    total = sum(p.numel() for n, p in unet.named_parameters() if DIFFFIT_ATTR not in n and "lora_" not in n)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if trainable == 0:
        raise UserError(f"transfer method '{method}' leaves no parameter trainable; check the freeze patterns")
    return TransferSummary(method, trainable, total)


def finish_transfer(unet) -> None:
    """Fold DiffFit scales and merge LoRA adapters into the weights; make every parameter trainable again."""
    fold_difffit_scales(unet)
    for module in unet.modules():
        if hasattr(module, "_contiguous_hook"):
            module._contiguous_hook.remove()
            del module._contiguous_hook
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    unet.requires_grad_(True)


def parameter_groups(named_params, base_lr: float, multipliers: dict[str, float]) -> list[dict]:
    """AdamW groups: each trainable parameter gets base_lr x the multiplier of its first matching glob (else 1)."""
    groups: dict[float, list] = {}
    for name, param in named_params:
        factor = next((m for pattern, m in multipliers.items() if fnmatch.fnmatchcase(name, pattern)), 1.0)
        groups.setdefault(float(factor), []).append(param)
    return [{"params": ps, "lr": base_lr * f, "lr_multiplier": f} for f, ps in sorted(groups.items())]
