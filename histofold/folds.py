"""Fold assignment: stratified by label, grouped so no slide/patient/duplicate cluster straddles folds."""
from __future__ import annotations

import warnings

import numpy as np

from histofold.errors import UsageError


SKLEARN_MAX_GROUPS = 20_000  # StratifiedGroupKFold's greedy loop takes ~35 s at 220k groups on 2 cores


def assign_folds(labels, groups, *, n_folds: int, seed: int,
                 sklearn_max_groups: int = SKLEARN_MAX_GROUPS) -> np.ndarray:
    """Fold index (0..n_folds-1) per sample, stratified by label and never splitting a group.

    StratifiedGroupKFold(shuffle=True, random_state=seed); when every group is a singleton this is
    plain StratifiedKFold (exact per-class balance: each class's count per fold differs by at most 1).
    Above `sklearn_max_groups` groups with some shared ones (Kaggle HCD: 220k ids, a few duplicate
    clusters), `_greedy_folds` gives the same guarantees in well under a second.
    A class with fewer members than folds only warns (some folds lack it); n_folds < 2 or more folds
    than groups is an error.

    Args:
      labels: class index per sample (ints).
      groups: group name per sample; samples sharing one land in the same fold.
      n_folds: number of folds (the --folds flag).
      seed: shuffling seed (the --seed flag); same seed and inputs -> same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    n_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    if n_folds < 2:
        raise UsageError(f"--folds={n_folds}: need at least 2 folds")
    if n_folds > n_groups:
        raise UsageError(f"--folds={n_folds} but only {len(labels)} samples in {n_groups} groups "
                         f"(duplicates and --groups merge samples); pass --folds <= {n_groups}")
    smallest = np.bincount(np.unique(labels, return_inverse=True)[1]).min()
    if smallest < n_folds:
        warnings.warn(f"the smallest class has {smallest} samples (< {n_folds} folds): some folds "
                      "will have none of it", stacklevel=2)
    if n_groups == len(labels):
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    elif n_groups > sklearn_max_groups:
        return _greedy_folds(np.unique(labels, return_inverse=True)[1], group_ids, n_folds=n_folds, seed=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # warned above
        split_groups = None if isinstance(splitter, StratifiedKFold) else group_ids
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, split_groups)):
            folds[val] = k
    return folds


def _greedy_folds(y: np.ndarray, group_ids: np.ndarray, *, n_folds: int, seed: int) -> np.ndarray:
    """Shared groups first (largest first, each to the fold it overfills least), then singletons of each
    class one by one to the fold holding fewest of that class: groups intact, classes balanced."""
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1
    sizes = np.bincount(group_ids)
    per_class = np.bincount(y, minlength=n_classes)
    target = per_class / n_folds  # expected count of each class per fold
    counts = np.zeros((n_folds, n_classes))
    fold_of_group = np.full(len(sizes), -1)
    shared = np.flatnonzero(sizes > 1)
    shared = shared[np.lexsort((rng.random(len(shared)), -sizes[shared]))]  # largest first, random ties
    members = np.bincount(group_ids * n_classes + y, minlength=len(sizes) * n_classes).reshape(-1, n_classes)
    for g in shared:
        overfill = ((counts + members[g]) / np.maximum(target, 1e-9)).max(axis=1)
        f = int(np.lexsort((counts.sum(axis=1), overfill))[0])
        fold_of_group[g], counts[f] = f, counts[f] + members[g]
    folds = fold_of_group[group_ids]
    for c in range(n_classes):
        todo = rng.permutation(np.flatnonzero((folds < 0) & (y == c)))
        for i in todo:  # water-filling: the fold with the fewest of class c (lowest index on ties)
            f = int(np.argmin(counts[:, c]))
            folds[i], counts[f, c] = f, counts[f, c] + 1
    return folds


def class_balance(df, *, classes: list[str] | None = None):
    """Fold x class count table (plus a `total` column and row) of a folds frame with `fold`, `label`.

    Columns are class names when `classes` is given (label k -> classes[k]), else the labels.
    """
    import pandas as pd

    labels = df["label"].map(lambda k: classes[k]) if classes is not None else df["label"]
    table = pd.crosstab(df["fold"], labels, margins=True, margins_name="total")
    if classes is not None:
        table = table.reindex(columns=[c for c in classes if c in table.columns] + ["total"])
    table.index.name, table.columns.name = "fold", None
    return table


# ---------------------------------------------------------------- folds.csv: decided once, reused

def decide(frame, *, folds_dir: str, n_folds: int, seed: int, overwrite: bool):
    """folds.csv for a frame of (id, label, group, + extra columns): reused when the same ids, labels,
    groups, seed and fold count produced it before; a different one on disk needs `overwrite`.

    Returns (frame with a `fold` column, True when decided now / False when reused)."""
    import hashlib
    import logging

    from histofold import io

    path, meta_path = io.join(folds_dir, "folds.csv"), io.join(folds_dir, "folds_meta.json")
    key = hashlib.sha256(frame[["id", "label", "group"]].to_csv(index=False).encode()).hexdigest()
    meta = {"seed": int(seed), "folds": int(n_folds), "n": len(frame), "key": key}
    if io.read_json(meta_path, None) == meta and io.exists(path):
        logging.getLogger("histofold").info("folds: reusing %s (same ids, labels, groups, seed and fold count)", path)
        return io.read_csv(path, dtype={"id": str, "group": str}), False
    if io.exists(path) and not overwrite:
        raise UsageError(f"{path} exists but was made from different ids/labels/groups, seed or fold count; "
                         "pass --overwrite to decide the folds anew (and rewrite the shards)")
    frame = frame.copy()
    frame.insert(2, "fold", assign_folds(frame["label"].to_numpy(), frame["group"].to_numpy(),
                                         n_folds=n_folds, seed=seed))
    io.makedirs(folds_dir)
    io.write_csv(path, frame)
    io.write_json(meta_path, meta)
    return frame, True
