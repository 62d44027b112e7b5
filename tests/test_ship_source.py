"""scripts/ship_source.py: a continued stage inherits its parent's history, and the card's commands rerun the runs."""

import importlib.util
import json
import shlex
import shutil
import sys

import pytest
import torch
from conftest import REPO, make_npz
from test_train import tiny_config

from imagen_transfer.cascade import load_cascade
from imagen_transfer.config import config_to_dict, load_config
from imagen_transfer.errors import UserError
from imagen_transfer.train import train

spec = importlib.util.spec_from_file_location("ship_source", REPO / "scripts" / "ship_source.py")
ship_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ship_source)
REFERENCE = REPO / "configs" / "cifar10-small.yaml"


def ship(monkeypatch, base, sr, out, label, *extra):
    monkeypatch.setattr(sys, "argv", ["ship_source.py", "--base", str(base), "--sr", str(sr), "--out", str(out),
                                      "--label", label, "--reference-config", str(REFERENCE), *extra])
    ship_source.main()


@pytest.mark.slow
def test_a_continued_stage_counts_every_image_and_keeps_the_history(tmp_path, monkeypatch):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    first = train(tiny_config(data, tmp_path / "first", "train.stages=[base, sr]"))
    shutil.copytree(first, tmp_path / "gone")
    ship(monkeypatch, tmp_path / "gone", tmp_path / "gone", tmp_path / "v1", "v1")
    shutil.rmtree(tmp_path / "gone")  # v1's runs are not kept: its segments' commands come from its training.json
    more = train(tiny_config(data, tmp_path / "more", f"model.init_from={tmp_path / 'v1'}", "train.steps=4",
                             "train.val_every=2", "train.checkpoint_every=2", "train.sample_every=0"))
    ship(monkeypatch, more, first, tmp_path / "v2", "v2")

    record = json.loads((tmp_path / "v2" / "training.json").read_text())
    assert record["base"]["images_seen"] == 6 * 8 + 4 * 8 and len(record["base"]["segments"]) == 2
    assert record["sr"]["images_seen"] == 6 * 8 and len(record["sr"]["segments"]) == 1
    assert [h["name"] for h in record["history"]] == ["v1"]
    assert record["history"][0]["images_seen"] == {"base": 48, "sr": 48}
    assert load_cascade(tmp_path / "v2").info["images_seen"] == {"base": 80, "sr": 48}
    card = (tmp_path / "v2" / "README.md").read_text()
    assert "| v1 | 48 | 48 |" in card and "| v2 | 80 | 48 |" in card and "| n/a | n/a |" in card
    for name in ("samples-16px.png", "samples-32px.png", "validation-loss.png"):
        assert (tmp_path / "v2" / name).stat().st_size > 0

    # each segment's command, rerun through the config loader, is the run's own config
    for segment, run in zip(record["base"]["segments"], (first, more)):
        words = shlex.split(segment["command"])
        sets = words[words.index("--set") + 1:words.index("--out")]
        rebuilt, ran = (config_to_dict(c) for c in (load_config(REFERENCE, sets), load_config(run / "config.yaml")))
        assert {**rebuilt, "out": None} == {**ran, "out": None}


def test_refuses_a_parent_without_history_and_a_used_out(tmp_path, monkeypatch):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    first = train(tiny_config(data, tmp_path / "first"))
    more = train(tiny_config(data, tmp_path / "more", f"model.init_from={first / 'cascade'}", "train.steps=2",
                             "train.val_every=2", "train.checkpoint_every=2", "train.sample_every=0"))
    with pytest.raises(UserError, match="has no training.json"):
        ship(monkeypatch, more, first, tmp_path / "out", "v2")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("not ours")
    with pytest.raises(UserError, match="not empty"):
        ship(monkeypatch, first, first, tmp_path / "used", "v1")
    assert (tmp_path / "used" / "keep.txt").read_text() == "not ours"


def test_checkpoint_cascade_takes_the_named_checkpoints_ema_weights(tmp_path):
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("checkpoint_cascade", REPO / "scripts" / "checkpoint_cascade.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = train(tiny_config(make_npz(tmp_path / "pneumoniamnist.npz"), tmp_path / "run"))
    used = module.checkpoint_cascade(run, "base", tmp_path / "at3", checkpoint="step-0000003")
    ema = load_file(used / "ema.safetensors")
    unet = load_cascade(tmp_path / "at3").stage("base").unet
    assert used.name == "step-0000003" and all(torch.equal(v, ema[k]) for k, v in unet.state_dict().items())
    final = load_cascade(run / "cascade").stage("base").unet.state_dict()
    assert not all(torch.equal(v, final[k]) for k, v in unet.state_dict().items())  # step 3, not the end
    with pytest.raises(UserError, match="no checkpoint step-0000004"):
        module.checkpoint_cascade(run, "base", tmp_path / "at4", checkpoint="step-0000004")


def test_the_shipped_record_is_a_valid_parent_and_keeps_v1_in_its_history():
    """The shipped cascade's training.json is a valid parent for the next ship: its history holds v1 on the full
    protocol (beside its two bars), and its own row counts every image its stages have seen."""
    record = ship_source.read_training(REPO / "src" / "imagen_transfer" / "models" / "cifar10")
    current = ship_source.model_summary(record, record["label"])
    table = ship_source.history_table(record["history"], dict(current, name="next"))
    assert ("| v1 2026-11-26 | 128,000 | 38,400 | 0.0428 | 0.0352 | 2,000 / 10,000 | 279.9 | 0.3171 | 0.177 | "
            "0.000 | 101.6 / 0.0773 | 52.7 / 0.0363 |") in table
    assert "| next | 1,128,000 | 438,400 | 0.0377 | 0.0173 | 2,000 / 10,000 |" in table
    assert record["base"]["images_seen"] == sum(s["images"] for s in record["base"]["segments"]) == 1_128_000


def test_one_evaluation_fills_all_three_quality_rows(tmp_path):
    """`evaluate --bicubic-baseline --base-stage` writes the cascade, its bar and its base alone into one file; the
    card's table shows the three; an explicit --eval-base file wins over the embedded base_stage."""
    def scores(resolution, fid):
        return dict(n_generated=2000, n_real=10000, resolution=resolution, fid=fid, kid_mean=0.01, kid_std=0.001,
                    precision=0.5, recall=0.25, conditioning_accuracy=None)

    cascade = dict(scores(32, 100.0), sampling={}, bicubic_baseline=scores(32, 150.0), base_stage=scores(16, 80.0))
    (tmp_path / "eval.json").write_text(json.dumps(cascade))
    table = ship_source.quality_table(ship_source.read_quality(tmp_path / "eval.json", None))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "generator" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| cascade (base + SR stage)", "| base + bicubic upsampling (the bar)",
                                                 "| base stage alone"]
    assert [r.split(" | ")[3] for r in rows] == ["100.0", "150.0", "80.0"]
    (tmp_path / "base.json").write_text(json.dumps(dict(scores(16, 90.0), sampling={})))
    both = ship_source.read_quality(tmp_path / "eval.json", tmp_path / "base.json")
    assert both["base"]["fid"] == 90.0 and "base_stage" not in both["cascade"]  # the base row is stored once
