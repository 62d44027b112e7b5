"""`study transfer`: every arm x fraction x seed trains, is sampled at each evaluation, measured and summarised; the
study resumes without retraining; scratch really starts from fresh weights of the source's architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_npz
from torch import nn


@pytest.fixture
def toy_net(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


@pytest.mark.slow
def test_transfer_study_end_to_end_and_resume(tiny_cascade_dir, tmp_path, toy_net):
    from imagen_transfer.errors import UserError
    from imagen_transfer.jobs.study import StudyPlan, plan_runs, study_transfer, train_all

    data = make_npz(tmp_path / "toy.npz", n_train=40, n_val=16)
    plan = StudyPlan(source=str(tiny_cascade_dir), data=str(data), config=None,
                     overrides=["data.val_split=val", "data.val_size=8", "data.hflip=false", "train.warmup_steps=1"],
                     fractions=[0.5, 1.0], seeds=[0, 1], steps=4, batch_size=8, eval_every=2, n_eval=8,
                     methods=["full", "bitfit"], method_fraction=0.5)
    out = tmp_path / "study"
    summary = study_transfer(plan, out, jobs=2, feature_net=str(toy_net), results=tmp_path / "docs" / "results.md",
                             progress=False)

    runs = plan_runs(plan)
    assert len(runs) == 2 * 2 * 2 + 1  # arms x fractions x seeds, plus bitfit (full is the transfer arm)
    assert [r.name for r in runs[:2]] == ["transfer-f0.5-s0", "scratch-f0.5-s0"]  # seed-major order
    for spec in runs:
        files = sorted(p.name for p in (out / spec.name / "study").glob("samples-step-*.safetensors"))
        assert files == ["samples-step-0000002.safetensors", "samples-step-0000004.safetensors"], spec.name
        measures = json.loads((out / spec.name / "measures.json").read_text())
        assert {m["step"] for m in measures.values()} == {2, 4}
        assert all(m["n"] == 8 and m["kid"] == m["kid"] for m in measures.values())  # KID is a number, not NaN
    assert (out / "source" / "study" / "samples-step-0000000.safetensors").is_file()

    scratch = json.loads((out / "scratch-f1-s0" / "cascade" / "cascade.json").read_text())
    assert scratch["info"]["random_init_from"] == str(tiny_cascade_dir) and "source" not in scratch["info"]

    cell = summary["cells"]["transfer@0.5"]
    assert cell["steps"] == [2, 4] and cell["final_kid"]["n"] == 2 and len(cell["per_seed_final_kid"]) == 2
    assert set(summary["steps_to_reach"]) == {"0.5", "1"}
    assert summary["images"] == {"0.5": 20, "1": 40}
    assert summary["methods"]["full"]["trainable_percent"] == pytest.approx(100)
    assert 0 < summary["methods"]["bitfit"]["trainable_percent"] < 10
    bitfit = summary["methods"]["bitfit"]
    assert bitfit["steps"] == 4 and 0 < bitfit["best_val_loss"] <= bitfit["final_val_loss"]
    assert bitfit["peak_memory_mb"] > 0  # measured per run (peaks reset at each stage's start)
    assert set(summary["verdicts"]) == {"better_final_quality", "less_target_data", "faster_training"}
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "## Verdicts" in md and "| bitfit |" in md and "results-kid.png" in md
    assert (tmp_path / "docs" / "results-kid.png").stat().st_size > 1000

    assert summary["compare_step"] == 4 and cell["val_loss_steps"] == [2, 4]

    # a study cut short: one run's last point is missing, so every cell is compared at the last step all reached
    from imagen_transfer.jobs.study import summarise

    measures_file = out / "scratch-f1-s1" / "measures.json"
    measures = json.loads(measures_file.read_text())
    measures_file.write_text(json.dumps({k: v for k, v in measures.items() if v["step"] == 2}))
    cut = summarise(plan, out)
    assert cut["compare_step"] == 2 and cut["cells"]["scratch@1"]["complete_seeds"] == ["0"]
    assert cut["cells"]["transfer@0.5"]["final_kid"]["n"] == 2  # both seeds, at step 2

    assert train_all(plan, out, jobs=1, progress=False) == []  # resumed: nothing left to train
    with pytest.raises(UserError, match="another plan"):
        study_transfer(StudyPlan(**{**plan.__dict__, "steps": 6}), out, feature_net=str(toy_net), progress=False)


def test_steps_to_reach_and_verdicts():
    from imagen_transfer.jobs.study import StudyPlan, steps_to_reach, verdicts

    assert steps_to_reach({100: 0.5, 200: 0.3, 300: 0.2}, 0.3) == 200
    assert steps_to_reach({100: 0.5}, 0.3) is None

    def cell(mean, std):
        return dict(final_kid=dict(mean=mean, std=std, n=3))

    plan = StudyPlan(fractions=[0.1, 1.0], steps=600)
    cells = {"transfer@0.1": cell(0.20, 0.01), "scratch@0.1": cell(0.40, 0.02),
             "transfer@1": cell(0.15, 0.01), "scratch@1": cell(0.16, 0.02)}
    reach = {"0.1": dict(per_seed=[100, 200, 100], reached=3, mean=133.0, budget=600),
             "1": dict(per_seed=[300, None, 500], reached=2, mean=400.0, budget=600)}
    v = verdicts(cells, reach, plan)
    assert v["better_final_quality"]["per_fraction"] == {"0.1": True, "1": False}  # 0.15 vs 0.16 is inside the std
    assert not v["better_final_quality"]["confirmed"]
    assert v["less_target_data"]["per_fraction"] == {"0.1": False} and not v["less_target_data"]["confirmed"]
    assert v["faster_training"]["per_fraction"] == {"0.1": True, "1": False}  # a seed never reached it
    assert v["better_final_quality"]["confirmed"] is False and v["less_target_data"]["confirmed"] is False

    one_fraction = verdicts({"transfer@1": cell(0.15, 0.01), "scratch@1": cell(0.40, 0.02)}, {}, StudyPlan(fractions=[1.0]))
    assert one_fraction["better_final_quality"]["confirmed"] is True
    assert one_fraction["less_target_data"]["confirmed"] is None  # nothing below 100% was trained: undecided, not refuted
    assert one_fraction["faster_training"]["confirmed"] is None


def test_random_init_keeps_the_architecture_with_fresh_weights(tiny_cascade_dir):
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.config import load_config
    from imagen_transfer.errors import UserError
    from imagen_transfer.interop import build_or_load_cascade

    source = load_cascade(tiny_cascade_dir)
    config = load_config(None, [f"model.init_from={tiny_cascade_dir}", "model.random_init=true", "train.seed=3"])
    a, b = build_or_load_cascade(config), build_or_load_cascade(config)
    for s, x, y in zip(source.stages, a.stages, b.stages):
        assert dict(x.unet.config) == dict(s.unet.config)
        wx, ws, wy = (dict(m.unet.named_parameters()) for m in (x, s, y))
        assert all(torch.equal(wx[n], wy[n]) for n in wx)  # seeded
        assert not all(torch.equal(wx[n], ws[n]) for n in wx if wx[n].dim() > 1)
    assert a.text_encoder == source.text_encoder
    with pytest.raises(UserError, match="needs model.init_from"):
        build_or_load_cascade(load_config(None, ["model.random_init=true"]))
