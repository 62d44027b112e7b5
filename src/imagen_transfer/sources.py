"""Data sources: a data set named once and resolved once.

`open_source(spec)` turns what a user typed (a folder, a .zip or an .npz, or the name of a shared data set looked up
in IMAGEN_TRANSFER_DATA) into a frozen `DataSource` that knows its path, its kind (image-text, npz, detection,
segmentation), its layout, its fingerprint and what the project knows about it (`KNOWN`, the one registry: file,
class names, default captions, task size, class map, published figures). Public functions that read data accept a
spec or a DataSource and open it on their first line; everything below them receives the DataSource. Opening is
cached per file version, so a command that passes a spec around resolves and lists a large zip once.

Also here, below both readers (data.py for image-text and npz sets, dense.py for detection and segmentation sets):
the archive reader (a folder or a zip as member names and bytes), member paths that may not escape the root, the
split folders of an image folder, the seeded split of a set without split folders, and dense layout detection.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
KINDS = ("image-text", "npz", "detection", "segmentation")


@dataclass(frozen=True)
class Known:
    """What the project knows about a shared data set that its files do not say."""

    file: str  # its file name in IMAGEN_TRANSFER_DATA
    labels: tuple[str, ...] | None = None  # class names of integer labels (npz)
    captions: tuple[str, ...] | None = None  # default caption templates ({label}, {report})
    task_size: tuple[int, int] | None = None  # (h, w) a dense set is read at, and why: see KNOWN
    class_map: dict = field(default_factory=dict)  # mask value -> class name, for masks that do not name them
    published: dict = field(default_factory=dict)  # published test figures printed beside our probes


# The one registry of named data sets (data README). Task sizes: BCCD smears are 640 x 480 and its platelets about
# 40 px across, so a quarter (160 x 120) keeps them about 10 px (2-3 cells of a stride-4 grid); WBC crops are
# 120 x 120 and read at their own size. Published: MedMNIST v2 (Yang et al. 2023), Table 3.
KNOWN = {
    "cifar10": Known("cifar10-jpg.zip", captions=("a photo of a {label}",)),
    "pneumoniamnist": Known("pneumoniamnist.npz", labels=("normal", "pneumonia"), captions=("{report}",),
                            published={"ResNet-18 (28)": dict(accuracy=0.854, auc=0.944),
                                       "ResNet-50 (28)": dict(accuracy=0.854, auc=0.948)}),
    "bccd": Known("bccd-voc.zip", task_size=(120, 160),
                  captions=("a microscope image of a peripheral blood smear: red cells, white cells and platelets",)),
    "wbc-seg": Known("wbc-seg.zip", task_size=(120, 120), class_map={0: "background", 128: "cytoplasm", 255: "nucleus"},
                     captions=("a microscope image of a stained white blood cell among red cells",)),
}


def known_for(spec: str | Path) -> tuple[str | None, Known | None]:
    """(name, entry) of a shared data set by its name, its file name or a file stem equal to its name (a copy of
    pneumoniamnist.npz anywhere is PneumoniaMNIST); (None, None) otherwise. Matches names only: no file is read."""
    text = str(spec)
    path = Path(text)
    for name, known in KNOWN.items():
        if text == name or path.name == known.file or path.stem.lower() == name:
            return name, known
    return None, None


def data_root() -> Path:
    return Path(os.environ.get("IMAGEN_TRANSFER_DATA", Path.cwd().parent / "shared" / "data"))


# ----------------------------------------------------------------------------------------------- the archive reader


class Archive:
    """Uniform read access to a folder or a zip: list member names (posix) and read bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = None
        if path.suffix == ".zip":
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{path}: not a readable zip archive ({err}); pass a zip, a folder or an .npz") from None
        elif not path.is_dir():
            raise UserError(f"{path}: not a dataset (expected a folder, a .zip or a MedMNIST-style .npz)")
        if self.zip is not None:
            self.names = [n for n in self.zip.namelist() if not n.endswith("/")]
        else:
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        self.name_set = set(self.names)

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        return (self.path / name).read_bytes()

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.zip is not None else str(self.path / name)


def safe_member(root_name: str, file_name: str, where: str) -> str:
    """Join a metadata `file_name` to its folder, refusing absolute paths and `..` that escape the dataset root."""
    root_parts = PurePosixPath(root_name).parts if root_name else ()
    parts: list[str] = list(root_parts)
    inside = not PurePosixPath(file_name).is_absolute()
    for part in PurePosixPath(file_name).parts:
        if part == "..":
            inside = inside and len(parts) > len(root_parts)
            parts = parts[:-1]
        elif part not in ("", "."):
            parts.append(part)
    if not inside or len(parts) == len(root_parts):
        raise UserError(f"{where}: file_name '{file_name}' escapes the dataset root; use a relative path inside it")
    return "/".join(parts)


# ----------------------------------------------------------------------------------------------- splits


KNOWN_SPLITS = ("train", "val", "valid", "validation", "test")
SPLIT_SEED = 0  # the seeded split of a dataset without split folders (recorded in the data's source string)
SPLIT_SHARES = {"val": 0.1, "test": 0.1}  # and the rest train


def hidden(name: str) -> bool:
    """A member no data set means: dot files and folders (.DS_Store, ._foo) and macOS zips' __MACOSX/ copies."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def split_levels(archive: Archive) -> tuple[str, list[str]]:
    """(parent prefix, split folder names): the split level (`train/`, `test/`, ...) and the one top folder that
    wraps everything, when there is one (a zip of a folder: `myset/cat/1.png`, `myset/metadata.jsonl`); ("", [])
    for a bare layout without splits. A single folder holding only files (`cat/1.png`) is a class, not a wrapper."""
    names = [n for n in archive.names if not hidden(n)]
    tops = {n.split("/")[0] for n in names if "/" in n}
    found = sorted(tops & set(KNOWN_SPLITS))
    if found:
        return "", found
    if len(tops) == 1 and names and all("/" in n for n in names):
        (top,) = tops
        below = {n.split("/")[1] for n in names if n.count("/") >= 2}
        found = sorted(below & set(KNOWN_SPLITS))
        if found:
            return top + "/", found
        if any(n.count("/") >= 2 for n in names) or f"{top}/metadata.jsonl" in archive.name_set:
            return top + "/", []
    return "", []


def seeded_split(entries: list, split: str) -> list:
    """The `split` part of a dataset without split folders: per class (or over all when unlabelled), a seeded
    permutation of the sorted file names gives 10% test, 10% val (each at least one example where a class has
    three or more) and the rest train; the same files land in the same split on every machine and call."""
    if split == "all":
        return entries
    groups: dict = {}
    for entry in sorted(entries):
        groups.setdefault(entry[2], []).append(entry)
    chosen = []
    for key in sorted(groups, key=str):
        members = groups[key]
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        n_test = max(1, round(SPLIT_SHARES["test"] * len(members))) if len(members) >= 3 else 0
        n_val = max(1, round(SPLIT_SHARES["val"] * len(members))) if len(members) >= 3 else 0
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        chosen += [members[i] for i in sorted(parts[split])]
    return sorted(chosen, key=entries.index)


# ----------------------------------------------------------------------------------------------- dense layouts


def _root_of(archive: Archive, marker: str) -> str | None:
    """The shallowest folder prefix under which `marker` (a relative path or folder + '/') exists."""
    hits = [n[: len(n) - len(n.split(marker, 1)[1]) - len(marker)] for n in archive.names
            if (n.startswith(marker) or f"/{marker}" in n)]
    prefixes = sorted({h for h in hits if h == "" or h.endswith("/")}, key=len)
    return prefixes[0] if prefixes else None


def is_coco_file(file_name: str) -> bool:
    return file_name in ("annotations.json", "_annotations.coco.json") or file_name.startswith("instances")


def detect_layout(archive: Archive) -> tuple[str, str]:
    """(layout, root prefix) of a dense data set; a clear error when none matches."""
    voc = _root_of(archive, "Annotations/")
    if voc is not None and any(n.startswith(voc + "JPEGImages/") for n in archive.names):
        return "voc", voc
    yolo = _root_of(archive, "data.yaml")
    if yolo is not None:
        return "yolo", yolo
    coco = [n for n in archive.names if n.endswith(".json") and is_coco_file(n.rsplit("/", 1)[-1])]
    if coco:
        return "coco", min((str(PurePosixPath(n).parent) + "/").lstrip("./") if "/" in n else "" for n in coco)
    masks = _root_of(archive, "masks/")
    if masks is not None and any(n.startswith(masks + "images/") for n in archive.names):
        return "masks", masks
    raise UserError(f"{archive.path}: not a detection or segmentation data set (expected Pascal VOC Annotations/ + "
                    "JPEGImages/, COCO instances*.json or annotations.json, YOLO data.yaml + images/ + labels/, or "
                    "images/ + masks/)")


# ----------------------------------------------------------------------------------------------- the data source


@dataclass(frozen=True, eq=False)
class DataSource:
    """A data set opened once (see module doc). Compared and hashed by identity: open_source returns the same
    object for the same spec and file version, so caches may key on it."""

    spec: str  # as the user gave it
    path: Path  # the file or folder it names
    kind: str  # one of KINDS
    layout: str  # image-text: folder | zip; npz: npz; dense: voc | coco | yolo | masks
    root: str = ""  # a dense layout's folder prefix inside the archive
    name: str | None = None  # its KNOWN name, if any
    known: Known = field(default_factory=lambda: Known(""))

    @property
    def dense(self) -> bool:
        return self.kind in ("detection", "segmentation")

    @functools.cached_property
    def archive(self) -> Archive:
        """The folder or zip, listed once (npz sets have none)."""
        if self.kind == "npz":
            raise ValueError(f"{self.path} is an npz file, not an archive")
        return Archive(self.path)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the data by content (size and sha1, ~0.2 s for CIFAR-10's 62 MB, hashed once per process and
        file state), so caches survive the file being copied or touched; folders by path only."""
        if self.path.is_dir():
            return str(self.path.resolve())
        stat = self.path.stat()
        return _content_hash(self.path.resolve(), stat.st_size, stat.st_mtime_ns)

    def __str__(self) -> str:
        return str(self.path)


def open_source(spec: str | Path | DataSource) -> DataSource:
    """The DataSource of a spec (a DataSource is returned as it is): the one place a data set is resolved."""
    if isinstance(spec, DataSource):
        return spec
    path = _find(str(spec))
    stat = path.stat()
    return _open(str(spec), path, stat.st_size, stat.st_mtime_ns)


def _find(spec: str) -> Path:
    """A path, or a short name (cifar10, pneumoniamnist, bccd, wbc-seg) looked up in IMAGEN_TRANSFER_DATA."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in KNOWN:
        found = data_root() / KNOWN[spec].file
        if found.exists():
            return found
        raise UserError(f"dataset '{spec}' expects {found}, which does not exist: set IMAGEN_TRANSFER_DATA to the "
                        f"folder that holds {KNOWN[spec].file}")
    raise UserError(f"dataset not found: {spec} (a folder, .zip or .npz path, or one of {', '.join(KNOWN)})")


@functools.lru_cache(maxsize=64)
def _open(spec: str, path: Path, _size: int, _mtime_ns: int) -> DataSource:
    name, known = known_for(path)  # a short name's path is its registry file
    known = known or Known("")
    if path.suffix == ".npz":
        return DataSource(spec, path, "npz", "npz", name=name, known=known)
    archive = Archive(path)
    try:
        layout, root = detect_layout(archive)
    except UserError:
        source = DataSource(spec, path, "image-text", "zip" if archive.zip is not None else "folder", name=name,
                            known=known)
    else:
        source = DataSource(spec, path, "segmentation" if layout == "masks" else "detection", layout, root, name, known)
    source.__dict__["archive"] = archive  # listed once: the cached_property's value
    return source


@functools.cache
def _content_hash(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return f"{size}|{hashlib.file_digest(f, 'sha1').hexdigest()}"
