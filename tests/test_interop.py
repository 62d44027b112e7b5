"""DeepFloyd IF round trip without the real weights: tiny IF pipelines built with diffusers itself (the layout of
diffusers' IF test configs), imported as a source, fine-tuned 2 steps, exported, reloaded with plain diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_npz


def _tiny_if_unet(in_channels: int, sample_size: int, text_dim: int, sr: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=in_channels, out_channels=6, cross_attention_dim=32, encoder_hid_dim=text_dim,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
        class_embed_type="timestep" if sr else None, mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
        time_embedding_dim=32)


def _if_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                         prediction_type="epsilon", variance_type="learned_range")


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    from diffusers import IFPipeline, IFSuperResolutionPipeline
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from imagen_transfer.text import minilm_path

    root = tmp_path_factory.mktemp("if")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # stands in for IF's T5 tokenizer (offline)
    t5 = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                 num_heads=2)).eval()
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    IFPipeline(tokenizer=tokenizer, text_encoder=t5, unet=_tiny_if_unet(3, 16, 16, False), scheduler=_if_scheduler(),
               **none).save_pretrained(root / "IF-I", safe_serialization=True)
    IFSuperResolutionPipeline(tokenizer=tokenizer, text_encoder=t5, unet=_tiny_if_unet(6, 32, 16, True),
                              scheduler=_if_scheduler(), image_noising_scheduler=_if_scheduler(), **none
                              ).save_pretrained(root / "IF-II", safe_serialization=True)
    return root


def test_import_finetune_export_reload_matches(if_folders, tmp_path):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from imagen_transfer.cascade import load_cascade, save_cascade
    from imagen_transfer.config import load_config
    from imagen_transfer.interop import export_diffusers, import_if
    from imagen_transfer.sampling import sample_cascade
    from imagen_transfer.train import train

    cascade = import_if(if_folders / "IF-I", if_folders / "IF-II")
    assert [s.kind for s in cascade.stages] == ["base", "sr"] and cascade.text_encoder.max_length == 77
    assert not cascade.text_encoder.masked and cascade.stages[1].aug_level_sample == 250
    save_cascade(cascade, tmp_path / "imported")
    data = make_npz(tmp_path / "pneumoniamnist.npz", n_train=16, n_val=8)
    config = load_config(None, [f"model.init_from={tmp_path / 'imported'}", f"data.dataset={data}", "data.val_size=4",
                                "transfer.method=full", "train.stages=[base, sr]", "train.steps=2",
                                "train.batch_size=4", "train.val_every=0", "train.sample_every=0",
                                "train.checkpoint_every=2", "train.log_every=1"])
    config.out = str(tmp_path / "run")
    tuned = load_cascade(train(config) / "cascade")
    before = load_cascade(tmp_path / "imported")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.stage("base").unet.state_dict().values(),
                                                      before.stage("base").unet.state_dict().values()))

    export_diffusers(tuned, tmp_path / "export")
    assert "IFPipeline" in (tmp_path / "export" / "README.md").read_text()
    pipe = IFPipeline.from_pretrained(tmp_path / "export" / "stage_I")  # plain diffusers from here
    theirs = pipe("a chest x-ray", num_inference_steps=4, guidance_scale=2.0, height=16, width=16,
                  generator=torch.Generator().manual_seed(7), output_type="pt", clean_caption=False).images
    ours = sample_cascade(tuned, ["a chest x-ray"], [7], stages=["base"], sampler="ddpm", steps=4, guidance=2.0,
                          progress=False)
    assert theirs.shape == ours.shape == (1, 3, 16, 16)
    # output_type="pt" is in [-1, 1]; the toy data is gray, so our sampler averages the channels (the card says so)
    assert tuned.sampling.get("grayscale")
    assert torch.allclose(theirs.clamp(-1, 1).mean(1, keepdim=True).expand_as(ours), ours, atol=1e-4)

    sr = IFSuperResolutionPipeline.from_pretrained(tmp_path / "export" / "stage_II")
    up = sr(image=ours, prompt="a chest x-ray", num_inference_steps=2, noise_level=250,
            generator=torch.Generator().manual_seed(7), output_type="pt", clean_caption=False).images
    assert up.shape == (1, 3, 32, 32) and torch.isfinite(up).all()


def test_if_folder_as_source_and_layout_errors(if_folders, tmp_path):
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.errors import UserError
    from imagen_transfer.interop import export_diffusers, import_if, open_model
    from imagen_transfer.jobs.cli import main

    direct = open_model(if_folders / "IF-I")  # --source / --model accept an IF stage-I folder
    assert direct.stages[0].unet.config.out_channels == 6
    with pytest.raises(UserError, match="is a diffusers pipeline folder, not a cascade"):
        load_cascade(if_folders / "IF-I")
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    with pytest.raises(UserError, match="missing unet/config.json, scheduler/scheduler_config.json"):
        import_if(tmp_path / "broken")
    assert main(["import-if", "--stage1", str(tmp_path / "broken"), "--out", str(tmp_path / "x")]) == 2
    from imagen_transfer.cascade import init_cascade

    with pytest.raises(UserError, match="tiny hash text encoder"):
        export_diffusers(init_cascade("tiny"), tmp_path / "e")


def test_a_lora_run_exports_as_a_diffusers_lora_file_that_plain_diffusers_loads(if_folders, tmp_path, capsys):
    """`export --lora RUN`: the adapters in the layout IFPipeline.load_lora_weights reads; loaded with plain
    diffusers into the source's exported pipeline, the U-Net predicts what the run's merged cascade predicts
    (alpha / rank != 1, so the scale must be folded in). Misuse is one line."""
    from diffusers import IFPipeline

    from imagen_transfer.cascade import load_cascade, save_cascade
    from imagen_transfer.config import load_config
    from imagen_transfer.interop import LORA_FILE, export_diffusers, import_if
    from imagen_transfer.jobs.cli import main
    from imagen_transfer.train import train

    source = import_if(if_folders / "IF-I")
    save_cascade(source, tmp_path / "imported")
    data = make_npz(tmp_path / "pneumoniamnist.npz", n_train=16, n_val=8)
    config = load_config(None, [f"model.init_from={tmp_path / 'imported'}", f"data.dataset={data}", "data.val_size=4",
                                "transfer.method=lora", "transfer.lora_rank=2", "transfer.lora_alpha=8",
                                "train.stages=[base]", "train.steps=3", "train.batch_size=4", "train.lr=0.01",
                                "train.val_every=0", "train.sample_every=0", "train.checkpoint_every=3",
                                "train.log_every=1", "train.ema_decay=0.5"])
    config.out = str(tmp_path / "run")
    run = train(config)
    tuned = load_cascade(run / "cascade")
    export_diffusers(load_cascade(tmp_path / "imported"), tmp_path / "export")
    assert main(["export", "--lora", str(run), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "stage_I" / LORA_FILE).is_file()

    pipe = IFPipeline.from_pretrained(tmp_path / "export" / "stage_I")  # plain diffusers from here
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 600])
    text = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))

    def predict(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=text).sample

    before = predict(pipe.unet)
    pipe.load_lora_weights(tmp_path / "lora" / "stage_I")
    after, ours = predict(pipe.unet), predict(tuned.stage("base").unet)
    assert not torch.allclose(before, ours, atol=1e-4)  # the adapters changed the model
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-4)
    # and back: MODEL+LORA_DIR opens as the run's model, so merge / --mix take downloaded adapters
    from imagen_transfer.interop import open_model

    applied = open_model(f"{tmp_path / 'imported'}+{tmp_path / 'lora'}")
    torch.testing.assert_close(predict(applied.stage("base").unet), ours, rtol=1e-4, atol=1e-4)
    assert main(["merge", "--models", f"{tmp_path / 'imported'}+{tmp_path / 'lora'}", str(tmp_path / "imported"),
                 "--out", str(tmp_path / "half")]) == 0  # half the adapter: the average of the two
    half = predict(load_cascade(tmp_path / "half").stage("base").unet)
    assert not torch.allclose(half, ours, atol=1e-4) and not torch.allclose(half, before, atol=1e-4)
    capsys.readouterr()
    assert main(["export", "--lora", str(tmp_path / "imported"), "--out", str(tmp_path / "x")]) == 2  # not a run
    assert main(["export", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.count("error:") == 2
