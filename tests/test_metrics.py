"""metrics.py against sklearn and hand-computed values."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from histofold import metrics


@pytest.fixture
def binary_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0, 1)
    p[:20] = np.round(p[:20], 1)  # some ties
    return y, p


def test_binary_metrics_match_sklearn(binary_data):
    y, p = binary_data
    for t in (0.5, 0.3):
        m = metrics.binary_metrics(y, p, threshold=t)
        pred = (p >= t).astype(int)
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
        assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
        assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)


def test_specificity_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.7, 0.9, 0.4])
    m = metrics.binary_metrics(y, p)
    assert m["specificity"] == pytest.approx(2 / 4)  # negatives 0.1, 0.2 below 0.5; 0.6, 0.7 above
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["threshold"] == 0.5


def test_youden_threshold_separates_perfectly():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4])  # separable, but below 0.5
    t = metrics.youden_threshold(y, p)
    m = metrics.binary_metrics(y, p, threshold=t)
    assert m["accuracy"] == 1.0 and metrics.binary_metrics(y, p)["accuracy"] == 0.5


def test_binary_report_ci_contains_point(binary_data):
    y, p = binary_data
    r = metrics.binary_report(y, p, n_boot=300, seed=1)
    lo, hi = r["auc_ci"]
    assert lo < r["auc"] < hi and hi - lo < 0.2
    assert r["at_youden"]["threshold"] == r["youden_threshold"]
    assert r == metrics.binary_report(y, p, n_boot=300, seed=1)  # seeded: reproducible


def test_one_class_auc_is_nan_not_error():
    assert math.isnan(metrics.binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])["roc_auc"])
    assert all(math.isnan(v) for v in metrics.bootstrap_auc_ci([1, 1], [0.1, 0.2], n_boot=10))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="3 labels but 2"):
        metrics.binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        metrics.binary_metrics([0, 2], [0.1, 0.2])


def test_paired_diff_ci_sign_on_clearly_better_model():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    good = np.clip(0.6 * y + rng.normal(0.2, 0.15, 400), 0, 1)
    bad = np.clip(0.1 * y + rng.normal(0.45, 0.2, 400), 0, 1)
    d = metrics.bootstrap_auc_diff(y, good, bad, n_boot=300, seed=0)
    assert d["diff"] == pytest.approx(skm.roc_auc_score(y, good) - skm.roc_auc_score(y, bad))
    assert 0 < d["ci"][0] <= d["diff"] <= d["ci"][1] and d["p_value"] < 0.01
    flipped = metrics.bootstrap_auc_diff(y, bad, good, n_boot=300, seed=0)
    assert flipped["ci"][1] < 0
    same = metrics.bootstrap_auc_diff(y, good, good, n_boot=50, seed=0)
    assert same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    k, n = 4, 400
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = P.argmax(1)
    names = ["a", "b", "c", "d"]
    m = metrics.multiclass_metrics(y, P, class_names=names)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(skm.precision_score(y, pred, average=avg))
        assert m[f"{avg}_recall"] == pytest.approx(skm.recall_score(y, pred, average=avg))
        assert m[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["quadratic_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"))
    for i, c in enumerate(names):
        assert m[f"auc_{c}"] == pytest.approx(skm.roc_auc_score(y == i, P[:, i]))
    assert m["notes"] == []


def test_multiclass_absent_class_gives_nan_auc_with_note():
    y = np.array([0, 1, 0, 1, 0])
    P = np.array([[.8, .1, .1], [.2, .7, .1], [.6, .3, .1], [.3, .3, .4], [.5, .4, .1]])
    m = metrics.multiclass_metrics(y, P, class_names=["x", "y", "z"])
    assert math.isnan(m["auc_z"]) and m["macro_auc"] == pytest.approx(np.mean([m["auc_x"], m["auc_y"]]))
    assert len(m["notes"]) == 1 and "class z" in m["notes"][0]
    assert m["per_class"]["z"]["support"] == 0
    with pytest.raises(ValueError, match=r"expected \(5, 2\)"):
        metrics.multiclass_metrics(y, P, class_names=["x", "y"])


def test_ece_zero_when_bins_are_calibrated():
    # bin of p=0.25 with 1/4 positives, bin of p=0.75 with 3/4 positives
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    # all predictions 0.9 but only half positive -> gap 0.4 in one bin
    assert metrics.expected_calibration_error([1, 0, 1, 0], [0.9] * 4) == pytest.approx(0.4)


def test_reliability_bins_multiclass_uses_top_label():
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7], [0.7, 0.1, 0.2]])
    y = np.array([0, 1, 1, 2])  # top label right in 2 of 4 rows, each with confidence 0.7
    bins = metrics.reliability_bins(y, P, n_bins=10)
    assert sum(bins["count"]) == 4 and bins["count"][6] == 4
    assert bins["observed"][6] == pytest.approx(0.5) and bins["confidence"][6] == pytest.approx(0.7)
    assert metrics.expected_calibration_error(y, P) == pytest.approx(0.2)


def test_summarize_folds():
    s = metrics.summarize_folds([{"auc": 0.8, "n": 10, "name": "x"}, {"auc": 0.9, "n": 12, "name": "y"}])
    assert set(s) == {"auc", "n"}
    assert s["auc"][0] == pytest.approx(0.85) and s["auc"][1] == pytest.approx(np.std([0.8, 0.9], ddof=1))
