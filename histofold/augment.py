"""Augmentation: pure, seeded tensor ops on image batches, and the named presets that chain them.

Conventions
- Every random op is stateless: `batch_op(images, seed)` with images (B, H, W, 3) and `seed` a
  shape-(2,) int tensor. One stateless draw of shape (B, n) per op per batch gives every image its
  own parameters; the same seed gives the same output, so a training run is reproducible.
- The per-image ops `op(image, seed)` on one (H, W, 3) image are the batch ops on a batch of one
  (the same draws as the first image of a batch drawn with that seed).
- Input images may be uint8 or float32 in [0, 255]. Colour and geometric ops return float32 in
  [0, 255] (clipped); `dihedral` / `inverse_dihedral` / `*_random_dihedral` only permute pixels and
  keep the dtype; `dihedral` accepts (H, W, C) or (B, H, W, C) of any channel count, so TTA can use
  it on images and on spatial maps.
- `build_augmenter(preset, seed=...)` returns `fn(images (B, H, W, 3), seed_pair) -> float32 images`
  of the same shape: the reader calls it once per batch with seed_pair = (seed, batch index).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

# Strengths. Fractions are of the full range unless the unit is named.
LIGHT_BRIGHTNESS = 0.05        # +-5% of 255 added to every pixel
LIGHT_CONTRAST = 0.1           # contrast factor in [0.9, 1.1]
STRONG_BRIGHTNESS = 0.1        # +-10% of 255
STRONG_CONTRAST = 0.2          # factor in [0.8, 1.2]
HUE = 0.04                     # hue shift, fraction of the colour wheel (0.04 = +-14 degrees)
SATURATION = 0.2               # saturation factor in [0.8, 1.2]
HED_SIGMA = 0.03               # stain scale alpha ~ U(1 - sigma, 1 + sigma) per H, E, D channel
HED_BIAS = 0.03                # stain shift beta ~ U(-bias, bias), optical density (natural-log) units
AFFINE_ROTATE_DEG = 15.0       # rotation ~ U(-15, 15) degrees
AFFINE_TRANSLATE = 0.05        # shift ~ U(-5%, 5%) of the side, each axis
AFFINE_SHEAR_DEG = 5.0         # shear angle ~ U(-5, 5) degrees
AFFINE_ZOOM = 0.1              # scale ~ U(0.9, 1.1), same on both axes
CROP_SCALE = (0.8, 1.0)        # crop keeps this fraction of the area, then resizes back
NOISE_STD = 3.0                # gaussian pixel noise, in [0, 255] units

_OP_SEED_STRIDE = 1_000_003    # seed-key offset between the ops of one preset (a prime, beyond run seeds)
DIHEDRAL = range(8)            # the 8 elements of D4: k % 4 quarter turns, then a transpose if k >= 4
_SHAPE_KEEPING = (0, 2, 5, 7)  # the D4 elements that keep (H, W) when H != W: id, rot180, two flips

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density,
# normalised to unit length; OD (1, 3) @ _HED_FROM_RGB -> stain concentrations (1, 3).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def _per_image(batch_op):
    """The one-image version `op(image (H, W, C), seed, **kw)` of a batch op: a batch of one."""
    @functools.wraps(batch_op)
    def op(image, seed, **kwargs):
        return batch_op(tf.convert_to_tensor(image)[None], seed, **kwargs)[0]
    op.__name__ = op.__qualname__ = batch_op.__name__.replace("batch_", "", 1)
    op.__doc__ = f"One (H, W, C) image version of `{batch_op.__name__}`: " + (batch_op.__doc__ or "")
    return op


def _uniform(seed, images, n, minval=0.0, maxval=1.0):
    """(B, n) float32 draws, one row per image of `images`, from one stateless RNG call."""
    return tf.random.stateless_uniform(tf.stack([tf.shape(images)[0], n]), seed, minval, maxval,
                                       dtype=tf.float32)


def _symmetric(seed, images, n):
    """(B, n) float32 draws from U(-1, 1); an op scales each by its strength."""
    return _uniform(seed, images, n, -1.0, 1.0)


def _bcast(v):
    """(B,) -> (B, 1, 1, 1), to scale a (B, H, W, C) batch per image."""
    return v[:, None, None, None]


# ---------------------------------------------------------------- geometry


def dihedral(image, k):
    """The k-th element of D4 (k in 0..7, python int or scalar tensor); k = 0 is the identity.

    Works on (H, W, C) or (B, H, W, C) of any dtype. Odd quarter turns and k in {4, 6} swap H and W.
    """
    image = tf.convert_to_tensor(image)
    if isinstance(k, (int, np.integer)):
        if not 0 <= k < 8:
            raise ValueError(f"dihedral k={k} is outside 0..7")
        out = tf.image.rot90(image, k % 4) if k % 4 else image
        return tf.image.transpose(out) if k >= 4 else out
    k = tf.cast(k, tf.int32)
    out = tf.image.rot90(image, k % 4)
    return tf.cond(k >= 4, lambda: tf.image.transpose(out), lambda: out)


def inverse_dihedral(image, k):
    """Undo `dihedral(., k)`: quarter turns invert to 4 - k turns; the four reflections are involutions."""
    if isinstance(k, (int, np.integer)):
        return dihedral(image, k if k >= 4 else (4 - k) % 4)
    k = tf.cast(k, tf.int32)
    return dihedral(image, tf.where(k >= 4, k, (4 - k) % 4))


@functools.lru_cache(maxsize=16)
def _static_dihedral_tables(h: int, w: int, elements: tuple) -> np.ndarray:
    """numpy twin of `dihedral` on an index grid (numpy: safe while a graph is being traced)."""
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    tables = []
    for k in elements:
        out = np.rot90(grid, k % 4)                                      # counter-clockwise, as tf.image.rot90
        tables.append(np.ascontiguousarray(out.T if k >= 4 else out).reshape(-1))
    return np.stack(tables)


def _dihedral_tables(static_h, static_w, elements, h, w):
    """(len(elements), H*W) int32: row i lists, for each output pixel, the input pixel of element i."""
    if static_h is not None and static_w is not None:                 # known size: a graph constant
        return tf.constant(_static_dihedral_tables(int(static_h), int(static_w), tuple(elements)))
    grid = tf.reshape(tf.range(h * w), tf.stack([h, w, 1]))
    return tf.stack([tf.reshape(dihedral(grid, k), [-1]) for k in elements])


def batch_random_dihedral(images, seed):
    """A uniformly random D4 element per image of (B, H, W, C); only the 4 shape-keeping ones when H != W.

    Each image draws k and its pixels are moved by one gather through the k-th (H*W,) index table
    (`dihedral` of an index grid): one pass over the batch whatever the draws. Keeps the dtype.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    square = images.shape[1] is not None and images.shape[1] == images.shape[2]
    elements = DIHEDRAL if square else _SHAPE_KEEPING
    tables = _dihedral_tables(images.shape[1], images.shape[2], elements, h, w)  # (n_elements, H*W)
    k = tf.random.stateless_uniform([n], seed, minval=0, maxval=len(elements), dtype=tf.int32)
    index = tf.gather(tables, k) + (tf.range(n) * (h * w))[:, None]            # (B, H*W) into B*H*W rows
    pixels = tf.reshape(images, tf.stack([-1, shape[3]]))
    out = tf.reshape(tf.gather(pixels, tf.reshape(index, [-1])), shape)
    return tf.ensure_shape(out, images.shape)


def _affine_matrix(*, height, width, angle, shear, zoom, tx, ty):
    """(..., 8) output->input pixel maps about the image centre: translate . rotate . shear . zoom.

    The parameters may be scalars or (B,) vectors; the rows are ImageProjectiveTransformV3 transforms.
    """
    cy, cx = (height - 1.0) / 2.0, (width - 1.0) / 2.0
    cos, sin, tan = tf.cos(angle), tf.sin(angle), tf.tan(shear)
    # linear part L = R(angle) @ Shear_x(shear) / zoom
    a, b = cos / zoom, (cos * tan - sin) / zoom
    c, d = sin / zoom, (sin * tan + cos) / zoom
    zero = tf.zeros_like(a)
    # x_in = L (x_out - centre) + centre + shift
    return tf.stack([a, b, cx - a * cx - b * cy + tx, c, d, cy - c * cx - d * cy + ty, zero, zero], axis=-1)


def batch_random_affine(images, seed, *, rotate_deg=AFFINE_ROTATE_DEG, translate=AFFINE_TRANSLATE,
                        shear_deg=AFFINE_SHEAR_DEG, zoom=AFFINE_ZOOM):
    """Small random rotation, shift, shear and zoom per image; borders filled by reflection.

    The parameters are drawn symmetrically, so sampling the output->input map directly gives the
    same distribution as sampling the forward transform. One (B, 8) transform, one kernel call.
    """
    images = tf.cast(images, tf.float32)
    u = _symmetric(seed, images, 5)
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    transforms = _affine_matrix(
        height=hf, width=wf,
        angle=u[:, 0] * math.radians(rotate_deg), shear=u[:, 1] * math.radians(shear_deg),
        zoom=1.0 + u[:, 2] * zoom, tx=u[:, 3] * translate * wf, ty=u[:, 4] * translate * hf)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([h, w]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return tf.clip_by_value(tf.ensure_shape(out, images.shape), 0.0, 255.0)


def batch_random_crop_resize(images, seed, *, scale=CROP_SCALE):
    """Crop a random window per image holding `scale` of the area (same aspect), resize back bilinearly."""
    images = tf.cast(images, tf.float32)
    u = _uniform(seed, images, 3)                              # (area, top, left) draws in [0, 1)
    side = tf.sqrt(scale[0] + u[:, 0] * (scale[1] - scale[0]))  # fraction of each side kept
    top, left = u[:, 1] * (1.0 - side), u[:, 2] * (1.0 - side)
    boxes = tf.stack([top, left, top + side, left + side], axis=-1)  # normalised (y1, x1, y2, x2)
    n = tf.shape(images)[0]
    out = tf.image.crop_and_resize(images, boxes, tf.range(n), tf.shape(images)[1:3], method="bilinear")
    return tf.clip_by_value(tf.ensure_shape(out, images.shape), 0.0, 255.0)


# ---------------------------------------------------------------- colour


def batch_random_brightness_contrast(images, seed, *, brightness=LIGHT_BRIGHTNESS, contrast=LIGHT_CONTRAST):
    """Add U(-b, b) x 255 to every pixel and scale contrast about the channel means by U(1 - c, 1 + c)."""
    images = tf.cast(images, tf.float32)
    u = _symmetric(seed, images, 2)                           # (brightness, contrast) draws per image
    factor = _bcast(1.0 + u[:, 1] * contrast)                 # (B, 1, 1, 1)
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)  # (B, 1, 1, 3)
    # (x + b - (mean + b)) * f + (mean + b), folded into one multiply-add
    shift = mean * (1.0 - factor) + _bcast(u[:, 0] * brightness * 255.0)
    return tf.clip_by_value(images * factor + shift, 0.0, 255.0)


def batch_random_hue_saturation(images, seed, *, hue=HUE, saturation=SATURATION):
    """Shift hue by U(-hue, hue) of the wheel and scale saturation by U(1 - s, 1 + s), per image."""
    images = tf.cast(images, tf.float32)
    u = _symmetric(seed, images, 2)                           # (hue, saturation) draws per image
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(images / 255.0), axis=-1)  # (B, H, W) each, [0, 1]
    h = tf.math.floormod(h + u[:, 0, None, None] * hue, 1.0)  # hue wraps around the wheel
    s = tf.clip_by_value(s * (1.0 + u[:, 1, None, None] * saturation), 0.0, 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1)) * 255.0, 0.0, 255.0)


def rgb_to_hed(image):
    """(..., 3) float [0, 255] RGB -> (..., 3) H, E, D stain concentrations (optical density units)."""
    od = -tf.math.log((tf.cast(image, tf.float32) + 1.0) / 256.0)  # +1: no log(0); 0 OD for white
    return tf.tensordot(od, tf.constant(_HED_FROM_RGB, tf.float32), axes=1)


def hed_to_rgb(hed):
    """Inverse of `rgb_to_hed`; float32 [0, 255], clipped."""
    od = tf.tensordot(hed, tf.constant(_RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


def batch_random_hed(images, seed, *, sigma=HED_SIGMA, bias=HED_BIAS):
    """Stain jitter (Tellez et al. 2018): each of H, E, D becomes alpha x + beta, per image.

    Done as one affine map in optical density per image: od' = od @ (HED_FROM_RGB diag(alpha)
    RGB_FROM_HED) + beta @ RGB_FROM_HED, the same as rgb_to_hed -> jitter -> hed_to_rgb.
    """
    images = tf.cast(images, tf.float32)
    u = _symmetric(seed, images, 6)
    alpha, beta = 1.0 + u[:, :3] * sigma, u[:, 3:] * bias    # (B, 3) each: H, E, D
    rgb_from_hed = tf.constant(_RGB_FROM_HED, tf.float32)
    matrix = tf.constant(_HED_FROM_RGB, tf.float32) @ (alpha[:, :, None] * rgb_from_hed)  # (B, 3, 3)
    offset = (beta @ rgb_from_hed)[:, None, :]                # (B, 1, 3)
    od = -tf.math.log((images + 1.0) / 256.0)                 # (B, H, W, 3)
    shape = tf.shape(od)
    od = tf.reshape(od, tf.stack([shape[0], -1, 3])) @ matrix + offset
    return tf.clip_by_value(256.0 * tf.exp(-tf.reshape(od, shape)) - 1.0, 0.0, 255.0)


def batch_equalize_histogram(images):
    """Per-image, per-channel histogram equalisation of a (B, H, W, C) [0, 255] batch.

    Values are rounded to integers first; each level maps through its channel's normalised CDF
    (cdf - cdf_min) / (n - cdf_min) x 255; a constant channel is left as it is. Returns float32.
    One bincount over B x C blocks of 256 bins does every histogram at once.
    """
    levels = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.int32)
    shape = tf.shape(levels)
    b, c = shape[0], shape[3]
    blocks = b * c
    offset = tf.reshape(tf.range(blocks) * 256, tf.stack([b, 1, 1, c]))  # one 256-bin block per (image, channel)
    flat = tf.reshape(levels + offset, [-1])
    hist = tf.reshape(tf.math.bincount(flat, minlength=256 * blocks, maxlength=256 * blocks),
                      tf.stack([blocks, 256]))             # (B*C, 256) pixel counts
    cdf = tf.cast(tf.cumsum(hist, axis=1), tf.float32)
    n = cdf[:, -1:]
    cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, n), axis=1, keepdims=True)  # count of the lowest level
    lut = tf.round((cdf - cdf_min) / tf.maximum(n - cdf_min, 1.0) * 255.0)
    lut = tf.where(n > cdf_min, lut, tf.range(256.0)[None, :])  # a constant channel maps to itself
    out = tf.gather(tf.reshape(tf.clip_by_value(lut, 0.0, 255.0), [-1]), flat)
    return tf.reshape(out, shape)


def equalize_histogram(image):
    """Per-channel histogram equalisation of one (H, W, C) [0, 255] image; see `batch_equalize_histogram`."""
    return batch_equalize_histogram(tf.convert_to_tensor(image)[None])[0]


def batch_random_noise(images, seed, *, stddev=NOISE_STD):
    """Add N(0, stddev) pixel noise ([0, 255] units)."""
    images = tf.cast(images, tf.float32)
    noise = tf.random.stateless_normal(tf.shape(images), seed, stddev=stddev)
    return tf.clip_by_value(images + noise, 0.0, 255.0)


# one-image versions: the batch op on a batch of one
random_dihedral = _per_image(batch_random_dihedral)
random_affine = _per_image(batch_random_affine)
random_crop_resize = _per_image(batch_random_crop_resize)
random_brightness_contrast = _per_image(batch_random_brightness_contrast)
random_hue_saturation = _per_image(batch_random_hue_saturation)
random_hed = _per_image(batch_random_hed)
random_noise = _per_image(batch_random_noise)


# ---------------------------------------------------------------- presets


def _batch_equalize_op(images, seed):
    del seed  # deterministic op; takes a seed only to fit the op signature
    return batch_equalize_histogram(images)


# Each preset is the ordered list of batch ops `op(images, seed) -> images`; geometry first, colour last.
# batch_random_dihedral leads: it permutes the input dtype (uint8 from the reader: 4x fewer bytes).
AUGMENT_PRESETS = {
    "none": (),
    "dihedral": (batch_random_dihedral,),
    "light": (batch_random_dihedral, batch_random_brightness_contrast),
    # light + stain variation (HED jitter, hue/saturation): colour robustness across slides/scanners
    "medium": (batch_random_dihedral, batch_random_hed, batch_random_hue_saturation,
               batch_random_brightness_contrast),
    "strong": (
        batch_random_dihedral,
        batch_random_crop_resize,
        batch_random_affine,
        batch_random_hed,
        batch_random_hue_saturation,
        functools.partial(batch_random_brightness_contrast, brightness=STRONG_BRIGHTNESS,
                          contrast=STRONG_CONTRAST),
    ),
    # seed 001: flips, histogram equalisation, rotation, translation and shear (no zoom)
    "seed001": (batch_random_dihedral, _batch_equalize_op, functools.partial(batch_random_affine, zoom=0.0)),
}


def build_augmenter(preset: str, *, seed: int = 0):
    """`fn(images (B, H, W, 3), seed_pair) -> float32 [0, 255] images` running the preset's ops in order.

    Every image of the batch gets its own draws. `seed` offsets every `seed_pair` (the reader passes
    (run seed, batch index)), so two runs with different seeds see different augmentations.
    """
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    ops = AUGMENT_PRESETS[preset]
    offsets = tf.constant([[seed + _OP_SEED_STRIDE * i, 0] for i in range(len(ops))], tf.int64)

    def augment(images, seed_pair):
        out = tf.convert_to_tensor(images)
        if not ops:
            return tf.cast(out, tf.float32)
        # op i draws from (s0 + offset_i, s1): stateless (Philox) streams of distinct keys are
        # independent, and one add is far cheaper than stateless_fold_in / stateless_split
        seeds = tf.cast(seed_pair, tf.int64)[None, :] + offsets  # (n_ops, 2)
        for i, op in enumerate(ops):
            out = op(out, seeds[i])                            # dihedral keeps the dtype, the rest float32
        return tf.cast(out, tf.float32)

    return augment
