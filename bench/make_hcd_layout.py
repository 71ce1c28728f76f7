"""Write class-per-folder PCam patches in the Kaggle Histopathologic Cancer Detection layout, to score the
`--source=hcd` path with bench/quality.py exactly as Kaggle scores it.

    python bench/make_hcd_layout.py --out=/tmp/hcd_pcam
    python bench/quality.py --source=hcd --input=/tmp/hcd_pcam --solution=/tmp/hcd_pcam/solution.csv \
        --extra_test=../shared/data/pcam_jpeg/valid

Writes `train/<id>.tif` (from --train, default ../shared/data/pcam_jpeg/train), `test/<id>.tif` (from
--test, default ../shared/data/pcam_test_jpeg), `train_labels.csv` and `sample_submission.csv` (`id,label`,
the competition's files) and `solution.csv` (the test labels, which Kaggle keeps). As in the competition,
an id is the SHA-1 of the patch pixels and the images are uncompressed RGB TIFFs; pixel-identical
duplicates are written once (Kaggle removed PCam's duplicates), and an id seen with two labels is left
out. Prints what it wrote and what it left out.
"""
from __future__ import annotations

import csv
import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _patches(folder: str):
    """(label, pixels uint8) of every image under folder/<label>/, in sorted order."""
    import numpy as np
    from PIL import Image

    for label in sorted(os.listdir(folder)):
        sub = os.path.join(folder, label)
        if not os.path.isdir(sub):
            continue
        for name in sorted(os.listdir(sub)):
            with Image.open(os.path.join(sub, name)) as img:
                yield int(label), np.asarray(img.convert("RGB"))


def _write_split(src: str, out: str, split: str) -> tuple[dict, int, int]:
    """Write out/split/<sha1>.tif; returns (id -> label, duplicates dropped, conflicting ids dropped)."""
    from PIL import Image

    os.makedirs(os.path.join(out, split), exist_ok=True)
    labels, conflicts, dups = {}, set(), 0
    for label, pixels in _patches(src):
        key = hashlib.sha1(pixels.tobytes()).hexdigest()
        if key in labels:
            dups += 1
            if labels[key] != label:
                conflicts.add(key)
            continue
        labels[key] = label
        Image.fromarray(pixels).save(os.path.join(out, split, f"{key}.tif"), compression=None)
    for key in conflicts:
        os.remove(os.path.join(out, split, f"{key}.tif"))
        del labels[key]
    return labels, dups, len(conflicts)


def _write_csv(path: str, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows(rows)


def main(*, out: str, train: str = os.path.join(DATA, "pcam_jpeg", "train"),
         test: str = os.path.join(DATA, "pcam_test_jpeg")):
    """Write the Kaggle HCD layout of two class-per-folder trees.

    Args:
        out: the folder to write (train/, test/, train_labels.csv, sample_submission.csv, solution.csv).
        train: class-per-folder tree of the labeled training patches.
        test: class-per-folder tree of the test patches (their labels go to solution.csv only).
    """
    train_labels, train_dups, train_conf = _write_split(train, out, "train")
    test_labels, test_dups, test_conf = _write_split(test, out, "test")
    _write_csv(os.path.join(out, "train_labels.csv"), sorted(train_labels.items()))
    order = sorted(test_labels)
    _write_csv(os.path.join(out, "sample_submission.csv"), ((k, 0) for k in order))
    _write_csv(os.path.join(out, "solution.csv"), ((k, test_labels[k]) for k in order))
    print(f"train: {len(train_labels)} written, {train_dups} duplicate copies left out "
          f"({train_conf} ids with two labels dropped)")
    print(f"test: {len(test_labels)} written, {test_dups} duplicate copies left out "
          f"({test_conf} ids with two labels dropped)")
    print(f"layout: {out}")
    print(f"solution: {os.path.join(out, 'solution.csv')}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import fire

    fire.Fire(main)
