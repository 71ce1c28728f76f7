"""Kaggle submissions from id-keyed probabilities: sample_submission row order and header, then validated."""
from __future__ import annotations

import numpy as np
import pandas as pd

from histofold.errors import DataError, UsageError

OUTPUTS = ("label", "probs")


def make_submission(preds: pd.DataFrame, *, class_names: list[str], sample_submission: str | None = None,
                    test_ids: list[str] | None = None, output: str = "label") -> pd.DataFrame:
    """Submission rows in sample_submission order (else test_ids, else preds order), joined on id.

    Binary, output="label": `id,label` holding P(class 1) (AUC-scored competitions want the score).
    Multi-class, output="label": the argmax class - its index when the sample submission's label
    column is numeric, else its name. output="probs": one column per class name (the sample's header
    order when it names the classes). The sample's column names are kept.
    """
    if output not in OUTPUTS:
        raise UsageError(f"--format={output!r}: choose one of {', '.join(OUTPUTS)}")
    cols = [f"p_{c}" for c in class_names]
    missing_cols = [c for c in ["id"] + cols if c not in preds.columns]
    if missing_cols:
        raise DataError(f"predictions lack columns {missing_cols}: they must come from runs on classes {class_names}")
    sample = _read_sample(sample_submission) if sample_submission else None
    id_col = _id_column(sample) if sample is not None else "id"
    order = (sample[id_col].tolist() if sample is not None
             else [str(i) for i in test_ids] if test_ids is not None else preds["id"].astype(str).tolist())
    probs = _aligned(preds, order, cols)  # (N, K) in submission row order
    sub = pd.DataFrame({id_col: order})
    if output == "probs":
        names = [str(c) for c in class_names]
        for name in _class_headers(sample, id_col, class_names):
            sub[name] = probs[:, names.index(name)]
    else:
        label_col = _label_column(sample, id_col)
        if len(class_names) == 2:
            sub[label_col] = probs[:, 1]
        else:
            idx = probs.argmax(axis=1)
            numeric = sample is not None and pd.api.types.is_numeric_dtype(sample[label_col])
            sub[label_col] = idx if numeric else [class_names[i] for i in idx]
    validate_submission(sub, expected_ids=order, num_classes=len(class_names), output=output)
    return sub


def validate_submission(sub: pd.DataFrame, *, expected_ids, num_classes: int, output: str = "label") -> None:
    """Every expected id exactly once, no extras, no NaN, probabilities in [0, 1]; else one-line ValueError."""
    ids = sub.iloc[:, 0].astype(str)
    expected = pd.Index([str(i) for i in expected_ids])
    present = set(ids)
    missing = [i for i in expected if i not in present]
    extra = sorted(present - set(expected))
    dup = sorted(set(ids[ids.duplicated()]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ids (e.g. {_few(missing)})")
    if extra:
        problems.append(f"{len(extra)} extra ids (e.g. {_few(extra)})")
    if dup:
        problems.append(f"{len(dup)} duplicated ids (e.g. {_few(dup)})")
    values = sub.iloc[:, 1:]
    n_nan = int(values.isna().to_numpy().sum())
    if n_nan:
        problems.append(f"{n_nan} NaN values (e.g. ids {_few(ids[values.isna().any(axis=1)])})")
    problems += _check_value_columns(values, num_classes=num_classes, output=output)
    if problems:
        raise DataError(f"invalid submission ({len(sub)} rows, {len(expected)} expected): " + "; ".join(problems)
                         + ". Predict the test records listed in tfrecords/test_ids.csv with the same runs.")


def _check_value_columns(values: pd.DataFrame, *, num_classes: int, output: str) -> list[str]:
    prob_cols = list(values.columns) if output == "probs" else list(values.columns[:1]) if num_classes == 2 else []
    want = num_classes if output == "probs" else 1
    problems = [] if values.shape[1] == want else [f"{values.shape[1]} value columns, expected {want}"]
    for c in prob_cols:
        v = pd.to_numeric(values[c], errors="coerce").to_numpy(np.float64)
        not_numbers = int(np.sum(np.isnan(v) & values[c].notna().to_numpy()))
        if not_numbers:
            problems.append(f"{not_numbers} values of {c} are not numbers")
        bad = int(np.sum((v < 0) | (v > 1)))
        if bad:
            problems.append(f"{bad} values of {c} outside [0, 1]")
    return problems


def _aligned(preds: pd.DataFrame, order: list[str], cols: list[str]) -> np.ndarray:
    by_id = preds.assign(id=preds["id"].astype(str))
    if by_id["id"].duplicated().any():
        raise DataError(f"predictions repeat ids (e.g. {_few(by_id.loc[by_id['id'].duplicated(), 'id'])}); "
                         f"ensemble fold predictions before making a submission")
    missing = [i for i in order if i not in set(by_id["id"])]
    if missing:
        raise DataError(f"{len(missing)} of {len(order)} submission ids have no prediction (e.g. {_few(missing)}): "
                         f"predict the same test records the sample submission lists")
    return by_id.set_index("id").loc[order, cols].to_numpy(np.float64)


def _read_sample(path: str) -> pd.DataFrame:
    from histofold import io

    header = io.read_csv(path, nrows=0).columns
    if len(header) < 2:
        raise DataError(f"{path}: a sample submission needs an id column and at least one value column")
    id_col = "id" if "id" in header else header[0]
    return io.read_csv(path, dtype={id_col: str})


def _id_column(sample: pd.DataFrame) -> str:
    return "id" if "id" in sample.columns else sample.columns[0]


def _label_column(sample: pd.DataFrame | None, id_col: str) -> str:
    if sample is None:
        return "label"
    return [c for c in sample.columns if c != id_col][0]


def _class_headers(sample: pd.DataFrame | None, id_col: str, class_names: list[str]) -> list[str]:
    """Per-class column names: the sample's order when it names exactly the classes, else class order."""
    if sample is not None:
        cols = [str(c) for c in sample.columns if c != id_col]
        if sorted(cols) == sorted(map(str, class_names)):
            return cols
    return [str(c) for c in class_names]


def _few(values, k: int = 5) -> str:
    values = list(values)
    return ", ".join(map(str, values[:k])) + (", ..." if len(values) > k else "")
