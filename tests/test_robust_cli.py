"""Issue #18, command side: bad input is one `error:` line with exit code 2, before any work, and nothing the
tool did not write is changed (each case compares the folder's files before and after)."""

import json
import os
import shutil

import pytest
from test_robust_train import tree_digest

from imagen_transfer.jobs.cli import main


def run(argv, capsys) -> str:
    """Run the CLI in-process; assert exit code 2 and exactly one `error: ` line (no traceback can escape)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith(("train", "stage"))]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_init_never_deletes_or_renames_user_files(tmp_path, user_folder, capsys):
    before = tree_digest(tmp_path)
    assert "did not write" in run(["init", "--preset", "tiny", "--out", user_folder], capsys)
    assert "did not write" in run(["init", "--preset", "tiny", "--out", user_folder, "--overwrite"], capsys)
    (tmp_path / "notes.txt").write_text("a file")
    before = tree_digest(tmp_path)
    assert "is a file" in run(["init", "--preset", "tiny", "--out", tmp_path / "notes.txt"], capsys)
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_init_twice_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["init", "--preset", "tiny", "--out", str(out)]) == 0
    before = tree_digest(out)
    assert "pass --overwrite" in run(["init", "--preset", "tiny", "--out", out, "--seed", "1"], capsys)
    assert tree_digest(out) == before
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert tree_digest(out) != before


def test_merge_refuses_a_foreign_out_and_non_finite_weights(tiny_cascade_dir, user_folder, capsys, tmp_path):
    before = tree_digest(user_folder)
    assert "did not write" in run(["merge", "--models", tiny_cascade_dir, tiny_cascade_dir, "--out", user_folder],
                                  capsys)
    assert "not a finite number" in run(["merge", "--models", tiny_cascade_dir, tiny_cascade_dir, "--weights", "nan",
                                         "0.5", "--out", tmp_path / "m"], capsys)
    assert "not a finite number" in run(["merge", "--models", tiny_cascade_dir, "--scale", "inf", "--out",
                                         tmp_path / "m"], capsys)
    assert tree_digest(user_folder) == before and not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra,message", [
    (["--guidance", "nan"], "not a finite number"),
    (["--guidance", "inf"], "not a finite number"),
    (["--mix", "{model}=nan"], "finite number as the weight"),
    (["--scale", "0"], "must be between 1 and 64"),
    (["--seed", str(2**64)], "must be between 0 and"),
    (["--seed", "-1"], "must be between 0 and"),
    (["--steps", "0"], "must be >= 1"),
    (["--per-prompt", "0"], "must be >= 1"),
    (["--stages", "sr"], "needs the stage before it"),
    (["--stages", "upscaler"], "no stage 'upscaler'"),
    (["--out", "{tmp}/notes.txt/grid.png"], "is a file, not a folder"),
])
def test_sample_refuses_bad_numbers_and_stages(tiny_cascade_dir, tmp_path, capsys, extra, message):
    (tmp_path / "notes.txt").write_text("x")
    extra = [e.replace("{model}", str(tiny_cascade_dir)).replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["sample", "--model", tiny_cascade_dir, "--prompt", "a cat", "--steps", "2", "--out", tmp_path / "g.png",
            *extra]
    assert message in run(argv, capsys)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_the_compute(tiny_cascade_dir, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "not writable" in run(["sample", "--model", tiny_cascade_dir, "--prompt", "a cat", "--out",
                                      folder / "g.png"], capsys)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("extra,message", [
    (["--n-real", "-5"], "must be >= 2"), (["--n-real", "0"], "must be >= 2"), (["--batch-size", "0"], "must be >= 1"),
    (["--n", "1"], "must be >= 2"), (["--split", "dev"], "no split 'dev'"),
])
def test_evaluate_refuses_bad_counts(tiny_cascade_dir, npz_dataset, tmp_path, capsys, extra, message):
    argv = ["evaluate", "--model", tiny_cascade_dir, "--data", npz_dataset, "--n", "4", "--no-judge",
            "--out", tmp_path / "eval.json", *extra]
    assert message in run(argv, capsys)
    assert not (tmp_path / "eval.json").exists()


def test_features_limit_zero_and_foreign_out(tiny_cascade_dir, npz_dataset, user_folder, capsys):
    assert "must be >= 1" in run(["features", "--model", tiny_cascade_dir, "--data", npz_dataset, "--limit", "0"],
                                 capsys)
    assert "did not write" in run(["features", "--model", tiny_cascade_dir, "--data", npz_dataset, "--out",
                                   user_folder], capsys)


def _damaged_copy(tiny_cascade_dir, tmp_path, damage) -> str:
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_cascade_dir, copy)
    damage(copy)
    return str(copy)


WEIGHTS = "base/unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / WEIGHTS).unlink(), "is incomplete: missing"),
    (lambda c: (c / WEIGHTS).write_bytes((c / WEIGHTS).read_bytes()[:5000]), "truncated or corrupt"),
    (lambda c: (c / WEIGHTS).write_bytes(b""), "truncated or corrupt"),
    (lambda c: (c / "base/unet/config.json").write_text("{"), "truncated or corrupt"),
    (lambda c: (c / "cascade.json").write_text(json.dumps({"format": "imagen-transfer-cascade"})),
     "'stages' must be a non-empty list"),
    (lambda c: (c / "cascade.json").write_text('{"format": "imagen-transfer-cascade", "stages": [{"name": "base", '
                                               '"kind": "base", "resolution": 16}]}'), "no valid 'text_encoder'"),
    (lambda c: (c / "cascade.json").write_text("{not json"), "not valid JSON"),
])
def test_damaged_model_folders_get_one_line(tiny_cascade_dir, tmp_path, capsys, damage, message):
    assert message in run(["info", _damaged_copy(tiny_cascade_dir, tmp_path, damage)], capsys)


def test_an_unwritable_output_folder_fails_before_the_compute_on_any_user(tiny_cascade_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """The same check with the folder's refusal simulated (root ignores permission bits; a full disk looks alike)."""
    import errno

    from imagen_transfer import outputs

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    import imagen_transfer.sampling as sampling

    monkeypatch.setattr(sampling, "sample_cascade", lambda *a, **k: pytest.fail("sampled before the check"))
    assert "No space left on device" in run(["sample", "--model", tiny_cascade_dir, "--prompt", "a cat", "--out",
                                             tmp_path / "g.png"], capsys)


def test_a_disk_that_fills_up_mid_run_gives_one_line(tiny_cascade_dir, tmp_path, capsys, monkeypatch):
    import errno

    import imagen_transfer.sampling as sampling

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "g.png"))

    monkeypatch.setattr(sampling, "save_grid", full_disk)
    code = main(["sample", "--model", str(tiny_cascade_dir), "--prompt", "a cat", "--steps", "1", "--per-prompt", "1",
                 "--out", str(tmp_path / "g.png")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0] and "g.png" in lines[0]


def test_a_result_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_atomic (every result file: probe JSON, reports, manifests, configs): a disk that fills up mid-write
    leaves the previous file as it was, no temporary file beside it, and an error that names the file."""
    import errno

    from imagen_transfer import outputs

    target = tmp_path / "probe-detection.json"
    outputs.write_atomic(target, '{"old": 1}')
    assert target.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["probe-detection.json"]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(OSError, match="no space left") as err:
        outputs.write_atomic(target, '{"new": 2}')
    assert err.value.filename == str(target)
    assert target.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["probe-detection.json"]
