"""The OpenMP wait setting (openmp.py): recorded, the user's environment wins, and a spin count of ours (when
SPINCOUNT is set) goes in before torch loads libgomp."""

import os
import subprocess
import sys

import pytest

from imagen_transfer import openmp

PROBE = "import os, imagen_transfer, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in openmp.VARIABLES}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, "None None"),  # measured: libgomp's default is kept (under_load_cpu.json)
    ({"GOMP_SPINCOUNT": "5"}, "5 None"),  # the user's spin count is kept
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),  # a wait policy of the user's: no spin count of ours beside it
])
def test_the_users_wait_setting_is_kept_and_none_is_added(env, expected):
    assert _run(PROBE, **env) == expected


def test_a_spin_count_of_ours_goes_in_before_torch_loads(monkeypatch):
    monkeypatch.setattr(openmp, "_chosen", {})
    monkeypatch.setattr(openmp, "SPINCOUNT", "10000")
    env: dict = {}
    assert openmp.configure(env)["set_by"].startswith("libgomp: torch was imported")  # too late in this process
    code = "import os, imagen_transfer.openmp as o; o.SPINCOUNT = '10000'; o.configure(); print(os.environ['GOMP_SPINCOUNT'])"
    assert _run(code) == "10000"  # a fresh process: set before torch is imported


def test_torch_loaded_first_keeps_libgomps_defaults_and_says_so():
    out = _run("import os, torch, imagen_transfer.openmp as o; print(os.environ.get('GOMP_SPINCOUNT'), o.describe())")
    assert out.startswith("None CPU:") and "libgomp's defaults" in out


def test_configure_on_an_environment_records_the_choice(monkeypatch):
    monkeypatch.setattr(openmp, "_chosen", {})  # this process's own record is left as it was
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.configure(env) == {"set_by": "environment", "OMP_WAIT_POLICY": "PASSIVE"} and env == {
        "OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.record()["OMP_WAIT_POLICY"] == "PASSIVE" and "PASSIVE" in openmp.describe()
