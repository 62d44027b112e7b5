"""Segmentation masks as class indices: how a mask file's pixels become classes, decided once per data set.

A mask pixel's *value* is its gray level (8- or 16-bit), its palette index, or, for colour masks, its RGB colour
(encoded as `COLOUR + 0xRRGGBB`, so a colour never collides with a gray level; a pixel whose three channels agree is
its gray level). Colour masks are never converted to gray: (255, 0, 0) and (97, 0, 0) are two values, not gray
levels 76 and 29 that a blue pixel could share.

The class table comes from every mask of the data set (all splits), so every split numbers classes alike:

- a `class_map.json` names values: `{"0": "background", "128": "cytoplasm"}`, colours as `"#ff0000"` or
  `"255,0,0"`; a name of `null` marks a value to ignore. Two spellings of one value with different names are
  refused as ambiguous. Values that share a name are one class.
- without one, each distinct value is a class named by its value (`"128"`, `"#ff0000"`).
- `IGNORE` (-1) marks pixels that are neither trained on nor scored: palette masks with the Pascal VOC colour map
  keep VOC's meaning of index 255 ("void", the border around objects), and *stray* values are ignored: a value
  (not named in a class map) on under `STRAY_SHARE` of all mask pixels is annotation noise (anti-aliasing, a slip
  of the brush), reported with its pixel count, never made a class. A value outside the class map on more pixels
  than that is refused, naming the class map as the fix.
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import UserError

COLOUR = 1 << 32  # colour mask values: COLOUR + 0xRRGGBB (gray levels and palette indices stay below 2**16)
IGNORE = -1  # the class index of pixels that are neither trained on nor scored
STRAY_SHARE = 1e-4  # a value on fewer of the data set's mask pixels than this is noise, not a class
MAX_CLASSES = 32  # more distinct values than this means a lossy (JPEG) or non-class mask
VOC_VOID = 255  # Pascal VOC's "void" index of palette masks


@functools.cache
def voc_colormap(n: int = 256) -> np.ndarray:
    """Pascal VOC's palette (its devkit's bit-interleaved colour map), (n, 3) uint8."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap.flags.writeable = False  # cached: shared by every caller
    return cmap


def value_name(value: int) -> str:
    """A mask value as people write it: '128', or '#ff0000' for a colour."""
    return f"#{value - COLOUR:06x}" if value >= COLOUR else str(value)


def read_mask(data: bytes, where: str) -> tuple[np.ndarray, bool]:
    """A mask file's values (H, W) int64 and whether it is a palette mask in VOC's colour map (its 255 is void)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                values = np.asarray(img).astype(np.int64)
                palette = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)
                used = np.unique(values)
                voc = voc_colormap()  # computed once per process
                is_voc = bool(len(palette) > used.max()) and all(
                    (palette[v] == voc[v]).all() for v in used.tolist())
                return values, is_voc
            if mode == "F":
                raise ValueError("32-bit float masks hold no class values; save one integer value per class")
            if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(img).astype(np.int64), False
            rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    except Exception as err:  # noqa: BLE001 - any decoding failure is reported with the file's name
        raise UserError(f"{where}: cannot read mask ({err}); fix or remove the file") from None
    gray = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    colour = COLOUR + (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    return np.where(gray, rgb[..., 0], colour), False


def parse_key(key: str, where: str) -> int:
    """A class map key: a gray level or palette index ('128'), or a colour ('#ff0000', '255,0,0')."""
    text = key.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            r, g, b = (int(text[i:i + 2], 16) for i in (1, 3, 5))
        elif "," in text:
            parts = [int(p) for p in re.sub(r"[()\[\]\s]", "", text).split(",")]
            if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
                raise ValueError
            r, g, b = parts
        else:
            value = int(text)
            if value < 0:
                raise ValueError
            return value
    except ValueError:
        raise UserError(f"{where}: key {key!r} is not a mask value; use a gray level or index like \"128\" or a "
                        "colour like \"#ff0000\" or \"255,0,0\"") from None
    return r if r == g == b else COLOUR + (r << 16 | g << 8 | b)


def parse_class_map(data: bytes, where: str) -> dict[int, str | None]:
    """{mask value: class name, or None to ignore} of a class_map.json; ambiguous or malformed maps refused."""
    try:
        raw = json.loads(data)
    except ValueError as err:  # bad JSON or not UTF-8
        raise UserError(f"{where}: not valid JSON ({err}); it maps mask values to class names, e.g. "
                        "{\"0\": \"background\", \"#ff0000\": \"tumour\"}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: must be a JSON object mapping mask values to class names, e.g. "
                        "{\"0\": \"background\", \"255\": null}")
    mapping: dict[int, str | None] = {}
    for key, name in raw.items():
        if name is not None and (not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip()):
            raise UserError(f"{where}: {key!r} must name a class (a string) or be null to ignore it, got {name!r}")
        value = parse_key(key, where)
        name = None if name is None else str(name).strip()
        if value in mapping and mapping[value] != name:
            raise UserError(f"{where}: {key!r} is the same mask value as another key with another name "
                            f"({mapping[value]!r} vs {name!r}); keep one")
        mapping[value] = name
    if not any(name is not None for name in mapping.values()):
        raise UserError(f"{where}: names no class (every entry is null)")
    return mapping


@dataclass(frozen=True)
class ClassTable:
    """How mask values become class indices for a whole data set."""

    names: list[str]
    values: np.ndarray  # sorted mask values with a meaning
    indices: np.ndarray  # their class index, or IGNORE
    notes: list[str]  # what was ignored, one line each kind

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """Class indices (H, W) int64 of a mask's values (every value is in the table: see class_table)."""
        pos = np.searchsorted(self.values, mask).clip(max=len(self.values) - 1)
        if not (self.values[pos] == mask).all():  # a value class_table never saw: a bug, never a silent class
            raise ValueError(f"mask values {np.setdiff1d(mask, self.values)[:5].tolist()} missing from the class table")
        return self.indices[pos]


def class_table(counts: dict[int, int], class_map: dict[int, str | None] | None, *, voc_void: bool,
                where: str) -> ClassTable:
    """The class table of a data set from the pixel count of each mask value over all its masks (see module doc)."""
    total = max(1, sum(counts.values()))
    mapping = dict(class_map or {})
    if voc_void and VOC_VOID not in mapping:
        mapping[VOC_VOID] = None
    unknown = {v: n for v, n in counts.items() if v not in mapping}
    stray = {v: n for v, n in unknown.items() if n < STRAY_SHARE * total}
    notes = []
    if stray:
        listed = ", ".join(f"{value_name(v)}: {n}" for v, n in sorted(stray.items(), key=lambda kv: -kv[1])[:12])
        more = f", and {len(stray) - 12} more" if len(stray) > 12 else ""
        notes.append(f"{sum(stray.values())} pixels of {len(stray)} stray mask values ignored (each on under "
                     f"{STRAY_SHARE:.2%} of the pixels; value: pixels {listed}{more}); name a value in class_map.json "
                     "to keep it as a class")
    if voc_void and counts.get(VOC_VOID):
        notes.append(f"{counts[VOC_VOID]} pixels of VOC's void index 255 ignored (palette masks in the VOC colour map)")
    rest = {v: n for v, n in unknown.items() if v not in stray}
    if class_map is not None and rest:
        listed = ", ".join(f"{value_name(v)} ({n} pixels)" for v, n in sorted(rest.items())[:12])
        raise UserError(f"{where}: mask values {listed} are not in the class map; add them to class_map.json (a class "
                        "name, or null to ignore them)")
    for v in rest:
        mapping[v] = value_name(v)
    for v in stray:
        mapping[v] = None
    if len(rest) > MAX_CLASSES:
        raise UserError(f"{where}: masks hold {len(rest)} distinct values on more than {STRAY_SHARE:.2%} of the pixels "
                        "each; save masks losslessly (PNG) with one value per class, or add a class_map.json")
    values = np.array(sorted(mapping), dtype=np.int64)
    names = list(dict.fromkeys(mapping[v] for v in values.tolist() if mapping[v] is not None))
    if not names:
        raise UserError(f"{where}: no mask value is a class")
    indices = np.array([IGNORE if mapping[v] is None else names.index(mapping[v]) for v in values.tolist()],
                       dtype=np.int64)
    return ClassTable(names, values, indices, notes)
