import json
import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_image_folder, make_npz

from imagen_transfer.data import caption_for, select_subset
from imagen_transfer.datasets import load_dataset
from imagen_transfer.errors import UserError
from imagen_transfer.sources import open_source


def test_image_folder_with_metadata(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=6)
    data = load_dataset(str(root), "all", resolution=16)
    assert data.images.shape == (6, 16, 16, 3) and data.images.dtype == torch.uint8
    assert data.captions[0] == "a red square number 0" and data.label_names == ["blue", "red"]
    assert data.labels.tolist() == [1, 0, 1, 0, 1, 0]


def test_class_subfolders_get_template_captions_and_grayscale(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=4, metadata=False)
    data = load_dataset(str(root), "all", resolution=8, channels=1, captions=["a drawing of a {label}"])
    assert data.images.shape == (4, 8, 8, 1)
    assert sorted(set(data.captions)) == ["a drawing of a blue", "a drawing of a red"]


def test_zip_with_split_folders_and_cache(tmp_path):
    root = make_image_folder(tmp_path / "src" / "train", n=4, metadata=False)
    make_image_folder(tmp_path / "src" / "test", n=2, metadata=False)
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (tmp_path / "src").rglob("*.png"):
            z.write(f, f.relative_to(tmp_path / "src").as_posix())
    train = load_dataset(str(archive), "train", resolution=16)
    test = load_dataset(str(archive), "test", resolution=16)
    assert len(train) == 4 and len(test) == 2 and root.exists()
    again = load_dataset(str(archive), "train", resolution=16)  # from the decoded cache
    assert torch.equal(again.images, train.images) and again.captions == train.captions


def test_medmnist_npz_with_report_captions(tmp_path):
    path = make_npz(tmp_path / "pneumoniamnist.npz")
    data = load_dataset(str(path), "val", resolution=32, channels=3, captions=["{report}"])
    assert data.images.shape == (16, 32, 32, 3)
    assert data.label_names == ["normal", "pneumonia"]
    assert data.captions[0].startswith("chest x-ray, normal") and data.captions[1].startswith("chest x-ray, pneumonia")
    assert torch.equal(data.images[..., 0], data.images[..., 2]), "grayscale replicated to RGB"
    with pytest.raises(UserError, match="no split 'dev'"):
        load_dataset(str(path), "dev")


def test_corrupt_and_non_image_files_are_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=4, metadata=False)
    (root / "red" / "broken.png").write_bytes(b"not a png at all")
    (root / "red" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"broken\.png: cannot read image") as err:
        load_dataset(str(root), "all", resolution=8)
    assert "skip_bad" in str(err.value)
    data = load_dataset(str(root), "all", resolution=8, skip_bad=True)
    assert len(data) == 4 and data.skipped == 2


def test_paths_escaping_the_root_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=2)
    (tmp_path / "secret.png").write_bytes((root / "red" / "img0.png").read_bytes())
    for bad in ["../secret.png", "/etc/passwd", "red/../../secret.png"]:
        (root / "metadata.jsonl").write_text(json.dumps({"file_name": bad, "text": "x"}) + "\n")
        with pytest.raises(UserError, match="escapes the dataset root"):
            load_dataset(str(root), "all", resolution=8)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "red/./img0.png", "text": "ok"}) + "\n")
    assert load_dataset(str(root), "all", resolution=8).captions == ["ok"]


def test_missing_captions_missing_files_and_empty_datasets(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=2)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "red/img0.png"}) + "\n")
    with pytest.raises(UserError, match="neither a 'text' caption nor a label"):
        load_dataset(str(root), "all", resolution=8)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "red/nothere.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(root), "all", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable images"):
        load_dataset(str(tmp_path / "empty"), resolution=8)
    with pytest.raises(UserError, match="dataset not found"):
        open_source(str(tmp_path / "nowhere"))


def test_short_names_need_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEN_TRANSFER_DATA", str(tmp_path))
    with pytest.raises(UserError, match="set IMAGEN_TRANSFER_DATA"):
        open_source("pneumoniamnist")
    make_npz(tmp_path / "pneumoniamnist.npz")
    source = open_source("pneumoniamnist")
    assert source.path == tmp_path / "pneumoniamnist.npz" and source.kind == "npz" and source.name == "pneumoniamnist"
    assert source.known.labels == ("normal", "pneumonia") and open_source(source) is source
    assert open_source("pneumoniamnist") is source  # opened once per file version


def test_subsets_are_deterministic_and_stratified():
    labels = torch.tensor([0] * 80 + [1] * 20)
    a = select_subset(labels, fraction=0.1, seed=3)
    b = select_subset(labels, fraction=0.1, seed=3)
    assert torch.equal(a, b) and (labels[a] == 0).sum() == 8 and (labels[a] == 1).sum() == 2
    assert not torch.equal(a, select_subset(labels, fraction=0.1, seed=4))
    c = select_subset(labels, per_class=5)
    assert (labels[c] == 0).sum() == 5 and (labels[c] == 1).sum() == 5
    with pytest.raises(UserError):
        select_subset(labels, fraction=0)


def test_caption_templates():
    assert caption_for("pickup_truck", 0, ["a photo of a {label}"]) == "a photo of a pickup truck"
    assert caption_for("pneumonia", 1, ["{report}"]).startswith("chest x-ray, pneumonia.")
    with pytest.raises(UserError, match="no report-like captions"):
        caption_for("cat", 0, ["{report}"])


@pytest.mark.slow
def test_real_datasets_when_present():
    """The shared data mirror: CIFAR-10 zip and PneumoniaMNIST npz with their official split sizes."""
    try:
        open_source("pneumoniamnist")
    except UserError:
        pytest.skip("IMAGEN_TRANSFER_DATA does not hold the shared datasets")
    pn = {s: load_dataset("pneumoniamnist", s, resolution=28, channels=1) for s in ("train", "val", "test")}
    assert [len(pn[s]) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert pn["train"].labels.bincount().tolist() == [1214, 3494]
    cifar = load_dataset("cifar10", "test", resolution=32, per_class=3)
    assert len(cifar) == 30 and cifar.label_names[0] == "airplane" and cifar.captions[0] == "a photo of a airplane"
    assert np.asarray(cifar.images).std() > 20


def test_fingerprint_follows_content_not_file_time(tmp_path):
    first = make_npz(tmp_path / "pneumoniamnist.npz")
    copy = tmp_path / "copy" / "pneumoniamnist.npz"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    os.utime(copy, (1, 1))  # a copy with another time (a re-materialised shared folder) keeps its caches
    assert open_source(first).fingerprint == open_source(copy).fingerprint
    copy.write_bytes(first.read_bytes()[:-1] + b"x")  # changed content: a new fingerprint
    assert open_source(first).fingerprint != open_source(copy).fingerprint


def test_shards_are_disjoint_class_balanced_and_cover_the_training_images(tmp_path):
    """K shards partition the (fraction of the) split: pairwise disjoint, together everything, each class split
    within one image; the same on every call; a training config names its shard and a shard out of range is one line."""
    from conftest import make_npz

    from imagen_transfer.config import load_config
    from imagen_transfer.data import shard_indices
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.errors import UserError

    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    parts = [shard_indices(labels, 3, k, seed=4) for k in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(20))
    for part in parts:
        counts = torch.bincount(labels[part], minlength=3)
        assert all(abs(int(c) - n / 3) < 1 for c, n in zip(counts, (10, 7, 3)))
    assert torch.equal(shard_indices(labels, 3, 1, seed=4), parts[1])
    data = make_npz(tmp_path / "toy.npz", n_train=24)
    halves = [load_dataset(str(data), "train", resolution=8, shards=2, shard=k, seed=1) for k in (0, 1)]
    assert len(halves[0]) + len(halves[1]) == 24
    assert not set(map(bytes, halves[0].images.flatten(1).numpy())) & set(map(bytes, halves[1].images.flatten(1).numpy()))
    assert load_config(None, ["data.shards=2", "data.shard=1"]).data.shard == 1
    with pytest.raises(UserError, match="data.shard must be < data.shards"):
        load_config(None, ["data.shards=2", "data.shard=2"])
