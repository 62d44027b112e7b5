"""Weight-space merges against their formulas, output-space mixtures against single models, the merge CLI."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def three():
    from imagen_transfer.cascade import init_cascade

    return [init_cascade("tiny", seed=s) for s in (0, 1, 2)]


def _w(cascade, stage="base"):
    return {k: v.clone() for k, v in cascade.stage(stage).unet.state_dict().items()}


def test_average_and_interpolation_follow_the_formula(three):
    from imagen_transfer.fusion import merge_cascades

    a, b, _ = three
    mixed = merge_cascades([a, b], ["a", "b"], weights=[0.3, 0.7])
    wa, wb, wm = _w(a), _w(b), _w(mixed)
    assert all(torch.allclose(wm[k], 0.3 * wa[k] + 0.7 * wb[k], atol=1e-6) for k in wa)
    same = merge_cascades([a, b], ["a", "b"], weights=[1.0, 0.0])
    assert all(torch.equal(_w(same)[k], wa[k]) for k in wa)
    assert mixed.info["method"] == "average" and _w(a)["conv_in.weight"].equal(wa["conv_in.weight"])  # inputs untouched


@pytest.mark.slow
def test_task_vector_methods(three):
    from imagen_transfer.fusion import merge_cascades

    base, a, b = three
    w0, wa, wb = _w(base), _w(a), _w(b)
    ta = merge_cascades([a, b], ["a", "b"], weights=[1.0, 1.0], method="task-arithmetic", base=base, scale=0.5)
    assert all(torch.allclose(_w(ta)[k], w0[k] + 0.5 * ((wa[k] - w0[k]) + (wb[k] - w0[k])), atol=1e-5) for k in w0)
    dare_all = merge_cascades([a, b], ["a", "b"], weights=[1.0, 1.0], method="dare-linear", base=base, scale=0.5,
                              density=1.0)  # nothing dropped: equals task arithmetic
    assert all(torch.allclose(_w(dare_all)[k], _w(ta)[k], atol=1e-5) for k in w0)
    ties = merge_cascades([a, b], ["a", "b"], method="ties", base=base, density=0.2)
    delta = torch.cat([(_w(ties)[k] - w0[k]).flatten() for k in w0 if w0[k].is_floating_point()])
    assert 0.05 < (delta != 0).float().mean() < 0.5  # trimmed to about the top 20% of each task vector
    dare = merge_cascades([a, b], ["a", "b"], method="dare-ties", base=base, density=0.5, seed=3)
    again = merge_cascades([a, b], ["a", "b"], method="dare-ties", base=base, density=0.5, seed=3)
    assert all(torch.equal(_w(dare)[k], _w(again)[k]) for k in w0)  # seeded drops
    from imagen_transfer.errors import UserError

    with pytest.raises(UserError, match="needs --base"):
        merge_cascades([a, b], ["a", "b"], method="ties")


def test_stage_from_and_architecture_mismatch(three):
    from imagen_transfer.cascade import init_cascade
    from imagen_transfer.errors import UserError
    from imagen_transfer.fusion import merge_cascades

    a, b, c = three
    c.stage("sr").aug_level_sample = 0  # e.g. a fine-tune's level, chosen on its val split
    assembled = merge_cascades([a], ["a"], stage_from={"sr": c})
    assert all(torch.equal(_w(assembled, "sr")[k], v) for k, v in _w(c, "sr").items())
    assert assembled.stage("sr").aug_level_sample == 0 != a.stage("sr").aug_level_sample  # the stage came whole
    assert all(torch.equal(_w(assembled)[k], v) for k, v in _w(a).items())
    from imagen_transfer.unet import build_unet

    other = init_cascade("tiny")
    other.stages[0].unet = build_unet("tiny", kind="base", resolution=16, text_dim=48)  # other cross-attention width
    with pytest.raises(UserError, match="stage base: tensor .* in other"):
        merge_cascades([a, other], ["a", "other"])


def test_greedy_soup_keeps_only_what_helps(three):
    from imagen_transfer.fusion import greedy_soup

    target = _w(three[0])["conv_in.weight"]

    def score(cascade):  # distance of one tensor to model 0's: model 0 alone is best, averaging only hurts
        return float((_w(cascade)["conv_in.weight"] - target).norm())

    soup, kept = greedy_soup(three, ["m0", "m1", "m2"], score)
    assert kept == ["m0"] and score(soup) == 0


def test_mixture_sampling(three):
    from imagen_transfer.sampling import mixed_denoiser, sample_cascade

    d1 = lambda x, t: x * 2  # noqa: E731
    d2 = lambda x, t: x + 1  # noqa: E731
    x = torch.randn(2, 3)
    w = 1.5
    assert torch.allclose(mixed_denoiser([d1, d2], [1 - w, w])(x, 0), d1(x, 0) + w * (d2(x, 0) - d1(x, 0)))
    a, b, _ = three
    opts = dict(steps=2, progress=False)
    alone_b = sample_cascade(b, ["a cat"], [0], **opts)
    all_b = sample_cascade(a, ["a cat"], [0], mix=[(b, 1.0)], **opts)  # a gets weight 0
    assert torch.allclose(alone_b, all_b, atol=1e-5)
    self_mix = sample_cascade(a, ["a cat"], [0], mix=[(a, 0.5)], **opts)
    assert torch.allclose(self_mix, sample_cascade(a, ["a cat"], [0], **opts), atol=1e-5)


def test_merge_cli_writes_a_cascade(tiny_cascade_dir, tmp_path):
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.jobs.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--models", str(tiny_cascade_dir), str(tiny_cascade_dir), "--weights", "0.5", "0.5",
                 "--stage-from", f"sr={tiny_cascade_dir}", "--out", str(out)]) == 0
    merged, original = load_cascade(out), load_cascade(tiny_cascade_dir)
    assert all(torch.allclose(_w(merged)[k], v, atol=1e-6) for k, v in _w(original).items())
    assert main(["merge", "--models", str(tiny_cascade_dir), "--weights", "0.4", "--out", str(out)]) == 2
