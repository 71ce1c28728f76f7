"""Classification metrics on arrays (numpy/sklearn only): binary, multi-class, calibration, bootstrap CIs."""
from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


# ---------------------------------------------------------------- binary

def binary_metrics(y_true, p, *, threshold: float = 0.5) -> dict:
    """Threshold metrics + ROC AUC of P(class 1) `p` (N,) against 0/1 labels; plain floats/ints."""
    y, p = _binary_inputs(y_true, p)
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)        # = sensitivity
    specificity = _ratio(tn, tn + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "roc_auc": fast_auc(y, p),
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": specificity,
        "f1": f1,
        "balanced_accuracy": float(np.nanmean([recall, specificity])) if len(y) else math.nan,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "threshold": float(threshold),
        "n": int(len(y)), "n_pos": int(y.sum()),
    }


def youden_threshold(y_true, p) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J) on the ROC curve."""
    y, p = _binary_inputs(y_true, p)
    if len(np.unique(y)) < 2:
        return 0.5  # no ROC curve with one class: keep the default threshold
    fpr, tpr, thr = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))  # sklearn's first threshold is +inf


def binary_report(y_true, p, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC with a stratified bootstrap 95% CI, metrics at 0.5 and at the Youden threshold, ECE."""
    y, p = _binary_inputs(y_true, p)
    t = youden_threshold(y, p)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    return {
        "auc": fast_auc(y, p), "auc_ci": [lo, hi], "n_boot": int(n_boot),
        "at_0.5": binary_metrics(y, p, threshold=0.5),
        "youden_threshold": t,
        "at_youden": binary_metrics(y, p, threshold=t),
        "ece": expected_calibration_error(y, p),
        "n": int(len(y)), "n_pos": int(y.sum()),
    }


def fast_auc(y_true, p) -> float:
    """ROC AUC via midranks (== sklearn.roc_auc_score); NaN when only one class is present."""
    y, p = _binary_inputs(y_true, p)
    _, inv = np.unique(p, return_inverse=True)
    k = int(inv.max()) + 1 if len(inv) else 0
    return _auc_from_counts(np.bincount(inv[y == 1], minlength=k), np.bincount(inv[y == 0], minlength=k))


def bootstrap_auc_ci(y_true, p, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the AUC over stratified resamples (positives and negatives resampled apart)."""
    y, p = _binary_inputs(y_true, p)
    aucs = _bootstrap_aucs(y, [p], n_boot=n_boot, seed=seed)[0]
    return _percentile_ci(aucs, alpha)


def bootstrap_auc_diff(y, p_a, p_b, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(a) - AUC(b) on the same rows with a paired stratified bootstrap CI and a two-sided p-value."""
    y, p_a = _binary_inputs(y, p_a)
    _, p_b = _binary_inputs(y, p_b)
    a, b = _bootstrap_aucs(y, [p_a, p_b], n_boot=n_boot, seed=seed)
    d = a - b
    lo, hi = _percentile_ci(d, alpha)
    ok = d[np.isfinite(d)]
    # bootstrap p-value for H0: diff = 0 (twice the smaller tail mass)
    p_value = float(min(1.0, 2 * min(np.mean(ok <= 0), np.mean(ok >= 0)))) if len(ok) else math.nan
    auc_a, auc_b = fast_auc(y, p_a), fast_auc(y, p_b)
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": auc_a - auc_b, "ci": [lo, hi],
            "p_value": p_value, "n_boot": int(n_boot), "n": int(len(y))}


def _bootstrap_aucs(y: np.ndarray, scores: list[np.ndarray], *, n_boot: int, seed: int) -> list[np.ndarray]:
    """AUC of each score vector on the same n_boot stratified resamples: O(N) per resample, no sorting."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    out = [np.full(n_boot, np.nan) for _ in scores]
    if len(pos) == 0 or len(neg) == 0:
        return out  # one class: no AUC to resample
    inverses = [np.unique(s, return_inverse=True)[1] for s in scores]
    rng = np.random.default_rng(seed)
    for b in range(n_boot):
        rp = pos[rng.integers(0, len(pos), len(pos))]
        rn = neg[rng.integers(0, len(neg), len(neg))]
        for i, inv in enumerate(inverses):
            k = int(inv.max()) + 1
            out[i][b] = _auc_from_counts(np.bincount(inv[rp], minlength=k), np.bincount(inv[rn], minlength=k))
    return out


def _auc_from_counts(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """AUC from per-distinct-score counts (ascending scores): P(s_pos > s_neg) + 0.5 P(tie)."""
    n_pos, n_neg = pos_counts.sum(), neg_counts.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg_counts) - neg_counts
    return float(np.sum(pos_counts * (neg_below + 0.5 * neg_counts)) / (n_pos * n_neg))


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    ok = values[np.isfinite(values)]
    if len(ok) == 0:
        return math.nan, math.nan
    return float(np.quantile(ok, alpha / 2)), float(np.quantile(ok, 1 - alpha / 2))


def _binary_inputs(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]  # [P(0), P(1)] columns -> P(1)
    p = p.ravel()
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities: pass one P(class 1) per row")
    if len(y) and not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary labels must be 0/1, got values {sorted(set(np.unique(y)) - {0, 1})[:5]}")
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


# ---------------------------------------------------------------- multi-class

def multiclass_metrics(y_true, P, *, class_names: list[str]) -> dict:
    """Accuracy, macro/weighted P/R/F1, one-vs-rest AUCs, kappas and the confusion matrix of (N, K) probs."""
    y = np.asarray(y_true).astype(int).ravel()
    P = np.asarray(P, dtype=np.float64)
    k = len(class_names)
    if P.ndim != 2 or P.shape != (len(y), k):
        raise ValueError(f"probabilities have shape {P.shape}, expected ({len(y)}, {k}) for classes {class_names}")
    labels = list(range(k))
    pred = P.argmax(axis=1)
    out = {"accuracy": float(skm.accuracy_score(y, pred)),
           "balanced_accuracy": float(np.nanmean(_per_class_recall(y, pred, k)))}
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(pr), f"{avg}_recall": float(rc), f"{avg}_f1": float(f1)})
    aucs, notes = _ovr_aucs(y, P, class_names)
    finite = [a for a in aucs.values() if np.isfinite(a)]
    out["macro_auc"] = float(np.mean(finite)) if finite else math.nan
    out.update({f"auc_{c}": a for c, a in aucs.items()})
    out["cohen_kappa"] = _kappa(y, pred, labels, weights=None)
    out["quadratic_kappa"] = _kappa(y, pred, labels, weights="quadratic")
    pr, rc, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {c: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]),
                            "support": int(support[i]), "auc": aucs[c]} for i, c in enumerate(class_names)}
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()  # rows = true class
    out["class_names"] = list(class_names)
    out["notes"] = notes
    out["n"] = int(len(y))
    return out


def _ovr_aucs(y: np.ndarray, P: np.ndarray, class_names: list[str]) -> tuple[dict, list[str]]:
    aucs, notes = {}, []
    for i, c in enumerate(class_names):
        aucs[c] = fast_auc((y == i).astype(int), P[:, i])
        if not np.isfinite(aucs[c]):
            why = "absent" if not (y == i).any() else "is every row"
            notes.append(f"class {c}: one-vs-rest AUC undefined (class {why}); excluded from macro_auc")
    return aucs, notes


def _per_class_recall(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Recall of each class present in y (NaN for absent classes) — balanced accuracy is their mean."""
    return np.array([np.mean(pred[y == i] == i) if (y == i).any() else np.nan for i in range(k)])


def _kappa(y, pred, labels, *, weights) -> float:
    if len(np.unique(np.concatenate([y, pred]))) < 2:
        return math.nan  # kappa is 0/0 when truth and prediction are one constant class
    return float(skm.cohen_kappa_score(y, pred, labels=labels, weights=weights))


# ---------------------------------------------------------------- calibration

def reliability_bins(y_true, p, n_bins: int = 10) -> dict:
    """Equal-width bins: 1-D p = P(class 1) vs the positive rate; (N, K) = top-label confidence vs accuracy."""
    conf, hit = _confidence_and_outcome(y_true, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)  # bin i = (e_i, e_{i+1}], first closed
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        frac = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return {"edges": edges.tolist(), "count": count.astype(int).tolist(),
            "confidence": mean_conf.tolist(), "observed": frac.tolist()}  # NaN in empty bins


def expected_calibration_error(y_true, p, n_bins: int = 10) -> float:
    """Count-weighted mean |observed - confidence| over the reliability bins (0 = perfectly calibrated)."""
    bins = reliability_bins(y_true, p, n_bins)
    count = np.asarray(bins["count"], dtype=float)
    if count.sum() == 0:
        return math.nan
    gap = np.abs(np.asarray(bins["observed"]) - np.asarray(bins["confidence"]))
    return float(np.sum(np.where(count > 0, gap, 0.0) * count) / count.sum())


def _confidence_and_outcome(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y_true).astype(int).ravel()
    if p.ndim == 2 and p.shape[1] > 1:
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    return p.ravel(), y.astype(float)


# ---------------------------------------------------------------- across folds

def summarize_folds(fold_metrics: list[dict]) -> dict:
    """{metric: (mean, std)} over the numeric scalars every fold has; std is the sample std (ddof=1)."""
    if not fold_metrics:
        return {}
    keys = [k for k, v in fold_metrics[0].items() if _is_number(v) and all(_is_number(m.get(k)) for m in fold_metrics)]
    out = {}
    for k in keys:
        v = np.array([float(m[k]) for m in fold_metrics])
        ok = v[np.isfinite(v)]
        mean = float(ok.mean()) if len(ok) else math.nan
        std = float(ok.std(ddof=1)) if len(ok) > 1 else (0.0 if len(ok) else math.nan)
        out[k] = (mean, std)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def bootstrap_accuracy_diff(y, pred_a, pred_b, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Accuracy(a) - accuracy(b) of class predictions on the same rows, with a paired bootstrap CI."""
    y = np.asarray(y).astype(int).ravel()
    hit_a = (np.asarray(pred_a).ravel() == y).astype(float)
    hit_b = (np.asarray(pred_b).ravel() == y).astype(float)
    rng = np.random.default_rng(seed)
    d = np.array([np.mean(hit_a[i] - hit_b[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))])
    lo, hi = _percentile_ci(d, alpha)
    return {"acc_a": float(hit_a.mean()), "acc_b": float(hit_b.mean()), "diff": float(hit_a.mean() - hit_b.mean()),
            "ci": [lo, hi], "n_boot": int(n_boot), "n": int(len(y))}
