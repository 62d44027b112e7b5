import pytest
import torch

from imagen_transfer.cascade import check_text_length
from imagen_transfer.diffusion import denoise
from imagen_transfer.errors import UserError
from imagen_transfer.text import TinyTextEncoder
from imagen_transfer.unet import build_unet


@pytest.mark.parametrize("kind,res", [("base", 16), ("sr", 32)])
def test_stage_shapes(kind, res):
    unet = build_unet("tiny", kind=kind, resolution=res, text_dim=32)
    text = TinyTextEncoder()(["a cat", "a dog"])
    x = torch.randn(2, 3, res, res)
    lowres = torch.randn(2, 3, res, res) if kind == "sr" else None
    level = torch.tensor([0, 250]) if kind == "sr" else None
    out = denoise(unet, x, torch.tensor([10, 900]), text, lowres, level)
    assert out.shape == x.shape
    assert unet.config.in_channels == (6 if kind == "sr" else 3)
    assert unet.config.addition_embed_type == "text" and unet.config.resnet_time_scale_shift == "scale_shift"


def test_sr_stage_uses_the_augmentation_level():
    torch.manual_seed(0)
    unet = build_unet("tiny", kind="sr", resolution=32, text_dim=32)
    text = TinyTextEncoder()(["a cat"])
    x, low = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    a = denoise(unet, x, torch.tensor([5]), text, low, torch.tensor([0]))
    b = denoise(unet, x, torch.tensor([5]), text, low, torch.tensor([500]))
    assert not torch.allclose(a, b)


def test_text_changes_the_prediction():
    torch.manual_seed(0)
    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32)
    enc = TinyTextEncoder()
    x = torch.randn(1, 3, 16, 16)
    a = denoise(unet, x, torch.tensor([5]), enc(["a cat"]))
    b = denoise(unet, x, torch.tensor([5]), enc(["a truck on a road"]))
    assert not torch.allclose(a, b)


def test_bad_presets_and_lengths():
    with pytest.raises(UserError, match="unknown U-Net preset"):
        build_unet("huge")
    with pytest.raises(UserError, match="not divisible"):
        build_unet("small", resolution=18)
    with pytest.raises(UserError, match="perfect square"):
        check_text_length(16)
