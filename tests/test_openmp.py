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


def test_cpu_names_the_model_and_the_kernel_tiers_it_has(tmp_path):
    info = tmp_path / "cpuinfo"  # two cores of a machine with AVX2 and AVX512-BF16 but no AMX
    core = "processor\t: {}\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
    info.write_text(core.format(0) + core.format(1))
    c = openmp.cpu(info)
    assert c["name"] == "Example CPU 9000" and c["flags"] == ["avx2", "avx512f", "avx512_bf16"] and c["cores"] >= 1
    missing = openmp.cpu(tmp_path / "none")  # no /proc (macOS, Windows): still a name, no flags
    assert missing["name"] and missing["flags"] == []
    assert openmp.record()["cpu"] == openmp.cpu() and openmp.describe().startswith(f"CPU: {openmp.cpu()['name']} (")


# --- the thread count chosen from the load (openmp.auto_threads / adapt) ---

@pytest.mark.parametrize("cores, busy, threads", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.5, 1), (2, 1.3, 1), (2, 2.0, 1), (2, 3.5, 1), (4, 1.0, 3), (4, 1.6, 2)])
def test_one_thread_per_core_the_others_leave_free(cores, busy, threads):
    assert openmp.threads_for(cores, busy) == threads


def test_others_busy_is_all_cpu_time_less_our_own_per_second():
    assert openmp.others_busy((10.0, 3.0, 100.0), (14.0, 5.0, 102.0)) == pytest.approx(1.0)  # 4 s busy, 2 ours
    assert openmp.others_busy((10.0, 3.0, 100.0), (11.0, 4.5, 101.0)) == 0.0  # tick rounding: never below 0


@pytest.fixture
def two_threads(monkeypatch):
    """auto_threads starts from torch's count: 2 here, whatever the test process was given; restored after."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(openmp, "_auto", dict(on=False))
    torch.set_num_threads(2)
    yield
    openmp.auto_threads(on=False)
    torch.set_num_threads(before)


def test_adapt_follows_a_load_that_comes_and_goes(two_threads, monkeypatch):
    import time

    import torch

    t0 = time.monotonic() - 100  # readings in the past: adapt compares them with time.monotonic()
    readings = iter([(0.0, 0.0, t0), (4.0, 0.0, t0 + 2), (8.0, 0.0, t0 + 4), (9.0, 1.0, t0 + 6), (9.5, 1.4, t0 + 8)])
    monkeypatch.setattr(openmp, "cpu_times", lambda: next(readings))
    assert openmp.auto_threads(environ={}).startswith("auto: 1-2") and torch.get_num_threads() == 2
    assert openmp.adapt(every_s=1e6) is None  # not due yet: /proc is not read
    assert openmp.adapt(every_s=0) == 1 and torch.get_num_threads() == 1  # others kept 2 cores busy
    assert openmp.adapt(every_s=0) is None and torch.get_num_threads() == 1  # still busy: no change
    assert openmp.adapt(every_s=0) == 2 and torch.get_num_threads() == 2  # 1 s busy, all of it ours: free again
    assert "auto" in openmp.record()["thread_choice"]
    openmp.auto_threads(on=False)
    assert openmp.adapt(every_s=0) is None  # off: nothing is read


def test_a_count_set_by_someone_else_ends_the_choosing_and_off_restores(two_threads, monkeypatch):
    import torch

    readings = iter([(0.0, 0.0, 0.0), (4.0, 0.0, 2.0), (8.0, 0.0, 4.0)])
    monkeypatch.setattr(openmp, "cpu_times", lambda: next(readings))
    openmp.auto_threads(environ={})
    assert openmp.adapt(every_s=0) == 1
    openmp.auto_threads(on=False)
    assert torch.get_num_threads() == 2  # as auto_threads found them
    openmp.auto_threads(environ={})
    torch.set_num_threads(1)  # a library caller's own choice
    assert openmp.adapt(every_s=0) is None and "torch.set_num_threads" in openmp.record()["thread_choice"]
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("env, threads, choice", [
    ({"IMAGEN_TRANSFER_THREADS": "1"}, 1, "IMAGEN_TRANSFER_THREADS=1"),
    ({"OMP_NUM_THREADS": "2"}, 2, "OMP_NUM_THREADS=2"),
    ({"IMAGEN_TRANSFER_THREADS": "auto", "OMP_NUM_THREADS": "2"}, 2, "OMP_NUM_THREADS=2")])
def test_a_count_the_user_fixed_is_kept(two_threads, env, threads, choice):
    import torch

    openmp.auto_threads(environ=env)
    assert torch.get_num_threads() == threads and openmp.record()["thread_choice"] == choice
    assert openmp.adapt(every_s=0) is None


def test_a_bad_thread_count_is_one_line_naming_the_variable(two_threads):
    from imagen_transfer.errors import UserError

    for bad in ("0", "two", "-1"):
        with pytest.raises(UserError, match="IMAGEN_TRANSFER_THREADS='.*': set it to auto or to a thread count"):
            openmp.auto_threads(environ={"IMAGEN_TRANSFER_THREADS": bad})


@pytest.mark.skipif(openmp.cpu_times() is None, reason="needs Linux's /proc/stat for this process's cores")
def test_a_real_load_beside_us_takes_a_thread_away(two_threads):
    """Two busy processes beside this idle one keep about 2 cores busy: the next look chooses one thread."""
    import time

    import torch

    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # both running
        openmp.auto_threads(environ={})
        time.sleep(1.5)
        assert openmp.adapt(every_s=1.0) == 1 and torch.get_num_threads() == 1
    finally:
        for p in load:
            p.kill()
            p.wait()


def test_a_training_run_records_each_thread_change(tmp_path, monkeypatch):
    """The loop asks openmp.adapt before every step; a change is a `threads` event in metrics.jsonl, and the start
    record says how the count is chosen."""
    from conftest import make_npz

    from imagen_transfer.checkpoint import read_jsonl
    from imagen_transfer.config import load_config
    from imagen_transfer.train import train

    answers = iter([None, 1, None, None])
    monkeypatch.setattr(openmp, "adapt", lambda: next(answers, None))
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    run = train(load_config(None, [
        f"data.dataset={data}", "data.val_split=val", "data.val_size=8", "model.preset=tiny", "train.stages=[base]",
        "train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.val_every=0", "train.sample_every=0",
        "train.checkpoint_every=3", "train.mixed_precision=no", f"out={tmp_path / 'run'}"]))
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["threads"]) for r in records if r.get("event") == "threads"] == [(1, 1)]
    start = next(r for r in records if r.get("event") == "start")
    assert "thread_choice" in start["openmp"] and start["openmp"]["threads"] >= 1


@pytest.mark.parametrize("trainer", ["detector", "segmenter", "backbone classifier"])
def test_the_downstream_fits_follow_the_load_every_step(trainer, monkeypatch):
    """The dense and backbone fits run for minutes (BCCD: ~11 min each), so each of their steps lets the thread
    count follow the load like the training and sampling loops do; a fit that never looks keeps both threads
    beside a competing process, the 3.8x slowdown of issue #39."""
    import torch

    from imagen_transfer import backbone_probe, detection, segmentation

    module = {"detector": detection, "segmenter": segmentation, "backbone classifier": backbone_probe}[trainer]
    looks = []
    monkeypatch.setattr(module, "adapt_threads", lambda: looks.append(1))
    x = torch.rand(4, 3, 16, 16)
    if trainer == "detector":
        target = detection.centernet_targets([torch.tensor([[2.0, 2.0, 8.0, 8.0]])] * 4, [torch.tensor([0])] * 4,
                                             1, (4, 4), 4)
        detection.train_detector(x, target, 1, lr=1e-3, steps=3, scratch=True)
    elif trainer == "segmenter":
        segmentation.train_segmenter("conv", x, torch.zeros(4, 16, 16, dtype=torch.long), 2, lr=1e-3, steps=3)
    else:
        backbone_probe.train_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 2)), x,
                                        torch.tensor([0, 1, 0, 1]), lr=1e-3, steps=3)
    assert len(looks) == 3
