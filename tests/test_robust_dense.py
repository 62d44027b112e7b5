"""Issue #35: no silent wrong labels and no tracebacks from any data file. Each test here failed on the code before
the issue (a wrong class, a merged colour, a traceback) and names the finding it covers."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_npz
from PIL import Image
from test_dense import make_masks, make_voc
from test_robust_cli import run

from imagen_transfer import masks
from imagen_transfer.datasets import load_dataset
from imagen_transfer.dense import load_dense
from imagen_transfer.errors import UserError
from imagen_transfer.jobs.cli import main


def _png(path: Path, value, size=8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


# ------------------------------------------------------------------ 1. one class list per data set, every split


def _animals(root: Path) -> Path:
    for name, n in [("aardvark", 1), ("bee", 5), ("cat", 5)]:
        for i in range(n):
            _png(root / name / f"{i}.png", 40 * i + 7 * len(name))
    return root


@pytest.mark.parametrize("as_zip", [False, True])
def test_every_split_numbers_classes_as_the_whole_data_set_does(tmp_path, as_zip):
    root = _animals(tmp_path / "animals")
    spec = root
    if as_zip:
        spec = tmp_path / "animals.zip"
        with zipfile.ZipFile(spec, "w") as z:
            for f in sorted(root.rglob("*.png")):
                z.write(f, f.relative_to(root).as_posix())
    parts = {s: load_dataset(str(spec), s, resolution=8) for s in ("train", "val", "test")}
    assert len(parts["train"]) == 7 and len(parts["test"]) == 2  # aardvark (one image) lands in train only
    for split, data in parts.items():
        assert data.label_names == ["aardvark", "bee", "cat"], split
        for label, caption in zip(data.labels.tolist(), data.captions):  # index and caption name the same class
            assert caption == f"a photo of a {data.label_names[label]}", split


def test_npz_classes_number_by_value_across_splits(tmp_path):
    path = tmp_path / "digits.npz"
    np.savez(path, train_images=np.zeros((12, 8, 8), np.uint8), train_labels=np.arange(12) % 12,
             test_images=np.zeros((3, 8, 8), np.uint8), test_labels=np.array([2, 10, 11]))
    test = load_dataset(str(path), "test", resolution=8)
    assert test.label_names == [str(i) for i in range(12)]  # numeric, not '0', '1', '10', '11', '2'
    assert test.labels.tolist() == [2, 10, 11]


def test_integer_metadata_labels_sort_numerically(tmp_path):
    root = tmp_path / "meta"
    rows = []
    for i, label in enumerate([9, 10, 2, 10, 9, 2]):
        _png(root / f"{i}.png", 30 * i)
        rows.append(json.dumps({"file_name": f"{i}.png", "label": label, "text": f"class {label}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    data = load_dataset(str(root), "all", resolution=8)
    assert data.label_names == ["2", "9", "10"] and data.labels.tolist() == [1, 2, 0, 2, 1, 0]


def test_an_image_outside_the_class_folders_is_refused_a_readme_ignored(tmp_path):
    root = _animals(tmp_path / "animals")
    (root / "README.md").write_text("my animals")
    assert load_dataset(str(root), "all", resolution=8).label_names == ["aardvark", "bee", "cat"]
    _png(root / "stray.png", 3)
    with pytest.raises(UserError, match="stray.png: an image outside the class folders"):
        load_dataset(str(root), "train", resolution=8)


def test_a_text_file_named_npz_is_called_what_it_is(tmp_path):
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(UserError, match=r"notes.npz: not an .npz file \(an .npz is a zip of .npy arrays"):
        load_dataset(str(tmp_path / "notes.npz"), "train")


# ------------------------------------------------------------------ 2. a sharded index missing an entry


def test_a_sharded_index_missing_an_entry_is_refused(tiny_cascade, tmp_path, capsys):
    from imagen_transfer.cascade import load_cascade, save_cascade

    out = save_cascade(tiny_cascade, tmp_path / "sharded", max_shard_size="200KB")
    index = out / "base/unet/diffusion_pytorch_model.safetensors.index.json"
    load_cascade(out)  # whole: loads
    meta = json.loads(index.read_text())
    dropped = sorted(meta["weight_map"])[3]
    del meta["weight_map"][dropped]
    index.write_text(json.dumps(meta))
    line = run(["info", out], capsys)
    assert "weights are not in its safetensors files" in line and dropped in line


# ------------------------------------------------------------------ 3. and 5. masks: colours, stray values, void


def _mask_set(root: Path, masks_: list[np.ndarray], class_map: dict | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, m in enumerate(masks_):
        shape = np.asarray(m).shape[:2]
        Image.fromarray(np.full(shape + (3,), 50 + i, np.uint8)).save(root / "images" / f"{i:03d}.png")
        (Image.fromarray(m) if not isinstance(m, Image.Image) else m).save(root / "masks" / f"{i:03d}.png")
    if class_map is not None:
        (root / "class_map.json").write_text(json.dumps(class_map))
    return root


def _rgb_masks(n=10, size=16):
    out = []
    for i in range(n):
        m = np.zeros((size, size, 3), np.uint8)
        m[: size // 2, :, 0] = 255  # red
        m[size // 2:, : size // 2, 2] = 255  # blue
        m[size // 2:, size // 2:, 0] = 97  # dark red: gray 29, like blue, through convert("L")
        out.append(np.roll(m, i, axis=1))
    return out


def test_rgb_masks_keep_their_colours_apart(tmp_path):
    root = _mask_set(tmp_path / "rgb", _rgb_masks())
    data = load_dense(str(root), "all")
    assert data.class_names == ["#610000", "#ff0000", "#0000ff"] or sorted(data.class_names) == sorted(
        ["#610000", "#ff0000", "#0000ff"])
    assert len(set(data.class_names)) == 3 and data.masks.unique().tolist() == [0, 1, 2]
    red = data.class_names.index("#ff0000")
    first = data.masks[0]
    assert (first[:8] == red).all() and len(first[8:].unique()) == 2  # blue and dark red stay two classes


def test_a_colour_class_map_names_colours_and_ambiguity_is_refused(tmp_path):
    cmap = {"#ff0000": "cell", "0,0,255": "nucleus", "97, 0, 0": "border"}
    root = _mask_set(tmp_path / "rgb", _rgb_masks(), cmap)
    assert load_dense(str(root), "all").class_names == ["nucleus", "border", "cell"]  # in value order
    (root / "class_map.json").write_text(json.dumps({"#ff0000": "cell", "255,0,0": "tumour", "#0000ff": "b"}))
    with pytest.raises(UserError, match="same mask value as another key"):
        load_dense(str(root), "all")
    (root / "class_map.json").write_text(json.dumps({"#ff00": "cell"}))
    with pytest.raises(UserError, match="is not a mask value"):
        load_dense(str(root), "all")


def _wbc_like(n=20, size=30, stray=()):
    """0 / 128 / 255 masks (a disc with a core) and `stray` (value, image, pixels) specks."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2 - (i % 5)) ** 2)
        out.append(np.where(d < 4, 255, np.where(d < 9, 128, 0)).astype(np.uint8))
    for value, image, count in stray:
        out[image].flat[:count] = value
    return out


def test_stray_mask_values_are_ignored_and_reported_not_made_classes(tmp_path):
    root = _mask_set(tmp_path / "wbc", _wbc_like(n=40, stray=[(2, 0, 1), (7, 3, 1), (24, 5, 1)]))
    with pytest.warns(UserWarning, match=r"3 pixels of 3 stray mask values ignored .*2: 1"):
        data = load_dense(str(root), "all")
    assert data.class_names == ["0", "128", "255"]
    assert (data.masks == masks.IGNORE).sum() == 3 and data.masks[0].flatten()[0] == masks.IGNORE
    # a value on many pixels is a class, not noise
    root2 = _mask_set(tmp_path / "four", _wbc_like(n=40, stray=[(60, i, 30) for i in range(40)]))
    assert load_dense(str(root2), "all").class_names == ["0", "60", "128", "255"]
    # with a class map, a frequent value outside it is refused with the fix; stray ones are still ignored
    (root2 / "class_map.json").write_text(json.dumps({"0": "background", "128": "cytoplasm", "255": "nucleus"}))
    with pytest.raises(UserError, match=r"mask values 60 \(1200 pixels\) are not in the class map.*null to ignore"):
        load_dense(str(root2), "all")
    (root2 / "class_map.json").write_text(json.dumps({"0": "bg", "60": None, "128": "cyto", "255": "nucleus"}))
    data = load_dense(str(root2), "all")
    assert data.class_names == ["bg", "cyto", "nucleus"] and (data.masks == masks.IGNORE).sum() == 1200


def test_voc_palette_masks_ignore_the_void_index(tmp_path):
    palette = masks.voc_colormap().flatten().tolist()
    made = []
    for m in _wbc_like(n=20):
        p = Image.fromarray(np.where(m == 255, 255, np.where(m == 128, 1, 0)).astype(np.uint8), mode="P")
        p.putpalette(palette)
        made.append(p)
    root = _mask_set(tmp_path / "voc", made)
    with pytest.warns(UserWarning, match="VOC's void index 255 ignored"):
        data = load_dense(str(root), "all")
    assert data.class_names == ["0", "1"] and (data.masks == masks.IGNORE).any()


def test_ignored_pixels_are_neither_trained_on_nor_scored():
    from imagen_transfer.segmentation import masked_cross_entropy, segmentation_scores

    truth = torch.tensor([[0, 1, masks.IGNORE, 1]])
    pred = torch.tensor([[0, 1, 0, 1]])
    assert segmentation_scores(pred, truth, ["a", "b"])["miou"] == 1.0  # the ignored pixel's miss does not count
    logits = torch.randn(4, 2)
    assert torch.allclose(masked_cross_entropy(logits, truth[0]),
                          torch.nn.functional.cross_entropy(logits[[0, 1, 3]], truth[0, [0, 1, 3]]))
    assert masked_cross_entropy(logits, torch.full((4,), masks.IGNORE)) == 0  # not NaN


def test_a_split_without_usable_pairs_says_why(tmp_path):
    root = make_masks(tmp_path / "seg", n=1)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "000.png")  # wrong size
    with pytest.raises(UserError, match=r"no usable image \+ mask pairs \(.*size differs from their image"):
        load_dense(str(root), "train")


# ------------------------------------------------------------------ 4. YOLO names, and the parsers' tracebacks


def _yolo(root: Path, names_yaml: str, label: bytes = b"0 0.5 0.5 0.2 0.2\n") -> Path:
    for split in ("train", "val"):
        _png(root / "images" / split / "a.png", 90, size=16)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / "a.txt").write_bytes(label)
    (root / "data.yaml").write_text(names_yaml)
    return root


@pytest.mark.parametrize("names_yaml,message", [
    ("names: cells\n", r"'names' must be a non-empty list or mapping.*names: \[cells\]"),
    ("names:\n", "got missing"),
    ("names: []\n", "non-empty list"),
    ("nc: 2\n", "got missing"),
    ("names: {a: cells}\n", "must map an integer index"),
    ("names: [cells, cells]\n", "repeats a class name"),
    ("names: [cells\n", "not valid YAML"),
])
def test_yolo_names_are_a_list_or_a_mapping_or_one_error(tmp_path, names_yaml, message):
    with pytest.raises(UserError, match=message):
        load_dense(str(_yolo(tmp_path / "y", names_yaml)), "train")


def test_yolo_names_mapping_with_a_gap_maps_by_index(tmp_path):
    root = _yolo(tmp_path / "y", "names: {0: rbc, 2: wbc}\n", b"2 0.5 0.5 0.4 0.4\n1 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning, match=r"class index outside \[0, 2\]"):
        data = load_dense(str(root), "train")
    assert data.class_names == ["rbc", "wbc"] and data.box_labels[0].tolist() == [1]  # 2 is wbc, not out of range


def test_a_yolo_label_file_that_is_not_text_skips_its_image(tmp_path):
    root = _yolo(tmp_path / "y", "names: [cells]\n", b"\xff\xfe0 0.5\x80")
    _png(root / "images" / "train" / "b.png", 20, size=16)
    with pytest.warns(UserWarning, match="label file is not UTF-8 text skipped"):
        data = load_dense(str(root), "train")
    assert data.names == ["images/train/b.png"]


def _voc_with(tmp_path, edit) -> Path:
    root = make_voc(tmp_path / "voc", n=6, faults=False)
    edit(root)
    return root


def _set_in_xml(old: str, new: str):
    def edit(root):
        xml = root / "Annotations" / "img_000.xml"
        xml.write_text(xml.read_text().replace(old, new))
    return edit


@pytest.mark.parametrize("edit,fault", [
    (_set_in_xml("<height>48</height>", "<height>abc</height>"), "unreadable <size>"),
    (_set_in_xml("<height>48</height>", ""), "unreadable <size>"),
])
def test_voc_size_faults_are_counted(tmp_path, edit, fault):
    with pytest.warns(UserWarning, match=fault):
        assert len(load_dense(str(_voc_with(tmp_path, edit)), "all")) == 6


def test_a_voc_list_file_that_is_not_text_is_one_error(tmp_path):
    root = _voc_with(tmp_path, lambda r: (r / "ImageSets/Main/train.txt").write_bytes(b"img_000\n\xff\xfe"))
    with pytest.raises(UserError, match="train.txt: not UTF-8 text"):
        load_dense(str(root), "train")


def _coco(root: Path, annotations, categories=None) -> Path:
    _png(root / "images" / "a.png", 80, size=16)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}], "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "cell"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize("annotation,fault", [
    ({"id": 7, "image_id": 1, "category_id": 1}, "without a numeric"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": ["a", 1, 2, 3]}, "without a numeric"),
    ({"id": 7, "image_id": 1, "category_id": [1], "bbox": [1, 1, 4, 4]}, "unknown category id"),
    ("not an object", "annotations that are not objects"),
])
def test_coco_annotation_faults_are_counted(tmp_path, annotation, fault):
    good = {"id": 8, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6]}
    with pytest.warns(UserWarning, match=fault):
        data = load_dense(str(_coco(tmp_path / "c", [annotation, good])), "all")
    assert data.boxes[0].shape == (1, 4)


@pytest.mark.parametrize("categories,message", [
    ([{"id": 1}], "must be a list of"),
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "appears twice"),
    ({"id": 1, "name": "a"}, "must be a list of"),
])
def test_coco_category_errors_are_one_line(tmp_path, categories, message):
    with pytest.raises(UserError, match=message):
        load_dense(str(_coco(tmp_path / "c", [], categories)), "all")


# ------------------------------------------------------------------ full disk, output paths, leftovers


def test_a_full_disk_before_init_writes_is_one_line_with_the_space_needed(tmp_path, capsys, monkeypatch):
    from imagen_transfer import outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 10_000)
    code = main(["init", "--preset", "tiny", "--out", str(tmp_path / "c")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, lines
    assert "no space left for cascade" in lines[0] and "needs about" in lines[0] and "0.0 MB free" in lines[0]
    assert str(tmp_path) in lines[0] and not list(tmp_path.iterdir())  # nothing half-written left


def test_a_disk_that_fills_during_a_safetensors_write_is_one_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = main(["init", "--preset", "tiny", "--out", str(tmp_path / "c")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "no space left on device" in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one(tmp_path, monkeypatch):
    from imagen_transfer import checkpoint, outputs

    model = {"w": torch.zeros(1000)}
    first = checkpoint.save_checkpoint(tmp_path, "base", 1, model=model, ema=model, optimizer={"state": {},
                                       "param_groups": []}, state={})
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 100)
    with pytest.raises(OSError, match="needs about"):
        checkpoint.save_checkpoint(tmp_path, "base", 2, model=model, ema=model,
                                   optimizer={"state": {}, "param_groups": []}, state={})
    assert checkpoint.latest_checkpoint(tmp_path, "base") == first
    assert not list((tmp_path / "checkpoints/base").glob("*.tmp"))


def test_sample_refuses_an_output_name_without_an_image_extension_before_sampling(tiny_cascade_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    import imagen_transfer.interop as interop

    monkeypatch.setattr(interop, "open_model", lambda *a, **k: pytest.fail("opened the model before the check"))
    line = run(["sample", "--model", tiny_cascade_dir, "--prompt", "a cat", "--out", tmp_path / "grid_noext"],
               capsys)
    assert "not an image format" in line and ".png" in line


def test_probe_checks_its_out_folder_before_reading_features(tmp_path, capsys):
    features = tmp_path / "not-read"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years")
    assert "holds files this tool did not write" in run(["probe", "--features", features, "--out", mine], capsys)


def test_stale_partial_folders_of_a_save_are_removed(tmp_path):
    from imagen_transfer.outputs import remove_stale_partials

    (tmp_path / ".cascade.partial-abc123" / "base").mkdir(parents=True)
    (tmp_path / ".cascade.old-x1" / "cascade").mkdir(parents=True)
    (tmp_path / ".other.partial-1").mkdir()
    (tmp_path / "cascade.partial-notours").mkdir()
    assert remove_stale_partials(tmp_path / "cascade") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1", "cascade.partial-notours"]


def test_the_data_command_reports_counts_classes_and_faults(tmp_path, capsys):
    root = _mask_set(tmp_path / "wbc", _wbc_like(n=20, stray=[(9, 0, 1)]))
    assert main(["data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 16 images at 30x30, segmentation (masks)" in out and "classes ['0', '128', '255']" in out
    assert "fault: " in out and "stray mask values" in out
    npz = make_npz(tmp_path / "pneumoniamnist.npz", n_train=8, n_val=4)
    assert main(["data", str(npz), "--splits", "train", "val", "--resolution", "28"]) == 0
    assert "train: 8 images at 28px" in capsys.readouterr().out


def test_study_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years")
    assert "holds files this tool did not write" in run(["study", "transfer", "--out", mine], capsys)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_report_checks_the_run_folder_is_writable_before_plotting(tmp_path, capsys, monkeypatch):
    import errno

    from imagen_transfer import outputs
    from imagen_transfer.jobs import report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(report, "plot_curves", lambda *a, **k: pytest.fail("plotted before the check"))
    assert "is not writable" in run(["report", tmp_path], capsys)


def test_an_error_naming_a_control_character_stays_one_line(tmp_path, capsys):
    """Found by the COCO fuzzer: an image id "\\x1e" (a record separator, which splits lines) in the message."""
    coco = _coco(tmp_path / "c", [])
    meta = json.loads((coco / "annotations.json").read_text())
    meta["images"].append({"id": "\x1e", "file_name": "../x.png"})
    (coco / "annotations.json").write_text(json.dumps(meta))
    line = run(["data", coco], capsys)
    assert "image \\x1e: file_name '../x.png' escapes the dataset root" in line


def test_the_mask_census_is_read_once_per_data_set(tmp_path, monkeypatch):
    """Every split needs the whole data set's class table; its evidence (every mask) is read once, not per split."""
    from imagen_transfer import dense

    root = _mask_set(tmp_path / "wbc", _wbc_like(n=20))
    reads, real = [], masks.read_mask
    monkeypatch.setattr(masks, "read_mask", lambda data, where: reads.append(where) or real(data, where))
    parts = [load_dense(str(root), split) for split in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 20 and len(reads) == 20 + 20  # the census, then each split its own
    assert dense._mask_census.cache_info().hits >= 2
