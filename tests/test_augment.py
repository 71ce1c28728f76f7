"""augment.py: the seeded batch ops (geometry, fused stain/colour jitter, equalisation, mixup) and the presets.

The D4 group itself is histofold.imageops (tests/test_imageops.py); a one-image case is a batch of one.
"""
import numpy as np
import pytest
import tensorflow as tf

from histofold import augment as A
from histofold import imageops
from histofold.errors import UsageError


@pytest.fixture(scope="module")
def image():
    """A random (24, 24, 3) uint8 image: no symmetry, so every D4 element moves it."""
    return np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def batch(image):
    """Four copies of the image: per-image draws make them differ after augmentation."""
    return np.stack([image] * 4)


@pytest.fixture(scope="module")
def mid(image):
    """(4, 24, 24, 3) float32 in [64, 191]: far from the clip limits, so colour ops stay linear."""
    return np.stack([image] * 4).astype(np.float32) * 0.5 + 64


def draws(seed, b, n):
    """The (B, n) U(-1, 1) draws an op with `n` parameters makes from `seed`."""
    return tf.random.stateless_uniform([b, n], tf.constant(seed), -1.0, 1.0).numpy()


# ---------------------------------------------------------------- geometry

def test_batch_random_dihedral_draws_every_element_per_image(batch):
    expected = {imageops.dihedral(batch[0], k).numpy().tobytes() for k in imageops.DIHEDRAL}
    drawn = set()
    for s in range(16):
        out = A.batch_random_dihedral(tf.constant(batch), tf.constant([s, 1])).numpy()
        assert out.dtype == np.uint8 and out.shape == batch.shape
        drawn |= {o.tobytes() for o in out}
    assert drawn == expected


def test_batch_random_dihedral_of_one_image_is_one_d4_element(image):
    expected = {imageops.dihedral(image, k).numpy().tobytes() for k in imageops.DIHEDRAL}
    drawn = {A.batch_random_dihedral(tf.constant(image[None]), tf.constant([s, 1])).numpy()[0].tobytes()
             for s in range(64)}
    assert drawn == expected


def test_batch_random_dihedral_keeps_shape_of_non_square_images():
    rect = np.random.default_rng(1).integers(0, 256, (1, 8, 12, 3), dtype=np.uint8)
    outs = {A.batch_random_dihedral(tf.constant(rect), tf.constant([s, 0])).numpy().tobytes() for s in range(40)}
    expected = {imageops.dihedral(rect[0], k).numpy().tobytes() for k in imageops.SHAPE_KEEPING}
    assert outs == expected and len(outs) == 4                 # id, rot180 and the two flips


@pytest.mark.parametrize("spec", [[None, 24, 24, 3], [None, None, None, 3]], ids=["known_hw", "unknown_hw"])
def test_batch_random_dihedral_in_graph_mode_draws_all_8_for_square_images(batch, spec):
    # the docstring: all 8 elements when H == W, whether or not the size is known when tracing
    fn = tf.function(A.batch_random_dihedral, input_signature=[
        tf.TensorSpec(spec, tf.uint8), tf.TensorSpec([2], tf.int64)])
    expected = {imageops.dihedral(batch[0], k).numpy().tobytes() for k in imageops.DIHEDRAL}
    drawn = set()
    for s in range(16):
        drawn |= {o.tobytes() for o in fn(tf.constant(batch), tf.constant([s, 1], tf.int64)).numpy()}
    assert drawn == expected


def test_affine_with_zero_strength_is_identity_and_moves_pixels_otherwise(batch):
    seed = tf.constant([9, 9])
    same = A.batch_random_affine(batch, seed, rotate_deg=0, translate=0, shear_deg=0, zoom=0).numpy()
    np.testing.assert_allclose(same, batch, atol=1e-3)
    moved = A.batch_random_affine(batch, seed, rotate_deg=30, translate=0.1, shear_deg=10, zoom=0.2).numpy()
    assert moved.dtype == np.float32 and moved.shape == batch.shape
    assert np.abs(moved - batch).mean() > 10
    assert not np.array_equal(moved[0], moved[1])               # each image its own transform


def test_affine_shift_only_translates():
    # a horizontal ramp shifted by t pixels: interior values change by exactly the shift times the slope
    ramp = np.tile(np.arange(32, dtype=np.float32)[None, :, None] * 4.0, (32, 1, 3))[None]  # (1, 32, 32, 3)
    seed = tf.constant([3, 4])
    out = A.batch_random_affine(ramp, seed, rotate_deg=0, translate=0.1, shear_deg=0, zoom=0).numpy()[0]
    tx = draws([3, 4], 1, 5)[0, 3] * 0.1 * 32                  # shift in pixels along x (output->input map)
    interior = out[8:24, 8:24, 0] - ramp[0, 8:24, 8:24, 0]
    np.testing.assert_allclose(interior, 4.0 * tx, atol=1e-2)


def test_crop_resize_at_full_scale_is_identity_and_zooms_otherwise(batch):
    out = A.batch_random_crop_resize(batch, tf.constant([1, 1]), scale=(1.0, 1.0)).numpy()
    np.testing.assert_allclose(out, batch, atol=1e-3)
    zoomed = A.batch_random_crop_resize(batch, tf.constant([1, 1]), scale=(0.25, 0.25)).numpy()
    assert np.abs(zoomed - batch).mean() > 10


# ---------------------------------------------------------------- colour

def test_brightness_contrast_matches_its_formula(mid):
    seed = [0, 3]
    out = A.batch_random_brightness_contrast(mid, tf.constant(seed), brightness=0.1, contrast=0.2).numpy()
    u = draws(seed, 4, 2)
    factor = (1 + 0.2 * u[:, 1])[:, None, None, None]
    mean = mid.mean(axis=(1, 2), keepdims=True)
    expected = (mid - mean) * factor + mean + (u[:, 0] * 0.1 * 255)[:, None, None, None]
    np.testing.assert_allclose(out, np.clip(expected, 0, 255), atol=1e-3)


def test_brightness_shift_stays_within_bounds(mid):
    shifts = []
    for s in range(10):
        out = A.batch_random_brightness_contrast(mid, tf.constant([0, s]), brightness=0.1, contrast=0.0).numpy()
        shifts += list(out.mean(axis=(1, 2, 3)) - mid.mean(axis=(1, 2, 3)))
    assert max(abs(s) for s in shifts) <= 0.1 * 255 + 1e-3
    assert np.std(shifts) > 1.0


def test_hed_round_trip(image):
    np.testing.assert_allclose(A.hed_to_rgb(A.rgb_to_hed(image)).numpy(), image, atol=0.01)
    white = np.full((1, 1, 3), 255.0, np.float32)
    np.testing.assert_allclose(A.rgb_to_hed(white).numpy(), 0.0, atol=1e-6)   # white glass: no stain


def test_stain_with_every_strength_zero_is_identity(batch):
    out = A.batch_random_stain(batch, tf.constant([5, 6]), hed_sigma=0.0, hed_bias=0.0, hue=0.0,
                               saturation=0.0, brightness=0.0, contrast=0.0).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, batch, atol=0.01)


def test_stain_hed_part_equals_the_explicit_stain_round_trip(batch):
    seed = [5, 6]
    out = A.batch_random_stain(batch, tf.constant(seed), hed_sigma=0.1, hed_bias=0.1, hue=0.0,
                               saturation=0.0, brightness=0.0, contrast=0.0).numpy()
    u = draws(seed, 4, 10)
    stains = A.rgb_to_hed(batch).numpy() * (1 + 0.1 * u[:, None, None, :3]) + 0.1 * u[:, None, None, 3:6]
    np.testing.assert_allclose(out, A.hed_to_rgb(tf.constant(stains)).numpy(), atol=0.05)
    assert np.abs(out - batch).mean() > 1.0


def test_stain_saturation_part_scales_chroma_about_luma(mid):
    seed = [2, 3]
    out = A.batch_random_stain(mid, tf.constant(seed), hed_sigma=0.0, hed_bias=0.0, hue=0.0,
                               saturation=0.5, brightness=0.0, contrast=0.0).numpy()
    s = (1 + 0.5 * draws(seed, 4, 10)[:, 7])[:, None, None, None]
    luma = (mid @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    np.testing.assert_allclose(out, np.clip(s * mid + (1 - s) * luma, 0, 255), atol=0.02)


def test_stain_contrast_and_brightness_parts_match_their_formula(mid):
    seed = [7, 1]
    out = A.batch_random_stain(mid, tf.constant(seed), hed_sigma=0.0, hed_bias=0.0, hue=0.0,
                               saturation=0.0, brightness=0.1, contrast=0.2).numpy()
    u = draws(seed, 4, 10)
    factor = (1 + 0.2 * u[:, 8])[:, None, None, None]
    mean = mid.mean(axis=(1, 2), keepdims=True)
    expected = (mid - mean) * factor + mean + (u[:, 9] * 0.1 * 255)[:, None, None, None]
    np.testing.assert_allclose(out, np.clip(expected, 0, 255), atol=0.02)


def test_stain_hue_turns_colour_but_keeps_grey_and_intensity(mid):
    seed = [2, 3]
    kw = dict(hed_sigma=0.0, hed_bias=0.0, saturation=0.0, brightness=0.0, contrast=0.0)
    moved = A.batch_random_stain(mid, tf.constant(seed), hue=0.1, **kw).numpy()
    assert np.abs(moved - mid).mean() > 1.0
    # a turn about the grey axis keeps each pixel's R + G + B (its projection on the grey axis)
    np.testing.assert_allclose(moved.sum(-1), mid.sum(-1), atol=0.05)
    grey = np.repeat(mid[..., :1], 3, axis=-1)
    np.testing.assert_allclose(A.batch_random_stain(grey, tf.constant(seed), hue=0.3, **kw).numpy(), grey,
                               atol=0.02)
    # saturation keeps grey too (luma of a grey pixel is the pixel)
    np.testing.assert_allclose(A.batch_random_stain(grey, tf.constant(seed), hue=0.3, **{**kw, "saturation": 0.5})
                               .numpy(), grey, atol=0.02)


def test_stain_is_seeded_and_per_image(batch):
    a = A.batch_random_stain(batch, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(a, A.batch_random_stain(batch, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a, A.batch_random_stain(batch, tf.constant([1, 3])).numpy())
    assert len({o.tobytes() for o in a}) == len(batch)
    assert a.min() >= 0.0 and a.max() <= 255.0


def test_equalize_flattens_the_histogram():
    rng = np.random.default_rng(2)
    low = rng.normal(100, 10, (1, 32, 32, 3)).clip(0, 255).astype(np.uint8)  # narrow, peaked histogram
    out = A.batch_equalize_histogram(low).numpy()
    for c in range(3):
        before = np.histogram(low[..., c], bins=8, range=(0, 256))[0]
        after = np.histogram(out[..., c], bins=8, range=(0, 256))[0]
        assert after.std() < before.std() / 2
        assert out[..., c].min() == 0 and out[..., c].max() == 255
    # monotone: brighter input pixels never get darker outputs
    order = np.argsort(low[..., 0], axis=None)
    assert np.all(np.diff(out[..., 0].ravel()[order]) >= 0)


def test_equalize_is_per_image_and_leaves_a_constant_channel_alone():
    rng = np.random.default_rng(3)
    imgs = np.stack([rng.normal(m, 10, (16, 16, 3)).clip(0, 255).astype(np.uint8) for m in (60, 150)])
    out = A.batch_equalize_histogram(imgs).numpy()
    for o, i in zip(out, imgs):
        np.testing.assert_array_equal(o, A.batch_equalize_histogram(i[None]).numpy()[0])
    flat = np.full((1, 8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(A.batch_equalize_histogram(flat).numpy(), flat.astype(np.float32))


def test_zero_strength_batch_ops_are_identity(batch):
    seed = tf.constant([4, 2])
    for out in [A.batch_random_brightness_contrast(batch, seed, brightness=0.0, contrast=0.0),
                A.batch_random_affine(batch, seed, rotate_deg=0, translate=0, shear_deg=0, zoom=0),
                A.batch_random_crop_resize(batch, seed, scale=(1.0, 1.0))]:
        np.testing.assert_allclose(out.numpy(), batch, atol=0.01)


# ---------------------------------------------------------------- mixup

def test_mixup_blends_images_labels_and_weights_by_one_lambda():
    n = 6
    images = tf.constant(np.arange(n, dtype=np.float32)[:, None, None, None] * 10 * np.ones((n, 4, 4, 3), np.float32))
    y = tf.constant(np.eye(n, dtype=np.float32))                # one "class" per image reveals its partner
    w = tf.constant(np.arange(1, n + 1, dtype=np.float32))
    out, y_out, w_out = (t.numpy() for t in A.batch_mixup(images, y, w, tf.constant([3, 1], tf.int64), alpha=0.4))
    np.testing.assert_allclose(y_out.sum(1), 1.0, rtol=1e-6)
    assert (np.diag(y_out) >= 0.5 - 1e-6).all()                 # lam folded to >= 0.5: the image stays major
    assert (np.count_nonzero(y_out > 1e-6, axis=1) <= 2).all()  # one partner each
    np.testing.assert_allclose(out[:, 0, 0, 0], y_out @ (np.arange(n) * 10.0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w_out, y_out @ w.numpy(), rtol=1e-5)
    assert (np.diag(y_out) < 1 - 1e-6).any()                    # it mixed something
    again = A.batch_mixup(images, y, None, tf.constant([3, 1], tf.int64), alpha=0.4)
    np.testing.assert_array_equal(again[1].numpy(), y_out)
    assert again[2] is None


# ---------------------------------------------------------------- presets

def test_preset_names_and_aliases():
    assert set(A.AUGMENT_PRESETS) == {"none", "dihedral", "light", "stain", "stain_strong", "strong", "seed001"}
    assert A.check_preset("medium") == "stain"
    assert A.check_preset("strong") == "strong"
    with pytest.raises(UsageError, match=r"--augment='heavy': choose one of none, dihedral, light.*seed001"):
        A.check_preset("heavy")
    with pytest.raises(UsageError, match="heavy"):
        A.build_augmenter("heavy")


def test_medium_alias_augments_exactly_as_stain(batch):
    seed = tf.constant([1, 2], tf.int64)
    np.testing.assert_array_equal(A.build_augmenter("medium", seed=3)(batch, seed).numpy(),
                                  A.build_augmenter("stain", seed=3)(batch, seed).numpy())


@pytest.mark.parametrize("preset", sorted(A.AUGMENT_PRESETS))
def test_presets_keep_shape_dtype_range_and_are_seeded(batch, preset):
    fn = A.build_augmenter(preset, seed=7)
    a = fn(batch, tf.constant([1, 2])).numpy()
    b = fn(batch, tf.constant([1, 2])).numpy()
    assert a.shape == batch.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 255.0
    np.testing.assert_array_equal(a, b)
    if preset == "none":
        np.testing.assert_array_equal(a, batch.astype(np.float32))
    else:
        # different batch seeds and a different builder seed give different images (dihedral-only
        # presets repeat 1 time in 8, hence the majority vote over 12 seeds)
        others = [fn(batch, tf.constant([1, s])).numpy()[0] for s in range(3, 15)]
        assert sum(not np.array_equal(a[0], o) for o in others) >= 8
        fn8 = A.build_augmenter(preset, seed=8)
        assert sum(not np.array_equal(fn8(batch, tf.constant([1, s])).numpy()[0], o)
                   for s, o in zip(range(3, 15), others)) >= 8


def test_dihedral_preset_only_permutes_pixels(batch):
    out = A.build_augmenter("dihedral", seed=0)(batch, tf.constant([0, 1])).numpy()
    expected = {imageops.dihedral(batch[0], k).numpy().astype(np.float32).tobytes() for k in imageops.DIHEDRAL}
    assert {o.tobytes() for o in out} <= expected


@pytest.mark.parametrize("preset", ["light", "stain", "stain_strong", "strong", "seed001"])
def test_presets_draw_per_image_within_a_batch(batch, preset):
    out = A.build_augmenter(preset, seed=0)(batch, tf.constant([0, 5])).numpy()
    assert len({o.tobytes() for o in out}) == len(batch)


def test_presets_work_in_graph_mode_with_unknown_batch_size(image):
    fn = tf.function(A.build_augmenter("strong"), input_signature=[
        tf.TensorSpec([None, 24, 24, 3], tf.float32), tf.TensorSpec([2], tf.int64)])
    out = fn(tf.constant(np.stack([image] * 3), tf.float32), tf.constant([3, 4], tf.int64))
    assert out.shape == (3, 24, 24, 3)
