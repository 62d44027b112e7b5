"""Dense-prediction datasets: object detection (boxes) and semantic segmentation (masks), for probes on U-Net maps.

Four layouts, detected from the files of a folder or zip (by path, or the short names `bccd` and `wbc-seg` in
IMAGEN_TRANSFER_DATA):

- **Pascal VOC**: `Annotations/*.xml` (`<object><name>`, `<bndbox>` xmin ymin xmax ymax in pixels), `JPEGImages/`,
  splits from `ImageSets/Main/<split>.txt`. Classes: the distinct object names of all annotations, sorted.
- **COCO**: `instances_<split>*.json` (or `<split>/annotations.json`, `<split>/_annotations.coco.json`) or one
  `annotations.json` (then a seeded split); images at `file_name` beside the json, under `images/` or `<split>/`.
  Boxes are `[x, y, width, height]`; classes are the `categories` in id order.
- **YOLO / Ultralytics**: `data.yaml` (`names`: a list, or a mapping of integer indices), `images/<split>/` and
  `labels/<split>/<stem>.txt` with one `class cx cy w h` line per box (normalised to [0, 1]).
- **Image + mask folders**: `images/` and `masks/` with matching stems and a seeded 80/10/10 split
  (`sources.seeded_split`); one class table for the whole data set from every mask (gray levels, palette indices or
  RGB colours, never colours through gray; named by a `class_map.json`, `wbc-seg`'s published names built in;
  VOC-palette void and stray values ignored and reported): see masks.py.

Images are resized (no crop: a crop would cut boxes) to the task size (h, w) the caller chooses, boxes scaled with
them (IoU is unchanged by scaling each axis, so mAP measured at the task size equals mAP at the native size), masks
resized with nearest neighbour. Real-data faults never pass silently and never stop a whole data set: each kind is
counted and reported in one line (a warning, also kept in `DenseData.faults`): boxes clipped to the image, boxes
dropped as degenerate, unknown class names or ids, label files without an image, listed images without a file, masks
whose size differs from their image, ignored mask values. A malformed file (XML, JSON, YAML, text that is not UTF-8)
is one error line that names it.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch
import yaml
from PIL import Image

from . import masks as mask_values
from .data import ImageTextData
from .errors import UserError
from .sources import (
    IMAGE_SUFFIXES,
    SPLIT_SEED,
    Archive,
    DataSource,
    detect_layout,
    open_source,
    safe_member,
    seeded_split,
)


@dataclass
class DenseData:
    """Images (N, h, w, 3) uint8 at the task size, with boxes (xyxy, task-size pixels) and box labels, or masks."""

    images: torch.Tensor
    names: list[str]
    class_names: list[str]
    task: str  # detection | segmentation
    layout: str  # voc | coco | yolo | masks
    source: str
    boxes: list[torch.Tensor] = field(default_factory=list)  # (n_i, 4) float
    box_labels: list[torch.Tensor] = field(default_factory=list)  # (n_i,) long
    masks: torch.Tensor | None = None  # (N, h, w) long class indices, masks.IGNORE (-1) where unscored
    faults: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> DenseData:
        index = [int(i) for i in index]
        return DenseData(self.images[index], [self.names[i] for i in index], self.class_names, self.task,
                         self.layout, self.source, [self.boxes[i] for i in index] if self.boxes else [],
                         [self.box_labels[i] for i in index] if self.box_labels else [],
                         None if self.masks is None else self.masks[index], list(self.faults))


class _Faults:
    """Counts faults by kind with a first example, reported as one line per kind."""

    def __init__(self, where: str):
        self.where, self.kinds, self.notes = where, {}, []

    def add(self, kind: str, example: str) -> None:
        count, first = self.kinds.get(kind, (0, example))
        self.kinds[kind] = (count + 1, first)

    def note(self, line: str) -> None:
        """A fault already counted and described by its finder (e.g. stray mask values)."""
        self.notes.append(line)

    def lines(self) -> list[str]:
        return [f"{self.where}: {n} {kind} (first: {first})" for kind, (n, first) in self.kinds.items()] + [
            f"{self.where}: {line}" for line in self.notes]


def _decode_rgb(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any decoding failure is reported with the file's name
        raise UserError(f"{where}: cannot read image ({err}); fix or remove the file") from None


def _resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if arr.shape[:2] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BICUBIC, reducing_gap=None))


def _clean_box(box: list[float], width: int, height: int, where: str, faults: _Faults) -> list[float] | None:
    """Clip a pixel xyxy box to the image (a fault), drop it when degenerate (a fault), else return it."""
    x0, y0, x1, y1 = box
    if not all(np.isfinite(box)):
        faults.add("non-finite boxes dropped", where)
        return None
    clipped = [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]
    if clipped != [x0, y0, x1, y1]:
        faults.add("boxes reaching outside the image clipped", where)
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        faults.add("degenerate boxes dropped (under 1 px wide or high after clipping)", where)
        return None
    return clipped


def _voc(archive: Archive, root: str, split: str, faults: _Faults) -> tuple[list, list[str]]:
    """[(image member, [(class name, xyxy)], (w, h) or None)] of a split, and the sorted class names of all files."""
    objects = {}
    for name in archive.names:
        if name.startswith(root + "Annotations/") and name.endswith(".xml"):
            where = archive.where(name)
            try:
                tree = ET.fromstring(archive.read(name))
            except ET.ParseError as err:
                raise UserError(f"{where}: not valid XML ({err}); fix or remove the annotation") from None
            boxes = []
            for obj in tree.iter("object"):
                cls, bb = (obj.findtext("name") or "").strip(), obj.find("bndbox")
                try:
                    box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                except (AttributeError, TypeError, ValueError):
                    faults.add("objects without a numeric bndbox dropped", where)
                    continue
                if not cls:
                    faults.add("objects without a name dropped", where)
                    continue
                boxes.append((cls, box))
            objects[PurePosixPath(name).stem] = (tree.findtext("filename"), boxes, _voc_size(tree, where, faults))
    classes = sorted({cls for _, boxes, _ in objects.values() for cls, _ in boxes})
    list_file = f"{root}ImageSets/Main/{split}.txt"
    if split == "all":
        stems = sorted(objects)
    elif list_file in archive.name_set:
        stems = [s.split()[0] for s in _text(archive, list_file).splitlines() if s.strip()]
    else:
        have = sorted(PurePosixPath(n).stem for n in archive.names if n.startswith(f"{root}ImageSets/Main/"))
        raise UserError(f"{archive.where(list_file)} does not exist (this data set's splits: {', '.join(have) or 'none'}"
                        "; pass one of them, or all)")
    items = []
    for stem in stems:
        if stem not in objects:
            faults.add("listed images without an annotation skipped", f"{list_file}: {stem}")
            continue
        filename, boxes, wh = objects[stem]
        image = next((f"{root}JPEGImages/{n}" for n in (filename, *(stem + s for s in (".jpg", ".jpeg", ".png")))
                      if n and f"{root}JPEGImages/{n}" in archive.name_set), None)
        if image is None:
            faults.add("annotations without an image skipped", f"{root}Annotations/{stem}.xml")
            continue
        items.append((image, boxes, wh))
    return items, classes


def _voc_size(tree: ET.Element, where: str, faults: _Faults) -> tuple[int, int] | None:
    """The annotation's <size> (width, height), or None (a fault when present but unreadable: the file's size is
    used)."""
    size = tree.find("size")
    if size is None:
        return None
    try:
        width, height = int(size.findtext("width").strip()), int(size.findtext("height").strip())
    except (AttributeError, ValueError):
        faults.add("annotations with an unreadable <size> (the image file's size used)", where)
        return None
    return width, height


def _text(archive: Archive, name: str) -> str:
    """A member as UTF-8 text, or one error line naming it."""
    try:
        return archive.read(name).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{archive.where(name)}: not UTF-8 text ({err}); save it as UTF-8") from None


def _coco_classes(cats, where: str, faults: _Faults) -> tuple[dict, list[str]]:
    """({category id: name}, class names in id order) of a COCO `categories` list; one error line when malformed."""
    if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise UserError(f"{where}: 'categories' must be a list of {{\"id\": ..., \"name\": ...}} objects")
    index = {}
    for cat in cats:
        key = cat["id"]
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not isinstance(cat["name"], (str, int)):
            raise UserError(f"{where}: category {cat!r} needs an integer id and a name")
        if key in index:
            raise UserError(f"{where}: category id {key!r} appears twice; give each category its own id")
        index[key] = str(cat["name"])
    names = [index[k] for k in sorted(index, key=lambda k: (isinstance(k, str), k))]
    if len(set(names)) < len(names):
        faults.add("categories sharing a name merged into one class", where)
    return index, list(dict.fromkeys(names))


def _coco_box(a: dict) -> list[float] | None:
    """An annotation's [x, y, w, h] as xyxy floats, or None when it is not four numbers."""
    bbox = a.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _coco(archive: Archive, root: str, split: str, faults: _Faults) -> tuple[list, list[str], bool]:
    """Like _voc, plus whether the split is seeded (one annotations file for all)."""
    candidates = [n for n in archive.names if n.startswith(root) and n.endswith(".json")]
    by_split = [n for n in candidates if PurePosixPath(n).name.startswith(f"instances_{split}")
                or n in (f"{root}{split}/annotations.json", f"{root}{split}/_annotations.coco.json")]
    single = [n for n in candidates if PurePosixPath(n).name in ("annotations.json", "_annotations.coco.json")
              and PurePosixPath(n).parent == PurePosixPath(root or ".")]
    seeded = not by_split
    if by_split:
        ann = by_split[0]
    elif single:
        ann = single[0]
    else:
        raise UserError(f"{archive.path}: no COCO annotations for split '{split}' (looked for instances_{split}*.json, "
                        f"{split}/annotations.json and annotations.json)")
    where = archive.where(ann)
    try:
        coco = json.loads(archive.read(ann))
        images, annotations = coco["images"], coco.get("annotations", [])
        cats = coco["categories"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{where}: not a COCO instances file ({err!r}); it needs images, annotations and "
                        "categories") from None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise UserError(f"{where}: 'images' and 'annotations' must be lists")
    index, classes = _coco_classes(cats, where, faults)
    per_image: dict = {}
    for img in images:
        if (isinstance(img, dict) and isinstance(img.get("id"), (int, str)) and not isinstance(img["id"], bool)
                and isinstance(img.get("file_name"), str) and img["file_name"]):
            per_image.setdefault(img["id"], [])
        else:
            faults.add("images without an id or a file_name skipped", f"{where} image {str(img)[:80]}")
    for a in annotations:
        if not isinstance(a, dict):
            faults.add("annotations that are not objects dropped", f"{where}: {str(a)[:80]}")
            continue
        category, image_id, box = a.get("category_id"), a.get("image_id"), _coco_box(a)
        if not isinstance(category, (int, str)) or category not in index:
            faults.add("boxes with an unknown category id dropped", f"annotation {a.get('id')}")
        elif not isinstance(image_id, (int, str)) or image_id not in per_image:
            faults.add("boxes of an unknown image id dropped", f"annotation {a.get('id')}")
        elif box is None:
            faults.add("boxes without a numeric [x, y, width, height] bbox dropped", f"annotation {a.get('id')}")
        else:
            per_image[image_id].append((index[category], box))
    folder = str(PurePosixPath(ann).parent)
    folder = "" if folder == "." else folder + "/"
    items = []
    for img in images:
        if not isinstance(img, dict) or img.get("id") not in per_image or not isinstance(img.get("file_name"), str):
            continue
        name = img["file_name"]
        member = next((m for m in (safe_member(folder.rstrip("/"), name, f"{where} image {img['id']}"),
                                   f"{folder}images/{name}", f"{folder}{split}/{name}")
                       if m in archive.name_set), None)
        if member is None:
            faults.add("listed images without a file skipped", name)
            continue
        wh = None
        if "width" in img or "height" in img:
            try:
                wh = (int(img["width"]), int(img["height"]))
            except (KeyError, TypeError, ValueError, OverflowError):
                faults.add("images with an unreadable width / height (the file's size used)", f"{where} {name}")
        items.append((member, per_image[img["id"]], wh))
    return items, classes, seeded


def _yolo(archive: Archive, root: str, split: str, faults: _Faults) -> tuple[list, list[str]]:
    ids = _yolo_names(archive, root + "data.yaml")
    classes = [ids[k] for k in sorted(ids)]
    splits = sorted({n[len(root) + 7:].split("/")[0] for n in archive.names
                     if n.startswith(root + "images/") and n.count("/") > root.count("/") + 1})
    if split not in splits:
        raise UserError(f"{archive.path}: no split '{split}' under images/ (its splits: {', '.join(splits) or 'none'})")
    images = {PurePosixPath(n).stem: n for n in archive.names if n.startswith(f"{root}images/{split}/")
              and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES}
    labels = {PurePosixPath(n).stem: n for n in archive.names if n.startswith(f"{root}labels/{split}/")
              and n.endswith(".txt")}
    for stem in sorted(set(labels) - set(images)):
        faults.add("label files without an image skipped", labels[stem])
    items = []
    for stem in sorted(images):
        boxes = []
        if stem in labels:
            try:
                text = archive.read(labels[stem]).decode("utf-8")
            except UnicodeDecodeError:
                faults.add("images whose label file is not UTF-8 text skipped", labels[stem])
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
                except (ValueError, IndexError):
                    faults.add("label lines that are not 'class cx cy w h' dropped", f"{labels[stem]}:{lineno}")
                    continue
                if cls not in ids:
                    known = f"0..{len(ids) - 1}" if sorted(ids) == list(range(len(ids))) else str(sorted(ids))
                    faults.add(f"boxes with a class index outside {known} dropped", f"{labels[stem]}:{lineno}")
                    continue
                boxes.append((ids[cls], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], "normalised"))
        items.append((images[stem], boxes, None))
    return items, classes


def _yolo_names(archive: Archive, name: str) -> dict[int, str]:
    """{class index: name} of an Ultralytics data.yaml's `names`: a list (index = position) or a mapping of
    integer indices; anything else (a bare string, an empty or missing entry) is one error line."""
    where = archive.where(name)
    try:
        spec = yaml.safe_load(archive.read(name))
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{where}: not valid YAML ({first})") from None
    names = spec.get("names") if isinstance(spec, dict) else None
    example = "names: [cells] or names: {0: cells}"
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        got = "missing" if names is None else repr(names)[:60]
        raise UserError(f"{where}: 'names' must be a non-empty list or mapping of class names, e.g. {example} (got "
                        f"{got})")
    ids = {}
    for key, value in names.items():
        if isinstance(key, bool) or not isinstance(key, int) or not isinstance(value, (str, int, float)) \
                or isinstance(value, bool) or not str(value).strip():
            raise UserError(f"{where}: names entry {key!r}: {value!r} must map an integer index to a class name, "
                            f"e.g. {example}")
        ids[key] = str(value).strip()
    if len(set(ids.values())) < len(ids):
        raise UserError(f"{where}: names repeats a class name ({sorted(ids.values())}); give each index its own name")
    return ids


def _masks(source: DataSource) -> tuple[list, dict[int, str | None] | None]:
    """[(image member, mask member)] with matching stems, and the class map (class_map.json, else the registry's
    for a shared data set, else None)."""
    archive, root = source.archive, source.root
    images = {PurePosixPath(n).stem: n for n in archive.names if n.startswith(root + "images/")
              and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES}
    masks = {PurePosixPath(n).stem: n for n in archive.names if n.startswith(root + "masks/")
             and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES}
    class_map = dict(source.known.class_map) or None
    if root + "class_map.json" in archive.name_set:
        name = root + "class_map.json"
        class_map = mask_values.parse_class_map(archive.read(name), archive.where(name))
    return [(images.get(s), masks.get(s)) for s in sorted(set(images) | set(masks))], class_map


def load_dense(spec: str | DataSource, split: str = "train", *, size: tuple[int, int] | None = None) -> DenseData:
    """A dense data set's split at task size `size` (h, w) (default: the registry's task size for a shared data set,
    else the first image's size)."""
    source = open_source(spec)
    if not source.dense:
        detect_layout(source.archive)  # raises its one line: which layouts it looked for
    path, archive, layout, root = source.path, source.archive, source.layout, source.root
    faults = _Faults(f"{path.name}:{split}")
    size = tuple(size or source.known.task_size or ()) or None
    if size is not None and (len(size) != 2 or min(size) < 8):
        raise UserError(f"task size must be (height, width), each at least 8 (got {size})")
    if layout == "masks":
        return _load_masks(source, split, size, faults)
    seeded = False
    if layout == "voc":
        items, classes = _voc(archive, root, split, faults)
    elif layout == "coco":
        items, classes, seeded = _coco(archive, root, split, faults)
    else:
        items, classes = _yolo(archive, root, split, faults)
    if seeded:
        by_member = {item[0]: item for item in items}
        items = [by_member[m] for m, *_ in seeded_split([(item[0], None, None) for item in items], split)]
    if not items:
        raise UserError(f"{path}: split '{split}' has no images")
    index = {c: i for i, c in enumerate(classes)}
    images, names, boxes, labels = [], [], [], []
    for member, objects, wh in items:
        arr = _decode_rgb(archive.read(member), archive.where(member))
        height, width = arr.shape[:2]
        if wh is not None and wh != (width, height):
            faults.add("annotations whose image size differs from the file's (file's used)", member)
        size = size or (height, width)
        sx, sy = size[1] / width, size[0] / height
        kept, kept_labels = [], []
        for cls, box, *unit in objects:
            if unit:  # YOLO: normalised
                box = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
            if cls not in index:
                faults.add("boxes with an unknown class name dropped", f"{member}: {cls}")
                continue
            clean = _clean_box(box, width, height, member, faults)
            if clean is not None:
                kept.append([clean[0] * sx, clean[1] * sy, clean[2] * sx, clean[3] * sy])
                kept_labels.append(index[cls])
        images.append(_resize_rgb(arr, size))
        names.append(member)
        boxes.append(torch.tensor(kept, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(kept_labels, dtype=torch.long))
    source = f"{path}:{split} ({layout}{', seeded split ' + str(SPLIT_SEED) if seeded else ''})"
    return _finish(DenseData(torch.from_numpy(np.stack(images)), names, classes, "detection", layout, source,
                             boxes, labels), faults)


def _usable_pairs(pairs: list, faults: _Faults | None = None) -> list[tuple[str, str]]:
    """The (image, mask) pairs that have both; the others counted as faults."""
    usable = []
    for image, mask in pairs:
        if image is None:
            if faults is not None:
                faults.add("masks without an image skipped", mask)
        elif mask is None:
            if faults is not None:
                faults.add("images without a mask skipped", image)
        else:
            usable.append((image, mask))
    return usable


@functools.lru_cache(maxsize=16)
def _mask_census(source: DataSource) -> tuple[Counter, bool]:
    """The pixel count of every mask value over every usable mask of every split, and whether all of them are
    VOC-palette masks: the class table's evidence (masks.py), read once per source rather than once per split."""
    counts, voc = Counter(), []
    for _, mask in _usable_pairs(_masks(source)[0]):
        values, is_voc = mask_values.read_mask(source.archive.read(mask), source.archive.where(mask))
        found, n = np.unique(values, return_counts=True)
        counts.update(dict(zip(found.tolist(), n.tolist())))
        voc.append(is_voc)
    return counts, bool(voc) and all(voc)


def _load_masks(source: DataSource, split: str, size, faults: _Faults) -> DenseData:
    """A split of an image + mask set; its class table from the whole data set (_mask_census), so all splits
    number classes alike and stray values are counted over the whole set."""
    archive = source.archive
    pairs, class_map = _masks(source)
    usable = _usable_pairs(pairs, faults)
    chosen = [(i, m) for i, m, *_ in seeded_split([(i, m, None) for i, m in usable], split)]
    counts, voc_void = _mask_census(source)
    decoded = []
    for image, mask in chosen:
        arr = _decode_rgb(archive.read(image), archive.where(image))
        values, _ = mask_values.read_mask(archive.read(mask), archive.where(mask))
        if values.shape != arr.shape[:2]:
            faults.add("masks whose size differs from their image skipped", f"{mask} {values.shape} vs {arr.shape[:2]}")
            continue
        decoded.append((image, arr, values))
    if not decoded:
        reasons = "; ".join(faults.lines()) or "no image has a mask with the same stem"
        raise UserError(f"{archive.path}: split '{split}' has no usable image + mask pairs ({reasons})")
    table = mask_values.class_table(counts, class_map, voc_void=voc_void, where=str(archive.path))
    for note in table.notes:
        faults.note(note)
    images, masks, names = [], [], []
    for image, arr, marr in decoded:
        hw = size or arr.shape[:2]
        images.append(_resize_rgb(arr, hw))
        m = table.apply(marr)
        if m.shape != hw:  # nearest neighbour on 32-bit values: indices and IGNORE survive as they are
            m = np.asarray(Image.fromarray(m.astype(np.int32)).resize((hw[1], hw[0]), Image.NEAREST)).astype(np.int64)
        masks.append(m)
        names.append(image)
    source = f"{archive.path}:{split} (masks, seeded split {SPLIT_SEED})"
    return _finish(DenseData(torch.from_numpy(np.stack(images)), names, table.names, "segmentation", "masks", source,
                             masks=torch.from_numpy(np.stack(masks))), faults)


def _finish(data: DenseData, faults: _Faults) -> DenseData:
    data.faults = faults.lines()
    for line in data.faults:
        warnings.warn(line, stacklevel=3)
    return data


def image_tiles(source: DataSource, split: str, *, resolution: int, channels: int = 3,
                captions: list[str] | None = None) -> ImageTextData:
    """A dense data set's images as an image-text set for fine-tuning without labels: each image at its task size
    cut into non-overlapping resolution x resolution tiles (the scale the dense features see), one caption each
    from `captions` (default: the registry's for a shared set, else "an image"); no labels (-1)."""
    templates = captions or list(source.known.captions or ("an image",))
    if any("{label}" in t or "{report}" in t for t in templates):
        raise UserError(f"{source.spec} is a detection / segmentation set without image labels: give captions without "
                        "{label} or {report}, e.g. \"data.captions=['a microscope image']\"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # box and mask faults do not touch the images; the probe reports them
        data = load_dense(source, split)
    h, w = data.images.shape[1:3]
    if min(h, w) < resolution:
        raise UserError(f"{source.spec}: images of {h}x{w} at the task size cannot give {resolution}x{resolution} tiles")
    tiles = data.images.unfold(1, resolution, resolution).unfold(2, resolution, resolution)  # N, th, tw, C, r, r
    tiles = tiles.permute(0, 1, 2, 4, 5, 3).reshape(-1, resolution, resolution, data.images.shape[3])
    if channels == 1:
        tiles = tiles.float().mean(-1, keepdim=True).round().to(torch.uint8)
    per_image = len(tiles) // len(data)
    return ImageTextData(tiles.contiguous(), [templates[i % len(templates)] for i in range(len(tiles))],
                         torch.full((len(tiles),), -1, dtype=torch.long), [],
                         f"{data.source}: {per_image} tiles of {resolution}x{resolution} per {h}x{w} image")
