"""Imagen-style U-Nets as diffusers `UNet2DConditionModel`s in DeepFloyd IF's configuration.

The configuration follows Imagen (Saharia et al. 2022) as IF realises it in diffusers: text token states are
projected (`encoder_hid_dim` -> `cross_attention_dim`) and attended to in SimpleCrossAttn blocks (self-attention
with the text keys/values concatenated), an attention-pooled text vector is added to the timestep embedding
(`addition_embed_type="text"`), and the timestep conditions the ResNet blocks through scale-shift norm. A
super-resolution stage takes the noisy image concatenated with the upsampled low-res image (`in_channels=2C`) and
its noise-augmentation level as a second timestep embedding (`class_embed_type="timestep"`).

Because these are plain diffusers models, any stage saved by this toolkit loads with diffusers alone, and a
diffusers pixel-space U-Net (IF stage I/II) can be used as a source.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import UserError

# Width, depth and attention per preset. `tiny` mirrors diffusers' own IF test configuration (CPU tests);
# `small` (6.5M) and `small-sr` (4M) train on a CPU at 16-32 px; `base64` is a GPU-scale 64 px stage.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, num_heads=2),
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=32, num_heads=4),
    "small-sr": dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_head_dim=32, num_heads=4),
    "base64": dict(block_out_channels=(128, 256, 384, 512), layers_per_block=3, attention_head_dim=64, num_heads=8),
}


# DeepFloyd IF's stage U-Nets as published in diffusers format (the `unet/config.json` of DeepFloyd/IF-I-XL-v1.0
# and IF-II-L-v1.0, as fine-tunes of them on the Hugging Face hub repeat it), randomly initialised, so memory and
# speed can be measured without the weights. Built on the meta device they count 4,304,695,110 and 1,187,608,070
# parameters: IF's published 4.3B and 1.2B. (The IF-I-M / L and IF-II-M configs were not available offline.)
_IF_COMMON: dict[str, Any] = dict(
    act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=64, attention_head_dim=64,
    cross_attention_norm="group_norm", encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift", out_channels=6,
)
IF_UNETS: dict[str, dict[str, Any]] = {
    "if-i-xl": dict(
        _IF_COMMON, sample_size=64, in_channels=3, block_out_channels=(704, 1408, 2112, 2816), layers_per_block=3,
        cross_attention_dim=2816, down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), mid_block_scale_factor=1,
        resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    ),
    "if-ii-l": dict(
        _IF_COMMON, sample_size=256, in_channels=6, block_out_channels=(160, 320, 640, 960, 1280),
        layers_per_block=(2, 2, 3, 5, 5), cross_attention_dim=1280, class_embed_type="timestep",
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3,
        mid_block_scale_factor=1.4142271248762552, resnet_out_scale_factor=1.4142271248762552,
        resnet_skip_time_act=True,
    ),
}


def if_unet_config(name: str, width: int | None = None) -> dict[str, Any]:
    """The diffusers config of an IF stage; `width` scales its block widths to a first width of `width` (same
    layout, a smaller model: the memory benchmark's second and third sizes)."""
    if name not in IF_UNETS:
        raise UserError(f"unknown IF stage '{name}'; known: {', '.join(IF_UNETS)}")
    config = dict(IF_UNETS[name])
    if width is not None:
        first = config["block_out_channels"][0]
        if width % 64 or any(w * width % first for w in config["block_out_channels"]):
            raise UserError(f"width {width} must be a multiple of 64 that scales {name}'s widths to whole numbers")
        widths = tuple(w * width // first for w in config["block_out_channels"])
        config.update(block_out_channels=widths, cross_attention_dim=widths[-1])
    return config


def unet_parameters(config: dict[str, Any]) -> int:
    """Parameters of a U-Net config, counted on the meta device (nothing allocated: a 4.3B stage in milliseconds)."""
    with torch.device("meta"):
        return count_parameters(UNet2DConditionModel(**config))


def build_unet(
    preset: str,
    *,
    kind: str = "base",
    resolution: int = 32,
    text_dim: int = 384,
    channels: int = 3,
    **overrides: Any,
):
    """A randomly initialised IF-style U-Net for a `base` or `sr` stage; `overrides` go to diffusers verbatim."""
    if preset not in UNET_PRESETS:
        raise UserError(f"unknown U-Net preset '{preset}'; known: {', '.join(UNET_PRESETS)}")
    if kind not in ("base", "sr"):
        raise UserError(f"unknown stage kind '{kind}'; use base or sr")
    p = UNET_PRESETS[preset]
    widths = tuple(p["block_out_channels"])
    levels = len(widths)
    if resolution % 2 ** (levels - 1):
        raise UserError(f"resolution {resolution} is not divisible by {2 ** (levels - 1)} (preset '{preset}')")
    # Highest resolution without attention (as in Imagen's and IF's stages), attention at the lower ones.
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1)
    up = ["SimpleCrossAttnUpBlock2D"] * (levels - 1) + ["ResnetUpsampleBlock2D"]
    config: dict[str, Any] = dict(
        sample_size=resolution,
        in_channels=channels * (2 if kind == "sr" else 1),
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=p["layers_per_block"],
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=widths[-1] if preset != "tiny" else widths[0],
        encoder_hid_dim=text_dim,
        attention_head_dim=p["attention_head_dim"],
        addition_embed_type="text",
        addition_embed_type_num_heads=p["num_heads"],
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    if kind == "sr":
        config.update(class_embed_type="timestep", mid_block_scale_factor=1.414)
    config.update(overrides)
    return UNet2DConditionModel(**config)


def precision_choice(requested: str, cuda: bool) -> tuple[str, str]:
    """(precision, reason): `auto` means bf16 where the hardware computes it natively and fp32 elsewhere (bf16
    emulated on an older CPU is slower than fp32). Native: a CUDA GPU with bf16; a CPU with AMX tiles or with
    AVX512-BF16 (an AMD EPYC without AMX trains faster in bf16 too). Measured ratios: docs/performance.md."""
    if requested != "auto":
        return requested, "requested"
    if cuda:
        native = torch.cuda.is_bf16_supported()
        return ("bf16", "auto: CUDA GPU with bf16") if native else ("no", "auto: CUDA GPU without bf16")
    for flag, name in (("_is_amx_tile_supported", "AMX tiles"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        probe = getattr(torch.cpu, flag, lambda: False)  # private probes: absent means "assume not"
        if probe():
            return "bf16", f"auto: CPU with {name} (native bf16)"
    return "no", "auto: CPU without AMX or AVX512-BF16 (bf16 would be emulated, slower than fp32)"


def resolve_precision(requested: str, cuda: bool) -> str:
    """The autocast precision a run uses (see precision_choice)."""
    return precision_choice(requested, cuda)[0]


def training_attention(device_type: str):
    """The attention kernel for training steps. On a CPU, torch's flash-attention backward is slow at these short
    sequences (16-96 tokens): the math kernel (matmul + softmax, differentiated by autograd) trains faster, in bf16
    most of all (docs/performance.md). GPUs keep torch's choice."""

    return sdpa_kernel(SDPBackend.MATH) if device_type == "cpu" else nullcontext()


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
