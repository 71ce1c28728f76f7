"""gradcam.py on a tiny CNN trained to find a bright square: shapes, range, and where the map points."""
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
