"""Pixel geometry every input path shares: the one resize and the dihedral group D4.

Resize. One filter everywhere: bilinear with antialiasing (a triangle kernel widened by the scale factor
when shrinking, half-pixel centres), so a model sees the same pixels in training (the tf.data reader),
at prediction (`predict.py --input`, test shards), on slides and in Grad-CAM. `resize` is the TensorFlow
implementation (float32 out); `resize_array` is its numpy twin for TensorFlow-free worker processes
(prepare's `--size`): Pillow's BILINEAR is the same antialiased triangle filter, and the two agree to
within one uint8 level (Pillow rounds; tests/test_imageops.py holds them to that).

D4. `dihedral(x, k)` for k in 0..7: k % 4 counter-clockwise quarter turns, then a transpose when k >= 4
(k = 0 is the identity, 5 a horizontal flip, 7 a vertical flip, 2 a half turn). Augmentation draws from
it and test-time augmentation averages over it; both use this one definition.
"""
from __future__ import annotations

import functools

import numpy as np

DIHEDRAL = range(8)            # the 8 elements of D4
HFLIP, VFLIP, ROT180 = 5, 7, 2
SHAPE_KEEPING = (0, ROT180, HFLIP, VFLIP)  # the elements that keep (H, W) when H != W


# ---------------------------------------------------------------- resize

def as_size(size) -> tuple[int, int]:
    """An int or (H, W) -> (H, W) ints."""
    if np.isscalar(size):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize(images, size):
    """(B, H, W, C) or (H, W, C) pixels of any dtype -> float32 at `size` (antialiased bilinear).

    The same size returns the input cast to float32 (no resampling)."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    h, w = as_size(size)
    if tuple(images.shape[-3:-1]) == (h, w):
        return tf.cast(images, tf.float32)
    return tf.image.resize(tf.cast(images, tf.float32), (h, w), method="bilinear", antialias=True)


def resize_array(image: np.ndarray, size) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with the same filter as `resize` (Pillow BILINEAR)."""
    from PIL import Image

    h, w = as_size(size)
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


# ---------------------------------------------------------------- D4

def swaps_hw(k: int) -> bool:
    """Odd quarter turns swap H and W, and so does the transpose: k in {1, 3, 4, 6}."""
    return bool((k % 4) % 2) != (k >= 4)


def dihedral(x, k):
    """The k-th element of D4 on (H, W, C) or (B, H, W, C) of any dtype; k a python int or scalar tensor."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    if isinstance(k, (int, np.integer)):
        if not 0 <= k < 8:
            raise ValueError(f"dihedral k={k} is outside 0..7")
        out = tf.image.rot90(x, k % 4) if k % 4 else x
        return tf.image.transpose(out) if k >= 4 else out
    k = tf.cast(k, tf.int32)
    out = tf.image.rot90(x, k % 4)
    return tf.cond(k >= 4, lambda: tf.image.transpose(out), lambda: out)


def inverse_dihedral(x, k):
    """Undo `dihedral(., k)`: quarter turns invert to 4 - k turns; the four reflections are involutions."""
    import tensorflow as tf

    if isinstance(k, (int, np.integer)):
        return dihedral(x, k if k >= 4 else (4 - k) % 4)
    k = tf.cast(k, tf.int32)
    return dihedral(x, tf.where(k >= 4, k, (4 - k) % 4))


@functools.lru_cache(maxsize=16)
def dihedral_tables(h: int, w: int, elements: tuple) -> np.ndarray:
    """(len(elements), h*w) int32: row i lists, for each output pixel, the input pixel of element i.

    numpy, so it is a constant while a tf.data graph is traced; equal to `dihedral` of an index grid
    (np.rot90 turns counter-clockwise, as tf.image.rot90 does)."""
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    tables = []
    for k in elements:
        out = np.rot90(grid, k % 4)
        tables.append(np.ascontiguousarray(out.T if k >= 4 else out).reshape(-1))
    return np.stack(tables)
