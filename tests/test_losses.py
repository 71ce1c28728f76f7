"""Tests for histofold/losses.py: loss values against hand-computed ones, focal(gamma=0) == CE, metric names."""
import math

import keras
import numpy as np
import pytest

from histofold import losses


def value(loss, y, p):
    return float(keras.ops.convert_to_numpy(loss(np.asarray(y, "float32"), np.asarray(p, "float32"))))


def test_binary_cross_entropy_and_smoothing_by_hand():
    y, p = [[1.0], [0.0]], [[0.8], [0.4]]
    bce = -(math.log(0.8) + math.log(0.6)) / 2
    assert value(losses.make_loss(num_classes=2), y, p) == pytest.approx(bce, rel=1e-5)
    # smoothing 0.2: targets 1 -> 0.9, 0 -> 0.1
    smooth = -((0.9 * math.log(0.8) + 0.1 * math.log(0.2)) + (0.1 * math.log(0.4) + 0.9 * math.log(0.6))) / 2
    assert value(losses.make_loss(num_classes=2, label_smoothing=0.2), y, p) == pytest.approx(smooth, rel=1e-5)


def test_categorical_cross_entropy_by_hand():
    y, p = [[0, 1, 0], [1, 0, 0]], [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
    assert value(losses.make_loss(num_classes=3), y, p) == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2,
                                                                         rel=1e-5)


def test_focal_gamma_zero_equals_cross_entropy_and_gamma_two_by_hand():
    yb, pb = [[1.0], [0.0], [1.0]], [[0.9], [0.3], [0.2]]
    assert value(losses.make_loss(num_classes=2, focal=True, focal_gamma=0.0), yb, pb) == pytest.approx(
        value(losses.make_loss(num_classes=2), yb, pb), rel=1e-5)
    ym, pm = [[0, 0, 1], [0, 1, 0]], [[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
    assert value(losses.make_loss(num_classes=3, focal=True, focal_gamma=0.0), ym, pm) == pytest.approx(
        value(losses.make_loss(num_classes=3), ym, pm), rel=1e-5)
    # gamma 2: -(1 - p_t)^2 log p_t, averaged; p_t = 0.9, 0.7, 0.2
    focal = -sum((1 - pt) ** 2 * math.log(pt) for pt in (0.9, 0.7, 0.2)) / 3
    assert value(losses.make_loss(num_classes=2, focal=True), yb, pb) == pytest.approx(focal, rel=1e-4)
    assert isinstance(losses.make_loss(num_classes=4, focal=True), keras.losses.CategoricalFocalCrossentropy)


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        losses.make_loss(num_classes=2, label_smoothing=1.5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.make_loss(num_classes=1)


def test_metric_names_and_monitor():
    assert [m.name for m in losses.make_metrics(2)] == ["auc", "accuracy"]
    assert [m.name for m in losses.make_metrics(4)] == ["accuracy", "macro_f1", "auc"]
    assert losses.default_monitor(2) == "val_auc" and losses.default_monitor(5) == "val_macro_f1"


def test_multiclass_metrics_values():
    acc, f1, auc = losses.make_metrics(3)
    y = np.eye(3, dtype="float32")[[0, 1, 2, 2]]
    p = np.array([[.8, .1, .1], [.1, .8, .1], [.1, .1, .8], [.6, .3, .1]], "float32")  # last one wrong
    for m in (acc, f1, auc):
        m.update_state(y, p)
    assert float(acc.result()) == pytest.approx(0.75)
    # per-class F1: class0 P=1/2 R=1 -> 2/3; class1 1; class2 P=1 R=1/2 -> 2/3
    assert float(f1.result()) == pytest.approx((2 / 3 + 1 + 2 / 3) / 3, rel=1e-5)
    assert 0.5 < float(auc.result()) <= 1.0


def test_compiles_and_trains_one_step_with_binary_metrics():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss=losses.make_loss(num_classes=2), metrics=losses.make_metrics(2))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    logs = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0).history
    assert {"loss", "auc", "accuracy", "val_auc"} <= set(logs)
