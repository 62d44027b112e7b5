"""KID and conditioning accuracy during training, and early stopping on KID (issue #18)."""

import pytest
from conftest import make_npz
from test_train import tiny_config

from imagen_transfer import train as train_module
from imagen_transfer.checkpoint import read_jsonl
from imagen_transfer.config import load_config
from imagen_transfer.errors import UserError
from imagen_transfer.jobs.report import plot_curves
from imagen_transfer.train import train


@pytest.fixture
def pneumonia_npz(tmp_path):
    return make_npz(tmp_path / "pneumoniamnist.npz")


@pytest.mark.slow
def test_kid_and_conditioning_accuracy_are_logged_with_the_validation_loss(pneumonia_npz, small_feature_net, tmp_path):
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.stages=[base, sr]", "train.kid_every=3",
                            "train.kid_samples=8", f"train.kid_feature_net={small_feature_net}"))
    rows = read_jsonl(run / "metrics.jsonl")
    for stage in ("base", "sr"):
        measured = [r for r in rows if r.get("stage") == stage and "kid" in r]
        assert [r["step"] for r in measured] == [3, 6]
        assert all("val_loss" in r and r["kid_n"] == 8 and r["kid_std"] >= 0 for r in measured)
        assert all(0 <= r["conditioning_accuracy"] <= 1 for r in measured)
    assert plot_curves(rows, tmp_path / "curves.png").is_file()


@pytest.mark.slow
def test_kid_measurements_repeat_exactly(pneumonia_npz, small_feature_net, tmp_path):
    extra = ("train.kid_every=6", "train.kid_samples=8", f"train.kid_feature_net={small_feature_net}")
    first = [r["kid"] for r in read_jsonl(train(tiny_config(pneumonia_npz, tmp_path / "a", *extra)) / "metrics.jsonl")
             if "kid" in r]
    again = [r["kid"] for r in read_jsonl(train(tiny_config(pneumonia_npz, tmp_path / "b", *extra)) / "metrics.jsonl")
             if "kid" in r]
    assert first == again and len(first) == 1


def test_early_stopping_on_kid_restores_the_best_measurement(pneumonia_npz, small_feature_net, tmp_path, monkeypatch):
    kids = iter([0.5, 0.3, 0.4, 0.45, 0.2])  # best at the 2nd measurement, then two without improvement

    monkeypatch.setattr(train_module, "measure_quality", lambda *a, **k: dict(kid=next(kids), kid_std=0.0, kid_n=8))
    run = train(tiny_config(pneumonia_npz, tmp_path / "run", "train.steps=10", "train.kid_every=2",
                            f"train.kid_feature_net={small_feature_net}", "train.early_stopping_metric=kid",
                            "train.early_stopping_patience=2", "train.val_every=0", "train.checkpoint_every=2"))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "kid" in r] == [2, 4, 6, 8]
    assert next(r for r in rows if r.get("early_stop"))["step"] == 8
    restored = next(r for r in rows if r.get("event") == "restore_best")
    assert restored["step"] == 4 and restored["metric"] == "kid" and restored["value"] == 0.3
    assert "val_loss" not in restored  # the KID is not reported as a validation loss (issue #35)
    done = next(r for r in rows if r.get("event") == "done")["summaries"][0]
    assert done["early_stopping_metric"] == "kid" and done["best_value"] == 0.3 and done["best_val_loss"] is None


@pytest.mark.parametrize("overrides,message", [
    (["train.early_stopping_metric=kid"], "train.kid_every must be >= 1 when"),
    (["train.early_stopping_metric=fid"], "must be one of val_loss, kid"),
    (["train.kid_every=5", "train.kid_samples=1"], "train.kid_samples must be >= 2"),
])
def test_quality_settings_are_checked(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_a_missing_feature_network_fails_before_the_run_folder(pneumonia_npz, tmp_path):
    with pytest.raises(UserError, match="feature network not found"):
        train(tiny_config(pneumonia_npz, tmp_path / "run", "train.kid_every=3",
                          f"train.kid_feature_net={tmp_path / 'none.pt'}"))
    assert not (tmp_path / "run").exists()
