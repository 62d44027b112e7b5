import copy

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_transfer.cascade import load_cascade
from imagen_transfer.checkpoint import read_jsonl
from imagen_transfer.config import TransferConfig
from imagen_transfer.diffusion import denoise
from imagen_transfer.errors import UserError
from imagen_transfer.text import TinyTextEncoder
from imagen_transfer.transfer import finish_transfer, parameter_groups, prepare_transfer
from imagen_transfer.unet import build_unet


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", kind="base", resolution=16, text_dim=32)


def _out(unet):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        return denoise(unet, x, torch.tensor([10, 700]), TinyTextEncoder()(["a cat", "a dog"]))


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "difffit", "lora"])
def test_methods_start_from_the_source_function_and_fold_back_to_plain_weights(unet, method):
    before = _out(unet)
    keys = set(unet.state_dict())
    summary = prepare_transfer(unet, TransferConfig(method=method, freeze_first_k=1))
    assert 0 < summary.trainable <= summary.total
    torch.testing.assert_close(_out(unet), before)  # DiffFit scales start at 1, LoRA's B at 0
    with torch.no_grad():  # pretend training moved the new parameters
        for name, p in unet.named_parameters():
            if "difffit_scale" in name or "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    moved = _out(unet)
    finish_transfer(unet)
    assert set(unet.state_dict()) == keys, "a fine-tuned stage must be a plain diffusers U-Net again"
    torch.testing.assert_close(_out(unet), moved, atol=1e-5, rtol=1e-4)
    if method in ("difffit", "lora"):
        assert not torch.allclose(moved, before)


def test_trainable_fractions_follow_the_method(unet):
    pct = {m: prepare_transfer(copy.deepcopy(unet), TransferConfig(method=m)).percent
           for m in ("full", "bitfit", "difffit", "lora")}
    assert pct["full"] == 100
    assert 0 < pct["bitfit"] < pct["difffit"] < 5
    assert 0 < pct["lora"] < 30
    with pytest.raises(UserError, match="unknown transfer method"):
        prepare_transfer(unet, TransferConfig(method="magic"))
    with pytest.raises(UserError, match="no parameter trainable"):
        prepare_transfer(unet, TransferConfig(method="freeze", freeze_patterns=["*"]))


def test_lora_adapts_attention_and_resnet_convolutions_by_default(unet):
    prepare_transfer(unet, TransferConfig(method="lora"))
    adapted = {n.split(".lora_A")[0] for n, p in unet.named_parameters() if ".lora_A" in n and p.requires_grad}
    assert "down_blocks.0.resnets.0.conv1" in adapted and "up_blocks.0.resnets.0.conv2" in adapted
    assert {"mid_block.attentions.0.to_q", "mid_block.attentions.0.add_k_proj"} <= adapted
    assert not any(n.endswith(("conv_in", "conv_out", "conv_shortcut")) for n in adapted)


def test_a_freeze_that_freezes_nothing_or_a_pattern_or_target_that_names_nothing_is_refused(unet):
    with pytest.raises(UserError, match="freezes nothing"):
        prepare_transfer(copy.deepcopy(unet), TransferConfig(method="freeze"))
    with pytest.raises(UserError, match="has 2 down blocks"):
        prepare_transfer(copy.deepcopy(unet), TransferConfig(method="freeze", freeze_first_k=3))
    with pytest.raises(UserError, match="'down_block.0.*' matches no parameter"):
        prepare_transfer(copy.deepcopy(unet), TransferConfig(method="freeze", freeze_patterns=["down_block.0.*"]))
    with pytest.raises(UserError, match="'*.nrom1.*' matches no parameter"):
        prepare_transfer(copy.deepcopy(unet), TransferConfig(method="bitfit", train_patterns=["*.nrom1.*"]))
    with pytest.raises(UserError, match="'to_qq' names no module"):
        prepare_transfer(copy.deepcopy(unet), TransferConfig(method="lora", lora_targets=["to_q", "to_qq"]))
    summary = prepare_transfer(unet, TransferConfig(method="freeze", freeze_patterns=["down_blocks.0.*"]))
    assert summary.trainable < summary.total


def test_bitfit_trains_only_biases_and_norms(unet):
    prepare_transfer(unet, TransferConfig(method="bitfit"))
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") or "norm" in n for n in names)
    assert "down_blocks.0.resnets.0.norm1.weight" in names and "conv_in.weight" not in names


def test_frozen_early_blocks_get_no_backward_pass_and_no_gradient(unet):
    prepare_transfer(unet, TransferConfig(method="freeze", freeze_first_k=1, freeze_patterns=["*.norm_cross.*"]))
    calls = []
    unet.down_blocks[0].register_full_backward_hook(lambda *a: calls.append("down0"))
    unet.up_blocks[0].register_full_backward_hook(lambda *a: calls.append("up0"))
    x = torch.randn(2, 3, 16, 16)
    loss = denoise(unet, x, torch.tensor([3, 4]), TinyTextEncoder()(["a", "b"])).square().mean()
    loss.backward()
    assert "up0" in calls and "down0" not in calls
    for name, p in unet.named_parameters():
        if name.startswith(("down_blocks.0.", "conv_in.", "time_embedding.", "add_embedding.")) or "norm_cross" in name:
            assert not p.requires_grad and p.grad is None, name
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    groups = parameter_groups(named, 1e-4, {"up_blocks.*": 10.0})
    assert sorted(g["lr"] for g in groups) == [1e-4, 1e-3]
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_difffit_blocks_choose_where_scales_go(unet):
    early = copy.deepcopy(unet)
    prepare_transfer(early, TransferConfig(method="difffit", difffit_blocks="early"))
    scaled = [n for n, _ in early.named_parameters() if n.endswith("difffit_scale")]
    assert scaled and all(n.startswith(("down_blocks.", "mid_block.")) for n in scaled)
    with pytest.raises(UserError, match="difffit_blocks"):
        prepare_transfer(unet, TransferConfig(method="difffit", difffit_blocks="middle"))


# ------------------------------------------------------------------------------------------ end to end through train()


def _finetune_config(source, data, out, method, *extra):
    from imagen_transfer.config import load_config

    return load_config(None, [
        f"model.init_from={source}", f"data.dataset={data}", "data.val_split=val", "data.val_size=8",
        f"transfer.method={method}", "train.stages=[base]", "train.steps=4", "train.batch_size=4",
        "train.warmup_steps=1", "train.log_every=2", "train.val_every=2", "train.sample_every=4",
        "train.checkpoint_every=4", "sample.steps=2", "sample.per_prompt=2", f"out={out}", *extra])


def test_a_refused_transfer_setting_leaves_no_run_folder(tiny_cascade_dir, tmp_path):
    from conftest import make_npz

    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    with pytest.raises(UserError, match="'down_block.0.*' matches no parameter"):
        train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", "freeze",
                               "transfer.freeze_patterns=['down_block.0.*']"))
    assert not (tmp_path / "run").exists(), "a typo must not leave a folder that blocks the corrected run"


def test_freeze_alone_freezes_the_stem_and_first_down_block(tiny_cascade_dir, tmp_path, capsys):
    from conftest import make_npz

    from imagen_transfer.config import load_config
    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    run = train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", "freeze"))
    assert "freezing the stem and the first 1 down block(s)" in capsys.readouterr().out
    assert load_config(run / "config.yaml").transfer.freeze_first_k == 1  # the resolved default is recorded
    source, tuned = load_cascade(tiny_cascade_dir), load_cascade(run / "cascade")
    a, b = source.stage("base").unet.state_dict(), tuned.stage("base").unet.state_dict()
    frozen = [k for k in a if k.startswith(("conv_in.", "time_embedding.", "down_blocks.0."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("up_blocks."))


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "difffit", "lora"])
def test_finetune_each_method_end_to_end(tiny_cascade_dir, tmp_path, method):
    from conftest import make_npz

    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    run = train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", method, "transfer.freeze_first_k=1"))
    rows = read_jsonl(run / "metrics.jsonl")
    trainable = next(r for r in rows if r.get("event") == "trainable")
    assert trainable["method"] == method and 0 < trainable["percent"] <= 100
    tuned = load_cascade(run / "cascade")
    assert tuned.info["source"] == str(tiny_cascade_dir) and tuned.info["method"] == method
    source = load_cascade(tiny_cascade_dir)
    a, b = source.stage("base").unet.state_dict(), tuned.stage("base").unet.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a), "fine-tuning changed nothing"
    sa, sb = source.stage("sr").unet.state_dict(), tuned.stage("sr").unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the source SR stage is reused unchanged"
    assert (run / "samples" / "base-step-0000004.png").is_file()
    # gray training data: the cascade samples gray, and so do the training-time grids
    assert tuned.sampling.get("grayscale") is True
    grid = np.asarray(Image.open(run / "samples" / "base-step-0000004.png").convert("RGB")).astype(int)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
    assert "chest x-ray" in (run / "config.yaml").read_text()  # default prompts come from the report captions


def test_early_stopping_triggers_and_restores_the_best_step(tiny_cascade_dir, tmp_path, capsys):
    from conftest import make_npz
    from safetensors.torch import load_file

    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    # min_delta so large that no later validation counts as an improvement: stop at the 2nd one after the 1st, and
    # restore the validation with the lowest loss (whatever its margin)
    run = train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", "bitfit", "train.steps=20",
                                 "train.early_stopping_patience=2", "train.early_stopping_min_delta=1000",
                                 "train.sample_every=0"))
    captured = capsys.readouterr()
    log = captured.out + captured.err
    rows = read_jsonl(run / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None and "loss" in r}
    best_step = min(vals, key=vals.get)
    assert sorted(vals) == [2, 4, 6]
    assert "[base] early stopping at step 6" in log and f"restored the best EMA weights: step {best_step}" in log
    stop = next(r for r in rows if r.get("early_stop"))
    restored = next(r for r in rows if r.get("event") == "restore_best")
    assert stop["step"] == 6 and restored["step"] == best_step
    assert not any(r.get("step", 0) > 6 for r in rows if "loss" in r)
    best_ema = load_file(run / "checkpoints" / "base" / f"step-{best_step:07d}" / "ema.safetensors")
    tuned = load_cascade(run / "cascade").stage("base").unet.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in best_ema.items())


def test_text_encoder_mismatch_is_a_clear_error(tiny_cascade_dir, tmp_path):
    from conftest import make_npz

    from imagen_transfer.interop import build_or_load_cascade

    config = _finetune_config(tiny_cascade_dir, make_npz(tmp_path / "x.npz"), tmp_path / "run", "full",
                              "model.text_encoder=minilm")
    with pytest.raises(UserError, match="384-d states, but the source cascade"):
        build_or_load_cascade(config)


def test_prediction_type_is_the_sources_own_when_transferring(tiny_cascade_dir):
    """A transferred stage keeps the target it was trained on: an explicit different loss.prediction_type is refused
    (it used to be ignored silently); with random_init the fresh weights take the requested target."""
    from imagen_transfer.config import load_config
    from imagen_transfer.errors import UserError
    from imagen_transfer.interop import build_or_load_cascade

    base = [f"model.init_from={tiny_cascade_dir}"]
    kept = build_or_load_cascade(load_config(None, base))
    assert {s.scheduler.config.prediction_type for s in kept.stages} == {"epsilon"}
    with pytest.raises(UserError, match="was trained to predict epsilon"):
        build_or_load_cascade(load_config(None, [*base, "loss.prediction_type=v_prediction"]))
    fresh = build_or_load_cascade(load_config(None, [*base, "loss.prediction_type=v_prediction",
                                                     "model.random_init=true"]))
    assert {s.scheduler.config.prediction_type for s in fresh.stages} == {"v_prediction"}
    assert build_or_load_cascade(load_config(None, ["model.preset=tiny"])).stages[0].scheduler.config.prediction_type \
        == "epsilon"


def test_hold_frozen_in_casts_only_what_does_not_train():
    from imagen_transfer.step import hold_frozen_in

    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32)
    prepare_transfer(unet, TransferConfig(method="bitfit"))
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    held = hold_frozen_in(unet, "bf16")
    norms = {f"{m}.{n}" for m, module in unet.named_modules() if isinstance(module, (torch.nn.GroupNorm,
                                                                                 torch.nn.LayerNorm))
             for n, _ in module.named_parameters(recurse=False)}
    frozen = [n for n, p in unet.named_parameters() if not p.requires_grad and n not in norms]
    assert frozen and held["frozen_parameters"] == sum(before[n].numel() for n in frozen)
    for name, p in unet.named_parameters():
        if p.requires_grad or name in norms:  # trained, or a normalisation layer's: fp32 as they were
            assert p.dtype == torch.float32 and torch.equal(p, before[name])
        else:  # bf16 keeps 8 bits of mantissa: the frozen values are rounded to it, nothing more
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name].to(torch.bfloat16))
    assert 0 < held["frozen_max_abs_change"] <= max(before[n].abs().max().item() for n in frozen) * 2**-8
    # an fp16 source held in fp16 is exact
    unet = build_unet("tiny", kind="base", resolution=16, text_dim=32).half().float()
    prepare_transfer(unet, TransferConfig(method="lora", lora_rank=2))
    assert hold_frozen_in(unet, "fp16")["frozen_max_abs_change"] == 0


@pytest.mark.parametrize("method", ["bitfit", pytest.param("lora", marks=pytest.mark.slow)])
def test_half_precision_frozen_weights_train_and_fold_back_into_a_plain_cascade(tiny_cascade_dir, tmp_path, method):
    """train.frozen_dtype=bf16: the run logs what was held, validates and samples under autocast, and saves an
    ordinary fp32 cascade whose frozen weights are the source's rounded to bf16 (BitFit: the trained biases
    moved; LoRA: the adapters folded in, no adapter keys left)."""
    from conftest import make_npz
    from safetensors.torch import load_file

    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    run = train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", method, "train.mixed_precision=bf16",
                                 "train.frozen_dtype=bf16", "transfer.lora_rank=2"))
    start = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "start")
    assert start["frozen_dtype"] == "bf16" and start["frozen_parameters"] > 0
    assert any("val_loss" in r for r in read_jsonl(run / "metrics.jsonl"))
    saved = load_file(run / "cascade" / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    source = load_cascade(tiny_cascade_dir).stage("base").unet.state_dict()
    assert saved.keys() == source.keys() and all(v.dtype == torch.float32 for v in saved.values())
    kept = [k for k in source if torch.equal(saved[k], source[k].to(torch.bfloat16).float())
            or torch.equal(saved[k], source[k])]  # held in bf16, or a frozen norm kept in fp32
    moved = [k for k in source if k not in kept]
    assert moved and kept, "some weights trained, the rest are the source's held in bf16"
    if method == "bitfit":
        assert all(k.endswith(".bias") or "norm" in k for k in moved)
    load_cascade(run / "cascade")  # an ordinary cascade folder


def test_half_precision_frozen_weights_without_autocast_are_refused_before_the_run_folder(tiny_cascade_dir,
                                                                                          tmp_path):
    from conftest import make_npz

    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    with pytest.raises(UserError, match="frozen_dtype=bf16 needs autocast"):
        train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", "bitfit", "train.mixed_precision=no",
                               "train.frozen_dtype=bf16"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_runs_kept_step_opens_as_the_run_was_then(tiny_cascade_dir, tmp_path, method):
    """`train.keep_steps` keeps early checkpoints past pruning; `RUN/step-N` opens the run's cascade at that step.
    Known answer: the last step opens as the run's final cascade (same EMA weights, adapters merged alike), an
    earlier one differs from it and from the source; a step not kept is one line naming those kept."""
    from conftest import make_npz

    from imagen_transfer.interop import open_model
    from imagen_transfer.train import train

    data = make_npz(tmp_path / "pneumoniamnist.npz")
    run = train(_finetune_config(tiny_cascade_dir, data, tmp_path / "run", method, "train.keep_checkpoints=1",
                                 "train.keep_steps=[2]", "transfer.lora_rank=2" if method == "lora" else "train.seed=0"))
    kept = sorted(p.name for p in (run / "checkpoints" / "base").glob("step-*"))
    assert kept == ["step-0000002", "step-0000004"]  # step 2 survives keep_checkpoints=1
    final, last = load_cascade(run / "cascade"), open_model(run / "step-4")
    early, source = open_model(run / "step-2"), load_cascade(tiny_cascade_dir)

    def weights(cascade):
        return cascade.stage("base").unet.state_dict()

    for name, tensor in weights(final).items():
        torch.testing.assert_close(weights(last)[name], tensor, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(weights(early)[k], weights(final)[k]) for k in weights(final))
    assert any(not torch.equal(weights(early)[k], weights(source)[k]) for k in weights(source))
    assert early.info["step"] == 2 and early.sampling == final.sampling
    with pytest.raises(UserError, match="no checkpoint step-3 of stage base .kept: step-0000002, step-0000004"):
        open_model(run / "step-3")
