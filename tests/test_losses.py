"""Tests for histofold/losses.py: loss values against hand-computed ones, focal(gamma=0) == CE, metric names."""
import math

import keras
import numpy as np
import pytest

from histofold import losses


def value(loss, y, p, w=None):
    y, p = np.asarray(y, "float32"), np.asarray(p, "float32")
    out = loss(y, p) if w is None else loss(y, p, sample_weight=np.asarray(w, "float32"))
    return float(keras.ops.convert_to_numpy(out))


# numpy references, written from the definitions (mean over the batch, as Keras' default reduction)

def ref_bce(y, p, smoothing=0.0):
    y = np.asarray(y, float) * (1 - smoothing) + 0.5 * smoothing       # binary: targets pulled to 1/2
    p = np.asarray(p, float)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def ref_binary_focal(y, p, gamma=2.0):
    y, p = np.asarray(y, float), np.asarray(p, float)
    pt = np.where(y == 1, p, 1 - p)
    return float(np.mean(-(1 - pt) ** gamma * np.log(pt)))


def ref_cce(y, p, smoothing=0.0, gamma=0.0):
    y, p = np.asarray(y, float), np.asarray(p, float)
    y = y * (1 - smoothing) + smoothing / y.shape[1]                    # multi-class: pulled to 1/K
    return float(np.mean(np.sum(-y * (1 - p) ** gamma * np.log(p), axis=1)))


BINARY_CASES = [
    ([[1.0], [0.0]], [[0.8], [0.4]]),
    ([[1.0], [0.0], [1.0]], [[0.9], [0.3], [0.2]]),
    ([[0.0], [0.0], [1.0], [1.0]], [[0.05], [0.6], [0.55], [0.99]]),
]
MULTI_CASES = [
    ([[0, 1, 0], [1, 0, 0]], [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]),
    ([[0, 0, 1], [0, 1, 0]], [[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]),
    ([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], [[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.4, 0.1]]),
]


def test_binary_cross_entropy_and_smoothing_by_hand():
    y, p = [[1.0], [0.0]], [[0.8], [0.4]]
    bce = -(math.log(0.8) + math.log(0.6)) / 2                          # 0.36698...
    assert bce == pytest.approx(0.366985, abs=1e-6)
    assert value(losses.make_loss(num_classes=2), y, p) == pytest.approx(bce, rel=1e-5)
    # smoothing 0.2: targets 1 -> 0.9, 0 -> 0.1
    smooth = -((0.9 * math.log(0.8) + 0.1 * math.log(0.2)) + (0.1 * math.log(0.4) + 0.9 * math.log(0.6))) / 2
    assert smooth == pytest.approx(0.456573, abs=1e-6)
    assert value(losses.make_loss(num_classes=2, label_smoothing=0.2), y, p) == pytest.approx(smooth, rel=1e-5)


@pytest.mark.parametrize("y,p", BINARY_CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_binary_cross_entropy_values(y, p, smoothing):
    loss = losses.make_loss(num_classes=2, label_smoothing=smoothing)
    assert value(loss, y, p) == pytest.approx(ref_bce(y, p, smoothing), rel=1e-5)


def test_categorical_cross_entropy_by_hand():
    y, p = [[0, 1, 0], [1, 0, 0]], [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
    cce = -(math.log(0.7) + math.log(0.5)) / 2                          # 0.52491...
    assert cce == pytest.approx(0.524911, abs=1e-6)
    assert value(losses.make_loss(num_classes=3), y, p) == pytest.approx(cce, rel=1e-5)
    # smoothing 0.3 over 3 classes: the true class 0.8, the others 0.1
    smooth = -((0.1 * math.log(0.2) + 0.8 * math.log(0.7) + 0.1 * math.log(0.1))
               + (0.8 * math.log(0.5) + 0.1 * math.log(0.25) + 0.1 * math.log(0.25))) / 2
    assert value(losses.make_loss(num_classes=3, label_smoothing=0.3), y, p) == pytest.approx(smooth, rel=1e-5)


@pytest.mark.parametrize("y,p", MULTI_CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_categorical_cross_entropy_values(y, p, smoothing):
    loss = losses.make_loss(num_classes=len(y[0]), label_smoothing=smoothing)
    assert value(loss, y, p) == pytest.approx(ref_cce(y, p, smoothing), rel=1e-5)


def test_focal_gamma_zero_equals_cross_entropy_and_gamma_two_by_hand():
    yb, pb = [[1.0], [0.0], [1.0]], [[0.9], [0.3], [0.2]]
    assert value(losses.make_loss(num_classes=2, focal=True, focal_gamma=0.0), yb, pb) == pytest.approx(
        value(losses.make_loss(num_classes=2), yb, pb), rel=1e-5)
    ym, pm = [[0, 0, 1], [0, 1, 0]], [[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
    assert value(losses.make_loss(num_classes=3, focal=True, focal_gamma=0.0), ym, pm) == pytest.approx(
        value(losses.make_loss(num_classes=3), ym, pm), rel=1e-5)
    # binary, gamma 2: -(1 - p_t)^2 log p_t, averaged; p_t = 0.9, 0.7, 0.2
    focal = -sum((1 - pt) ** 2 * math.log(pt) for pt in (0.9, 0.7, 0.2)) / 3
    assert focal == pytest.approx(0.354398, abs=1e-6)
    assert value(losses.make_loss(num_classes=2, focal=True), yb, pb) == pytest.approx(focal, rel=1e-4)
    # categorical, gamma 2 (alpha 1: no extra scale): p_t = 0.8, 0.3
    cat = -((1 - 0.8) ** 2 * math.log(0.8) + (1 - 0.3) ** 2 * math.log(0.3)) / 2
    assert cat == pytest.approx(0.299436, abs=1e-6)
    assert value(losses.make_loss(num_classes=3, focal=True), ym, pm) == pytest.approx(cat, rel=1e-4)
    assert isinstance(losses.make_loss(num_classes=4, focal=True), keras.losses.CategoricalFocalCrossentropy)
    assert isinstance(losses.make_loss(num_classes=2, focal=True), keras.losses.BinaryFocalCrossentropy)


@pytest.mark.parametrize("y,p", BINARY_CASES)
@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0])
def test_binary_focal_values(y, p, gamma):
    loss = losses.make_loss(num_classes=2, focal=True, focal_gamma=gamma)
    assert value(loss, y, p) == pytest.approx(ref_binary_focal(y, p, gamma), rel=1e-4)
    assert value(loss, y, p) < ref_bce(y, p)                            # easy examples weigh less


@pytest.mark.parametrize("y,p", MULTI_CASES)
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_categorical_focal_values(y, p, gamma):
    loss = losses.make_loss(num_classes=len(y[0]), focal=True, focal_gamma=gamma)
    assert value(loss, y, p) == pytest.approx(ref_cce(y, p, gamma=gamma), rel=1e-4)


def test_sample_weights_scale_each_example():
    # the reader passes class weights as sample weights: the batch loss is mean(w_i * loss_i)
    y, p, w = [[1.0], [0.0]], [[0.8], [0.4]], [2.0, 0.5]
    expected = (2.0 * -math.log(0.8) + 0.5 * -math.log(0.6)) / 2
    assert value(losses.make_loss(num_classes=2), y, p, w) == pytest.approx(expected, rel=1e-5)
    ym, pm = [[0, 1, 0], [1, 0, 0]], [[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
    expected = (0.0 * -math.log(0.7) + 3.0 * -math.log(0.5)) / 2
    assert value(losses.make_loss(num_classes=3), ym, pm, [0.0, 3.0]) == pytest.approx(expected, rel=1e-5)


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
