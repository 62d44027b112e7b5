"""Image-text and npz data sets: images + captions, decoded once into memory at the cascade's resolution.

Sources (a `sources.DataSource`: opened once from a path or a shared data set's name; `datasets.load_dataset` is
the entry point that takes a spec):
- an image folder or a zip of one, either with a `metadata.jsonl` (Hugging Face imagefolder convention:
  `file_name`, `text`, optional `label`) or with class subfolders (`<class>/<image>`); an optional split level
  (`train/`, `val/`, `test/`, ...) above either. A split the data set lacks is refused; a data set without split
  folders is split by a seeded per-class permutation (80/10/10 train/val/test, `seeded_split`, recorded in the
  data's `source`), so train and test never share an image; `all` reads every image;
- a MedMNIST `.npz` file (`train_images`, `train_labels`, `val_*`, `test_*`): uint8, uint16 or float images (floats
  in [0, 1] or [0, 255]), one integer label per image; anything else is refused with the file named.

Images are decoded in the main process (never inside a DataLoader worker), converted to RGB or grayscale,
centre-cropped and resized to the requested resolution, and held as one uint8 tensor: the datasets this toolkit
targets (CIFAR-10, MedMNIST) are a few hundred MB at most. Decoded arrays are cached on disk (npz, no pickle).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import MissingSplit, UserError
from .outputs import cache_root, replaced_atomically
from .sources import (
    IMAGE_SUFFIXES,
    SPLIT_SEED,
    Archive,
    DataSource,
    hidden,
    safe_member,
    seeded_split,
    split_levels,
)

MAX_NPZ_CLASSES = 100_000  # an npz label beyond this is a mistake, not a class index

# Report-like captions per finding, in the wording of chest X-ray reports (IU X-ray style).
REPORT_CAPTIONS = {
    "normal": [
        "chest x-ray, normal. The lungs are clear. No focal consolidation, effusion or pneumothorax.",
        "chest x-ray, normal. Clear lungs bilaterally. Normal heart size and mediastinal contours.",
        "chest x-ray, normal. No acute cardiopulmonary abnormality.",
    ],
    "pneumonia": [
        "chest x-ray, pneumonia. Patchy airspace opacities consistent with pneumonia.",
        "chest x-ray, pneumonia. Focal consolidation in the lung, compatible with infection.",
        "chest x-ray, pneumonia. Bilateral interstitial and airspace opacities suggesting pneumonia.",
    ],
}


@dataclass
class ImageTextData:
    """Decoded images (N, H, W, C) uint8, one caption each, optional integer labels and their names."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor  # (N,) long, -1 where unknown
    label_names: list[str]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def grayscale(self) -> bool:
        """True when every image has equal colour channels (an X-ray set stored as RGB counts as grayscale)."""
        x = self.images
        return x.shape[-1] == 1 or bool((x[..., :1] == x).all())

    def subset(self, idx) -> ImageTextData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageTextData(self.images[idx], [self.captions[i] for i in idx.tolist()], self.labels[idx],
                             self.label_names, self.source, self.skipped)


# ----------------------------------------------------------------------------------------------- decoding


def _to_array(data: bytes, name: str, resolution: int, channels: int) -> np.ndarray:
    """Decode, convert to RGB/L, centre-crop to a square and resize (bicubic, antialiased) to `resolution`."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: scale to 8 bits (convert("L") saturates)
            wide = np.asarray(img, dtype=np.int64)
            if wide.min() < 0 or wide.max() > 65535:
                raise ValueError(f"{img.mode} pixel values outside 0..65535")
            img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        elif img.mode == "F":
            raise ValueError("32-bit float images are not supported; save as 8- or 16-bit")
        img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    side = min(w, h)
    if w != h:
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _split_prefix(archive: Archive, split: str) -> tuple[str, bool]:
    """('train/', False) when the archive has a split level (optionally under one wrapping top folder); (the wrapping
    folder or '', True) for one without: its splits are then seeded. A split the archive does not have is refused
    (never the whole archive with its split folders read as classes)."""
    parent, splits = split_levels(archive)
    if not splits:
        if split not in ("train", "val", "test", "all"):
            raise UserError(f"{archive.path} has no split folders, so its splits are a seeded split (train / val / "
                            f"test, {SPLIT_SEED}) or all; got split '{split}'")
        return parent, True
    if split not in splits:
        raise MissingSplit(f"{archive.path}: no split '{split}' (its split folders: {', '.join(splits)})")
    return f"{parent}{split}/", False


def _entries(archive: Archive, split: str) -> tuple[list[tuple[str, str | None, str | None]], bool]:
    """(member name, text or None, label or None) for each example of a split, and whether the split is seeded."""
    prefix, seeded = _split_prefix(archive, split)
    meta_name = prefix + "metadata.jsonl"
    if meta_name in archive.name_set:
        entries = []
        try:
            text = archive.read(meta_name).decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{archive.where(meta_name)}: not UTF-8 text ({err}); save it as UTF-8") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{archive.where(meta_name)} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise UserError(f"{where}: each line must be a JSON object with a 'file_name'")
            if not isinstance(row["file_name"], str):
                raise UserError(f"{where}: 'file_name' must be a string, got {row['file_name']!r}")
            caption, label = row.get("text"), row.get("label")
            if caption is not None and not isinstance(caption, str):
                raise UserError(f"{where}: 'text' must be a string caption, got {caption!r}; quote it")
            if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
                raise UserError(f"{where}: 'label' must be a string or an integer, got {label!r}")
            member = safe_member(prefix.rstrip("/"), row["file_name"], where)
            if member not in archive.name_set:
                raise UserError(f"{where}: file '{row['file_name']}' does not exist in the dataset")
            entries.append((member, caption, None if label is None else str(label)))
        return (seeded_split(entries, split) if seeded else entries), seeded
    entries = []
    for name in archive.names:
        if not name.startswith(prefix) or name == prefix + "metadata.jsonl":
            continue
        rel = PurePosixPath(name[len(prefix):]).parts
        if hidden(name):
            continue  # hidden files (.DS_Store, ._foo, __MACOSX/)
        if len(rel) < 2 or rel[0] in ("/", ""):  # beside the class folders, not in one
            if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                raise UserError(f"{archive.where(name)}: an image outside the class folders (<class>/<image>); move it "
                                "into its class folder or remove it")
            continue  # a README, LICENSE or list file beside the class folders
        entries.append((name, None, rel[0]))
    return (seeded_split(entries, split) if seeded else entries), seeded


def class_names(labels) -> list[str]:
    """The sorted distinct class names of a data set (numerically when every name is an integer, so '10' follows
    '9')."""
    names = {str(lab) for lab in labels if lab is not None}
    numeric = all(n.isdigit() for n in names)
    return sorted(names, key=(lambda n: (int(n), n)) if numeric else None)


@functools.lru_cache(maxsize=16)
def archive_class_names(source: DataSource) -> tuple[str, ...]:
    """The class names of a whole image folder or zip: every split's labels, so all splits number classes alike
    (a class with one image lands in train only; val and test still use the data set's numbering); once per
    source."""
    _, splits = split_levels(source.archive)
    labels = set()
    for split in splits or ["all"]:
        labels |= {label for _, _, label in _entries(source.archive, split)[0]}
    return tuple(class_names(labels))


def _decode_archive(source: DataSource, split: str, resolution: int, channels: int, skip_bad: bool):
    archive, path = source.archive, source.path
    entries, seeded = _entries(archive, split)
    images, texts, labels, skipped = [], [], [], 0

    for name, text, label in tqdm(entries, desc=f"decoding {path.name}:{split}", leave=False,
                                  disable=len(entries) < 2000):
        try:
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError("not an image file (unknown extension)")
            arr = _to_array(archive.read(name), name, resolution, channels)
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported with the file's name
            if skip_bad:
                skipped += 1
                continue
            raise UserError(f"{archive.where(name)}: cannot read image ({err}); fix or remove the file, "
                            "or set data.skip_bad=true to skip unreadable files") from None
        images.append(arr)
        texts.append(text)
        labels.append(label)
    return images, texts, labels, skipped, seeded


def _npz_pixels(raw: np.ndarray, where: str) -> torch.Tensor:
    """Images of any usual storage as float pixel values in [0, 255]: uint8 as is, uint16 scaled from [0, 65535],
    floats in [0, 1] scaled by 255 (MedMNIST-style arrays saved as floats), floats already in [0, 255] kept;
    anything else (negative or non-finite values, wider integers beyond 255) refused."""
    if raw.ndim not in (3, 4) or (raw.ndim == 4 and raw.shape[-1] not in (1, 3)):
        raise UserError(f"{where}: images must be (N, H, W) or (N, H, W, 1|3), got shape {raw.shape}")
    if raw.size == 0:
        raise UserError(f"{where}: holds no images (shape {raw.shape})")
    if raw.dtype == np.uint8:
        return torch.from_numpy(raw).float()
    if raw.dtype == np.uint16:
        return torch.from_numpy(raw.astype(np.float32) * (255 / 65535))
    if np.issubdtype(raw.dtype, np.floating):
        x = torch.from_numpy(raw.astype(np.float32))
        if not torch.isfinite(x).all():
            raise UserError(f"{where}: images hold NaN or inf values")
        low, high = x.min().item(), x.max().item()
        if low >= 0 and high <= 1:
            return x * 255
        if low >= 0 and high <= 255:
            return x
        raise UserError(f"{where}: float images must lie in [0, 1] or [0, 255], found [{low:g}, {high:g}]")
    if np.issubdtype(raw.dtype, np.integer):
        if raw.min() < 0 or raw.max() > 255:
            raise UserError(f"{where}: {raw.dtype} images must lie in 0..255, found {raw.min()}..{raw.max()}; store "
                            "uint8 or uint16")
        return torch.from_numpy(raw.astype(np.float32))
    raise UserError(f"{where}: images of dtype {raw.dtype} are not supported (use uint8, uint16 or float)")


def _npz_labels(raw: np.ndarray, n_images: int, where: str, names: list[str] | None) -> list[int]:
    """One integer class per image: (N,) or (N, 1); counts must match; MedMNIST flags' labels within their names."""
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise UserError(f"{where}: labels must be one class per image, shape (N,) or (N, 1), got {raw.shape} "
                        "(multi-label data is not supported)")
    if len(raw) != n_images:
        raise UserError(f"{where}: {len(raw)} labels for {n_images} images; each image needs exactly one label")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
            and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw))):
        raise UserError(f"{where}: labels must be integers, got dtype {raw.dtype}")
    labels = raw.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise UserError(f"{where}: negative label {labels.min()}; classes are 0, 1, ...")
    if names is not None and labels.size and labels.max() >= len(names):
        raise UserError(f"{where}: label {labels.max()} is out of range for {len(names)} classes ({', '.join(names)})")
    return labels.tolist()


def _open_npz(path: Path):
    """np.load of an .npz, refusing anything else by name (numpy calls any non-zip file 'pickled data')."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserError(f"{path}: cannot read the file ({err.strerror})") from None
    if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":
        raise UserError(f"{path}: not an .npz file (an .npz is a zip of .npy arrays, written by numpy.savez)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable .npz file ({err})") from None


def _decode_npz(source: DataSource, split: str, resolution: int, channels: int):
    path = source.path
    with _open_npz(path) as npz:
        if f"{split}_images" not in npz.files:
            splits = sorted(k[: -len("_images")] for k in npz.files if k.endswith("_images"))
            raise MissingSplit(f"{path}: no split '{split}' (splits: {', '.join(splits) or 'none: no <split>_images'})")
        if f"{split}_labels" not in npz.files:
            raise UserError(f"{path}: '{split}_images' has no '{split}_labels' beside it; add one integer label per "
                            "image")
        try:
            raw, raw_labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        except ValueError as err:  # object arrays would need pickle
            raise UserError(f"{path}: cannot read '{split}' arrays ({err})") from None
    names = list(source.known.labels) if source.known.labels else None
    where = f"{path}:{split}"
    x = _npz_pixels(raw, where)
    label_ids = _npz_labels(raw_labels, len(raw), where, names)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True,
                                            align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    labels = [names[i] if names else str(i) for i in label_ids]
    return images, labels


@functools.lru_cache(maxsize=16)
def npz_class_names(source: DataSource) -> tuple[str, ...]:
    """The classes of an npz data set: a known set's names (MedMNIST), else 0 .. the largest label of any split, so
    every split numbers its classes alike (a split without the largest class keeps the others' indices)."""
    path = source.path
    if source.known.labels:
        return source.known.labels
    largest = 0
    with _open_npz(path) as npz:
        for key in (k for k in npz.files if k.endswith("_labels")):
            try:
                labels = npz[key]
                top = labels.max() if labels.size else 0
                largest = max(largest, int(top))
            except (ValueError, TypeError, OverflowError) as err:
                raise UserError(f"{path}:{key}: labels must be integers ({err})") from None
    if largest >= MAX_NPZ_CLASSES:
        raise UserError(f"{path}: label {largest} implies over {MAX_NPZ_CLASSES:,} classes; number the classes 0, 1, "
                        "2, ... consecutively")
    return tuple(str(i) for i in range(largest + 1))


def _cache_file(source: DataSource, split: str, resolution: int, channels: int, skip_bad: bool) -> Path | None:
    if source.path.is_dir():
        return None
    key = f"{source.fingerprint}|{split}|{resolution}|{channels}|{skip_bad}|v4"  # v4: wrapping top folders
    return cache_root() / "data" / (hashlib.sha1(key.encode()).hexdigest()[:24] + ".npz")


def _decoded(source: DataSource, split: str, resolution: int, channels: int, skip_bad: bool):
    """(images uint8 NHWC, texts or None each, label names or None each, skipped, seeded: whether the split is a
    seeded split of a data set without split folders); cached for zip files."""
    if source.kind == "npz":
        images, labels = _decode_npz(source, split, resolution, channels)
        return images, [None] * len(labels), labels, 0, False
    path = source.path
    cache = _cache_file(source, split, resolution, channels, skip_bad)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            texts = [t if has else None for t, has in zip(z["texts"].tolist(), z["has_text"].tolist())]
            labels = [lab if has else None for lab, has in zip(z["labels"].tolist(), z["has_label"].tolist())]
            return torch.from_numpy(z["images"]), texts, labels, int(z["skipped"]), bool(z["seeded"])
    images, texts, labels, skipped, seeded = _decode_archive(source, split, resolution, channels, skip_bad)
    if not images:
        raise UserError(f"{path}: split '{split}' holds no readable images")
    stacked = np.stack(images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(cache, stacked.nbytes, suffix=".npz") as tmp:  # np.savez adds .npz to other names
            np.savez(tmp, images=stacked, texts=np.array([t or "" for t in texts]),
                     has_text=np.array([t is not None for t in texts]), labels=np.array([lab or "" for lab in labels]),
                     has_label=np.array([lab is not None for lab in labels]), skipped=np.array(skipped),
                     seeded=np.array(seeded))
    return torch.from_numpy(stacked), texts, labels, skipped, seeded


# ----------------------------------------------------------------------------------------------- captions, subsets


def caption_for(label: str, index: int, templates: list[str]) -> str:
    """A caption from a label: report-like sentences for known findings when templates say `{report}`,
    else `templates[index % len(templates)]` with `{label}` filled in (underscores become spaces)."""
    template = templates[index % len(templates)]
    if "{report}" in template:
        sentences = REPORT_CAPTIONS.get(label)
        if sentences is None:
            raise UserError(f"no report-like captions for label '{label}'; use a '{{label}}' template")
        return template.replace("{report}", sentences[index % len(sentences)])
    return template.replace("{label}", label.replace("_", " "))


def select_subset(labels: torch.Tensor, *, fraction: float = 1.0, per_class: int | None = None, seed: int = 0) -> torch.Tensor:
    """Deterministic indices: a fraction of each class (at least one), or `per_class` of each class."""
    if not 0 < fraction <= 1:
        raise UserError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction == 1 and per_class is None:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for value in torch.unique(labels).tolist():
        members = torch.nonzero(labels == value).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        k = per_class if per_class is not None else max(1, round(fraction * len(members)))
        chosen.append(members[:k])
    return torch.cat(chosen).sort().values


def load_image_text(source: DataSource, split: str, *, resolution: int = 32, channels: int = 3,
                    captions: list[str] | None = None, skip_bad: bool = False) -> ImageTextData:
    """A split of an image folder, zip or npz with its captions (given, else from its labels and the templates
    the registry knows for it, else "a photo of a {label}"); classes numbered as the whole data set does."""
    templates = captions or list(source.known.captions or ("a photo of a {label}",))
    images, texts, label_strs, skipped, seeded = _decoded(source, split, resolution, channels, skip_bad)
    path = source.path
    if len(images) == 0:
        raise UserError(f"{path}: split '{split}' is empty")
    names = list(npz_class_names(source) if source.kind == "npz" else archive_class_names(source))
    index = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([index[lab] if lab is not None else -1 for lab in label_strs], dtype=torch.long)
    final_captions = []
    for i, (text, label) in enumerate(zip(texts, label_strs)):
        if text is None:
            if label is None:
                raise UserError(f"{path}: example {i} of split '{split}' has neither a 'text' caption nor a label")
            text = caption_for(label, i, templates)
        final_captions.append(text)
    where = f"{path}:{split}"
    if seeded:
        where += f" (seeded split, seed {SPLIT_SEED}: 80/10/10 train/val/test per class; the folder has no split folders)"
    return ImageTextData(images, final_captions, labels, names, where, skipped)


def shard_indices(labels: torch.Tensor, shards: int, shard: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of part `shard` of `shards` disjoint parts that together cover every image: each class's
    images in a seeded order dealt out in turn, so every part holds each class's share (within one image)."""
    if not 0 <= shard < shards:
        raise UserError(f"data.shard must be in [0, {shards - 1}] for data.shards={shards} (got {shard})")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for value in torch.unique(labels).tolist():
        members = torch.nonzero(labels == value).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)][shard::shards])
    return torch.cat(chosen).sort().values


def take(data: ImageTextData, *, fraction: float = 1.0, per_class: int | None = None, seed: int = 0,
         limit: int | None = None, shards: int = 1, shard: int = 0) -> ImageTextData:
    """A deterministic part of a split: a fraction or `per_class` of each class (select_subset), then part `shard`
    of `shards` disjoint ones (shard_indices: a soup's fine-tunes each see one), then at most `limit` images spread
    evenly over the rest (so over the classes)."""
    if fraction < 1 or per_class is not None:
        data = data.subset(select_subset(data.labels, fraction=fraction, per_class=per_class, seed=seed))
    if shards > 1:
        data = data.subset(shard_indices(data.labels, shards, shard, seed))
    if limit is not None and limit < len(data):
        data = data.subset(torch.linspace(0, len(data) - 1, limit).round().long())
    return data


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Float images (N, C, H, W) to size x size (or (h, w)): area averaging to shrink, bilinear to enlarge, as-is if
    equal."""
    h, w = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    mode = "area" if h <= x.shape[-2] and w <= x.shape[-1] else "bilinear"
    return torch.nn.functional.interpolate(x, size=(h, w), mode=mode)


def random_window(size: tuple[int, int], crop: tuple[int, int], align: int, gen: torch.Generator) -> tuple[int, int]:
    """The top-left corner (y, x) of a random `crop` window inside `size`, at multiples of `align` pixels (a
    feature grid's stride), drawn from `gen` (y first)."""
    (h, w), (ch, cw) = size, crop
    y = int(torch.randint((h - ch) // align + 1, (1,), generator=gen))
    x = int(torch.randint((w - cw) // align + 1, (1,), generator=gen))
    return y * align, x * align


def to_float(images_uint8: torch.Tensor, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], resized to `resolution` if given."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1
    return x if resolution is None else resize(x, resolution)


def stage_inputs(stage, images: torch.Tensor, flips: torch.Tensor | None, device) -> tuple:
    """A cascade stage's training inputs from uint8 images (N, H, W, C): x0 at the stage's resolution and channels and,
    for SR stages, the clean low-res image (area-downsampled), optionally flipped where `flips` is true."""
    x = to_float(images.to(device))
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    if x.shape[1] != stage.channels:
        x = x.mean(1, keepdim=True) if stage.channels == 1 else x.expand(-1, stage.channels, -1, -1)
    x0 = resize(x, stage.resolution)
    lowres = resize(x, stage.lowres) if stage.kind == "sr" else None
    return x0, lowres
