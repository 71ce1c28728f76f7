"""tta.py: the 8 D4 transforms on batches, and TTA averaging on invariant / non-invariant models."""
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from histofold import imageops, tta


@pytest.fixture
def batch():
    return np.random.default_rng(0).random((3, 6, 6, 3)).astype(np.float32)  # no symmetry


def test_tta_uses_the_one_d4(batch):
    """TTA averages over imageops' D4: 8 distinct transforms, the same ones augmentation draws from."""
    outs = [imageops.dihedral(batch, k).numpy() for k in tta.tta_subset(8)]
    for a, b in itertools.combinations(range(8), 2):
        assert not np.allclose(outs[a], outs[b]), (a, b)
    # D4 built independently: 4 rotations of the image and of its mirror image, per image
    group = [np.rot90(m, r, axes=(1, 2)) for m in (batch, batch[:, :, ::-1]) for r in range(4)]
    assert all(any(np.array_equal(o, g) for g in group) for o in outs)
    assert tta.tta_subset(2) == [0, imageops.HFLIP]
    assert not any(imageops.swaps_hw(k) for k in tta.tta_subset(4))


def test_tta_subsets():
    assert [len(tta.tta_subset(n)) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert tta.tta_subset(1) == [0] and sorted(tta.tta_subset(8)) == list(range(8))
    assert all(len(set(tta.tta_subset(n))) == n for n in (1, 2, 4, 8))
    with pytest.raises(ValueError, match="--tta=3"):
        tta.tta_subset(3)


def _dataset(x, n_per_batch=4):
    ids = [f"img{i:02d}" for i in range(len(x))]
    y = (np.arange(len(x)) % 2).astype(np.float32)[:, None]  # binary (B, 1) labels
    return tf.data.Dataset.from_tensor_slices((x, y, ids)).batch(n_per_batch), ids


def _invariant_model():
    """Per-pixel 1x1 conv + global average pooling: any permutation of pixels gives the same output."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 1, activation="tanh")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))


def _position_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Flatten()(inp)
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))


def test_invariant_model_same_with_and_without_tta():
    x = np.random.default_rng(1).normal(size=(10, 6, 6, 3)).astype(np.float32)
    ds, ids = _dataset(x)
    model = _invariant_model()
    got_ids, labels, p8 = tta.predict_tta(model, ds, n=8, verbose=False)
    _, _, p1 = tta.predict_tta(model, ds, n=1, verbose=False)
    assert list(got_ids) == ids and labels.tolist() == [i % 2 for i in range(10)]
    assert p8.shape == (10, 1) and p8.dtype == np.float32
    np.testing.assert_allclose(p8, p1, atol=1e-6)
    np.testing.assert_allclose(p1, model.predict(x, verbose=0), atol=1e-6)


def test_position_model_changes_and_equals_manual_mean():
    x = np.random.default_rng(2).normal(size=(10, 6, 6, 3)).astype(np.float32)
    ds, _ = _dataset(x)
    model = _position_model()
    _, _, p1 = tta.predict_tta(model, ds, n=1, verbose=False)
    _, _, p4 = tta.predict_tta(model, ds, n=4, verbose=False)
    assert np.abs(p4 - p1).max() > 1e-3
    numpy_d4 = {0: lambda a: a, imageops.ROT180: lambda a: a[:, ::-1, ::-1], imageops.HFLIP: lambda a: a[:, :, ::-1],
                imageops.VFLIP: lambda a: a[:, ::-1]}  # written out by hand, independent of imageops
    manual = np.mean([model.predict(np.ascontiguousarray(numpy_d4[k](x)), verbose=0) for k in tta.tta_subset(4)],
                     axis=0)
    np.testing.assert_allclose(p4, manual, atol=1e-6)


def test_non_square_images_need_shape_keeping_tta():
    inp = keras.Input((4, 6, 3))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inp)))
    x = np.zeros((2, 4, 6, 3), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(2, np.int32), ["a", "b"])).batch(2)
    assert tta.predict_tta(model, ds, n=4, verbose=False)[2].shape == (2, 1)
    with pytest.raises(ValueError, match="square images"):
        tta.predict_tta(model, ds, n=8, verbose=False)


def test_to_class_probs():
    np.testing.assert_allclose(tta.to_class_probs(np.array([[0.2], [0.9]]), 2), [[0.8, 0.2], [0.1, 0.9]])
    three = np.array([[0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(tta.to_class_probs(three, 3), three)
    with pytest.raises(ValueError, match="3 classes"):
        tta.to_class_probs(np.array([[0.2], [0.9]]), 3)
