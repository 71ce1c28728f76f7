"""Dataset adapters: one per layout, each listing (id, label, group, image reference) without loading pixels.

CONTRACT (other modules rely on it; keep it):

    SOURCES: dict[str, Source]          registry; unknown names list the valid ones (get_source)
    Source.list(input, **options) -> Listing
    load_ref(ref) -> np.ndarray         (H, W, 3) uint8 RGB; raises ImageError(reason) when unreadable

An `Item.ref` is a small picklable tuple that `load_ref` understands, so worker processes can load
pixels without the adapter object:
    ("file", path)                      any Pillow-readable file (TIFF, PNG, JPEG, BMP, ...)
    ("h5", path, key, index)            one patch of an HDF5 array (PCam)
    ("synthetic", seed, index, size, label, num_classes)   generated on demand, deterministic
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    id: str
    label: int          # class index into Listing.classes; -1 = unlabeled
    group: str          # slide/patient id; "" = unknown (prepare falls back to duplicate cluster / id)
    ref: tuple          # see module docstring
    split: str = "train"  # "train" -> k-fold shards, "test" -> test shards
    path: str = ""      # human-readable origin for folds.csv `source` and rejects.csv


@dataclass
class Listing:
    classes: list[str]
    train: list[Item]
    test: list[Item]
    rejects: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}: found while listing
    sample_submission: str | None = None  # path of the dataset's sample_submission.csv, if any
    meta: dict = field(default_factory=dict)  # anything worth recording in the manifest


class ImageError(Exception):
    """An image that cannot be read (unreadable, truncated, zero-byte, wrong shape); str() is the reason."""
