"""Issue #18, data side: splits never leak, pixel values and labels decode as stored or are refused by name."""

import zipfile

import numpy as np
import pytest
import torch
from conftest import make_image_folder, make_npz
from PIL import Image

from imagen_transfer.datasets import load_dataset
from imagen_transfer.errors import UserError


def test_a_folder_without_splits_gets_a_seeded_disjoint_recorded_split(tmp_path):
    root = make_image_folder(tmp_path / "ds", n=40, metadata=False)
    parts = {s: load_dataset(str(root), s, resolution=8) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in parts.items()}
    assert sizes == {"train": 32, "val": 4, "test": 4}  # 20 per class: 2 test, 2 val, 16 train each
    pixels = {s: {d.images[i].numpy().tobytes() for i in range(len(d))} for s, d in parts.items()}
    assert not (pixels["train"] & pixels["test"]) and not (pixels["train"] & pixels["val"])
    assert not (pixels["val"] & pixels["test"])
    assert len(load_dataset(str(root), "all", resolution=8)) == 40
    for s in ("train", "test"):
        assert parts[s].labels.bincount().tolist() == [sizes[s] // 2] * 2  # per class
        assert "seeded split, seed 0" in parts[s].source
    again = load_dataset(str(root), "test", resolution=8)
    assert torch.equal(again.images, parts["test"].images)
    with pytest.raises(UserError, match="no split folders.*got split 'dev'"):
        load_dataset(str(root), "dev", resolution=8)


def test_a_split_the_archive_lacks_is_refused(tmp_path):
    for split in ("train", "test"):
        make_image_folder(tmp_path / "src" / split, n=4, metadata=False)
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (tmp_path / "src").rglob("*.png"):
            z.write(f, "top/" + f.relative_to(tmp_path / "src").as_posix())
    assert len(load_dataset(str(archive), "test", resolution=8)) == 4
    with pytest.raises(UserError, match=r"no split 'val' \(its split folders: test, train\)"):
        load_dataset(str(archive), "val", resolution=8)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_float_and_16_bit_images_decode_like_8_bit(tmp_path):
    base = make_npz(tmp_path / "u8.npz", n_train=8, n_val=4)
    with np.load(base) as z:
        arrays = dict(z)
    reference = load_dataset(str(base), "train", resolution=28, channels=1).images
    for name, images in [("f01", arrays["train_images"] / 255.0), ("f255", arrays["train_images"].astype(np.float32)),
                         ("u16", arrays["train_images"].astype(np.uint16) * 257)]:
        path = _npz(tmp_path / f"{name}.npz", train_images=images, train_labels=arrays["train_labels"])
        decoded = load_dataset(path, "train", resolution=28, channels=1).images
        assert torch.equal(decoded, reference), name  # not black, not saturated


@pytest.mark.parametrize("images,labels,message", [
    (np.full((4, 8, 8), np.nan, np.float32), np.zeros(4), "NaN or inf"),
    (np.full((4, 8, 8), -3.0, np.float32), np.zeros(4), r"must lie in \[0, 1\] or \[0, 255\]"),
    (np.full((4, 8, 8), 300, np.int32), np.zeros(4), "must lie in 0..255"),
    (np.zeros((4, 8, 8, 5), np.uint8), np.zeros(4), "must be \\(N, H, W\\)"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(3), "3 labels for 4 images"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros((4, 2)), "one class per image"),
    (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 1]), "label 2 is out of range for 2 classes"),
    (np.zeros((4, 8, 8), np.uint8), np.array([0, -1, 0, 1]), "negative label"),
    (np.zeros((4, 8, 8), np.uint8), np.array([0.5, 1, 0, 1]), "labels must be integers"),
    (np.zeros((4, 8, 8), np.uint8), None, "has no 'train_labels'"),
])
def test_bad_npz_arrays_are_refused_by_name(tmp_path, images, labels, message):
    arrays = {"train_images": images} | ({} if labels is None else {"train_labels": labels})
    path = _npz(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(path, "train", resolution=8)
    assert "pneumoniamnist.npz" in str(err.value)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    root = tmp_path / "ds" / "gray"
    root.mkdir(parents=True)
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(root / "a.png")
    assert Image.open(root / "a.png").mode.startswith("I")
    data = load_dataset(str(tmp_path / "ds"), "all", resolution=16, channels=1)
    expected = torch.from_numpy((ramp.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert torch.equal(data.images[0, ..., 0], expected)  # saturating would make all but the first pixels 255


@pytest.mark.parametrize("line,message", [
    (b'{"file_name": "red/img0.png", "text": "caf\xe9"}', "not UTF-8"),
    (b'{"file_name": "red/img0.png", "text": 42}', "'text' must be a string caption"),
    (b'["red/img0.png"]', "must be a JSON object"),
    (b'{"file_name": 7}', "'file_name' must be a string"),
    (b'{"file_name": "red/img0.png", "label": [1]}', "'label' must be a string or an integer"),
])
def test_bad_metadata_is_refused_by_name(tmp_path, line, message):
    root = make_image_folder(tmp_path / "ds", n=2)
    (root / "metadata.jsonl").write_bytes(line + b"\n")
    with pytest.raises(UserError, match=message) as err:
        load_dataset(str(root), "all", resolution=8)
    assert "metadata.jsonl" in str(err.value)


def test_files_that_are_not_archives_are_refused(tmp_path):
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(UserError, match="fake.zip: not a readable zip archive"):
        load_dataset(str(tmp_path / "fake.zip"), "train")
    (tmp_path / "fake.npz").write_text("not an npz")
    with pytest.raises(UserError, match=r"fake.npz: not an .npz file \(an .npz is a zip"):
        load_dataset(str(tmp_path / "fake.npz"), "train")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(UserError, match="data.csv: not a dataset"):
        load_dataset(str(tmp_path / "data.csv"), "train")


def test_bad_data_fails_before_a_run_folder_exists(tmp_path):
    from test_train import tiny_config

    from imagen_transfer.train import train

    path = _npz(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((8, 28, 28), np.uint8),
                train_labels=np.zeros(6, np.uint8), val_images=np.zeros((8, 28, 28), np.uint8),
                val_labels=np.zeros(8, np.uint8))
    with pytest.raises(UserError, match="6 labels for 8 images"):
        train(tiny_config(path, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_zip_of_a_wrapping_folder_reads_its_classes_and_metadata_not_the_folder_name(tmp_path):
    """Zipping a folder puts every member under its name (`myset/cat/0.png`), macOS adds `__MACOSX/`: the classes
    are still cat and dog (they were one class 'myset' before), and a wrapped metadata.jsonl is read."""
    src = make_image_folder(tmp_path / "src", n=12, metadata=False)
    archive = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(src.rglob("*.png")):
            z.write(f, "myset/" + f.relative_to(src).as_posix())
            z.writestr("__MACOSX/myset/" + f.relative_to(src).parent.as_posix() + "/._" + f.name, b"junk")
    data = load_dataset(str(archive), "all", resolution=8)
    assert data.label_names == sorted({p.parent.name for p in src.rglob("*.png")}) and len(data) == 12
    assert "seeded split" in load_dataset(str(archive), "train", resolution=8).source
    meta = make_image_folder(tmp_path / "meta", n=6, metadata=True)
    archive = tmp_path / "wrapped-meta.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(p for p in meta.rglob("*") if p.is_file()):
            z.write(f, "top/" + f.relative_to(meta).as_posix())
    wrapped, plain = load_dataset(str(archive), "all", resolution=8), load_dataset(str(meta), "all", resolution=8)
    assert wrapped.captions == plain.captions and torch.equal(wrapped.images, plain.images)
