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


def test_if_stage_presets_have_the_published_parameter_counts(capsys):
    """IF-I-XL and IF-II-L as published (diffusers configs), counted on the meta device: 4.3B and 1.2B."""
    from imagen_transfer.jobs.cli import main
    from imagen_transfer.unet import if_unet_config, unet_parameters

    assert unet_parameters(if_unet_config("if-i-xl")) == 4_304_695_110
    assert unet_parameters(if_unet_config("if-ii-l")) == 1_187_608_070
    scaled = if_unet_config("if-i-xl", 192)  # an IF-I-M-sized model of the same layout
    assert scaled["block_out_channels"] == (192, 384, 576, 768) and unet_parameters(scaled) == 371_605_830
    assert main(["info", "--preset", "if-i-xl"]) == 0 and "4,304,695,110 parameters" in capsys.readouterr().out
    assert main(["info", "--preset", "if-i-xl", "--width", "100"]) == 2
    assert "must be a multiple of 64" in capsys.readouterr().err


@pytest.mark.slow
def test_a_scaled_if_stage_runs_a_training_step():
    """The IF-I-XL layout at width 64 (88M parameters, most of them in the 4096-d text projections): a forward and backward pass at 64 px with 4096-d text."""
    from diffusers import UNet2DConditionModel

    from imagen_transfer.unet import if_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**if_unet_config("if-i-xl", 64))
    out = unet(torch.randn(1, 3, 64, 64), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 8, 4096)).sample
    assert out.shape == (1, 6, 64, 64)
    out[:, :3].square().mean().backward()
    assert unet.conv_in.weight.grad is not None


def _variant(unet, **overrides):
    """The same U-Net class and sizes with config overrides (fresh weights, seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({**unet.config, **overrides}).eval()


@torch.no_grad()
def test_a_keep_all_text_mask_equals_no_mask():
    """diffusers' test_model_xattn_mask, first half: a mask of ones is the same as no mask at all."""
    torch.manual_seed(0)
    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32).eval()
    text = TinyTextEncoder()(["a cat on a mat"])
    n = int(text.mask.sum())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    kept = denoise(unet, x, t, type(text)(text.states[:, :n], torch.ones(1, n, dtype=torch.long), text.pooled))
    none = unet(x, t, encoder_hidden_states=text.states[:, :n], encoder_attention_mask=None, return_dict=False)[0]
    assert torch.equal(kept, none)


@torch.no_grad()
def test_masking_the_last_token_equals_truncating_it_where_attention_alone_sees_the_text():
    """diffusers' test_model_xattn_mask, second half, through `denoise`: the mask reaches every cross-attention.
    It holds where attention is the only reader of the text states; IF's layout (ours) also reads them through
    the group norm over text tokens (cross_attention_norm) and the pooled text embedding (addition_embed_type),
    which see every position, masked or not, as in DeepFloyd IF: there a cascade's max_text_length (recorded in
    cascade.json) is part of its conditioning, which the second assertion pins down."""
    unet = _variant(build_unet("tiny", kind="base", resolution=16, text_dim=32), cross_attention_norm=None,
                    addition_embed_type=None)
    text = TinyTextEncoder()(["a cat on a mat"])
    n = int(text.mask.sum())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    mask = text.mask.clone()
    mask[0, n - 1] = 0
    masked = denoise(unet, x, t, type(text)(text.states, mask, text.pooled))
    truncated = denoise(unet, x, t, type(text)(text.states[:, : n - 1], text.mask[:, : n - 1], text.pooled))
    # the masked key's softmax weight is exp(-10000) = 0 in fp32; what remains is summation order: outputs are O(1)
    assert torch.allclose(masked, truncated, atol=1e-5)
    assert not torch.allclose(masked, denoise(unet, x, t, text), atol=1e-3)  # and the token did matter
    ours = build_unet("tiny", kind="base", resolution=16, text_dim=32).eval()
    padded = denoise(ours, x, t, text)
    assert not torch.allclose(padded, denoise(ours, x, t, type(text)(text.states[:, :n], text.mask[:, :n],
                                                                     text.pooled)), atol=1e-3)
