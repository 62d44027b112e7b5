"""Issue #18, training side: no run folder is lost or silently changed; non-finite numbers never train or ship."""

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import make_npz
from test_train import tiny_config

from imagen_transfer import step as step_module
from imagen_transfer import train as train_module
from imagen_transfer.checkpoint import append_jsonl, latest_checkpoint, read_jsonl
from imagen_transfer.config import load_config
from imagen_transfer.errors import UserError
from imagen_transfer.jobs.cli import main
from imagen_transfer.outputs import run_lock
from imagen_transfer.train import train


@pytest.fixture
def pneumonia_npz(tmp_path):
    return make_npz(tmp_path / "pneumoniamnist.npz")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its content hash: 'nothing changed' is this staying equal."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_set_given_twice_keeps_both(tmp_path):
    from imagen_transfer.jobs.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--set", "train.steps=3", "--set", "train.lr=1e-4", "data.seed=2"])
    config = load_config(None, args.set)
    assert (config.train.steps, config.train.lr, config.data.seed) == (3, 1e-4, 2)


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.lr=nan", "loss.min_snr_gamma=inf",
                                      "sample.guidance=.nan", "train.lr_multipliers={'*': .inf}"])
def test_non_finite_config_numbers_are_refused(override):
    with pytest.raises(UserError, match="finite"):
        load_config(None, [override])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(pneumonia_npz, tmp_path, monkeypatch):
    real_loss = step_module.training_loss
    calls = {"n": 0}

    def loss_turning_nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(step_module, "training_loss", loss_turning_nan_at_step_5)
    run = tmp_path / "run"
    config = tiny_config(pneumonia_npz, run, "train.val_every=0", "train.log_every=1", "train.checkpoint_every=3")
    with pytest.raises(UserError, match=r"non-finite \(NaN or inf\) by step 5.*step-0000003 was kept"):
        train(config)
    checkpoint = latest_checkpoint(run, "base")
    assert checkpoint.name == "step-0000003"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "ema.safetensors").values())
    assert not (run / "cascade").exists()  # no NaN model shipped
    assert read_jsonl(run / "metrics.jsonl")[-1]["event"] == "nonfinite"


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(pneumonia_npz, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(pneumonia_npz, run))
    before = tree_digest(run)
    for change in ["train.batch_size=4", "train.lr=0.5", "train.stages=[base, sr]", "data.fraction=0.5"]:
        key = change.split("=")[0]
        with pytest.raises(UserError, match=rf"differs from the run's .*config.yaml in {key}: "):
            train(tiny_config(pneumonia_npz, run, change), resume=True)
    assert tree_digest(run) == before  # config.yaml and everything else untouched
    # the step budget may grow: the run continues
    train(tiny_config(pneumonia_npz, run, "train.steps=9"), resume=True)
    assert latest_checkpoint(run, "base").name == "step-0000009"


def test_resume_without_a_config_uses_the_runs_own(pneumonia_npz, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(pneumonia_npz, run))
    assert main(["pretrain", "--out", str(run), "--resume", "--set", "train.steps=8"]) == 0
    assert latest_checkpoint(run, "base").name == "step-0000008"


def test_a_locked_run_folder_is_refused(pneumonia_npz, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(pneumonia_npz, run))
    before = tree_digest(run)
    with run_lock(run):  # another process writing the run holds this lock
        with pytest.raises(UserError, match="in use by another process"):
            train(tiny_config(pneumonia_npz, run, "train.steps=9"), resume=True)
    assert tree_digest(run) == before


def test_a_torn_metrics_line_is_dropped_on_resume(pneumonia_npz, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = train_module.save_checkpoint

    def crash_after_step_3(run_dir, stage, step, **kw):
        path = real_save(run_dir, stage, step, **kw)
        if step == 3:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write('{"stage": "base", "step": 4, "lo')  # a kill in the middle of a log write
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(pneumonia_npz, run))
    with pytest.warns(UserWarning, match="line .* is not a JSON record"):
        assert read_jsonl(run / "metrics.jsonl")  # readable despite the torn line
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(tiny_config(pneumonia_npz, run), resume=True)
    assert "dropped the unfinished last line" in capsys.readouterr().out
    text = (run / "metrics.jsonl").read_text()
    assert '"lo\n' not in text and '"lo{' not in text
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [2, 4, 6]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"a": 1}\n{"b": ')
    append_jsonl(log, {"c": 3})
    with pytest.warns(UserWarning):
        assert read_jsonl(log) == [{"a": 1}, {"c": 3}]


def test_a_failed_start_does_not_block_the_corrected_command(pneumonia_npz, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def broken_encoder(spec):
        raise UserError("text encoder missing (simulated)")

    monkeypatch.setattr(train_module, "load_text_encoder", broken_encoder)
    with pytest.raises(UserError, match="simulated"):
        train(tiny_config(pneumonia_npz, run))
    monkeypatch.undo()
    train(tiny_config(pneumonia_npz, run))  # not "already exists"
    assert latest_checkpoint(run, "base").name == "step-0000006"


@pytest.mark.parametrize("override,message", [
    ("sample.sampler=euler", "sample.sampler must be one of ddpm, ddim, dpmpp"),
    ("sample.thresholding=hard", "sample.thresholding must be one of off, static, dynamic"),
    ("sample.percentile=1.5", r"sample.percentile must be in \(0, 1\]"),
    ("loss.prediction_type=x0", "loss.prediction_type must be one of epsilon, v_prediction"),
])
def test_sampling_and_loss_choices_are_checked_when_the_config_loads(override, message):
    with pytest.raises(UserError, match=message):  # not a thousand steps into the run, at the first sample grid
        load_config(None, [override])
