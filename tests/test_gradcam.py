"""gradcam.py on a tiny CNN trained to find a bright square: shapes, range, where the map points (corners
included), and the zero-padding border response removed."""
import keras
import numpy as np
import pytest

from histofold import gradcam

SIZE, SQ = 32, 8


def _square_data(n, seed):
    """Dim noise; class 1 images hold one bright SQ x SQ square at a random place. Returns x, y, masks."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, SIZE, SIZE, 3)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, SIZE - SQ, 2)
        x[i, r:r + SQ, c:c + SQ] = 230.0
        masks[i, r:r + SQ, c:c + SQ] = True
    return x, y, masks


def _cnn(num_out=1, act="sigmoid", split_head=True):
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="last_conv")(h)
    h = keras.layers.GlobalAveragePooling2D(name="head_pool")(h)
    if split_head:  # the layout of histofold.models: head_logits -> head_probs
        out = keras.layers.Activation(act, name="head_probs")(keras.layers.Dense(num_out, name="head_logits")(h))
    else:
        out = keras.layers.Dense(num_out, activation=act, name="head_logits")(h)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def trained():
    x, y, _ = _square_data(256, seed=0)
    model = _cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


def test_maps_shape_range_and_locate_the_square(trained):
    x, y, masks = _square_data(16, seed=1)
    p = trained.predict(x, verbose=0)[:, 0]
    assert np.mean((p >= 0.5) == y) >= 0.9  # the model learned the pattern
    maps, valid = gradcam.gradcam(trained, x, return_valid=True)
    assert maps.shape == (16, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    pos = np.flatnonzero((y == 1) & valid)
    assert len(pos) >= 6
    for i in pos:
        assert maps[i].std() > 0.01  # not constant
        assert maps[i].max() == pytest.approx(1.0)
    inside = np.array([maps[i][masks[i]].mean() for i in pos])
    outside = np.array([maps[i][~masks[i]].mean() for i in pos])
    assert np.mean(inside > outside) >= 0.8 and inside.mean() > 2 * outside.mean()


def _corner_images(seed):
    """Dim noise with the bright square touching each corner in turn: (4, SIZE, SIZE, 3), masks."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (4, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((4, SIZE, SIZE), bool)
    for i, (r, c) in enumerate([(0, 0), (0, SIZE - SQ), (SIZE - SQ, 0), (SIZE - SQ, SIZE - SQ)]):
        x[i, r:r + SQ, c:c + SQ] = 230.0
        masks[i, r:r + SQ, c:c + SQ] = True
    return x, masks


def test_evidence_in_a_corner_peaks_in_that_corner(trained):
    """The border cells are where zero padding distorts features most; evidence there must still win."""
    x, masks = _corner_images(seed=5)
    assert (trained.predict(x, verbose=0)[:, 0] >= 0.5).all()
    maps, valid = gradcam.gradcam(trained, x, return_valid=True)
    assert valid.all()
    for m, mask in zip(maps, masks):
        rows, cols = np.nonzero(mask)
        peak = np.unravel_index(np.argmax(m), m.shape)
        # the peak lies on the square or within one feature-map cell (stride 2) of it
        assert abs(peak[0] - rows.mean()) <= SQ / 2 + 2 and abs(peak[1] - cols.mean()) <= SQ / 2 + 2, peak
        assert m[mask].mean() > 2 * m[~mask].mean()


def test_padding_response_is_removed_and_featureless_maps_flagged(trained):
    """A flat patch holds no evidence anywhere; plain Grad-CAM still paints the zero-padding frame."""
    flat = np.full((3, SIZE, SIZE, 3), [[[[40.0]]], [[[120.0]]], [[[200.0]]]], np.float32)
    plain = gradcam.gradcam(trained, flat, class_index=1, correct_padding=False)
    border = np.ones((SIZE, SIZE), bool)
    border[2:-2, 2:-2] = False
    assert (np.abs(plain[:, border].mean(axis=1) - plain[:, ~border].mean(axis=1)) > 0.05).all()  # the frame
    for cls in (0, 1):
        maps, valid = gradcam.gradcam(trained, flat, class_index=cls, return_valid=True)
        assert not valid.any()  # nothing is localized: flagged, not stretched into a pattern
        spread = maps.reshape(3, -1).max(axis=1) - maps.reshape(3, -1).min(axis=1)
        assert (spread < 1e-4).all()  # the padding response is gone: a constant (or zero) map
    x, y, _ = _square_data(16, seed=6)
    neg = x[(y == 0) & (trained.predict(x, verbose=0)[:, 0] < 0.5)]
    frame = [np.abs(m[:, border].mean() - m[:, ~border].mean())  # what argues against the square
             for m in (gradcam.gradcam(trained, neg, correct_padding=False), gradcam.gradcam(trained, neg))]
    assert frame[1] < 0.7 * frame[0]


def test_layer_default_and_class_choice(trained):
    x, _, _ = _square_data(4, seed=2)
    assert gradcam.find_last_conv_layer(trained) == "last_conv"
    explicit = gradcam.gradcam(trained, x, layer_name="last_conv", class_index=1)
    np.testing.assert_allclose(gradcam.gradcam(trained, x, class_index=[1, 1, 1, 1]), explicit, atol=1e-6)
    other = gradcam.gradcam(trained, x, class_index=0)
    assert not np.allclose(explicit, other)  # class 0 map uses the opposite gradient sign


def test_probability_head_gives_same_map_as_logit_head():
    """Gradient of sigmoid(z) = p(1-p) x gradient of z: a per-image positive scale that normalisation removes."""
    x, _, _ = _square_data(4, seed=3)
    split, fused = _cnn(split_head=True), _cnn(split_head=False)
    fused.set_weights(split.get_weights())
    np.testing.assert_allclose(split.predict(x, verbose=0), fused.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(gradcam.gradcam(split, x, class_index=1), gradcam.gradcam(fused, x, class_index=1),
                               atol=1e-4)


def test_multiclass_maps_and_dead_maps_flagged():
    x, _, _ = _square_data(3, seed=4)
    model = _cnn(num_out=5, act="softmax")
    maps = gradcam.gradcam(model, x)
    assert maps.shape == (3, SIZE, SIZE) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    dead, valid = gradcam.gradcam(model, np.zeros((2, SIZE, SIZE, 3), np.float32), return_valid=True)
    assert not valid.any() and not dead.any()  # zero input -> ReLU features all 0 (no biases trained)


def test_overlay():
    img = np.full((6, 8, 3), 100, np.uint8)
    heat = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    out = gradcam.overlay(img, heat, alpha=0.4)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(gradcam.overlay(img, heat, alpha=0.0), img)
    assert not np.array_equal(out[0, 0], out[-1, -1])  # cold vs hot colour
    assert gradcam.overlay(img, heat[:3, :4]).shape == (6, 8, 3)  # heatmap resized to the image
