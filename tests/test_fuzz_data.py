"""Issue #35: the data parsers fuzzed as trusted parsers are. Hypothesis builds random, mostly malformed data sets
(VOC XML, COCO JSON, YOLO labels and yaml, masks of any size / mode / palette, npz files, image-text folders and
zips) and runs `imagen-transfer data` on each, as a user would before `features`. For every case:

- exit code 0 (faults counted), or exit code 2 with exactly one `error:` line; never a traceback (any other
  exception escapes `main` and fails the test), never exit 1 (that is for a full disk);
- on success the loaded data is sane: class indices in range, one class list shared by every split, boxes finite
  and inside the image, masks holding class indices or IGNORE only.

The fast subset runs `FAST` cases per layout (derandomised: the same cases on every machine), the slow subset `SLOW`.
A failure prints its falsifying example and the `@reproduce_failure` blob to rerun it (`print_blob`). To hunt with
fresh random cases: `IMAGEN_TRANSFER_FUZZ=5000 python -m pytest -m slow tests/test_fuzz_data.py`; the statistics of
what each case ended in: `--hypothesis-show-statistics`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagen_transfer import masks
from imagen_transfer.datasets import load_dataset
from imagen_transfer.dense import load_dense
from imagen_transfer.jobs.cli import main

FAST, SLOW = 30, 300
HUNT = int(os.environ.get("IMAGEN_TRANSFER_FUZZ", 0))  # > 0: the slow fuzzers run this many random (not fixed) cases
SPLITS = ("train", "val", "test")


def budget(n: int):
    return settings(max_examples=HUNT or n, deadline=None, derandomize=not HUNT, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def budgets(test):
    """The fuzz test in two sizes: FAST cases in the fast subset, SLOW in the slow one."""
    fast = budget(FAST)(given(case=test.strategy)(test))
    slow = pytest.mark.slow(budget(SLOW)(given(case=test.strategy)(test)))
    return fast, slow


def run_data(root: Path, *extra: str) -> int:
    """`imagen-transfer data ROOT` in-process: 0, or 2 with one `error:` line; anything else fails."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["data", str(root), "--size", "16", "16", "--resolution", "8", *extra])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code in (0, 2), (code, err.getvalue())
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    event(f"exit {code}" + (f": {lines[0].split(': ', 2)[-1][:40]}" if code else ""))  # --hypothesis-show-statistics
    return code


def check_dense(root: Path) -> None:
    """Every split that loads is sane, and all of them share one class list."""
    names = None
    for split in SPLITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                data = load_dense(str(root), split, size=(16, 16))
            except Exception as err:  # noqa: BLE001 - a split may be refused (exit 2 above covers its line)
                assert type(err).__name__ == "UserError", err
                continue
        assert names is None or data.class_names == names
        names = data.class_names
        assert len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)
        if data.task == "detection":
            for boxes, labels in zip(data.boxes, data.box_labels):
                assert boxes.isfinite().all() and (boxes[:, 2:] > boxes[:, :2]).all()
                assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 16).all() and (boxes[:, [1, 3]] <= 16).all()
                assert ((labels >= 0) & (labels < len(names))).all()
        else:
            m = data.masks
            assert (((m >= 0) & (m < len(names))) | (m == masks.IGNORE)).all()


# ----------------------------------------------------------------------------------------------- building blocks

junk_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "nan", "inf", "-3", "1e9", "12", "0", "abc",
                                                              "<x>", "&amp;", "\x00", "é"]))
numbers = st.one_of(st.integers(-50, 200), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 16]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=6))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


def rarely(draw, one_in: int = 8) -> bool:
    """True about once in `one_in` draws: faults mostly local, so that most cases load and get checked."""
    return draw(st.integers(0, one_in - 1)) == one_in // 2  # not 0 or the top: Hypothesis favours both


def png_bytes(size=(16, 16), value=90, mode="RGB") -> bytes:
    buf = io.BytesIO()
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    Image.fromarray(np.full(shape, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


good_image = st.one_of(st.tuples(st.integers(4, 24), st.integers(4, 24)).map(lambda s: png_bytes(s, 77)),
                       st.just(png_bytes((16, 16), 30, "L")))


@st.composite
def image_file(draw):
    return draw(st.binary(max_size=40)) if rarely(draw, 12) else draw(good_image)  # now and then a broken image


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def as_zip(root: Path) -> Path:
    archive = root.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(root).as_posix())
    return archive


def fuzz(build, check=None, *extra):
    """Write a case into a fresh folder (or zip), run the CLI on it, check what loads."""
    def test(case):
        files, zipped = case
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "set"
            root.mkdir()
            write(root, files)
            spec = as_zip(root) if zipped else root
            if run_data(spec, *extra) == 0 and check is not None:
                check(spec)
    test.strategy = st.tuples(build, st.booleans())
    return test


# ----------------------------------------------------------------------------------------------- VOC


@st.composite
def voc_case(draw):
    files = {}
    stems = [f"im{i}" for i in range(draw(st.integers(1, 5)))]
    for stem in stems:
        objects = ""
        for _ in range(draw(st.integers(0, 3))):
            fields = {k: str(draw(st.integers(-4, 20))) if not rarely(draw) else draw(st.one_of(numbers.map(str), junk_text))
                      for k in ("xmin", "ymin", "xmax", "ymax")}
            dropped = draw(st.sets(st.sampled_from(list(fields) + ["name", "bndbox"]), max_size=2)) if rarely(
                draw, 4) else set()
            box = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items() if k not in dropped)
            label = draw(junk_text) if rarely(draw) else draw(st.sampled_from(["cell", "rbc"]))
            name = "" if "name" in dropped else f"<name>{label}</name>"
            objects += f"<object>{name}{'' if 'bndbox' in dropped else f'<bndbox>{box}</bndbox>'}</object>"
        size = draw(st.sampled_from(["", "<size><width>16</width><height>16</height></size>",
                                     "<size><width>16</width><height>abc</height></size>", "<size><width>16</width></size>",
                                     "<size></size>"]))
        xml = f"<annotation><filename>{stem}.png</filename>{size}{objects}</annotation>".encode()
        if rarely(draw, 10):
            xml = draw(st.sampled_from([xml[: len(xml) // 2], b"\xff\xfe" + xml, xml.replace(b"<annotation>", b"")]))
        if not rarely(draw) or stem == stems[0]:
            files[f"Annotations/{stem}.xml"] = xml
        if not rarely(draw):
            files[f"JPEGImages/{stem}.png"] = draw(image_file())
    for split in SPLITS:
        listed = draw(st.lists(st.sampled_from(stems + ["missing"]) if rarely(draw, 4) else st.sampled_from(stems),
                               min_size=1, max_size=4))
        text = "\n".join(listed).encode()
        files[f"ImageSets/Main/{split}.txt"] = draw(st.sampled_from([text + b"\n\xff", b"  \n" + text])) if rarely(
            draw, 10) else text
    files.setdefault("JPEGImages/extra.png", png_bytes())
    return files


# ----------------------------------------------------------------------------------------------- COCO


@st.composite
def coco_case(draw):
    files = {"images/a.png": draw(image_file()), "images/b.png": png_bytes((12, 20)), "c.png": png_bytes()}
    images = [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}, {"id": 2, "file_name": "b.png"},
              {"id": 3, "file_name": "c.png", "width": 16, "height": "16"}]
    images += [] if not rarely(draw, 3) else draw(st.lists(st.one_of(json_any, st.fixed_dictionaries(
        {"id": json_leaf, "file_name": st.one_of(st.sampled_from(["a.png", "../x.png", "/etc/passwd", "nope.png"]),
                                                 json_leaf)})), max_size=2))
    good = st.fixed_dictionaries({"id": st.integers(0, 9), "image_id": st.sampled_from([1, 2]),
                                  "category_id": st.sampled_from([1, 2]),
                                  "bbox": st.lists(st.integers(-3, 20), min_size=4, max_size=4)})
    odd = st.one_of(
        st.fixed_dictionaries({"id": st.integers(0, 9), "image_id": st.sampled_from([1, 2, 3, "1", None]),
                               "category_id": st.one_of(st.sampled_from([1, 2, 7]), json_any),
                               "bbox": st.one_of(st.lists(numbers, min_size=4, max_size=4), json_any)}),
        json_any)
    annotations = draw(st.lists(odd if rarely(draw, 3) else good, max_size=6))
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "wbc"}]
    if rarely(draw, 6):
        categories = draw(st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"id": json_leaf, "name": json_leaf}),
                                                       json_any), max_size=3), json_any))
    coco = {"images": images, "annotations": annotations, "categories": categories}
    if rarely(draw, 10):
        coco[draw(st.sampled_from(list(coco)))] = draw(json_any)
    text = json.dumps(coco).encode()
    files["annotations.json"] = draw(st.sampled_from([text[:-3], b"\xff" + text])) if rarely(draw, 10) else text
    return files


# ----------------------------------------------------------------------------------------------- YOLO


yolo_line = st.one_of(
    st.tuples(st.integers(0, 2), *([st.floats(0, 1)] * 4)).map(lambda t: " ".join(map(str, t))),
    st.tuples(st.integers(-1, 4), *([st.floats(-0.5, 1.5, allow_nan=False)] * 4)).map(lambda t: " ".join(map(str, t))),
    st.lists(junk_text, max_size=6).map(" ".join))


@st.composite
def yolo_case(draw):
    names = draw(st.sampled_from([["rbc", "wbc"], {0: "rbc", 2: "wbc"}, ["cells"]]))
    if rarely(draw, 6):
        names = draw(st.one_of(st.just("cells"), st.just([]), st.none(), json_any))
    spec = {"names": names} if not rarely(draw, 10) else draw(st.one_of(st.just({"nc": 2}), json_any))
    text = yaml.safe_dump(spec).encode() if not rarely(draw, 10) else draw(st.binary(max_size=30))
    files = {"data.yaml": text}
    for split in SPLITS if not rarely(draw, 6) else draw(st.sets(st.sampled_from(SPLITS), min_size=1)):
        for stem in ("a", "b"):
            if draw(st.integers(0, 3)):
                files[f"images/{split}/{stem}.png"] = draw(image_file())
            lines = draw(st.lists(yolo_line, max_size=4))
            label = "\n".join(lines).encode()
            files[f"labels/{split}/{stem}.txt"] = label + b"\x80\xff" if rarely(draw, 10) else label
    return files


# ----------------------------------------------------------------------------------------------- masks


def mask_bytes(array: np.ndarray, mode: str, palette: str) -> bytes:
    buf = io.BytesIO()
    if mode == "RGB":
        img = Image.fromarray(np.stack([array * 37 % 256, array * 91 % 256, array % 256], -1).astype(np.uint8))
    elif mode == "P":
        img = Image.fromarray(array.astype(np.uint8), mode="P")
        img.putpalette(masks.voc_colormap().flatten().tolist() if palette == "voc" else list(range(256)) * 3)
    elif mode == "I;16":
        img = Image.fromarray(array.astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(array.astype(np.float32))
    else:
        img = Image.fromarray(array.astype(np.uint8))
    img.save(buf, format="TIFF" if mode == "F" else "PNG")
    return buf.getvalue()


@st.composite
def masks_case(draw):
    files = {}
    values = draw(st.lists(st.sampled_from([0, 1, 2, 128, 255, 7, 300]), min_size=1, max_size=4, unique=True))
    mode = draw(st.sampled_from(["L", "RGB", "P", "I;16", "F"] if rarely(draw, 6) else ["L", "RGB", "P", "I;16"]))
    palette = draw(st.sampled_from(["voc", "gray"]))
    for i in range(draw(st.integers(3, 12))):
        h, w = (16, 16) if not rarely(draw) else draw(st.sampled_from([(12, 20), (8, 8)]))
        rng = np.random.default_rng(i)
        array = rng.choice(values, size=(h, w))
        if draw(st.integers(0, 4)) == 0:
            array.flat[0] = draw(st.integers(0, 65535))  # a stray speck
        if not rarely(draw):
            files[f"images/{i:03d}.png"] = png_bytes((16, 16)) if not rarely(draw) else draw(image_file())
        if not rarely(draw):
            files[f"masks/{i:03d}.png"] = mask_bytes(array, mode, palette) if not rarely(draw, 12) else draw(
                st.binary(max_size=20))
    if rarely(draw, 3):
        cmap = draw(st.one_of(
            st.dictionaries(st.sampled_from(["0", "1", "128", "255", "#ff0000", "255,0,0", "x", "-1", "300"]),
                            st.one_of(st.sampled_from(["bg", "cell", "nucleus"]), st.none(), json_leaf), max_size=4),
            json_any))
        text = json.dumps(cmap).encode()
        files["class_map.json"] = draw(st.sampled_from([b"\xff" + text, text[:-1]])) if rarely(draw) else text
    files.setdefault("images/zzz.png", png_bytes())
    files.setdefault("masks/zzz.png", mask_bytes(np.zeros((16, 16), int), "L", "gray"))
    return files


# ----------------------------------------------------------------------------------------------- npz


@st.composite
def npz_case(draw):
    arrays = {}
    for split in SPLITS if not rarely(draw, 4) else draw(st.sets(st.sampled_from(SPLITS), min_size=1)):
        n = draw(st.integers(1, 6)) if not rarely(draw) else 0
        dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32] if not rarely(draw) else [np.int64, np.int8,
                                                                                                  np.bool_]))
        shape = draw(st.sampled_from([(n, 8, 8), (n, 8, 8, 1), (n, 8, 8, 3)] if not rarely(draw) else [
            (n, 8, 8, 5), (n, 8), (n,)]))
        images = np.asarray(draw(st.sampled_from([0, 1, 255, 0.5] if not rarely(draw) else [300, -1, np.nan])),
                            dtype=np.float64)
        with np.errstate(invalid="ignore"):
            arrays[f"{split}_images"] = np.full(shape, images).astype(dtype)
        if not rarely(draw, 10):
            labels = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)) if not rarely(draw) else draw(
                st.lists(st.one_of(st.integers(-2, 12), st.just(1e12)), max_size=7))
            small = all(0 <= v < 255 for v in labels)
            dtype = draw(st.sampled_from([np.int64, np.float64, np.uint8] if small else [np.float64]))
            arrays[f"{split}_labels"] = np.asarray(labels, dtype=dtype)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return {"set.npz": draw(st.sampled_from([buf.getvalue()[:50], b"plain text"])) if rarely(draw, 10) else
            buf.getvalue()}


def npz_test(case):
    files, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), files)
        path = Path(tmp) / "set.npz"
        if run_data(path) == 0:
            check_image_text(path)


npz_test.strategy = st.tuples(npz_case(), st.just(False))


# ----------------------------------------------------------------------------------------------- image-text


@st.composite
def image_text_case(draw):
    files = {}
    split_level = draw(st.booleans())
    for split in (SPLITS if split_level else ("",)):
        prefix = f"{split}/" if split else ""
        if rarely(draw, 3):  # metadata.jsonl
            rows = []
            for i in range(draw(st.integers(1, 5))):
                files[f"{prefix}{i}.png"] = draw(image_file())
                good = st.fixed_dictionaries({"file_name": st.just(f"{i}.png"), "text": st.text(max_size=8),
                                              "label": st.sampled_from(["cat", "dog", 3, 10])})
                odd = st.one_of(
                    st.fixed_dictionaries({"file_name": st.sampled_from([f"{i}.png", "../x.png", "nope.png"]),
                                           "text": st.one_of(st.text(max_size=8), json_leaf),
                                           "label": st.one_of(st.sampled_from(["cat", "dog", 3, 10]), json_leaf)}),
                    json_any)
                rows.append(json.dumps(draw(odd if rarely(draw) else good)))
            text = "\n".join(rows).encode()
            files[f"{prefix}metadata.jsonl"] = draw(st.sampled_from([text + b"\n{bad", b"\xff" + text])) if rarely(
                draw, 10) else text
        else:  # class folders
            for cls in draw(st.lists(st.sampled_from(["cat", "dog", "aardvark", ".hidden", "10", "9"]), min_size=1,
                                     max_size=3, unique=True)):
                for i in range(draw(st.integers(1, 4))):
                    files[f"{prefix}{cls}/{i}.png"] = draw(image_file())
            extras = ["README.md", ".DS_Store", "list.txt"] + (["stray.png"] if rarely(draw) else [])
            for name in draw(st.sets(st.sampled_from(extras), max_size=2)):
                files[f"{prefix}{name}"] = png_bytes() if name.endswith(".png") else b"notes"
    if not files:
        files["cat/0.png"] = png_bytes()
    return files


def check_image_text(spec: Path) -> None:
    names = None
    for split in SPLITS:
        try:
            data = load_dataset(str(spec), split, resolution=8)
        except Exception as err:  # noqa: BLE001 - a split may be refused
            assert type(err).__name__ == "UserError", err
            continue
        assert names is None or data.label_names == names, (names, data.label_names)
        names = data.label_names
        assert len(set(names)) == len(names)
        assert ((data.labels >= -1) & (data.labels < len(names))).all() and len(data.captions) == len(data)


test_voc_fast, test_voc_slow = budgets(fuzz(voc_case(), check_dense))
test_coco_fast, test_coco_slow = budgets(fuzz(coco_case(), check_dense))
test_yolo_fast, test_yolo_slow = budgets(fuzz(yolo_case(), check_dense))
test_masks_fast, test_masks_slow = budgets(fuzz(masks_case(), check_dense))
test_npz_fast, test_npz_slow = budgets(npz_test)
test_image_text_fast, test_image_text_slow = budgets(fuzz(image_text_case(), check_image_text))


FEATURE_CASES = 20


@pytest.mark.slow
@budget(FEATURE_CASES)
@given(case=st.tuples(st.one_of(voc_case(), coco_case(), yolo_case(), masks_case()), st.booleans()))
def test_features_on_a_fuzzed_dense_set_leave_their_output_absent_or_complete(tiny_cascade_dir, case):
    """`features` on a fuzzed detection / segmentation set: exit 0 with a complete feature folder (its manifest),
    or exit 2 with one error line and no output folder at all (nothing half-written to clean up)."""
    files, zipped = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        root.mkdir()
        write(root, files)
        spec, out = as_zip(root) if zipped else root, Path(tmp) / "features"
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["features", "--model", f"tiny={tiny_cascade_dir}", "--data", str(spec), "--size", "16", "16",
                         "--baselines", "none", "--blocks", "mid", "--timesteps", "50", "--out", str(out)])
        lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith(("features",
                                                                                                       "  "))]
        event(f"features exit {code}")
        assert code in (0, 2), err.getvalue()
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: ") and not out.exists(), err.getvalue()
        else:
            assert (out / "manifest.json").is_file()
