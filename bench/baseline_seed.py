"""The seed-001-style baseline: a plain CNN on PIL-loaded arrays, the yardstick histofold must beat.

Deliberately naive, as the seed notebook was: pixels /255, one random 80/20 split, no augmentation,
no folds, no TTA, Adam at its default rate, a handful of epochs, softmax over 2 classes. It is
scored by ROC AUC on a separate labeled test set (or on its own 20% split when none is given).

    python bench/baseline_seed.py --train_dir ../shared/data/pcam_jpeg/train \
        --test_dir ../shared/data/pcam_jpeg/valid
    python bench/baseline_seed.py --train_dir ../shared/data/hcd_kaggle_mock/train \
        --train_labels ../shared/data/hcd_kaggle_mock/train_labels.csv \
        --test_dir <hcd>/test --test_labels <solution id,label csv>
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def load_labeled(kind: str, *, image_dir: str, labels_csv: str | None = None,
                 suffix: str = ".tif") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads labeled images as (x (N, H, W, 3) uint8, y (N,) int64, ids) in a stable order.

    Args:
      kind: "folders" -- `image_dir/<class>/<file>`, the class is the folder name (sorted folder
        names become indices 0..K-1; for PCam folders "0" and "1" that is the label itself);
        "csv" -- `image_dir/<id><suffix>` labeled by an `id,label` CSV (Kaggle HCD
        `train_labels.csv`, or a solution file for its test set).
      image_dir: the folder holding the images.
      labels_csv: the `id,label` CSV; required for kind "csv".
      suffix: file name ending of the images for kind "csv".
    """
    if kind == "folders":
        pairs = _list_folders(image_dir)
    elif kind == "csv":
        if not labels_csv:
            raise ValueError(f"kind='csv' needs labels_csv (an id,label CSV) for images in {image_dir}")
        pairs = _list_csv(image_dir, labels_csv, suffix)
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'folders' (class-per-folder) or 'csv' (id,label CSV)")
    if not pairs:
        raise ValueError(f"no labeled images found in {image_dir} (kind={kind!r})")
    x = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _, _ in pairs])
    y = np.array([label for _, label, _ in pairs], dtype=np.int64)
    return x, y, [image_id for _, _, image_id in pairs]


def _list_folders(root: str) -> list[tuple[str, int, str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    pairs = []
    for index, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_SUFFIXES):
                pairs.append((os.path.join(root, name, file), index, os.path.splitext(file)[0]))
    return pairs


def _list_csv(image_dir: str, labels_csv: str, suffix: str) -> list[tuple[str, int, str]]:
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"id", "label"} <= set(rows[0]):
        raise ValueError(f"{labels_csv} must have columns id,label; found {sorted(rows[0])}")
    pairs = [(os.path.join(image_dir, r["id"] + suffix), int(r["label"]), r["id"]) for r in rows]
    missing = [p for p, _, _ in pairs if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{len(missing)} ids of {labels_csv} have no image in {image_dir}, "
                         f"e.g. {missing[0]}; check --suffix and the directory")
    return pairs


def seed_cnn(input_shape: tuple[int, int, int], num_classes: int = 2):
    """The seed-001 network: 3 x (conv 3x3 + ReLU + max-pool), Flatten, Dense 1000, Dropout 0.5."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(1000, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ])


def run_baseline(*, train_dir: str, test_dir: str | None = None, train_labels: str | None = None,
                 test_labels: str | None = None, epochs: int = 5, batch_size: int = 64,
                 seed: int = 0, more_test_dirs: tuple = ()) -> dict:
    """Trains the seed CNN on train_dir and returns {auc, seconds, n_train, n_val, n_test, ...}.

    `auc` is P(class 1) scored on test_dir when given, else on the 20% split. A CSV label file
    switches that directory to the Kaggle HCD layout (`<id>.tif` + `id,label`). `more_test_dirs`:
    further class-per-folder test sets, scored by the same model into `aucs` {dir: auc}.
    """
    import keras

    start = time.time()
    keras.utils.set_random_seed(seed)
    x, y, _ = load_labeled("csv" if train_labels else "folders", image_dir=train_dir, labels_csv=train_labels)
    order = np.random.default_rng(seed).permutation(len(x))  # the seed notebook's random 80/20 split
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    x = x.astype(np.float32) / 255.0
    num_classes = int(y.max()) + 1
    model = seed_cnn(x.shape[1:], num_classes=max(num_classes, 2))
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x[train], y[train], validation_data=(x[val], y[val]), epochs=epochs,
              batch_size=batch_size, verbose=2)
    val_auc = _auc(y[val], model.predict(x[val], verbose=0)[:, 1])
    result = dict(val_auc=val_auc, n_train=int(len(train)), n_val=int(n_val))
    if test_dir:
        xt, yt, _ = load_labeled("csv" if test_labels else "folders", image_dir=test_dir, labels_csv=test_labels)
        p = model.predict(xt.astype(np.float32) / 255.0, verbose=0)[:, 1]
        result.update(auc=_auc(yt, p), n_test=int(len(xt)))
    else:
        result.update(auc=result["val_auc"], n_test=0)
    result["aucs"] = {}
    for extra in more_test_dirs:
        xt, yt, _ = load_labeled("folders", image_dir=extra)
        result["aucs"][extra] = _auc(yt, model.predict(xt.astype(np.float32) / 255.0, verbose=0)[:, 1])
    result.update(seconds=round(time.time() - start, 1), epochs=epochs, seed=seed)
    return result


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC of P(class 1) against y == 1; None when only one class is present (tiny splits)."""
    from sklearn.metrics import roc_auc_score

    positive = (y == 1)
    if positive.all() or not positive.any():
        return None
    return round(float(roc_auc_score(positive, p)), 4)


def main(*, train_dir: str, test_dir: str | None = None, train_labels: str | None = None,
         test_labels: str | None = None, epochs: int = 5, batch_size: int = 64, seed: int = 0) -> dict:
    """Runs the seed-style baseline; fire prints the returned summary.

    Args:
      train_dir: labeled training images: class-per-folder, or `<id>.tif` files with --train_labels.
      test_dir: labeled test images scored by ROC AUC (same two layouts); omit to score the 20% split.
      train_labels: `id,label` CSV for train_dir (Kaggle HCD `train_labels.csv`).
      test_labels: `id,label` solution CSV for test_dir.
      epochs: training epochs (the seed notebook used a handful).
      batch_size: images per step.
      seed: seed of the split, the initial weights and the dropout.
    """
    return run_baseline(train_dir=train_dir, test_dir=test_dir, train_labels=train_labels,
                        test_labels=test_labels, epochs=epochs, batch_size=batch_size, seed=seed)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
