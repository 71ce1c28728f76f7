"""imageops.py: the one resize (TF `resize` and its numpy/Pillow twin `resize_array` agree within one uint8
level on real patches) and the dihedral group D4 shared by augmentation and TTA."""
import numpy as np
import pytest
import tensorflow as tf
from conftest import shared

from histofold import imageio, imageops


def _pcam_patches(n=12):
    """n real 96 px PCam patches (both classes), or skip."""
    root = shared("pcam_jpeg") / "train"
    paths = sorted((root / "0").glob("*.jpg"))[: n // 2] + sorted((root / "1").glob("*.jpg"))[: n // 2]
    if not paths:
        pytest.skip(f"no jpg patches under {root}")
    return [imageio.read_image(p) for p in paths]


def _crc_patches(n=4):
    """n real 224 px CRC-VAL-HE-7K patches (different classes), or skip."""
    root = shared("crc_he_7k")
    paths = [sorted(d.glob("*.jpg"))[0] for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*.jpg"))][:n]
    if not paths:
        pytest.skip(f"no jpg patches under {root}")
    return [imageio.read_image(p) for p in paths]


def _assert_twins_agree(images, size):
    for image in images:
        numpy_out = imageops.resize_array(image, size)
        tf_out = imageops.resize(image, size).numpy()
        h, w = imageops.as_size(size)
        assert numpy_out.shape == tf_out.shape == (h, w, 3)
        assert numpy_out.dtype == np.uint8 and tf_out.dtype == np.float32
        diff = np.abs(numpy_out.astype(np.float64) - tf_out.astype(np.float64))
        assert diff.max() <= 1.0, f"{image.shape[:2]} -> {size}: max difference {diff.max():.3f} levels"
        assert diff.mean() < 0.5                                            # rounding, not a filter change


# ---------------------------------------------------------------- resize

@pytest.mark.parametrize("size", [48, 64, 224])
def test_resize_twins_agree_within_one_level_on_pcam_patches(size):
    images = _pcam_patches()
    assert all(im.shape == (96, 96, 3) for im in images)
    _assert_twins_agree(images, size)


def test_resize_twins_agree_within_one_level_on_crc_patches_224_to_96():
    images = _crc_patches()
    assert all(im.shape == (224, 224, 3) for im in images)
    _assert_twins_agree(images, 96)


def test_resize_twins_agree_on_a_rectangular_target():
    _assert_twins_agree(_pcam_patches(2), (40, 72))


def test_resize_is_antialiased_bilinear():
    # a 1-pixel checkerboard shrunk 2x averages to grey (a plain bilinear sample would alias to 0 or 255)
    checker = np.zeros((16, 16, 3), np.uint8)
    checker[::2, ::2] = 255
    checker[1::2, 1::2] = 255
    for out in (imageops.resize(checker, 8).numpy(), imageops.resize_array(checker, 8)):
        # interior pixels (the border's kernel is cut off by the edge and renormalised)
        assert np.all(np.abs(out[1:-1, 1:-1].astype(float) - 127.5) <= 1.0)
        assert np.all(np.abs(out.astype(float) - 127.5) <= 4.0)
    expected = tf.image.resize(checker.astype(np.float32), (8, 8), method="bilinear", antialias=True).numpy()
    np.testing.assert_array_equal(imageops.resize(checker, 8).numpy(), expected)


def test_same_size_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert imageops.resize_array(image, (24, 32)) is image
    out = imageops.resize(image, (24, 32))
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), image.astype(np.float32))
    batch = np.stack([image, image[::-1]])
    np.testing.assert_array_equal(imageops.resize(batch, (24, 32)).numpy(), batch.astype(np.float32))
    square = image[:, :24]
    np.testing.assert_array_equal(imageops.resize(square, 24).numpy(), square.astype(np.float32))


def test_resize_batches_and_as_size():
    batch = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = imageops.resize(batch, 8).numpy()
    assert out.shape == (3, 8, 8, 3)
    for o, im in zip(out, batch):
        np.testing.assert_allclose(o, imageops.resize(im, 8).numpy(), atol=1e-4)
    assert imageops.as_size(5) == (5, 5) and imageops.as_size((3, 4)) == (3, 4)
    assert imageops.as_size(np.int64(7)) == (7, 7)


# ---------------------------------------------------------------- D4

@pytest.fixture(scope="module")
def image():
    """A random (6, 6, 3) uint8 image: no symmetry, so all 8 D4 elements differ."""
    return np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)


def test_dihedral_gives_8_distinct_images_with_identity_at_0(image):
    outs = [imageops.dihedral(image, k).numpy() for k in imageops.DIHEDRAL]
    assert len({o.tobytes() for o in outs}) == 8
    np.testing.assert_array_equal(outs[0], image)
    assert all(o.dtype == np.uint8 for o in outs)
    assert list(imageops.DIHEDRAL) == list(range(8))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_inverse_dihedral_undoes_each(image, as_tensor):
    for k in imageops.DIHEDRAL:
        kk = tf.constant(k) if as_tensor else k
        np.testing.assert_array_equal(imageops.inverse_dihedral(imageops.dihedral(image, kk), kk).numpy(), image)
        np.testing.assert_array_equal(imageops.dihedral(imageops.inverse_dihedral(image, kk), kk).numpy(), image)


def test_named_elements(image):
    assert (imageops.HFLIP, imageops.VFLIP, imageops.ROT180) == (5, 7, 2)
    np.testing.assert_array_equal(imageops.dihedral(image, 5).numpy(), image[:, ::-1])     # horizontal flip
    np.testing.assert_array_equal(imageops.dihedral(image, 7).numpy(), image[::-1, :])     # vertical flip
    np.testing.assert_array_equal(imageops.dihedral(image, 2).numpy(), image[::-1, ::-1])  # half turn
    np.testing.assert_array_equal(imageops.dihedral(image, 1).numpy(), np.rot90(image, 1))  # counter-clockwise
    np.testing.assert_array_equal(imageops.dihedral(image, 4).numpy(), image.transpose(1, 0, 2))
    assert imageops.SHAPE_KEEPING == (0, 2, 5, 7)


def test_dihedral_tensor_k_matches_int_k_batches_and_any_channel_count(image):
    batch = np.stack([image, image[::-1]])                                   # (2, H, W, 3)
    maps = np.random.default_rng(2).normal(size=(2, 6, 6, 5)).astype(np.float32)  # e.g. spatial maps
    for k in imageops.DIHEDRAL:
        np.testing.assert_array_equal(imageops.dihedral(image, tf.constant(k)).numpy(),
                                      imageops.dihedral(image, k).numpy())
        np.testing.assert_array_equal(imageops.dihedral(batch, k).numpy()[1],
                                      imageops.dihedral(image[::-1], k).numpy())
        np.testing.assert_array_equal(imageops.dihedral(maps, k).numpy()[0], imageops.dihedral(maps[0], k).numpy())


def test_dihedral_rejects_out_of_range_k(image):
    for k in (-1, 8):
        with pytest.raises(ValueError, match="0..7"):
            imageops.dihedral(image, k)


def test_dihedral_tables_equal_dihedral_of_an_index_grid():
    for h, w, elements in [(5, 5, tuple(imageops.DIHEDRAL)), (4, 7, imageops.SHAPE_KEEPING)]:
        tables = imageops.dihedral_tables(h, w, elements)
        assert tables.shape == (len(elements), h * w) and tables.dtype == np.int32
        grid = np.arange(h * w, dtype=np.int32).reshape(h, w, 1)
        for row, k in zip(tables, elements):
            np.testing.assert_array_equal(row, imageops.dihedral(grid, k).numpy().reshape(-1))
    # and a gather through a table is the transform
    image = np.random.default_rng(3).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    tables = imageops.dihedral_tables(5, 5, tuple(imageops.DIHEDRAL))
    for k in imageops.DIHEDRAL:
        np.testing.assert_array_equal(image.reshape(-1, 3)[tables[k]].reshape(5, 5, 3),
                                      imageops.dihedral(image, k).numpy())


def test_swaps_hw():
    rect = np.zeros((4, 6, 3), np.uint8)
    assert [k for k in imageops.DIHEDRAL if imageops.swaps_hw(k)] == [1, 3, 4, 6]
    for k in imageops.DIHEDRAL:
        shape = tuple(imageops.dihedral(rect, k).shape)
        assert shape == ((6, 4, 3) if imageops.swaps_hw(k) else (4, 6, 3)), k
    assert not any(imageops.swaps_hw(k) for k in imageops.SHAPE_KEEPING)
