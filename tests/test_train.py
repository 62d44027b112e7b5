import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_npz
from safetensors.torch import load_file

from imagen_transfer import memory
from imagen_transfer import train as train_module
from imagen_transfer.cascade import init_cascade, load_cascade
from imagen_transfer.checkpoint import latest_checkpoint, load_checkpoint, read_jsonl, save_checkpoint
from imagen_transfer.config import load_config
from imagen_transfer.errors import UserError
from imagen_transfer.step import epoch_batch
from imagen_transfer.train import train
from imagen_transfer.unet import resolve_precision, training_attention


def tiny_config(data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"data.dataset={data}", "data.val_split=val", "data.val_size=8", "data.captions=['{report}']",
        "model.preset=tiny", "train.stages=[base]", "train.steps=6", "train.batch_size=8", "train.warmup_steps=2",
        "train.log_every=2", "train.val_every=3", "train.sample_every=6", "train.checkpoint_every=3",
        "sample.steps=2", "sample.per_prompt=2", "sample.prompts=['chest x-ray, normal']", f"out={out}",
        "train.mixed_precision=no",  # the same numerics on every CI machine; `auto` and bf16 have their own tests
        *extra,
    ])


@pytest.fixture
def pneumonia_npz(tmp_path):
    return make_npz(tmp_path / "pneumoniamnist.npz")


def test_pretrain_writes_a_self_describing_run_folder(pneumonia_npz, tmp_path):
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.stages=[base, sr]"))
    assert (run / "config.yaml").is_file() and "tiny" in (run / "config.yaml").read_text()
    records = read_jsonl(run / "metrics.jsonl")
    for stage in ("base", "sr"):
        rows = [r for r in records if r.get("stage") == stage]
        assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
        assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
        assert all(r["images_per_s"] > 0 for r in rows if "loss" in r)
        assert (run / "samples" / f"{stage}-step-0000006.png").is_file()
        assert latest_checkpoint(run, stage).name == "step-0000006"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    cascade = load_cascade(run / "cascade")
    assert cascade.info["steps"] == {"base": 6, "sr": 6}
    with pytest.raises(UserError, match="already exists"):
        train(tiny_config(pneumonia_npz, tmp_path / "run"))


def test_sample_aug_level_is_written_into_the_sr_stages(pneumonia_npz, tmp_path):
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.stages=[sr]", "train.steps=1",
                            "train.val_every=0", "train.sample_every=0", "sample.aug_level=7"))
    cascade = load_cascade(run / "cascade")
    assert cascade.stage("sr").aug_level_sample == 7
    assert cascade.stage("base").aug_level_sample == init_cascade("tiny").stage("base").aug_level_sample
    with pytest.raises(UserError, match=r"sample.aug_level=1000000 is outside stage sr's \d+ noise levels"):
        train(tiny_config(pneumonia_npz, tmp_path / "bad", "sample.aug_level=1000000"))
    assert not (tmp_path / "bad").exists()  # refused before any folder is made


@pytest.mark.slow
def test_validation_loss_falls(pneumonia_npz, tmp_path):
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.steps=40", "train.val_every=20",
                               "train.lr=0.002", "train.ema_decay=0.9", "train.checkpoint_every=40",
                               "train.sample_every=0"))
    vals = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adafactor", marks=pytest.mark.slow)])
def test_resume_after_a_crash_is_exact(pneumonia_npz, tmp_path, monkeypatch, optimizer):
    """Also with Adafactor, whose factored state goes through the same pickle-free optimizer file."""
    straight = train(tiny_config(pneumonia_npz, tmp_path / "straight", f"train.optimizer={optimizer}"))

    real_save = train_module.save_checkpoint

    def crash_after_step_3(run_dir, stage, step, **kw):
        path = real_save(run_dir, stage, step, **kw)
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(pneumonia_npz, tmp_path / "resumed", f"train.optimizer={optimizer}"))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train(tiny_config(pneumonia_npz, tmp_path / "resumed", f"train.optimizer={optimizer}"), resume=True)
    a = load_cascade(straight / "cascade").stages[0].unet.state_dict()
    b = load_cascade(resumed / "cascade").stages[0].unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must equal an uninterrupted one"
    if optimizer == "adafactor":  # it trained, with a state smaller than AdamW's two moments per parameter
        source = init_cascade("tiny", text_encoder="tiny", seed=0).stages[0].unet.state_dict()
        assert any(not torch.equal(a[k], source[k]) for k in a)
        saved = load_file(next((straight / "checkpoints" / "base").glob("step-*")) / "optimizer.safetensors")
        factored = sum(v.numel() for v in saved.values() if v.dim() > 0)  # row / column statistics, vectors whole
        expected = sum(v[..., 0, 0].numel() * sum(v.shape[-2:]) if v.dim() >= 2 else v.numel() for v in a.values())
        assert factored == expected and factored < 0.6 * sum(v.numel() for v in a.values())


@pytest.mark.slow
def test_kill_during_checkpoint_save_then_resume(pneumonia_npz, tmp_path):
    """SIGKILL the moment a checkpoint is being written; the last good checkpoint must load, and resume finishes."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "imagen_transfer", "pretrain", "--out", str(out), "--set",
               f"data.dataset={pneumonia_npz}", "data.val_split=val", "data.val_size=8", "model.preset=tiny",
               "train.stages=[base]", "train.batch_size=4", "train.checkpoint_every=1", "train.val_every=0",
               "train.sample_every=0", "train.log_every=50", "train.keep_checkpoints=1"]
    proc = subprocess.Popen([*command, "train.steps=1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints" / "base"
    killed_mid_save = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            names = os.listdir(ckpts)
        except FileNotFoundError:
            continue
        if any(n.endswith(".tmp") for n in names) and "step-0000002" <= max(names):
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_save = True
            break
    proc.wait()
    assert killed_mid_save, proc.stderr.read().decode()[-2000:]
    good = latest_checkpoint(out, "base")
    assert good is not None
    loaded = load_checkpoint(good)  # loads: no torn files
    step = loaded["state"]["step"]
    assert step >= 1 and loaded["model"] and loaded["optimizer"]["state"]
    done = subprocess.run([*command, f"train.steps={step + 2}", "--resume"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {good}" in done.stdout + done.stderr
    assert not list(ckpts.glob("*.tmp"))
    assert latest_checkpoint(out, "base").name == f"step-{step + 2:07d}"
    load_cascade(out / "cascade")


def test_checkpoints_store_the_optimizer_without_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[1].parameters(), "lr": 5e-4}]
    optimizer = torch.optim.AdamW(groups, fused=True, weight_decay=0.01)
    for _ in range(2):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = save_checkpoint(tmp_path, "base", 2, model=model.state_dict(), ema=model.state_dict(),
                            optimizer=optimizer.state_dict(), state={})
    assert sorted(p.name for p in saved.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                       "optimizer.safetensors", "state.json"]
    loaded = load_checkpoint(saved)["optimizer"]
    original = optimizer.state_dict()
    as_json = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in original["param_groups"]]
    assert loaded["param_groups"] == as_json  # JSON has no tuples: betas come back as a list, which AdamW accepts
    assert loaded["state"].keys() == original["state"].keys()
    for index, entries in original["state"].items():
        assert loaded["state"][index].keys() == entries.keys()
        for name, value in entries.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    # a fresh optimizer given the loaded state takes the same next step as the original
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW([{"params": twin[0].parameters()}, {"params": twin[1].parameters()}], fused=True)
    twin_optimizer.load_state_dict(loaded)
    x = torch.randn(5, 3)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        net(x).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_checkpoints_of_the_pickled_optimizer_format_still_load(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    saved = save_checkpoint(tmp_path, "base", 1, model=model.state_dict(), ema=model.state_dict(),
                            optimizer=optimizer.state_dict(), state={})
    (saved / "optimizer.safetensors").unlink()
    torch.save(optimizer.state_dict(), saved / "optimizer.pt")  # how checkpoints were written before
    loaded = load_checkpoint(saved)["optimizer"]
    assert torch.equal(loaded["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_peak_memory_is_per_window(pneumonia_npz, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    memory.reset_peak_memory(cpu)
    base = memory.peak_memory_mb(cpu)
    block = torch.ones(300 * 2**20 // 4)  # 300 MB, written, so resident
    assert memory.peak_memory_mb(cpu) >= base + 250
    del block
    memory.reset_peak_memory(cpu)  # the next window forgets the block (on Linux: the VmHWM mark)
    if Path("/proc/self/clear_refs").exists():
        assert memory.peak_memory_mb(cpu) < base + 250
    resets = []
    monkeypatch.setattr(train_module, "reset_peak_memory", lambda device: resets.append(device.type))
    train(tiny_config(pneumonia_npz, tmp_path / "run", "train.steps=1", "train.val_every=0", "train.sample_every=0"))
    assert resets == ["cpu"]  # each stage's peak starts at its own first step, not at the process's


def test_epoch_batches_cover_the_data_once_per_epoch():
    seen = torch.cat([epoch_batch(20, 5, step, seed=0) for step in range(4)])
    assert sorted(seen.tolist()) == list(range(20))
    assert not torch.equal(epoch_batch(20, 5, 0, 0), epoch_batch(20, 5, 4, 0))
    assert len(epoch_batch(3, 8, 0, 0)) == 8  # fewer examples than a batch: repeated


DIST_SCRIPT = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from imagen_transfer.cascade import init_cascade
    from imagen_transfer.config import load_config
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.text import EmbeddingCache, load_text_encoder
    from imagen_transfer.train import encode_captions, train_stage

    data, out = sys.argv[1], Path(sys.argv[2])
    resume, flags = "resume" in sys.argv[3:], ("resume", "stop-after-2")
    if "stop-after-2" in sys.argv[3:]:  # every rank stops right after the step-2 checkpoint, as a crash would
        import imagen_transfer.train as loop
        save = loop._save
        loop._save = lambda run, step, done: save(run, step, done) if step < 2 else (save(run, step, done), sys.exit(3))
    config = load_config(None, ["model.preset=tiny", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
                                "train.val_every=0", "train.sample_every=0", "train.checkpoint_every=100",
                                "train.log_every=2", "train.lr=0.001", *[a for a in sys.argv[3:] if a not in flags]])
    accelerator = Accelerator(cpu=True)
    # ranks start from different weights on purpose: preparing the model for DDP broadcasts rank 0's
    cascade = init_cascade("tiny", seed=accelerator.process_index)
    cache = EmbeddingCache(load_text_encoder(cascade.text_encoder))
    ds = load_dataset(data, "train", resolution=32, captions=["{report}"])
    val = load_dataset(data, "val", resolution=32, captions=["{report}"])
    stage = cascade.stage("base")
    out.mkdir(parents=True, exist_ok=True)
    train_stage(config, cascade, stage, encode_captions(ds, cache), encode_captions(val, cache), cache([""]), out,
                encode=cache, accelerator=accelerator, resume=resume)
    save_file({k: v.contiguous() for k, v in stage.unet.state_dict().items()},
              out / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.safetensors")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()
''')


SHARDED = ("train.shard=fsdp", "train.checkpoint_every=2", "train.val_every=2", "train.sample_every=4",
           "sample.steps=2", "sample.per_prompt=1", "sample.prompts=['chest x-ray']")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), SHARDED], ids=["ddp", "fsdp"])
def test_two_processes_match_one(pneumonia_npz, tmp_path, extra):
    """DDP, and FSDP2 (train.shard=fsdp: every weight, gradient and AdamW moment sharded over the two gloo processes,
    with gathered checkpoints, a sharded validation and a sample grid on the way): the same weights as one process."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    two = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", str(script), str(pneumonia_npz),
                          str(tmp_path / "two"), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run([*accelerate, "--num_processes", "1", str(script), str(pneumonia_npz), str(tmp_path / "one"),
                          *extra], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    r0 = load_file(tmp_path / "two" / "rank0-of-2.safetensors")
    r1 = load_file(tmp_path / "two" / "rank1-of-2.safetensors")
    if extra:  # the gathered checkpoint of the sharded run holds full tensors, as the one-process run's does
        sharded = load_checkpoint(latest_checkpoint(tmp_path / "two", "base"))
        plain = load_checkpoint(latest_checkpoint(tmp_path / "one", "base"))
        assert all(sharded["model"][k].shape == plain["model"][k].shape for k in plain["model"])
        assert sharded["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
        assert (tmp_path / "two" / "samples" / "base-step-0000004.png").is_file()
        # a sharded run stopped after 2 steps and resumed from its gathered checkpoint ends bit-identical
        for flag, code in (("stop-after-2", 3), ("resume", 0)):
            part = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", str(script), str(pneumonia_npz),
                                   str(tmp_path / "resumed"), *extra, flag], capture_output=True, text=True, env=env,
                                  timeout=600)
            assert (part.returncode != 0) == bool(code), part.stderr[-4000:]
        resumed = load_file(tmp_path / "resumed" / "rank0-of-2.safetensors")
        assert all(torch.equal(resumed[k], r0[k]) for k in r0), "a resumed sharded run must equal an uninterrupted one"
    single = load_file(tmp_path / "one" / "rank0-of-1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks must end bit-identical"
    # Equal up to float reduction order. Biases that feed a GroupNorm have a true gradient of zero; Adam divides
    # their float-noise gradients by sqrt(v), a normalised update of about lr per step, in a direction each run draws
    # from its own rounding. So: nearly every weight within 1e-4, and none further apart than two runs moving the
    # other way at every step, 2 x 4 steps x lr (lr = 1e-3 here; measured: under 3.4e-3 for DDP and FSDP).
    total = sum(v.numel() for v in r0.values())
    close = sum(((r0[k] - single[k]).abs() <= 1e-4).sum().item() for k in r0)
    assert close / total > 0.999, f"only {close} of {total} weights match the one-process run"
    worst = max((r0[k] - single[k]).abs().max().item() for k in r0)
    assert worst < 2 * 4 * 1e-3, worst


def _final_weights(run):
    return load_cascade(run / "cascade").stages[0].unet.state_dict()


def test_gradient_accumulation_matches_the_full_batch(pneumonia_npz, tmp_path):
    full = _final_weights(train(tiny_config(pneumonia_npz, tmp_path / "full", "train.val_every=0",
                                               "train.sample_every=0")))
    accum = _final_weights(train(tiny_config(pneumonia_npz, tmp_path / "accum", "train.grad_accum=2",
                                                "train.val_every=0", "train.sample_every=0")))
    total = sum(v.numel() for v in full.values())
    close = sum(((full[k] - accum[k]).abs() <= 1e-4).sum().item() for k in full)
    assert close / total > 0.999  # see test_two_processes_match_one for why not every weight


def test_auto_precision_follows_the_hardware(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", cuda=False) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", cuda=False) == "bf16"  # AMD EPYC: AVX512-BF16 without AMX, bf16 1.32x faster
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto", cuda=False) == "no"  # bf16 emulated without native support is slower than fp32
    assert resolve_precision("no", cuda=False) == "no" and resolve_precision("bf16", cuda=False) == "bf16"
    assert load_config(None, []).train.mixed_precision == "auto"
    with pytest.raises(UserError, match="train.mixed_precision must be one of auto, no, bf16, fp16, got 'fp8'"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_auto_precision_runs_here_and_is_recorded_with_its_reason(pneumonia_npz, tmp_path):
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.mixed_precision=auto", "train.steps=2"))
    start = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "start")
    assert start["precision"] == resolve_precision("auto", cuda=False) and start["precision_reason"].startswith("auto")
    assert start["openmp"]["threads"] == torch.get_num_threads() and start["openmp"]["set_by"]  # how threads wait
    assert start["openmp"]["cpu"]["name"] and start["openmp"]["torch"] == torch.__version__  # what a time ran on
    assert load_cascade(run / "cascade").stages[0].unet.dtype == torch.float32  # trained, saved, loadable


def test_cpu_attention_kernel_is_the_math_one_and_agrees_with_the_default():
    q, k, v = (torch.randn(2, 4, 24, 8, requires_grad=True) for _ in range(3))
    with training_attention("cpu"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, reference, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(reference.square().sum(), (q, k, v))):
        assert torch.allclose(g, r, atol=1e-4)


@pytest.mark.slow
def test_channels_last_and_compile_train_the_same_model(pneumonia_npz, tmp_path, monkeypatch):
    plain = "train.val_every=0", "train.sample_every=0", "train.steps=2", "train.log_every=1"
    compile_calls = []
    real_compile = torch.compile

    def traced_only(module, **kwargs):  # dynamo traces the step; the eager backend skips inductor's C++ build (~2 min)
        compile_calls.append(kwargs)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", traced_only)

    def losses(run):
        return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]

    eager = train(tiny_config(pneumonia_npz, tmp_path / "eager", *plain))
    reference = _final_weights(eager)
    for name, option in (("nhwc", "train.channels_last=true"), ("compiled", "train.compile=true")):
        run = train(tiny_config(pneumonia_npz, tmp_path / name, option, *plain))
        assert losses(run) == pytest.approx(losses(eager), rel=1e-4), name  # the same steps, up to float reassociation
        weights = _final_weights(run)
        close = sum(((weights[k] - reference[k]).abs() <= 1e-4).sum().item() for k in reference)
        assert close / sum(v.numel() for v in reference.values()) > 0.999, name  # Adam magnifies near-zero gradients
        assert all(v.is_contiguous() for v in weights.values())
    assert compile_calls == [dict(mode="default")]
    run = train(tiny_config(pneumonia_npz, tmp_path / "graphs", "train.compile=true", "train.compile_mode=reduce-overhead",
                            *plain))
    assert compile_calls[-1] == dict(mode="reduce-overhead")  # CUDA graphs on a GPU; traced the same way here
    assert losses(run) == pytest.approx(losses(eager), rel=1e-4)
    with pytest.raises(UserError, match="train.compile_mode must be one of default, .*got 'fast'"):
        tiny_config(pneumonia_npz, tmp_path / "bad", "train.compile_mode=fast")


def test_bf16_autocast_trains(pneumonia_npz, tmp_path):
    """The U-Net's convolutions inside the training steps run in bf16 (autocast on; accelerate hands the model's
    output back in fp32, so the evidence is read off the convolutions themselves), and the weights stay fp32."""
    conv_dtypes = []

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():  # training steps, not validation
            conv_dtypes.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run = train(tiny_config(pneumonia_npz, tmp_path / "bf16", "train.mixed_precision=bf16", "train.steps=2",
                                "train.val_every=2", "train.sample_every=0"))
    finally:
        hook.remove()
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    losses = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert next(load_cascade(run / "cascade").stages[0].unet.parameters()).dtype == torch.float32
    assert [r["precision"] for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "start"] == ["bf16"]


def test_gradient_checkpointing_trains_to_the_same_weights(pneumonia_npz, tmp_path):
    """Recomputing activations in the backward pass repeats the same operations on the same inputs, so two steps
    with train.gradient_checkpointing reach the weights of two steps without (to float rounding of the summation
    order, bounded here at 1e-6 of the largest weight)."""
    from safetensors.torch import load_file

    runs = [train(tiny_config(pneumonia_npz, tmp_path / name, "train.steps=2", "train.val_every=0",
                              "train.sample_every=0", "train.checkpoint_every=2", *extra))
            for name, extra in (("plain", ()), ("checkpointed", ("train.gradient_checkpointing=true",)))]
    weights = [load_file(run / "cascade" / "base" / "unet" / "diffusion_pytorch_model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    scale = max(t.abs().max() for t in weights[0].values())
    assert max((weights[0][k] - weights[1][k]).abs().max() for k in weights[0]) <= 1e-6 * scale


def test_a_run_config_with_a_removed_setting_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  val_batches: 4\n  steps: 3\n")
    with pytest.warns(UserWarning, match="train.val_batches ignored"):
        assert load_config(path).train.steps == 3
    with pytest.raises(UserError, match="unknown key"):
        load_config(None, ["train.val_batches=2"])
