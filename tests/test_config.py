from pathlib import Path

import pytest

from imagen_transfer.config import load_config, parse_overrides, save_config
from imagen_transfer.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_has_a_header(path):
    config = load_config(path)
    assert config.train.steps > 0 and config.train.stages
    assert path.read_text().startswith("#"), "each config starts with a comment saying what it is and how to run it"


def test_overrides_are_typed_and_nested():
    config = load_config(None, ["train.steps=7", "train.stages=[base]", "sample.guidance=1.5", "model.init_from=x"])
    assert config.train.steps == 7 and config.train.stages == ["base"] and config.sample.guidance == 1.5
    assert config.model.init_from == "x"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(UserError, match="unknown key.*learing_rate"):
        load_config(None, ["train.learing_rate=1e-4"])
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml\.train: unknown key"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.steps=9", "data.captions=['{report}']"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
