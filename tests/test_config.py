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


def test_values_are_checked_against_the_field_types():
    config = load_config(None, ["train.lr=1e-4", "train.steps=1e3", "sample.thresholding=off",
                                "train.mixed_precision=no", "train.lr_multipliers={'up_blocks.*': 2}"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)  # YAML leaves 1e-4 a string
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.sample.thresholding == "off" and config.train.mixed_precision == "no"  # YAML reads off / no as false
    assert config.train.lr_multipliers == {"up_blocks.*": 2.0}
    for override, message in [("train.steps=abc", "steps must be an integer, got 'abc'"),
                              ("train.steps=2.5", "steps must be an integer"),
                              ("train.compile=maybe", "compile must be true or false"),
                              ("data.captions=a photo", "captions must be a list"),
                              ("data.captions=[a {label}]", "not valid YAML.*quote")]:
        with pytest.raises(UserError, match=message):
            load_config(None, [override])


@pytest.mark.parametrize("override", ["train.steps=-5", "train.batch_size=0", "train.lr=0", "data.fraction=1.5",
                                      "train.ema_decay=1", "loss.cond_drop_prob=2", "sample.steps=0"])
def test_values_outside_what_a_run_can_do_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"{key} must be"):
        load_config(None, [override])


def test_every_declared_rule_refuses_a_bad_value_at_load_naming_the_valid_ones():
    """Each field with a declared rule (config.rule) gets a value outside it: load_config refuses it in one line that
    names the field and what is valid, before any run folder exists."""
    import dataclasses

    from imagen_transfer.config import RunConfig, _rule_text

    checked = 0
    sections = [s for s in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(s.default_factory)]
    for section in sections:
        for f in dataclasses.fields(section.default_factory()):
            meta = f.metadata
            if "choices" not in meta:
                continue
            if meta["choices"]:
                bad = "nonsense"
            elif meta["low"] is not None:
                bad = meta["low"] - 1
            else:
                bad = meta["high"] + 1
            if f.type in ("dict[str, int]",):
                bad = "{x: -1}"
            if f.type in ("list[int]",):
                bad = f"[{bad}]"
            key = f"{section.name}.{f.name}"
            with pytest.raises(UserError) as caught:
                load_config(None, [f"{key}={bad}"])
            message = str(caught.value)
            assert message.count("\n") == 0 and key in message and _rule_text(meta) in message, message
            checked += 1
    assert checked >= 30
    with pytest.raises(UserError, match="sample.sampler must be one of ddpm, ddim, dpmpp, got 'euler'"):
        load_config(None, ["sample.sampler=euler"])


def test_shipped_accelerate_configs_load():
    """configs/accelerate/*.yaml are accelerate launch configs (multi-GPU, one and two machines) that accelerate reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) == 2
    for path in files:
        config = load_config_from_file(str(path))
        assert config.distributed_type == "MULTI_GPU" and config.num_processes == 8 * config.num_machines
