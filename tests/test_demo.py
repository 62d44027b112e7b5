"""`demo`: all five phases on a tiny cascade and a toy dataset; a missing data file is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_npz
from torch import nn


@pytest.mark.slow
def test_demo_runs_every_phase_into_one_report(tiny_cascade_dir, tmp_path):
    from imagen_transfer.jobs.demo import run_demo

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.jit.save(torch.jit.script(net.eval()), str(tmp_path / "net.pt"))
    data = make_npz(tmp_path / "toy.npz", n_train=40, n_val=16)
    tiny = dict(steps=4, sr_steps=2, n_eval=8, feature_limit=16, val_every=2, batch=8, probe_epochs=2, sample_steps=2,
                guide_step=1)
    run = run_demo(tmp_path / "demo", source=str(tiny_cascade_dir), data=str(data), settings=tiny,
                   feature_net=str(tmp_path / "net.pt"))
    summary = json.loads((run / "demo.json").read_text())
    assert set(summary["kid"]) == {"source", "fine-tuned", "autoguidance 2.5 (step 1)"}  # the table's winner only
    assert set(summary["probe_test_accuracy"]) == {"source", "fine-tuned", "random", "pixels"}
    assert summary["timings_s"]["total"] > 0 and len(summary["timings_s"]) == 6
    assert summary["machine"]["cpu"]["name"] and summary["machine"]["threads"] >= 1  # what the timings ran on
    for name in ("eval-0-source.json", "eval-1-finetuned.json", "eval-2-autoguidance.json", "report.html",
                 "cascade/cascade.json", "features/probe-classification.json"):
        assert (run / name).is_file(), name
    from imagen_transfer.checkpoint import read_jsonl

    steps = {}
    for row in read_jsonl(run / "metrics.jsonl"):
        if "loss" in row:
            steps[row["stage"]] = max(steps.get(row["stage"], 0), row["step"])
    assert steps == {"base": 4, "sr": 2}  # both stages fine-tuned, the SR stage for its own step count
    assert set(summary["bicubic_baseline"]) == {"source", "fine-tuned"}  # both cascades against their own bar
    assert json.loads((run / "eval-1-finetuned.json").read_text())["bicubic_baseline"]["resolution"] == 32
    guided = json.loads((run / "eval-2-autoguidance.json").read_text())["sampling"]
    assert guided["guide_model"] == str(run / "step-1") and guided["guidance"] == 2.5
    assert {d.name for d in (run / "checkpoints").glob("*/step-0000001")} == {"step-0000001"}  # kept for it
    md = (run / "report.md").read_text()
    assert "## Probes" in md and "eval-2-autoguidance.json" in md


@pytest.mark.slow
def test_quick_shape_fine_tunes_and_evaluates_the_base_stage_only(tiny_cascade_dir, tmp_path, monkeypatch):
    from imagen_transfer import sources
    from imagen_transfer.checkpoint import read_jsonl
    from imagen_transfer.jobs.demo import QUICK, run_demo

    resolved, real_find = [], sources._find  # issue #36: the demo's data argument is resolved once
    monkeypatch.setattr(sources, "_find", lambda spec: resolved.append(spec) or real_find(spec))

    assert QUICK["sr_steps"] == 0 and QUICK["n_real"] and QUICK["precision"] == "auto"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.jit.save(torch.jit.script(net.eval()), str(tmp_path / "net.pt"))
    data = make_npz(tmp_path / "toy.npz", n_train=40, n_val=16)
    tiny = dict(QUICK, steps=2, n_eval=6, n_real=10, feature_limit=16, val_every=2, batch=8, probe_epochs=1,
                sample_steps=1, guide_step=1)  # and autoguidance by the run's own step-1 checkpoint
    run = run_demo(tmp_path / "demo", source=str(tiny_cascade_dir), data=str(data), settings=tiny,
                   feature_net=str(tmp_path / "net.pt"))
    assert resolved == [str(data)]  # fine-tune, evaluations and features all read the one opened DataSource
    assert {row["stage"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row} == {"base"}
    for name in ("eval-0-source.json", "eval-1-finetuned.json", "eval-2-autoguidance.json"):
        result = json.loads((run / name).read_text())
        assert result["resolution"] == 16 and result["n_real"] == 10 and result["sampling"]["stages"] == ["base"]
    guided = json.loads((run / "eval-2-autoguidance.json").read_text())["sampling"]
    assert guided["guide_model"] == str(run / "step-1") and guided["guidance"] == 2.5
    assert (run / "checkpoints" / "base" / "step-0000001").is_dir()  # kept for it
    assert json.loads((run / "features" / "manifest.json").read_text())["timesteps"] == [10]  # --quick's one view


def test_demo_without_data_names_the_missing_file(tmp_path, monkeypatch, capsys):
    from imagen_transfer.jobs.cli import main

    monkeypatch.setenv("IMAGEN_TRANSFER_DATA", str(tmp_path / "nowhere"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "pneumoniamnist.npz" in err and "IMAGEN_TRANSFER_DATA" in err
    assert main(["demo", "--precision", "no", "--out", str(tmp_path / "d")]) == 2  # parsed, then the same refusal
    assert "pneumoniamnist.npz" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_a_guide_step_the_run_never_reaches_is_one_line_before_any_work(tmp_path):
    from imagen_transfer.errors import UserError
    from imagen_transfer.jobs.demo import run_demo

    data = make_npz(tmp_path / "toy.npz", n_train=8, n_val=4)
    with pytest.raises(UserError, match=r"--guide-step 60 must be below every stage's steps \(60\)"):
        run_demo(tmp_path / "d", quick=True, data=str(data), settings=dict(guide_step=60))
    assert not (tmp_path / "d").exists()


def test_demo_precision_applies_to_the_feature_passes_too():
    from imagen_transfer.jobs.cli import build_parser, demo_settings

    def parsed(*argv):
        return demo_settings(build_parser().parse_args(["demo", *argv]))

    assert parsed() is None  # the job's own defaults (FULL / QUICK)
    assert parsed("--precision", "no") == dict(precision="no", feature_precision="no")  # fp32 throughout
    assert parsed("--precision", "bf16", "--guide-weight", "2") == dict(precision="bf16", feature_precision="bf16",
                                                                      guide_weight=2.0)
