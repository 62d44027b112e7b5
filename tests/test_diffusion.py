import pytest
import torch

from imagen_transfer.cascade import training_scheduler
from imagen_transfer.diffusion import add_noise, draw, training_loss
from imagen_transfer.text import TinyTextEncoder
from imagen_transfer.unet import build_unet

ALPHAS = training_scheduler().alphas_cumprod


def _batch(n=4):
    torch.manual_seed(0)
    x0 = torch.rand(n, 3, 16, 16) * 2 - 1
    enc = TinyTextEncoder()
    return x0, enc([f"image {i}" for i in range(n)]), enc([""])


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32)
    x0, text, null = _batch()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    fixed = torch.Generator().manual_seed(7)
    draws = draw(4, (3, 16, 16), 1000, generator=fixed)

    def val():
        with torch.no_grad():
            return training_loss(unet, ALPHAS, x0, text, draws=draws).mean().item()

    before = val()
    for _ in range(60):
        loss = training_loss(unet, ALPHAS, x0, text, null_text=null, cond_drop_prob=0.1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val() < 0.5 * before


def test_fixed_generator_gives_a_fixed_loss_and_per_example_shape():
    torch.manual_seed(0)
    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32)
    x0, text, _ = _batch()
    with torch.no_grad():
        a = training_loss(unet, ALPHAS, x0, text, generator=torch.Generator().manual_seed(1))
        b = training_loss(unet, ALPHAS, x0, text, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4,) and torch.equal(a, b)


class _Oracle(torch.nn.Module):
    """Returns a stored tensor as its prediction, to check targets and weights exactly."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, **kwargs):
        return (self.out,)


def test_targets_and_min_snr_weights_match_the_formulas():
    x0, text, _ = _batch(3)
    draws = draw(3, (3, 16, 16), 1000, generator=torch.Generator().manual_seed(3))
    a = ALPHAS[draws.t]
    snr = a / (1 - a)
    # An eps oracle has zero eps loss; its v loss equals |v - eps|^2 weighted by min(snr, 5) / (snr + 1).
    eps_model = _Oracle(draws.noise)
    assert training_loss(eps_model, ALPHAS, x0, text, draws=draws, min_snr_gamma=None).abs().max() < 1e-10
    v = a.sqrt().view(-1, 1, 1, 1) * draws.noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    v_model = _Oracle(v)
    assert training_loss(v_model, ALPHAS, x0, text, draws=draws, prediction_type="v_prediction").abs().max() < 1e-10
    plain = (v - draws.noise).square().mean((1, 2, 3))
    weighted = training_loss(eps_model, ALPHAS, x0, text, draws=draws, prediction_type="v_prediction", min_snr_gamma=5.0)
    torch.testing.assert_close(weighted, plain * snr.clamp(max=5) / (snr + 1))
    zero = _Oracle(torch.zeros_like(x0))
    eps_weighted = training_loss(zero, ALPHAS, x0, text, draws=draws, min_snr_gamma=5.0)
    torch.testing.assert_close(eps_weighted, draws.noise.square().mean((1, 2, 3)) * snr.clamp(max=5) / snr)


def test_add_noise_is_the_forward_process():
    x0 = torch.ones(2, 3, 4, 4)
    noise = torch.zeros_like(x0)
    t = torch.tensor([0, 999])
    out = add_noise(x0, t, noise, ALPHAS)
    torch.testing.assert_close(out[:, 0, 0, 0], ALPHAS[t].sqrt())


def test_slicing_global_draws_equals_drawing_them():
    d = draw(8, (3, 4, 4), 1000, cond_drop_prob=0.5, aug_level_max=100, generator=torch.Generator().manual_seed(0))
    part = d.slice(2, 5)
    assert torch.equal(part.noise, d.noise[2:5]) and torch.equal(part.aug_level, d.aug_level[2:5])
    assert d.drop.dtype == torch.bool and d.aug_level.max() <= 100


def test_condition_dropout_uses_the_null_caption():
    x0, text, null = _batch(4)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None, **kw):
            seen["states"] = encoder_hidden_states
            return (torch.zeros_like(x),)

    draws = draw(4, (3, 16, 16), 1000, cond_drop_prob=0.0)
    draws.drop = torch.tensor([True, False, True, False])
    training_loss(Spy(), ALPHAS, x0, text, null_text=null, draws=draws)
    assert torch.equal(seen["states"][0], null.states[0]) and torch.equal(seen["states"][1], text.states[1])
