import json

import pytest
import torch

from imagen_transfer.cascade import describe, init_cascade, load_cascade, save_cascade
from imagen_transfer.errors import UserError


def test_save_load_is_bit_exact(tiny_cascade, tmp_path):
    save_cascade(tiny_cascade, tmp_path / "c")
    loaded = load_cascade(tmp_path / "c")
    assert loaded.text_encoder == tiny_cascade.text_encoder
    assert [s.name for s in loaded.stages] == ["base", "sr"] and loaded.stages[1].lowres == 16
    for a, b in zip(tiny_cascade.stages, loaded.stages):
        sa, sb = a.unet.state_dict(), b.unet.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.scheduler.config.beta_schedule == b.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    files = {p.name for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files), files
    meta = json.loads((tmp_path / "c" / "cascade.json").read_text())
    assert meta["format"] == "imagen-transfer-cascade" and meta["stages"][1]["kind"] == "sr"


def test_fp16_save_halves_the_weights_and_loads_as_fp32(tiny_cascade, tmp_path):
    save_cascade(tiny_cascade, tmp_path / "full")
    save_cascade(tiny_cascade, tmp_path / "half", dtype=torch.float16)
    size = lambda d: (d / "base" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "half") < 0.55 * size(tmp_path / "full")
    loaded = load_cascade(tmp_path / "half")
    assert next(loaded.stages[0].unet.parameters()).dtype == torch.float32
    assert next(tiny_cascade.stages[0].unet.parameters()).dtype == torch.float32, "saving must not cast the model"


def test_overwriting_a_cascade_needs_overwrite_and_replaces_only_ours(tiny_cascade, tmp_path):
    save_cascade(tiny_cascade, tmp_path / "c")
    other = init_cascade("tiny", seed=1)
    with pytest.raises(UserError, match="already holds a cascade; pass --overwrite"):
        save_cascade(other, tmp_path / "c")
    save_cascade(other, tmp_path / "c", overwrite=True)
    loaded = load_cascade(tmp_path / "c")
    first = next(iter(other.stages[0].unet.state_dict().values()))
    assert torch.equal(next(iter(loaded.stages[0].unet.state_dict().values())), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no .old / .partial left behind
    (tmp_path / "c" / "notes.txt").write_text("mine")  # a user's file inside: --overwrite must not delete it
    with pytest.raises(UserError, match="holds files this tool did not write"):
        save_cascade(other, tmp_path / "c", overwrite=True)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_save_refuses_a_file_and_a_foreign_folder_and_keeps_them(tiny_cascade, tmp_path):
    (tmp_path / "file").write_text("user data")
    with pytest.raises(UserError, match="is a file"):
        save_cascade(tiny_cascade, tmp_path / "file", overwrite=True)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="did not write"):
        save_cascade(tiny_cascade, tmp_path / "folder", overwrite=True)
    assert (tmp_path / "file").read_text() == "user data"
    assert (tmp_path / "folder" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing renamed, nothing left over
    (tmp_path / "empty").mkdir()
    save_cascade(tiny_cascade, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "cascade.json").is_file()


def test_errors_for_missing_and_foreign_folders(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        load_cascade(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no cascade.json"):
        load_cascade(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cascade.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_cascade(tmp_path / "bad")
    with pytest.raises(UserError, match="unknown preset"):
        init_cascade("enormous")


def test_describe_names_the_stages(tiny_cascade):
    text = describe(tiny_cascade)
    assert "stage base (base, 16px)" in text and "stage sr (sr, 16->32px" in text


def test_a_sharded_save_reloads_exactly_and_stays_ours(tiny_cascade, tmp_path):
    """A stage above max_shard_size is written as safetensors shards plus an index (a large IF stage by default):
    it reloads bit-exactly, counts as a cascade folder of ours (so --overwrite may replace it), and the fp16
    shipping cast reaches every shard."""
    from imagen_transfer.cascade import is_cascade_folder, weight_files

    save_cascade(tiny_cascade, tmp_path / "c", max_shard_size="1MB")
    shards = weight_files(tmp_path / "c" / "base" / "unet")
    assert shards[0].endswith(".index.json") and len(shards) > 2
    loaded = load_cascade(tmp_path / "c")
    for a, b in zip(tiny_cascade.stages, loaded.stages):
        sa, sb = a.unet.state_dict(), b.unet.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert is_cascade_folder(tmp_path / "c")
    save_cascade(tiny_cascade, tmp_path / "c", dtype=torch.float16, max_shard_size="1MB", overwrite=True)
    half = load_cascade(tmp_path / "c").stages[0].unet.state_dict()
    full = tiny_cascade.stages[0].unet.state_dict()
    assert all(torch.equal(half[k], full[k].half().float()) for k in full)
    (tmp_path / "c" / "base" / "unet" / "notes.txt").write_text("mine")
    assert not is_cascade_folder(tmp_path / "c")  # a file we did not write: --overwrite must refuse
