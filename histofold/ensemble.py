"""Ensembles of id-keyed prediction frames (mean, geometric mean, rank), joined on id, never by position."""
from __future__ import annotations

import numpy as np
import pandas as pd

from histofold.errors import DataError, UsageError

EPS = 1e-7  # gmean clips probabilities to [EPS, 1] so one confident 0 cannot zero a row


def _mean(stack: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.tensordot(w, stack, axes=1)


def _gmean(stack: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.exp(np.tensordot(w, np.log(np.clip(stack, EPS, 1.0)), axes=1))


def _rank(stack: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per frame and column, average ranks scaled to [0, 1]; then the weighted mean."""
    from scipy.stats import rankdata

    n = stack.shape[1]
    ranks = rankdata(stack, axis=1, method="average")  # ranks over rows, (F, N, K)
    scaled = (ranks - 1.0) / (n - 1) if n > 1 else np.full_like(stack, 0.5)
    return np.tensordot(w, scaled, axes=1)


# method -> fn((F, N, K) probabilities, (F,) weights summing to 1) -> (N, K)
METHODS = {"mean": _mean, "gmean": _gmean, "rank": _rank}


def ensemble(frames: list[pd.DataFrame], *, method: str = "mean", weights=None,
             names: list[str] | None = None) -> pd.DataFrame:
    """Combine frames of `id, p_<class>...` into one such frame, rows in the first frame's order.

    mean: weighted arithmetic mean. gmean: weighted geometric mean of EPS-clipped probabilities.
    rank: weighted mean of per-column ranks scaled to [0, 1] - scores for AUC, not calibrated
    probabilities. With two columns (binary p_0, p_1) p_0 is set to 1 - p_1 for every method; with
    K > 2 columns gmean and rank rows are renormalised to sum to 1 (rank then keeps each row's
    argmax but not each column's ordering, so prefer mean/gmean for multi-class).
    Raises ValueError when the frames' id sets, class columns differ or any probability is NaN;
    `names` (e.g. file paths) label the frames in those errors.
    """
    if method not in METHODS:
        raise UsageError(f"unknown ensemble method {method!r}; use one of {sorted(METHODS)}")
    if not frames:
        raise ValueError("ensemble needs at least one prediction frame")
    names = list(names) if names is not None else [f"frame {i}" for i in range(len(frames))]
    cols = prob_columns(frames[0], names[0])
    ids = _check_frames(frames, cols, names)
    w = _weights(weights, len(frames))
    stack = np.stack([f.assign(id=f["id"].astype(str)).set_index("id").loc[ids, cols].to_numpy(np.float64)
                      for f in frames])  # (F, N, K), rows aligned on id
    out = METHODS[method](stack, w)
    if len(cols) == 2:
        out[:, 0] = 1.0 - out[:, 1]
    elif len(cols) > 2 and method != "mean":
        out = out / out.sum(axis=1, keepdims=True)
    result = pd.DataFrame(out, columns=cols)
    result.insert(0, "id", ids)
    return result


def prob_columns(frame: pd.DataFrame, name: str = "frame") -> list[str]:
    cols = [c for c in frame.columns if str(c).startswith("p_")]
    if "id" not in frame.columns or not cols:
        raise DataError(f"{name} is not a prediction frame: it needs an `id` column and p_<class> columns, "
                         f"has {list(frame.columns)[:8]}")
    return cols


def _check_frames(frames: list[pd.DataFrame], cols: list[str], names: list[str]) -> list[str]:
    """The shared id list (first frame's order) after checking columns, duplicates, id sets and NaN."""
    ids = frames[0]["id"].astype(str).tolist()
    all_ids = set().union(*(set(f["id"].astype(str)) for f in frames))
    problems = []
    for f, name in zip(frames, names):
        if sorted(prob_columns(f, name)) != sorted(cols):
            problems.append(f"{name} has columns {prob_columns(f, name)}, expected {cols}")
            continue
        fid = f["id"].astype(str)
        if fid.duplicated().any():
            problems.append(f"{name} repeats {int(fid.duplicated().sum())} ids (e.g. {_few(fid[fid.duplicated()])})")
        missing = sorted(all_ids - set(fid))
        if missing:
            problems.append(f"{name} lacks {len(missing)} ids that other frames have (e.g. {_few(missing)})")
        nan = f[cols].isna().any(axis=1).to_numpy()
        if nan.any():
            problems.append(f"{name} has NaN probabilities in {int(nan.sum())} rows (e.g. ids {_few(fid[nan])})")
    if problems:
        raise DataError("cannot ensemble: " + "; ".join(problems) +
                         ". Predict every frame on the same records (same tfrecords, same --tta) and rerun.")
    return ids


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(w) != n or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
        raise UsageError(f"--run_weights={list(w)} must be {n} non-negative numbers (one per frame) with a positive sum")
    return w / w.sum()


def _few(values, k: int = 5) -> str:
    values = list(values)
    return ", ".join(map(str, values[:k])) + (", ..." if len(values) > k else "")
