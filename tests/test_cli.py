import argparse
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from imagen_transfer.jobs.cli import main

NO_NETWORK = (
    "import socket\n"
    "def _refuse(*a, **k): raise RuntimeError('network call attempted')\n"
    "socket.socket.connect = _refuse\nsocket.create_connection = _refuse\nsocket.getaddrinfo = _refuse\n"
)


def _run_python(code: str, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", NO_NETWORK + code], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_import_and_help_are_fast_and_offline():
    code = (
        "import time, sys; t = time.perf_counter()\n"
        "import imagen_transfer\nfrom imagen_transfer.jobs.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('ELAPSED', time.perf_counter() - t); print('TORCH', 'torch' in sys.modules)\n"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    elapsed = float(out.stdout.split("ELAPSED")[1].split()[0])
    assert elapsed < 3.0, elapsed
    assert "TORCH False" in out.stdout, "--help must not import torch"
    assert "init" in out.stdout and "sample" in out.stdout


@pytest.mark.slow
def test_init_then_sample_writes_a_png_without_network(tmp_path):
    code = (
        "from imagen_transfer.jobs.cli import main\n"
        f"assert main(['init', '--preset', 'tiny', '--out', r'{tmp_path / 'tiny-cascade'}']) == 0\n"
        f"assert main(['sample', '--model', r'{tmp_path / 'tiny-cascade'}', '--prompt', 'a photo of a cat', "
        f"'--per-prompt', '4', '--steps', '3', '--out', r'{tmp_path / 'grid.png'}']) == 0\n"
    )
    out = _run_python(code, timeout=300)
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (4 * (4 * 34 + 2), 4 * (34 + 2))


def test_info(tiny_cascade_dir, capsys):
    assert main(["info", str(tiny_cascade_dir)]) == 0
    assert "stage sr (sr, 16->32px" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["init", "--preset", "gigantic", "--out", "{tmp}/x"], "unknown preset 'gigantic'"),
        (["sample", "--model", "{tmp}/missing", "--prompt", "a cat"], "model folder not found"),
        (["sample", "--model", "{tmp}", "--prompt", "a cat"], "is not a cascade"),
        (["info", "{tmp}/missing"], "model folder not found"),
        (["sample", "--model", "{tmp}", "--prompt", "a cat", "--guidance", "-1"], "--guidance must be >= 0"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(argv, message, tmp_path, capfd):
    """In process (capfd reads the real stderr file descriptor, so a library warning counts as a line too)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(argv)
    err = capfd.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.slow
def test_the_entry_point_answers_bad_input_in_one_line_from_a_cold_start(tmp_path):
    """The installed entry point in a fresh interpreter: whatever the imports print on the way also counts."""
    out = subprocess.run([sys.executable, "-m", "imagen_transfer", "sample", "--model", str(tmp_path / "missing"),
                          "--prompt", "a cat"], capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "model folder not found" in lines[0], out.stderr


def test_help_runs_quickly_as_a_command():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "imagen_transfer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
    assert time.perf_counter() - start < 5


def test_python_api_names_resolve_and_the_readme_example_runs(tmp_path, monkeypatch, tiny_cascade_dir):
    """Every exported name resolves to its function; the README's API example runs as written (on the tiny preset
    and a toy data set, with the step count cut)."""
    import re

    from conftest import REPO, make_npz

    import imagen_transfer

    for name in imagen_transfer.__all__:
        assert callable(getattr(imagen_transfer, name)), name
        assert not (REPO / "src" / "imagen_transfer" / f"{name}.py").exists(), f"{name} shadows a module"
    with pytest.raises(AttributeError):
        imagen_transfer.no_such_function  # noqa: B018
    code = re.search(r"## Python API.*?```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    toy = make_npz(tmp_path / "pneumoniamnist.npz")
    code = (code.replace("cifar10", str(tiny_cascade_dir))
            .replace("data.dataset=pneumoniamnist", f"data.dataset={toy}").replace("train.steps=200", "train.steps=2")
            .replace('"out=runs/xray-bitfit"', '"data.val_split=val", "data.captions=[\'{report}\']", '
                     '"train.val_every=0", "train.sample_every=0", "train.mixed_precision=no", "sample.steps=2", '
                     f'"out={tmp_path / "run"}"'))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "cats.png").is_file() and (namespace["run"] / "cascade" / "cascade.json").is_file()


def test_every_command_takes_its_model_as_model(tiny_cascade_dir, capsys):
    """`--model` names the model in every command (finetune's --source, merge's --models and info's positional
    stay as older names); sample's images per prompt is --per-prompt (--n, its older name, still parses)."""
    from imagen_transfer.jobs.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["finetune", "--model", "x", "--data", "d", "--method", "lora"]).source == "x"
    assert parser.parse_args(["merge", "--model", "a", "b", "--out", "o"]).models == ["a", "b"]
    assert parser.parse_args(["study", "transfer", "--model", "x", "--data", "d", "--out", "o"]).source == "x"
    assert parser.parse_args(["sample", "--model", "m", "--prompt", "p", "--per-prompt", "3", "--out", "g.png"]).n == 3
    with pytest.raises(SystemExit):  # one meaning of --n: images in total (evaluate); sample names the new flag
        parser.parse_args(["sample", "--model", "m", "--prompt", "p", "--n", "2", "--out", "g.png"])
    assert "--n is now --per-prompt" in capsys.readouterr().err
    assert main(["info", "--model", str(tiny_cascade_dir)]) == 0 and "stage base" in capsys.readouterr().out
    assert main(["info"]) == 2 and "name one model" in capsys.readouterr().err


def test_the_features_help_states_the_defaults_the_code_uses():
    """The help spells out the block and timestep defaults (argparse cannot: they depend on the task); a change of
    the constants without the help would mislead whoever reads it."""
    from imagen_transfer.features import DEFAULT_TIMESTEPS, DENSE_BLOCKS, DENSE_TIMESTEPS
    from imagen_transfer.jobs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["features"].format_help().split())
    for defaults in (DEFAULT_TIMESTEPS, DENSE_BLOCKS, DENSE_TIMESTEPS):
        assert " ".join(map(str, defaults)) in text
