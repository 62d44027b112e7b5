"""`load_dataset`: any data set's split as images with one caption each, the entry point of training, evaluation,
the judge and feature extraction.

It opens the data source once (`sources.open_source`) and reads it with the reader of its kind: image folders, zips
and npz files through data.py; detection and segmentation sets as unlabelled image tiles through dense.py (for
fine-tuning a cascade on a dense set's images). Sitting above both readers, it lets neither import the other.
"""

from __future__ import annotations

from .data import ImageTextData, load_image_text, take
from .dense import image_tiles
from .sources import DataSource, open_source


def load_dataset(spec: str | DataSource, split: str = "train", *, resolution: int = 32, channels: int = 3,
                 captions: list[str] | None = None, fraction: float = 1.0, per_class: int | None = None,
                 seed: int = 0, skip_bad: bool = False, limit: int | None = None, shards: int = 1,
                 shard: int = 0) -> ImageTextData:
    """A split of a data set (a spec or an opened DataSource) as in-memory images with one caption each; a
    `fraction` or `per_class` of each class (seeded), part `shard` of `shards` disjoint parts, then at most `limit`
    images spread over the classes (data.take)."""
    source = open_source(spec)
    if source.dense:
        data = image_tiles(source, split, resolution=resolution, channels=channels, captions=captions)
    else:
        data = load_image_text(source, split, resolution=resolution, channels=channels, captions=captions,
                               skip_bad=skip_bad)
    return take(data, fraction=fraction, per_class=per_class, seed=seed, limit=limit, shards=shards, shard=shard)
