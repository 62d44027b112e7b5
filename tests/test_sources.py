"""Issue #36, seam 1: a data set (and a feature folder) is opened once and passed on as an object."""

import json

import torch
from conftest import make_image_folder, make_npz
from safetensors.torch import save_file
from test_dense import make_masks, make_voc

from imagen_transfer import sources
from imagen_transfer.datasets import load_dataset
from imagen_transfer.dense import load_dense
from imagen_transfer.features import open_features
from imagen_transfer.sources import KNOWN, known_for, open_source


def test_kinds_and_layouts_are_detected_once(tmp_path):
    npz = open_source(str(make_npz(tmp_path / "pneumoniamnist.npz")))
    folder = open_source(str(make_image_folder(tmp_path / "imgs", metadata=False)))
    voc = open_source(str(make_voc(tmp_path / "voc")))
    seg = open_source(str(make_masks(tmp_path / "seg")))
    assert (npz.kind, npz.layout, npz.name) == ("npz", "npz", "pneumoniamnist")
    assert (folder.kind, folder.layout, folder.name, folder.dense) == ("image-text", "folder", None, False)
    assert (voc.kind, voc.layout, voc.dense) == ("detection", "voc", True)
    assert (seg.kind, seg.layout) == ("segmentation", "masks")


def test_the_registry_matches_by_name_file_or_stem_only():
    assert known_for("wbc-seg")[0] == "wbc-seg" and known_for("/x/bccd-voc.zip")[0] == "bccd"
    assert known_for("/elsewhere/pneumoniamnist.npz")[1] is KNOWN["pneumoniamnist"]
    assert known_for("/data/wbc") == (None, None) and known_for("/data/bccd-mini.zip") == (None, None)


def test_a_data_set_is_resolved_once_and_then_passed_as_an_object(tmp_path, monkeypatch):
    path = make_npz(tmp_path / "pneumoniamnist.npz", n_train=8, n_val=4)
    found = []
    real_find = sources._find
    monkeypatch.setattr(sources, "_find", lambda spec: found.append(spec) or real_find(spec))
    source = open_source(str(path))
    for split in ("train", "val"):
        data = load_dataset(source, split, resolution=8)
    assert found == [str(path)] and data.label_names == ["normal", "pneumonia"]
    seg = open_source(str(make_masks(tmp_path / "seg")))
    for split in ("train", "test"):
        load_dense(seg, split)
    assert found == [str(path), str(tmp_path / "seg")]


def test_a_feature_folder_reads_a_set_only_when_asked(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    for name in ("a", "b"):
        save_file({"train/x": torch.full((2, 3), float(ord(name)))}, folder / f"{name}.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"sets": {n: {"file": f"{n}.safetensors"} for n in "ab"}}))
    opened = open_features(folder)
    assert list(opened.sets) == ["a", "b"] and not opened.sets._loaded
    assert opened.sets["b"]["train/x"][0, 0] == ord("b") and list(opened.sets._loaded) == ["b"]
    assert open_features(opened) is opened and str(opened) == str(folder)
