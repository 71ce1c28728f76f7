"""Test helper: write a small, faithful fake `tfrecords/` dir (shards, manifest.json, test_ids.csv).

Layout as docs/design.md describes prepare's output: `fold{k}-{i:03d}-{count}.tfrec` and
`test-{i:03d}-{count}.tfrec` shards, `manifest.json`, `test_ids.csv`, `sample_submission.csv`, plus
`../folds/folds.csv` beside the tfrecords dir. Images are learnable: class c brightens channel c % 3
in the centre. Labels are imbalanced (the last class is about twice as common as each other class).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os

import numpy as np
import pandas as pd

from histofold import records


def fake_image(rng: np.random.Generator, *, label: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 noise; class `label` (>= 0) adds +120 to channel label % 3 in the centre."""
    image = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    if label >= 0:
        q = size // 4
        image[q:size - q, q:size - q, label % 3] += 120
    return image


def fake_label(j: int, num_classes: int) -> int:
    """Record j's class: cycles 0, 1, ..., K-1, K-1 so the last class is twice as common."""
    return min(j % (num_classes + 1), num_classes - 1)


def _write_shard(path: str, rows: list[dict], encoding: str) -> dict:
    """Write one shard with the real writer; returns its {count, bytes, sha256}."""
    return records.write_shard(path, (
        records.serialize(image=records.encode_image(r["image"], encoding), encoding=encoding,
                          height=r["image"].shape[0], width=r["image"].shape[1], label=r["label"], id=r["id"],
                          fold=r["fold"], group=r["group"]) for r in rows))


def _make_rows(rng, *, n: int, fold: int, size: int, num_classes: int) -> list[dict]:
    rows = []
    for j in range(n):
        label = fake_label(j, num_classes) if fold >= 0 else -1
        image = fake_image(rng, label=label, size=size)
        rows.append({"image": image, "label": label, "fold": fold, "id": hashlib.sha1(image.tobytes()).hexdigest(),
                     "group": f"f{fold}g{j // 2}" if fold >= 0 else ""})
    return rows


def _split(rows: list, parts: int) -> list[list]:
    """rows in `parts` contiguous, near-equal shards (fewer when rows are few; none when empty)."""
    parts = min(parts, len(rows))
    return [[rows[i] for i in idx] for idx in np.array_split(np.arange(len(rows)), parts)] if parts else []


def write_fake_tfrecords(out_dir, *, n_per_fold: int = 8, folds: int = 3, n_test: int = 5, size: int = 32,
                         num_classes: int = 2, encoding: str = "png", seed: int = 0,
                         shards_per_fold: int = 2) -> dict:
    """Write the fake dataset into out_dir (created); returns the manifest dict (also manifest.json).

    Every fold has `n_per_fold` records in `shards_per_fold` shards; the test set `n_test` unlabeled
    records (label -1) in two shards (one when n_test < 2). Ids are SHA-1 of the pixels, as in HCD.
    """
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, folds_rows = [], []
    per_fold, per_fold_class = {}, {}
    for k in range(folds):
        rows = _make_rows(rng, n=n_per_fold, fold=k, size=size, num_classes=num_classes)
        for i, part in enumerate(_split(rows, shards_per_fold)):
            shards.append(_shard(out_dir, f"fold{k}", i, part, encoding=encoding, split="train", fold=k))
        per_fold[str(k)] = len(rows)
        labels = [r["label"] for r in rows]
        per_fold_class[str(k)] = {str(c): labels.count(c) for c in range(num_classes)}
        folds_rows += [{"id": r["id"], "label": r["label"], "fold": k, "group": r["group"], "source": "fake",
                        "class": str(r["label"])} for r in rows]
    test_rows = _make_rows(rng, n=n_test, fold=-1, size=size, num_classes=num_classes)
    for i, part in enumerate(_split(test_rows, 2)):
        shards.append(_shard(out_dir, "test", i, part, encoding=encoding, split="test", fold=-1))
    pd.DataFrame({"id": [r["id"] for r in test_rows], "label": -1}).to_csv(
        os.path.join(out_dir, "test_ids.csv"), index=False)
    pd.DataFrame({"id": [r["id"] for r in test_rows], "label": 0}).to_csv(
        os.path.join(out_dir, "sample_submission.csv"), index=False)
    folds_csv = _write_folds_csv(out_dir, folds_rows)

    n_train = folds * n_per_fold
    manifest = {
        "version": 2,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "fake", "input": os.path.abspath(out_dir),
        "args": {"n_per_fold": n_per_fold, "folds": folds, "n_test": n_test, "size": size,
                 "num_classes": num_classes, "encoding": encoding, "seed": seed},
        "classes": [str(c) for c in range(num_classes)], "num_classes": num_classes,
        "image_size": [size, size],
        "encoding": encoding, "jpeg_quality": 95,
        "folds": folds, "seed": seed,
        "shards": shards,
        "counts": {"inputs": n_train + n_test, "written": n_train + n_test, "rejected": 0,
                   "train": n_train, "test": n_test, "per_fold": per_fold, "per_fold_class": per_fold_class},
        "test_labeled": False,
        "sample_submission": "sample_submission.csv",
        "folds_csv": os.path.abspath(folds_csv), "folds_csv_sha256": _sha256(folds_csv),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _shard(out_dir: str, prefix: str, index: int, rows: list[dict], *, encoding: str, split: str,
           fold: int) -> dict:
    name = records.shard_name(prefix, index, len(rows))
    facts = _write_shard(os.path.join(out_dir, name), rows, encoding)
    return {"file": name, "split": split, "fold": fold, "count": len(rows), "bytes": facts["bytes"],
            "sha256": facts["sha256"]}


def _write_folds_csv(out_dir: str, rows: list[dict]) -> str:
    folds_dir = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "folds")
    os.makedirs(folds_dir, exist_ok=True)
    path = os.path.join(folds_dir, "folds.csv")
    pd.DataFrame(rows, columns=["id", "label", "fold", "group", "source", "class"]).to_csv(path, index=False)
    return path


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fake_images(*, n_per_fold: int = 8, folds: int = 3, n_test: int = 5, size: int = 32,
                num_classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """id -> the exact uint8 pixels `write_fake_tfrecords` writes with the same arguments."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(folds):
        rows += _make_rows(rng, n=n_per_fold, fold=k, size=size, num_classes=num_classes)
    rows += _make_rows(rng, n=n_test, fold=-1, size=size, num_classes=num_classes)
    return {r["id"]: r["image"] for r in rows}
