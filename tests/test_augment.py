"""augment.py: D4 transforms, seeded colour/geometry ops and the presets."""
import numpy as np
import pytest
import tensorflow as tf

from histofold import augment as A


@pytest.fixture(scope="module")
def image():
    """A random (24, 24, 3) uint8 image: no symmetry, so every D4 element moves it."""
    return np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def test_dihedral_gives_8_distinct_images_and_identity_at_0(image):
    outs = [A.dihedral(image, k).numpy() for k in A.DIHEDRAL]
    assert len({o.tobytes() for o in outs}) == 8
    np.testing.assert_array_equal(outs[0], image)
    assert all(o.dtype == np.uint8 for o in outs)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_inverse_dihedral_undoes_each(image, as_tensor):
    for k in A.DIHEDRAL:
        kk = tf.constant(k) if as_tensor else k
        np.testing.assert_array_equal(A.inverse_dihedral(A.dihedral(image, kk), kk).numpy(), image)


def test_dihedral_tensor_k_matches_int_k_and_batches(image):
    batch = np.stack([image, image[::-1]])                     # (2, H, W, 3)
    for k in A.DIHEDRAL:
        np.testing.assert_array_equal(A.dihedral(image, tf.constant(k)).numpy(), A.dihedral(image, k).numpy())
        np.testing.assert_array_equal(A.dihedral(batch, k).numpy()[1], A.dihedral(image[::-1], k).numpy())


def test_dihedral_rejects_out_of_range_k(image):
    with pytest.raises(ValueError, match="0..7"):
        A.dihedral(image, 8)


def test_random_dihedral_draws_every_d4_element(image):
    expected = {A.dihedral(image, k).numpy().tobytes() for k in A.DIHEDRAL}
    drawn = {A.random_dihedral(tf.constant(image), tf.constant([s, 1])).numpy().tobytes() for s in range(64)}
    assert drawn == expected


def test_random_dihedral_keeps_shape_of_non_square_images():
    rect = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    outs = {A.random_dihedral(tf.constant(rect), tf.constant([s, 0])).numpy().tobytes() for s in range(40)}
    assert len(outs) == 4                                      # id, rot180 and two flips
    assert all(np.frombuffer(o, np.uint8).size == rect.size for o in outs)


@pytest.fixture(scope="module")
def batch(image):
    """Four copies of the image: per-image draws make them differ after augmentation."""
    return np.stack([image] * 4)


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


@pytest.mark.parametrize("preset", ["light", "medium", "strong", "seed001"])
def test_presets_draw_per_image_within_a_batch(batch, preset):
    out = A.build_augmenter(preset, seed=0)(batch, tf.constant([0, 5])).numpy()
    assert len({o.tobytes() for o in out}) == len(batch)


def test_presets_work_in_graph_mode_with_unknown_batch_size(image):
    fn = tf.function(A.build_augmenter("strong"), input_signature=[
        tf.TensorSpec([None, 24, 24, 3], tf.float32), tf.TensorSpec([2], tf.int64)])
    out = fn(tf.constant(np.stack([image] * 3), tf.float32), tf.constant([3, 4], tf.int64))
    assert out.shape == (3, 24, 24, 3)


def test_batch_random_dihedral_draws_every_element_per_image(batch):
    expected = {A.dihedral(batch[0], k).numpy().tobytes() for k in A.DIHEDRAL}
    drawn = set()
    for s in range(16):
        out = A.batch_random_dihedral(tf.constant(batch), tf.constant([s, 1])).numpy()
        assert out.dtype == np.uint8
        drawn |= {o.tobytes() for o in out}
    assert drawn == expected


def test_batch_ops_match_the_one_image_ops_and_zero_strength_is_identity(batch):
    seed = tf.constant([4, 2])
    x = tf.constant(batch)
    for batch_op, op in [(A.batch_random_hed, A.random_hed), (A.batch_random_affine, A.random_affine),
                         (A.batch_random_hue_saturation, A.random_hue_saturation),
                         (A.batch_random_brightness_contrast, A.random_brightness_contrast),
                         (A.batch_random_crop_resize, A.random_crop_resize)]:
        out = batch_op(x, seed).numpy()
        np.testing.assert_allclose(out[0], op(batch[0], seed).numpy(), atol=1e-3)   # image 0 = batch of one
        assert not np.array_equal(out[0], out[1])
    zero = [A.batch_random_hed(x, seed, sigma=0.0, bias=0.0),
            A.batch_random_hue_saturation(x, seed, hue=0.0, saturation=0.0),
            A.batch_random_brightness_contrast(x, seed, brightness=0.0, contrast=0.0),
            A.batch_random_affine(x, seed, rotate_deg=0, translate=0, shear_deg=0, zoom=0),
            A.batch_random_crop_resize(x, seed, scale=(1.0, 1.0))]
    for out in zero:
        np.testing.assert_allclose(out.numpy(), batch, atol=0.01)


def test_batch_equalize_equals_per_image():
    rng = np.random.default_rng(3)
    imgs = np.stack([rng.normal(m, 10, (16, 16, 3)).clip(0, 255).astype(np.uint8) for m in (60, 150)])
    out = A.batch_equalize_histogram(imgs).numpy()
    for o, i in zip(out, imgs):
        np.testing.assert_array_equal(o, A.equalize_histogram(i).numpy())


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="light.*strong"):
        A.build_augmenter("heavy")


def test_hed_with_zero_jitter_is_identity(image):
    out = A.random_hed(image, tf.constant([5, 6]), sigma=0.0, bias=0.0).numpy()
    assert np.abs(out - image).max() < 0.01


def test_hed_round_trip_and_jitter_changes_stains(image):
    np.testing.assert_allclose(A.hed_to_rgb(A.rgb_to_hed(image)).numpy(), image, atol=0.01)
    out = A.random_hed(image, tf.constant([5, 6]), sigma=0.2, bias=0.2).numpy()
    assert np.abs(out - image).mean() > 1.0


def test_hed_jitter_equals_the_explicit_stain_round_trip(image):
    seed = tf.constant([5, 6])
    u = tf.random.stateless_uniform([6], seed, -1.0, 1.0).numpy()
    stains = A.rgb_to_hed(image).numpy() * (1 + 0.1 * u[:3]) + 0.1 * u[3:]
    expected = A.hed_to_rgb(tf.constant(stains)).numpy()
    np.testing.assert_allclose(A.random_hed(image, seed, sigma=0.1, bias=0.1).numpy(), expected, atol=0.05)


def test_hue_saturation_with_zero_strength_is_identity(image):
    out = A.random_hue_saturation(image, tf.constant([2, 3]), hue=0.0, saturation=0.0).numpy()
    assert np.abs(out - image).max() < 0.01
    moved = A.random_hue_saturation(image, tf.constant([2, 3]), hue=0.3, saturation=0.5).numpy()
    assert np.abs(moved - image).mean() > 1.0


def test_equalize_flattens_the_histogram():
    rng = np.random.default_rng(2)
    low = rng.normal(100, 10, (32, 32, 3)).clip(0, 255).astype(np.uint8)   # narrow, peaked histogram
    out = A.equalize_histogram(low).numpy()
    for c in range(3):
        before = np.histogram(low[..., c], bins=8, range=(0, 256))[0]
        after = np.histogram(out[..., c], bins=8, range=(0, 256))[0]
        assert after.std() < before.std() / 2
        assert out[..., c].min() == 0 and out[..., c].max() == 255
    # monotone: brighter input pixels never get darker outputs
    order = np.argsort(low[..., 0], axis=None)
    assert np.all(np.diff(out[..., 0].ravel()[order]) >= 0)


def test_equalize_leaves_a_constant_channel_alone():
    flat = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(A.equalize_histogram(flat).numpy(), flat.astype(np.float32))


def test_affine_with_zero_strength_is_identity_and_moves_pixels_otherwise(image):
    seed = tf.constant([9, 9])
    same = A.random_affine(image, seed, rotate_deg=0, translate=0, shear_deg=0, zoom=0).numpy()
    np.testing.assert_allclose(same, image, atol=1e-3)
    moved = A.random_affine(image, seed, rotate_deg=30, translate=0.1, shear_deg=10, zoom=0.2).numpy()
    assert np.abs(moved - image).mean() > 10


def test_crop_resize_at_full_scale_is_identity(image):
    out = A.random_crop_resize(image, tf.constant([1, 1]), scale=(1.0, 1.0)).numpy()
    np.testing.assert_allclose(out, image, atol=1e-3)


def test_brightness_contrast_shifts_the_mean_within_bounds(image):
    img = image.astype(np.float32) * 0.5 + 64                  # away from the clip limits
    outs = [A.random_brightness_contrast(img, tf.constant([0, s]), brightness=0.1, contrast=0.0).numpy()
            for s in range(10)]
    shifts = [o.mean() - img.mean() for o in outs]
    assert max(abs(s) for s in shifts) <= 0.1 * 255 + 1e-3
    assert np.std(shifts) > 1.0
