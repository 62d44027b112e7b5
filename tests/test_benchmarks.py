"""One-step smoke runs of every benchmark script, so a change to what they import cannot break them silently.

Each runs in its own process on the tiny preset (or the tiny cascade fixture), a toy data set and one or two steps,
and must exit 0 and print or write its table. Marked slow: together they take about a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_npz

pytestmark = pytest.mark.slow
BENCHMARKS = REPO / "benchmarks"


def _run(script: str, *args, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as {header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def number(cell: str) -> float:
    """The first number of a cell ('21.0 +- 3.2', '0.034 (0.002)', '12.500%'), which must be finite."""
    value = float(cell.replace("%", "").replace(",", "").split()[0])
    assert math.isfinite(value), cell
    return value


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    tested = {line.split('"')[1] for line in (REPO / "tests" / "test_benchmarks.py").read_text().splitlines()
              if line.strip().startswith("out = _run(")}
    assert scripts <= tested, f"no smoke test for {sorted(scripts - tested)}"


# Scripts that time contenders side by side (a thread count that moved mid-run would time the load, not the code)
# or only start commands (which follow the load themselves) or run on a GPU.
FIXED_COUNT = {"fid_speed.py", "guidance_cost.py", "inception_bf16.py", "gpu_mfu.py", "finetune_methods.py"}


def test_benchmarks_that_compute_in_process_choose_their_threads():
    """A benchmark that trains, samples or probes in its own process calls openmp.auto_threads() (the thread count
    follows the load, or IMAGEN_TRANSFER_THREADS) or fixes the count itself: at torch's default beside another job
    the probe's small heads ran ~70x slower (7.7 against 0.11 s per step)."""
    loose = [p.name for p in sorted(BENCHMARKS.glob("*.py"))
             if "from imagen_transfer" in (text := p.read_text()) and p.name not in FIXED_COUNT | {"common.py"}
             and not any(call in text for call in ("openmp.auto_threads()", "torch.set_num_threads("))]
    assert not loose, f"these benchmarks compute at torch's default thread count: {loose}"


def test_train_throughput(tmp_path):
    out = _run("train_throughput.py", "--preset", "tiny", "--steps", "1", "--repeats", "1", "--batch", "4",
               "--threads", "1", "--out", tmp_path / "t.md")
    assert "| base | 16px |" in out and (tmp_path / "t.md").is_file()


def test_peers(tmp_path):
    out = _run("peers.py", "--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "1", "--repeats", "1",
               "--threads", "1", "--train", "ours,ours-freeze,plain,plain-bf16", "--sample", "ours",
               "--sample-batch", "2", "--sample-repeats", "1", "--out", tmp_path / "p.md")
    assert "| plain-bf16 |" in out and "frozen against full" in out
    bf16_row = next(line for line in out.splitlines() if line.startswith("| bf16 |"))
    assert "x |" in bf16_row  # ours / plain-bf16 at the same precision (imagen-pytorch not run here: "-")


def test_gpu_mfu_runs_on_a_cpu(tmp_path):
    out = _run("gpu_mfu.py", "--preset", "tiny", "--batch", "4", "--steps", "1", "--out", tmp_path / "m.json")
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["ours"]["eager"]["images_per_s"] > 0 and result["plain_diffusers_images_per_s"] > 0 and out


def test_frozen_ratio(tmp_path, tiny_cascade_dir):
    out = _run("frozen_ratio.py", "--source", tiny_cascade_dir, "--batch", "4", "--pairs", "2", "--warmup", "0",
               "--depths", "1", "--threads", "1", "--profile-steps", "1", "--out", tmp_path / "f.md")
    row = next(line for line in (tmp_path / "f.md").read_text().splitlines() if line.startswith("| stem"))
    full_ms, frozen_ms = (cell.split(" / ") for cell in row.strip(" |").split(" | ")[-2:])
    assert len(full_ms) == 4 and float(full_ms[0]) > 0 and float(full_ms[1]) > 0 and out  # the step's own labels


def test_finetune_methods(tmp_path, tiny_cascade_dir):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    out = _run("finetune_methods.py", "--source", tiny_cascade_dir, "--data", data, "--methods", "full", "bitfit",
               "--set", "train.steps=2", "train.batch_size=4", "train.val_every=2", "train.sample_every=0",
               "train.mixed_precision=no", "data.val_size=4", "--out", tmp_path / "runs", "--table", tmp_path / "m.md")
    rows = {r["method"]: r for r in table_rows((tmp_path / "m.md").read_text())}
    assert set(rows) == {"full", "bitfit"}, out
    assert number(rows["full"]["trainable %"]) == 100 and 0 < number(rows["bitfit"]["trainable %"]) < 5
    for r in rows.values():  # both measured: a positive step time and a finite validation loss
        assert number(r["s / step"]) > 0 and number(r["first val loss"]) > 0


@pytest.fixture
def tiny_feature_env(small_feature_net, monkeypatch):
    """The evaluation scripts measure with the small TorchScript feature net instead of TF-Inception."""
    monkeypatch.setenv("IMAGEN_TRANSFER_FEATURE_NET", str(small_feature_net))


def test_sampler_parity(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "toy.npz")
    out = _run("sampler_parity.py", "--model", tiny_cascade_dir, "--data", data, "--settings", "ddim:2,dpmpp:2",
               "--n", "4", "--n-real", "8", "--threads", "1", "--out", tmp_path / "s.md")
    rows = table_rows((tmp_path / "s.md").read_text())
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", "2"), ("dpmpp", "2")], out
    for r in rows:
        assert number(r["KID x1e3 (+- subset std)"]) > -1e3 and number(r["FID"]) >= 0
    assert [r for r in rows if number(next(v for k, v in r.items() if k.startswith("KID -"))) == 0]  # the reference


def test_sr_sweep(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "toy.npz")
    out = _run("sr_sweep.py", "--model", tiny_cascade_dir, "--data", data, "--split", "val", "--n", "4", "--n-real",
               "8", "--batch", "4", "--only", "0", "--out", tmp_path / "sr.md")
    rows = table_rows((tmp_path / "sr.md").read_text())  # the bar, then --only 0: one SR setting
    assert len(rows) == 2 and rows[0]["SR setting"] == "base + bicubic (the bar)", out
    for row in rows:
        assert number(row["FID"]) >= 0 and 0 <= number(row["precision"]) <= 1 and 0 <= number(row["recall"]) <= 1
    out = _run("sr_sweep.py", "--model", tiny_cascade_dir, "--data", data, "--split", "test", "--n", "4", "--n-real",
               "8", "--batch", "4", "--only", "0", "--real-lowres", "val", "--guidance", "1.5", "--out", tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "4 real val images shrunk" in text and "| real low-res + bicubic (the bar) |" in text, out


def test_sr_finetune_curve(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    out = _run("sr_finetune_curve.py", "--source", tiny_cascade_dir, "--data", data, "--steps", "1", "--sr-steps", "2",
               "--every", "1", "--batch", "4", "--n", "4", "--sample-steps", "2", "--aug-level", "0",
               "--out", tmp_path / "curve", "--table", tmp_path / "c.md")
    table = (tmp_path / "c.md").read_text()
    assert "| cascade, SR step 1 |" in table and "| cascade, SR step 2 |" in table and "(the bar)" in table, out
    kept = json.loads((tmp_path / "curve" / "by-step" / "sr-00002" / "cascade.json").read_text())
    assert kept["stages"][1]["aug_level_sample"] == 0  # --aug-level reached the kept cascades


def test_fusion_pneumonia(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    out = _run("fusion_pneumonia.py", "--source", tiny_cascade_dir, "--finetuned", tiny_cascade_dir, "--second",
               tiny_cascade_dir, "--data", data, "--n", "4", "--steps", "2", "--out", tmp_path / "fusion",
               "--table", tmp_path / "f.md")  # 2 sampling steps: 25 made this smoke test take ~4 min on 2 cores
    table = (tmp_path / "f.md").read_text()
    assert "2 steps per stage, precision no" in table and "| ensemble 0.5 F + 0.5 G (outputs) |" in table, out
    measured = json.loads((tmp_path / "fusion" / "fusion.json").read_text())
    assert len(measured) == 7 and all(math.isfinite(r["kid_mean"]) for r in measured.values())  # every fusion


def test_dense_tables(tmp_path):
    per_class = {"background": dict(iou=0.9, dice=0.95), "nucleus": dict(iou=0.5, dice=0.6667)}
    point = dict(miou=0.7, per_class=per_class)
    run = dict(task="segmentation", dataset="/data/wbc-seg.zip", head="conv", steps=300, sets={
        "source": dict(parameters=1000, test=point, label_efficiency={"5": [point, point], "all": [point]})})
    scratch = dict(task="segmentation", dataset="/data/wbc-seg.zip", head="mlp", steps=300, scratch=dict(steps=600),
                   sets={"scratch": dict(parameters=5000, test=point, label_efficiency={"20": [point], "all": [point]})})
    more = dict(scratch, sets={"scratch": dict(parameters=5000, test=dict(point, miou=0.5),
                                                label_efficiency={"5": [dict(point, miou=0.6)], "20": [point]})})
    larger = dict(run, size=[240, 320], sets={"source": dict(run["sets"]["source"], test=dict(point, miou=0.8))})
    for name, result in (("a", dict(run, size=[120, 160])), ("b", scratch), ("c", more), ("d", larger)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    out = _run("dense_tables.py", *(tmp_path / f"{n}.json" for n in "abcd"), "--out", tmp_path / "t.md")
    assert "| source (conv, 240x320) | 1,000 | 300 | 0.800 |" in out  # another size: its own row, never merged
    assert "| source (conv) | 1,000 | 300 | 0.700 |" in out and "| scratch | 5,000 | 600 | 0.700 |" in out
    assert "| source (conv) | 0.700 +- 0.000 |  | 0.700 |" in out
    assert "| scratch | 0.600 | 0.700 | 0.700 |" in out  # the later run adds 5 labels, the first run's 20 stays
    assert out.count("| scratch |") == 3  # one row per table (scores, efficiency, Dice)
    flipped = dict(run, flip_test=True, sets={"random": dict(run["sets"]["source"], test=dict(point, miou=0.75),
                                                             without_flip_test=dict(test=point, label_efficiency={
                                                                 "5": [dict(point, miou=0.65)], "all": [point]}))})
    (tmp_path / "e.json").write_text(json.dumps(flipped))
    out = _run("dense_tables.py", tmp_path / "a.json", tmp_path / "e.json")
    assert "| random (conv, flip test) | 1,000 | 300 | 0.750 |" in out  # the flip-tested scores
    assert "| random (conv) | 1,000 | 300 | 0.700 |" in out and "| random (conv) | 0.650 | 0.700 |" in out


def test_probe_seeds(tmp_path):
    def result(source, random):
        best = {name: dict(view=f"mid@t{i}", test=dict(accuracy=acc, auc=0.9)) for i, (name, acc) in
                enumerate((("source", source), ("random", random)))}
        return dict(best=best, n=dict(test=100), head="linear")

    for seed, (source, random) in enumerate(((0.80, 0.70), (0.90, 0.70), (0.85, 0.75))):
        (tmp_path / f"{seed}.json").write_text(json.dumps(result(source, random)))
    out = _run("probe_seeds.py", *(tmp_path / f"{s}.json" for s in range(3)), "--out", tmp_path / "t.md")
    # accuracy 0.85 +- 0.05 (sample std); paired leads 0.10, 0.20, 0.10: 0.133 +- 0.058
    assert "| source | 0.850 +- 0.050 | 0.900 +- 0.000 | +0.133 +- 0.058 | mid@t0, mid@t0, mid@t0 |" in out
    assert "| random | 0.717 +- 0.029 | 0.900 +- 0.000 |  |" in out and (tmp_path / "t.md").read_text() == out[:-1]


def test_step_profile(tmp_path):
    out = _run("step_profile.py", "--preset", "tiny", "--batch", "4", "--warmup", "1", "--steps", "2",
               "--profile-steps", "1", "--threads", "1", "--out", tmp_path / "s.md")
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "s.md").read_text().splitlines()}
    assert float(rows["forward"].split(" | ")[1]) > 0 and float(rows["forward"].split(" | ")[2]) > 0 and out


def test_memory(tmp_path):
    out = _run("memory.py", "--widths", "64", "--methods", "lora", "--precisions", "bf16+frozen", "--checkpointing",
               "off", "--steps", "1", "--threads", "1", "--out", tmp_path / "m.md")
    text = (tmp_path / "m.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 64 | lora"))
    assert float(row.split(" | ")[5].replace(",", "")) > 0  # a measured peak
    assert "| lora |" in text.split("IF-I-XL at 64 px")[1] and out  # the fits-on table from IF-I-XL's counts


def test_frozen_recipes_table(tmp_path, tiny_cascade_dir):
    from imagen_transfer.features import extract

    data = make_npz(tmp_path / "toy.npz", n_train=24, n_val=8)
    extract({"source": str(tiny_cascade_dir)}, str(data), tmp_path / "r" / "base-k1", blocks=["mid", "up0"],
            timesteps=[10, 100], baselines=(), progress=False)
    (tmp_path / "r" / "timings.jsonl").write_text(json.dumps(dict(name="base-k1", args="--stage base", features_s=1,
                                                                  probe_s=1, bytes=1000)) + "\n")
    out = _run("frozen_recipes_table.py", tmp_path / "r", "--out", tmp_path / "t.md",
               timeout=900)  # ~20 s alone; beside two busy jobs on 2 cores it passed 300 s (session 25)
    rows = table_rows(out)
    assert [r["head"] for r in rows] == ["linear", "linear, 3 best views", "mlp", "mlp, 3 best views"]
    assert rows[1]["view chosen"].count("@t") in (1, 3) and all(0 <= number(r["test acc"]) <= 1 for r in rows)
    assert json.loads((tmp_path / "t.json").read_text())[0]["features"] == "base-k1"


def test_autoguidance(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    out = _run("autoguidance.py", "--model", tiny_cascade_dir, "--guides", tiny_cascade_dir, "--weights", "1", "2",
               "--data", data, "--n", "4", "--n-real", "8", "--steps", "2", "--precision", "no", "--no-judge",
               "--out", tmp_path / "ag", "--table", tmp_path / "a.md")
    rows = table_rows((tmp_path / "a.md").read_text())
    assert [r["row"] for r in rows] == ["single", f"autoguidance w=1, guide {tiny_cascade_dir.name}",
                                        f"autoguidance w=2, guide {tiny_cascade_dir.name}"], out
    measured = json.loads((tmp_path / "a.json").read_text())
    assert measured[0]["name"] == "single" and all(math.isfinite(r["kid"]) and r["n"] == 4 for r in measured)


def test_fusion_table_reads_the_sweep_and_adds_the_source_routes(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    common = ("--data", data, "--n", "4", "--n-real", "8", "--steps", "2", "--precision", "no", "--no-judge")
    _run("autoguidance.py", "--model", tiny_cascade_dir, "--guides", tiny_cascade_dir, "--weights", "2", "--cfg",
         "1.5", *common, "--out", tmp_path / "ag")
    out = _run("fusion_table.py", "--single", tiny_cascade_dir, "--source", tiny_cascade_dir, "--autoguidance",
               tmp_path / "ag" / "autoguidance.json", *common, "--out", tmp_path / "ft", "--table", tmp_path / "f.md")
    rows = table_rows((tmp_path / "f.md").read_text())
    assert [r["row"].split(" ")[0] for r in rows] == ["single", "autoguidance", "interpolation", "guidance", "switch:"], out
    assert rows[0]["vs single"] == "" and rows[1]["vs single"].endswith("std)")  # each row against the single one
    measured = json.loads((tmp_path / "f.json").read_text())
    assert all(math.isfinite(r["kid"]) and r["n"] == 4 for r in measured)


def test_guidance_cost(tmp_path, tiny_cascade_dir):
    out = _run("guidance_cost.py", "--model", tiny_cascade_dir, "--guide", tiny_cascade_dir, "--n", "2",
               "--repeats", "1", "--precision", "no", "--out", tmp_path / "g.json")
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["autoguidance_over_cfg"] > 0 and set(result["seconds_per_image"]) == {"cfg", "autoguidance"}, out


def test_under_load(tmp_path, tiny_cascade_dir):
    out = _run("under_load.py", "--model", tiny_cascade_dir, "--steps", "1", "--warmup", "1", "--batch", "2",
               "--repeats", "1", "--settings", "1 thread", "--out", tmp_path / "u.json")
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["1 thread"] and rows[0]["slowdown"] > 0, out


def test_peers_refuses_a_contender_whose_package_is_missing_before_any_run():
    import importlib.util

    if importlib.util.find_spec("imagen_pytorch") is not None:
        pytest.skip("imagen-pytorch is installed here: nothing is missing")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "peers.py"), "--train", "ours,imagen-pytorch", "--sample",
                           "none"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "imagen-pytorch is not installed" in done.stderr and not done.stdout


def test_under_load_auto_and_a_whole_command(tmp_path, tiny_cascade_dir):
    out = _run("under_load.py", "--model", tiny_cascade_dir, "--steps", "1", "--warmup", "1", "--batch", "2",
               "--repeats", "1", "--settings", "auto (threads from the load, the command line's default)", "--out",
               tmp_path / "u.json")
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert rows[0]["env"] == {"IMAGEN_TRANSFER_THREADS": "auto"} and rows[0]["slowdown"] > 0, out
    command = f"{sys.executable} -c \"import pathlib; pathlib.Path('{{out}}').mkdir()\""
    out = _run("under_load.py", "--command", command, "--command-dir", tmp_path / "c", "--out", tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())
    assert (tmp_path / "c" / "alone").is_dir() and (tmp_path / "c" / "loaded").is_dir(), out
    assert result["alone"]["seconds"] > 0 and result["loaded"]["phases"] is None and result["slowdown"] > 0


def test_inception_bf16(tmp_path, tiny_feature_env):
    data = make_npz(tmp_path / "toy.npz")
    out = _run("inception_bf16.py", "--data", data, "--n", "8", "--repeats", "1", "--out", tmp_path / "i.json")
    result = json.loads((tmp_path / "i.json").read_text())
    assert len(result["rows"]) == 2 and result["rows"][0]["set"].endswith("val (real)"), out
    assert result["speedup"] > 0 and 0 <= result["feature_change"]["median"] < 0.1
    assert all(math.isfinite(r["kid_shift_in_std"]) and r["fp32"]["fid"] >= 0 for r in result["rows"])


def test_roofline(tmp_path, tiny_cascade_dir, tiny_feature_env):
    out = _run("roofline.py", "--model", tiny_cascade_dir, "--peak-size", "128", "--batch", "2", "--steps", "1",
               "--out", tmp_path / "r.json", "--table", tmp_path / "r.md")
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["peaks"]) == 4 and all(r["conv_gflops"] > 0 for r in result["peaks"])
    assert {r["job"].split(",")[0] for r in result["jobs"]} >= {"training", "sampling step"}, out
    assert all(0 < r["of_conv_peak"] for r in result["jobs"]) and result["training_step_profile"]


def test_shard_soup(tmp_path, tiny_cascade_dir, tiny_feature_env):
    data = make_npz(tmp_path / "pneumoniamnist.npz")
    out = _run("shard_soup.py", "--source", tiny_cascade_dir, "--data", data, "--shards", "2", "--steps", "2",
               "--n", "4", "--n-real", "8", "--precision", "no", "--out", tmp_path / "soup", "--table",
               tmp_path / "s.md", "--set", "data.val_split=val", "data.val_size=8", "train.stages=[base]",
               "train.batch_size=4", "train.warmup_steps=1", "train.val_every=0", "sample.steps=2",
               "train.mixed_precision=no", "--parts")
    rows = table_rows((tmp_path / "s.md").read_text())
    assert [r["model"] for r in rows] == ["single", "soup of 2 shard fine-tunes", "shard 0 alone",
                                          "shard 1 alone"], out
    measured = json.loads((tmp_path / "s.json").read_text())
    assert all(math.isfinite(r["kid"]) for r in measured)
    trained = [json.loads(line) for line in (tmp_path / "soup" / "shard-1" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in trained) == 1  # half the budget per shard


def test_fid_speed(tmp_path):
    out = _run("fid_speed.py", "--dim", 32, "--sizes", 20, 10, 100, 80, "--repeats", 1, "--out", tmp_path / "f.json")
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [(r["n_real"], r["n_fake"]) for r in rows] == [(20, 10), (100, 80)] and "speed-up" in out
    assert all(r["gap"] < 1e-3 * r["fid"] for r in rows)  # the same distance, by the two routes
