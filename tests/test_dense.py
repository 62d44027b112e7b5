"""Dense prediction: the four data layouts and their faults, multi-block maps, CenterNet targets / decoding / COCO mAP
against oracles, segmentation scores, and the features -> probe path end to end on a tiny cascade."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_transfer.errors import UserError

CLASSES = ("cell", "dot")


def _scene(rng, width: int, height: int, boxes):
    """A dark image with a bright filled rectangle per box (class 0 red-ish, class 1 blue-ish)."""
    img = (rng.random((height, width, 3)) * 40).astype(np.uint8)
    for cls, (x0, y0, x1, y1) in boxes:
        img[int(y0):int(y1), int(x0):int(x1)] = (220, 60, 60) if cls == 0 else (60, 60, 220)
    return img


def _random_boxes(rng, width, height, count):
    out = []
    for _ in range(count):
        w, h = rng.integers(width // 5, width // 2), rng.integers(height // 5, height // 2)
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        out.append((int(rng.integers(0, 2)), (int(x0), int(y0), int(x0 + w), int(y0 + h))))
    return out


def make_voc(root: Path, n: int = 12, width: int = 64, height: int = 48, faults: bool = True) -> Path:
    """A Pascal VOC folder: `n` images, split 6 / 3 / 3 by ImageSets; image 0 carries one box reaching outside the
    image and one degenerate box when `faults`."""
    rng = np.random.default_rng(0)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = [f"img_{i:03d}" for i in range(n)]
    for i, stem in enumerate(stems):
        boxes = _random_boxes(rng, width, height, 2)
        Image.fromarray(_scene(rng, width, height, boxes)).save(root / "JPEGImages" / f"{stem}.png")
        extra = [(0, (50, 30, 70, 60)), (1, (10, 10, 10, 20))] if faults and i == 0 else []
        objects = "".join(f"<object><name>{CLASSES[c]}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                          f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in boxes + extra)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{width}</width><height>{height}</height>"
            f"</size>{objects}</annotation>")
    parts = {"train": stems[: n // 2], "val": stems[n // 2: 3 * n // 4], "test": stems[3 * n // 4:]}
    for split, members in parts.items():
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(members) + "\n")
    return root


def make_masks(root: Path, n: int = 20, size: int = 32, class_map: bool = False) -> Path:
    """images/ + masks/ with values 0 / 128 / 255 (a disc of 128 with a 255 core on each image's blob)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 9)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        mask = np.where(d < r / 2, 255, np.where(d < r, 128, 0)).astype(np.uint8)
        img = np.stack([mask // 2 + 40, mask // 3 + 20, 255 - mask // 2], -1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.bmp")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    if class_map:
        (root / "class_map.json").write_text(json.dumps({"0": "background", "128": "cytoplasm", "255": "nucleus"}))
    return root


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, Path(folder.name) / f.relative_to(folder))
    return path


def test_voc_folder_and_zip_read_alike_with_boxes_scaled_and_faults_counted(tmp_path):
    from imagen_transfer.dense import load_dense
    from imagen_transfer.sources import open_source

    voc = make_voc(tmp_path / "voc")
    with pytest.warns(UserWarning, match="1 boxes reaching outside the image clipped"):
        folder = load_dense(str(voc), "train", size=(24, 32))
    with pytest.warns(UserWarning):
        zipped = load_dense(str(_zip(voc, tmp_path / "voc.zip")), "train", size=(24, 32))
    assert open_source(str(voc)).kind == "detection" and folder.layout == "voc" and folder.class_names == list(CLASSES)
    assert len(folder) == 6 and folder.images.shape == (6, 24, 32, 3)
    assert torch.equal(folder.images, zipped.images) and all(torch.equal(a, b) for a, b in zip(folder.boxes, zipped.boxes))
    assert any("1 degenerate boxes dropped" in f for f in folder.faults)
    # image 0: two boxes plus the clipped one (50..64 x 30..48 in 64 x 48 pixels, halved), the degenerate one dropped
    assert len(folder.boxes[0]) == 3
    assert folder.boxes[0][2].tolist() == [25.0, 15.0, 32.0, 24.0]
    with pytest.raises(UserError, match="this data set's splits: test, train, val"):
        load_dense(str(voc), "validation")


def test_coco_and_yolo_layouts_agree_with_voc(tmp_path):
    from imagen_transfer.dense import load_dense

    voc = load_dense(str(make_voc(tmp_path / "voc", faults=False)), "all")
    images = sorted((tmp_path / "voc" / "JPEGImages").iterdir())
    coco_root = tmp_path / "coco"
    (coco_root / "images").mkdir(parents=True)
    coco = dict(images=[], annotations=[], categories=[dict(id=7, name="cell"), dict(id=9, name="dot")])
    yolo = tmp_path / "yolo"
    for sub in ("images/train", "labels/train"):
        (yolo / sub).mkdir(parents=True)
    (yolo / "data.yaml").write_text("names: [cell, dot]\ntrain: images/train\n")
    for i, (path, boxes, labels) in enumerate(zip(images, voc.boxes, voc.box_labels)):
        (coco_root / "images" / path.name).write_bytes(path.read_bytes())
        (yolo / "images/train" / path.name).write_bytes(path.read_bytes())
        coco["images"].append(dict(id=i + 100, file_name=path.name, width=64, height=48))
        lines = []
        for b, k in zip(boxes.tolist(), labels.tolist()):
            coco["annotations"].append(dict(id=len(coco["annotations"]), image_id=i + 100, category_id=(7, 9)[k],
                                            bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]]))
            lines.append(f"{k} {(b[0] + b[2]) / 128} {(b[1] + b[3]) / 96} {(b[2] - b[0]) / 64} {(b[3] - b[1]) / 48}")
        (yolo / "labels/train" / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    coco["annotations"].append(dict(id=999, image_id=100, category_id=3, bbox=[1, 1, 5, 5]))
    (coco_root / "annotations.json").write_text(json.dumps(coco))
    (yolo / "labels/train/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (yolo / "labels/train" / f"{images[1].stem}.txt").open("a").write("5 0.5 0.5 0.1 0.1\n")

    with pytest.warns(UserWarning, match="1 boxes with an unknown category id dropped"):
        from_coco = load_dense(str(coco_root), "all")
    with pytest.warns(UserWarning) as caught:
        from_yolo = load_dense(str(yolo), "train")
    messages = " ".join(str(w.message) for w in caught)
    assert "1 label files without an image skipped" in messages and "class index outside 0..1" in messages
    for other in (from_coco, from_yolo):
        assert other.class_names == ["cell", "dot"] and torch.equal(other.images, voc.images)
        for a, b, la, lb in zip(other.boxes, voc.boxes, other.box_labels, voc.box_labels):
            assert torch.allclose(a, b, atol=1e-4) and torch.equal(la, lb)
    # a single annotations.json gets the seeded split: disjoint parts that cover everything
    parts = {s: set(load_dense(str(coco_root), s).names) for s in ("train", "val", "test")}
    assert not parts["train"] & parts["test"] and set.union(*parts.values()) == set(from_coco.names)


def test_masks_layout_classes_split_and_faults(tmp_path):
    from imagen_transfer.dense import load_dense

    root = make_masks(tmp_path / "seg")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "019.png")  # wrong size
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "lonely.bmp")
    with pytest.warns(UserWarning) as caught:
        data = {s: load_dense(str(root), s) for s in ("train", "val", "test", "all")}
    messages = " ".join(str(w.message) for w in caught)
    assert "images without a mask skipped" in messages and "size differs from their image" in messages
    assert data["all"].class_names == ["0", "128", "255"] and data["all"].task == "segmentation"
    assert len(data["all"]) == 19 and set(data["all"].masks.unique().tolist()) == {0, 1, 2}
    assert sum(len(data[s]) for s in ("train", "val", "test")) == 19
    assert not set(data["train"].names) & set(data["test"].names)
    (root / "class_map.json").write_text(json.dumps({"0": "background", "128": "cytoplasm", "255": "nucleus"}))
    assert load_dense(str(root), "val").class_names == ["background", "cytoplasm", "nucleus"]
    (root / "class_map.json").write_text(json.dumps({"0": "background", "255": "nucleus"}))
    with pytest.raises(UserError, match=r"mask values 128 \(\d+ pixels\) are not in the class map"):
        load_dense(str(root), "val")


def test_not_a_dense_layout_is_one_clear_error(tmp_path):
    from imagen_transfer.dense import load_dense
    from imagen_transfer.sources import open_source

    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    assert open_source(str(tmp_path / "stuff")).kind == "image-text"
    with pytest.raises(UserError, match="not a detection or segmentation data set"):
        load_dense(str(tmp_path / "stuff"))


def _random_scene_targets(n=4, grid=(12, 16), stride=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(n):
        # centres on distinct cells, off the cell corners, so each object owns its peak
        cells = torch.randperm(grid[0] * grid[1], generator=gen)[:3]
        cy, cx = (cells // grid[1]).float() + 0.3, (cells % grid[1]).float() + 0.6
        w, h = 1 + 4 * torch.rand(3, generator=gen), 1 + 3 * torch.rand(3, generator=gen)
        boxes.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * stride)
        labels.append(torch.randint(2, (3,), generator=gen))
    return boxes, labels


def test_centernet_oracle_decodes_to_perfect_map_and_metric_responds():
    from imagen_transfer.detection import centernet_targets, coco_map, decode

    grid, stride = (12, 16), 4
    boxes, labels = _random_scene_targets(grid=grid, stride=stride)
    t = centernet_targets(boxes, labels, 2, grid, stride)
    assert int(t["mask"].sum()) == 12 and t["heat"].max() == 1
    oracle = (t["heat"], t["size"], t["offset"])  # decode reads heat-map probabilities (detection_maps' output)
    preds = decode(oracle, stride)
    perfect = coco_map(preds, boxes, labels, ["a", "b"], (48, 64))
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    for p in preds:  # every box shifted right by 30% of its width: IoU 0.54, so AP50 holds and AP@[.5:.95] falls
        width = p["boxes"][:, 2] - p["boxes"][:, 0]
        p["boxes"] = p["boxes"] + torch.stack([width, torch.zeros_like(width)] * 2, 1) * 0.3
    shifted = coco_map(preds, boxes, labels, ["a", "b"], (48, 64))
    assert shifted["map50"] == pytest.approx(1.0) and shifted["map"] < 0.2
    empty = coco_map([dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))]
                     * len(boxes), boxes, labels, ["a", "b"], (48, 64))
    assert empty["map50"] == 0


def test_flip_augmentation_equals_targets_of_flipped_boxes():
    from imagen_transfer.detection import centernet_targets, flip_targets

    grid, stride = (12, 16), 4
    boxes, labels = _random_scene_targets(grid=grid, stride=stride, seed=3)
    width = grid[1] * stride
    flipped = [torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1) for b in boxes]
    t = centernet_targets(boxes, labels, 2, grid, stride)
    want = centernet_targets(flipped, labels, 2, grid, stride)
    x = torch.randn(len(boxes), 5, *grid)
    fx, got = flip_targets(x, t, torch.ones(len(boxes), dtype=torch.bool))
    assert torch.equal(fx, x.flip(-1))
    for key in ("heat", "size", "offset", "mask"):
        assert torch.allclose(got[key].float(), want[key].float(), atol=1e-5), key


def test_pixel_sampling_equals_upsampling_and_segmentation_scores():
    from imagen_transfer.segmentation import sample_pixels, segmentation_scores

    x = torch.randn(3, 4, 6, 8)
    masks = torch.randint(3, (3, 24, 32))
    feats, target = sample_pixels(x, masks, 50, torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(x, size=(24, 32), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(0)
    i, py, px = torch.randint(3, (50,), generator=gen), torch.randint(24, (50,), generator=gen), \
        torch.randint(32, (50,), generator=gen)
    assert torch.allclose(feats, up[i, :, py, px], atol=1e-5) and torch.equal(target, masks[i, py, px])
    perfect = segmentation_scores(masks, masks, ["bg", "a", "b"])
    assert perfect["miou"] == pytest.approx(1.0)
    truth = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])  # class 0: IoU 1/2, Dice 2/3; class 1: IoU 2/3, Dice 4/5
    s = segmentation_scores(pred, truth, ["bg", "fg"])
    assert s["per_class"]["bg"]["iou"] == pytest.approx(0.5) and s["per_class"]["fg"]["dice"] == pytest.approx(0.8)
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2) and s["miou_foreground"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def dense_sets(tmp_path_factory, tiny_cascade_dir):
    from imagen_transfer.features import extract_dense

    root = tmp_path_factory.mktemp("dense")
    voc = make_voc(root / "voc", n=16, width=64, height=48, faults=False)
    seg = make_masks(root / "seg", n=20, size=32)
    kw = dict(blocks=["mid", "up0"], timesteps=[50], progress=False, batch_size=8)
    return dict(detection=extract_dense({"tiny": str(tiny_cascade_dir)}, str(voc), root / "fd", size=(32, 48), **kw),
                segmentation=extract_dense({"tiny": str(tiny_cascade_dir)}, str(seg), root / "fs", **kw))


def test_dense_feature_folder(dense_sets, tiny_cascade):
    from imagen_transfer.features import load_features

    manifest, sets = load_features(dense_sets["detection"])
    assert manifest["task"] == "detection" and manifest["size"] == [32, 48] and manifest["grid"] == [8, 12]
    assert set(sets) == {"tiny", "random", "pixels"}
    channels = tiny_cascade.stage("sr").unet.config.block_out_channels[-1]
    assert sets["tiny"]["train/mid@t50"].shape == (8, channels, 8, 12)
    assert sets["tiny"]["train/mid@t50"].dtype == torch.float16
    assert sets["pixels"]["test/pixels"].shape == (4, 48, 8, 12)
    assert manifest["sets"]["tiny"]["megabytes"] > 0
    # the space-to-depth pixel baseline is lossless: folding it back gives the images
    from imagen_transfer.data import to_float
    from imagen_transfer.dense import load_dense

    test = load_dense(manifest["dataset"], "test", size=(32, 48))
    back = torch.nn.functional.pixel_shuffle(sets["pixels"]["test/pixels"].float(), 4)
    assert torch.allclose(back, to_float(test.images), atol=1e-2)


def test_dense_size_must_fit_the_unet(tmp_path, tiny_cascade_dir):
    from imagen_transfer.features import extract_dense

    voc = make_voc(tmp_path / "voc", n=8, faults=False)
    with pytest.raises(UserError, match="must be a multiple of 4"):
        extract_dense({"tiny": str(tiny_cascade_dir)}, str(voc), tmp_path / "f", size=(30, 48), progress=False)
    assert not (tmp_path / "f").exists()


def test_tiled_extraction_stitches_the_tiles_maps_in_place(tmp_path, tiny_cascade_dir):
    """--tile: images cut into row-major tiles and the maps stitched back in place (checked on index images); the
    whole image as its one tile is the untiled extraction; a tile that does not divide the size is refused first."""
    from imagen_transfer.features import extract_dense, from_tiles, load_features, to_tiles

    x = torch.arange(2 * 8 * 12 * 3).reshape(2, 8, 12, 3)
    tiles = to_tiles(x, 4, 6)
    assert tiles.shape == (8, 4, 6, 3) and torch.equal(tiles[1], x[0, :4, 6:]) and torch.equal(tiles[6], x[1, 4:, :6])
    assert torch.equal(from_tiles(tiles.permute(0, 3, 1, 2), 2, 2), x.permute(0, 3, 1, 2))

    voc = make_voc(tmp_path / "voc", n=8, faults=False)
    kw = dict(blocks=["up1"], timesteps=[50], baselines=(), progress=False, size=(32, 48))
    folders = {name: extract_dense({"tiny": str(tiny_cascade_dir)}, str(voc), tmp_path / name, tile=tile, **kw)
               for name, tile in (("whole", None), ("one-tile", (32, 48)), ("tiled", (16, 24)))}
    (whole_m, whole), (_, one), (tiled_m, tiled) = (load_features(folders[n]) for n in ("whole", "one-tile", "tiled"))
    assert tiled_m["tile"] == [16, 24] and tiled_m["grid"] == whole_m["grid"] == [8, 12]
    assert all(torch.equal(whole["tiny"][k], one["tiny"][k]) for k in whole["tiny"])
    assert all(tiled["tiny"][k].shape == whole["tiny"][k].shape for k in whole["tiny"])
    assert not torch.equal(tiled["tiny"]["test/up1@t50"], whole["tiny"]["test/up1@t50"])  # each tile seen alone
    with pytest.raises(UserError, match="tile 16x20 must divide the task size 32x48"):
        extract_dense({"tiny": str(tiny_cascade_dir)}, str(voc), tmp_path / "bad", tile=(16, 20), **kw)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("task", ["detection", pytest.param("segmentation", marks=pytest.mark.slow)])
def test_dense_probe_end_to_end(dense_sets, task):
    from imagen_transfer.dense_probe import run_dense

    folder = dense_sets[task]
    result = run_dense(folder, folder / "probe", task=task, steps=30, seeds=2, labelled=(4, None), ensemble=2,
                       progress=False)
    key = "map50" if task == "detection" else "miou"
    assert set(result["sets"]) == {"tiny", "random", "pixels"}
    for r in result["sets"].values():
        assert 0 <= r["test"][key] <= 1 and len(r["label_efficiency"]["4"]) == 2 and r["lr"] in result["lrs"]
        all_labels = r["label_efficiency"]["all"]  # the chosen head first, then a refit per further seed
        assert len(all_labels) == 2 and all_labels[0] == r["test"]
    written = json.loads((folder / "probe" / f"probe-{task}.json").read_text())
    assert written["sets"]["pixels"]["test"][key] == result["sets"]["pixels"]["test"][key]
    assert len(result["plots"]) == 3 and all((folder / "probe" / p).is_file() for p in result["plots"])
    if task == "segmentation":  # the colour blobs are separable from pixels alone: the pixel MLPs must learn them
        assert result["sets"]["pixels"]["test"]["miou"] > 0.6
    else:  # bright rectangles on a dark ground, colour by class: from pixels a CenterNet head finds most of them
        # (0.80 measured; a broken target, decode or score path gives ~0), whatever the CPU's rounding
        assert result["sets"]["pixels"]["test"]["map50"] > 0.5
    with pytest.raises(UserError, match="not (segmentation|detection)"):
        run_dense(folder, folder / "other", task="segmentation" if task == "detection" else "detection")


def test_end_to_end_fits_show_their_steps(dense_sets, tmp_path, capsys):
    """A scratch or backbone fit takes minutes on a CPU: with progress on, each shows a bar of its steps, named by
    its set, label count, lr and seed; the heads on cached maps (seconds) add none."""
    from imagen_transfer.dense_probe import probe_dense

    probe_dense(dense_sets["detection"], steps=2, scratch_steps=3, seeds=1, labelled=(None,), lrs=(1e-3,),
                scratch=True, only=["scratch", "pixels"], progress=True)
    err = capsys.readouterr().err
    # The bar is drawn when it opens ("0/3": its total is the fit's 3 steps); it is not left behind when done and
    # tqdm redraws it only every 0.1 s, so whether a later count shows depends on the machine's speed.
    assert "scratch (8 labelled, lr 0.001, seed 0):   0%" in err and " 0/3 [" in err
    assert "pixels (" not in err


def test_fused_set_is_its_parts_maps_side_by_side(dense_sets, tmp_path):
    """`fuse`: one more set whose maps are the parts' standardised maps concatenated (U-Net channels, then the 48
    pixel channels), probed like any other; a group naming an unknown set is refused before any head trains."""
    from imagen_transfer.dense_probe import probe_dense, run_dense, stacked_views
    from imagen_transfer.features import load_features

    folder = dense_sets["detection"]
    result, chosen = probe_dense(folder, steps=3, seeds=1, labelled=(None,), fuse=[["tiny", "pixels"]],
                                 only=["tiny+pixels"], progress=False)
    assert list(result["sets"]) == ["tiny+pixels"] and 0 <= result["sets"]["tiny+pixels"]["test"]["map50"] <= 1
    manifest, sets = load_features(folder)
    parts = [stacked_views(sets[n], manifest["sets"][n]["views"], ["train", "val", "test"])["test"]
             for n in ("tiny", "pixels")]
    assert torch.equal(chosen["tiny+pixels"][1], torch.cat(parts, 1))
    with pytest.raises(UserError, match="--fuse needs two or more of tiny, random, pixels"):
        run_dense(folder, tmp_path / "bad", task="detection", fuse=[["tiny", "nope"]], progress=False)
    assert not (tmp_path / "bad").exists()


def test_cli_features_and_probe_on_a_dense_data_set(tmp_path, tiny_cascade_dir, capsys):
    from imagen_transfer.jobs.cli import main

    seg = make_masks(tmp_path / "seg", n=12, size=24, class_map=True)
    out = tmp_path / "features"
    assert main(["features", "--model", f"tiny={tiny_cascade_dir}", "--data", str(seg), "--blocks", "mid",
                 "--timesteps", "50", "--baselines", "pixels", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "segmentation" and manifest["stage"] == "sr" and set(manifest["sets"]) == {"tiny", "pixels"}
    assert main(["probe", "--features", str(out), "--task", "segmentation", "--head", "conv", "--steps", "5",
                 "--seeds", "1"]) == 0
    assert "| tiny |" in capsys.readouterr().out and (out / "probe-segmentation.json").is_file()
    assert main(["probe", "--features", str(out), "--task", "segmentation", "--steps", "3", "--sets", "scratch",
                 "--scratch", "--labelled", "2", "all", "--seeds", "2", "--out", str(tmp_path / "scratch")]) == 0
    scratch = json.loads((tmp_path / "scratch" / "probe-segmentation.json").read_text())
    assert scratch["machine"]["cpu"]["name"] and scratch["machine"]["threads"] >= 1  # what the fits ran on
    assert list(scratch["sets"]) == ["scratch"] and [len(v) for v in scratch["sets"]["scratch"]["label_efficiency"]
                                                     .values()] == [2, 2]
    capsys.readouterr()
    # wrong combinations are one line each, before any work
    assert main(["probe", "--features", str(out), "--task", "classification", "--head", "conv"]) == 2
    assert main(["probe", "--features", str(out), "--task", "detection"]) == 2
    assert main(["probe", "--features", str(out), "--task", "segmentation", "--sets", "nope",
                 "--out", str(tmp_path / "nope")]) == 2
    assert main(["features", "--model", str(tiny_cascade_dir), "--data", str(seg), "--baselines", "text",
                 "--out", str(tmp_path / "f2")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 4 and "does not apply to --task classification" in errors[0]
    assert "not detection" in errors[1] and "no feature set nope" in errors[2] and "--baselines text" in errors[3]
    assert not (tmp_path / "f2").exists() and not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_transfer_without_labels_fine_tunes_on_tiles_then_extracts(tmp_path, tiny_cascade_dir):
    """The end-to-end path: fine-tune the source cascade on the target's images (template captions, no labels),
    then read dense features from the fine-tuned model beside the source."""
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.jobs.cli import main

    voc = make_voc(tmp_path / "voc", n=8, faults=False)
    tiles = load_dataset(str(voc), "train", resolution=16)
    assert len(tiles) == 4 * 3 * 4 and tiles.images.shape[1:] == (16, 16, 3)  # 48 x 64 images: 3 x 4 tiles each
    assert set(tiles.captions) == {"an image"} and (tiles.labels == -1).all() and "tiles of 16x16" in tiles.source
    with pytest.raises(UserError, match="without image labels"):
        load_dataset(str(voc), "train", resolution=16, captions=["a photo of a {label}"])
    run = tmp_path / "run"
    assert main(["finetune", "--source", str(tiny_cascade_dir), "--data", str(voc), "--method", "freeze",
                 "--out", str(run),
                 "--set", "train.stages=[sr]", "train.steps=2", "train.batch_size=4", "train.val_every=0",
                 "train.sample_every=0",
                 "train.checkpoint_every=2", "train.mixed_precision=no", "data.val_split=val", "data.val_size=4",
                 "sample.steps=2", "data.captions=['a microscope image']"]) == 0
    out = tmp_path / "features"
    assert main(["features", "--model", f"source={tiny_cascade_dir}", "--model", f"tuned={run / 'cascade'}",
                 "--data", str(voc), "--blocks", "mid", "--timesteps", "50", "--baselines", "none",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sets"]) == {"source", "tuned"} and manifest["task"] == "detection"


def test_decoding_takes_channels_last_outputs():
    """A head fed a permuted (NHWC-strided) image tensor returns channels-last outputs; decoding must read them."""
    from imagen_transfer.detection import decode

    heat, size, offset = (torch.randn(2, c, 6, 8).contiguous(memory_format=torch.channels_last) for c in (3, 2, 2))
    plain = decode((heat.contiguous(), size.contiguous(), offset.contiguous()), 4)
    strided = decode((heat, size, offset), 4)
    assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(plain, strided))


def _mirror_symmetric_(conv: torch.nn.Conv2d) -> None:
    """Make a conv's kernels equal to their own mirror image, so the conv commutes with a left-right flip."""
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)


def test_flip_test_maps_the_mirror_image_back():
    """CenterNet's flip test: for a head that commutes with mirroring, the mirror's maps, mapped back, are the
    image's own, so averaging changes nothing (a forgotten flip-back would mirror the heat-map); for any head the
    flip-tested heat-map and sizes of the mirror image are the image's mirrored; offsets are the image's alone."""
    from imagen_transfer.detection import CenterNetHead, decode, detection_maps

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 8)
    head = CenterNetHead(5, 3, width=8)
    _mirror_symmetric_(head.trunk[2])
    plain, flipped = detection_maps(head, x), detection_maps(head, x, flip_test=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, flipped))
    torch.manual_seed(1)
    head = CenterNetHead(5, 3, width=8)  # not mirror-symmetric
    plain, flipped = detection_maps(head, x), detection_maps(head, x, flip_test=True)
    mirrored = detection_maps(head, x.flip(-1), flip_test=True)
    assert not torch.allclose(plain[0], flipped[0], atol=1e-4)
    assert torch.allclose(mirrored[0].flip(-1), flipped[0], atol=1e-6)
    assert torch.allclose(mirrored[1].flip(-1), flipped[1], atol=1e-5)
    assert torch.equal(flipped[2], plain[2])
    assert len(decode(flipped, 4, top=5)[0]["boxes"]) == 5


def test_flip_test_in_segmentation_and_in_the_probe(dense_sets, capsys):
    """Segmentation: the flip-tested conv head commutes with mirroring, pixel MLPs are unchanged by it. The probe
    scores with the flip test when asked (its test mAP is the flip-tested predictions' and the JSON says so) and
    keeps the same head's plain scores beside; the CLI refuses it for a pooled task in one line."""
    from safetensors.torch import load_file

    from imagen_transfer import dense_probe as dp
    from imagen_transfer import detection as det
    from imagen_transfer import segmentation as seg
    from imagen_transfer.features import load_features
    from imagen_transfer.jobs.cli import main
    from imagen_transfer.probe_report import dense_markdown

    torch.manual_seed(0)
    x, size = torch.randn(3, 5, 6, 8), (12, 16)
    conv = [seg.ConvSegHead(5, 3, width=8).eval()]
    assert torch.equal(seg.segment(conv, "conv", x.flip(-1), size, flip_test=True),
                       seg.segment(conv, "conv", x, size, flip_test=True).flip(-1))
    mlps = [seg.PixelMLP(5, 3).eval() for _ in range(2)]
    assert torch.equal(seg.segment(mlps, "mlp", x, size, flip_test=True), seg.segment(mlps, "mlp", x, size))

    folder = dense_sets["detection"]
    result, chosen = dp.probe_dense(folder, steps=30, seeds=1, labelled=(None,), only=["pixels"], flip_test=True,
                                    progress=False)
    manifest, _ = load_features(folder)
    head, test_x = chosen["pixels"]
    truth = det.boxes_of(load_file(Path(folder) / manifest["targets"]), "test")
    expected = det.coco_map(det.predict(head, test_x, manifest["stride"], flip_test=True), *truth,
                           manifest["label_names"], tuple(manifest["size"]))
    plain = det.coco_map(det.predict(head, test_x, manifest["stride"]), *truth, manifest["label_names"],
                        tuple(manifest["size"]))
    assert result["flip_test"] is True and result["sets"]["pixels"]["test"] == expected != plain
    assert result["sets"]["pixels"]["without_flip_test"] == dict(test=plain, label_efficiency={"all": [plain]})
    result.update(features=str(folder), dataset=manifest["dataset"], stage=manifest["stage"])
    assert "flip test" in dense_markdown(result) and "without the flip test" in dense_markdown(result)
    assert main(["probe", "--features", str(folder), "--task", "classification", "--flip-test"]) == 2
    assert "--flip-test applies to --task detection or segmentation" in capsys.readouterr().err
