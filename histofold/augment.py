"""Augmentation: pure, seeded tensor ops on one (H, W, 3) image, and the named presets that chain them.

Conventions
- Every random op is stateless: `op(image, seed)` with `seed` a shape-(2,) int tensor; the same seed
  gives the same output, so a training run is reproducible and two workers never share a stream.
- Input images may be uint8 or float32 in [0, 255]. Colour and geometric ops return float32 in
  [0, 255] (clipped); `dihedral` / `inverse_dihedral` only permute pixels and keep the dtype, and
  accept a batch (B, H, W, C) or any channel count, so TTA can use them on images and on spatial maps.
- `build_augmenter(preset, seed=...)` returns `fn(image, seed_pair) -> float32 image` of the same shape.
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


def random_dihedral(image, seed):
    """A uniformly random D4 element of one (H, W, C) image; only the 4 shape-keeping ones when H != W.

    Drawn as three coin flips (reverse rows, reverse columns, transpose), which give each of the 8
    elements once; data-dependent axes instead of tf.cond make it ~2x cheaper than `dihedral(image, k)`.
    """
    image = tf.convert_to_tensor(image)
    h, w = image.shape[0], image.shape[1]
    flips = tf.random.stateless_uniform([3], seed, minval=0, maxval=2, dtype=tf.int32) > 0  # (3,) bool
    out = tf.reverse(image, tf.boolean_mask(tf.constant([0, 1]), flips[:2]))
    if h is None or h != w:
        return out
    perm = tf.where(flips[2], tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    return tf.ensure_shape(tf.transpose(out, perm), image.shape)


def _symmetric(seed, n):
    """(n,) float32 draws from U(-1, 1); an op scales each by its strength (one RNG call per op)."""
    return tf.random.stateless_uniform([n], seed, -1.0, 1.0, dtype=tf.float32)


def _affine_matrix(*, height, width, angle, shear, zoom, tx, ty):
    """Row-major 3x3 output->input pixel map about the image centre: translate . rotate . shear . zoom."""
    cy, cx = (height - 1.0) / 2.0, (width - 1.0) / 2.0
    cos, sin, tan = tf.cos(angle), tf.sin(angle), tf.tan(shear)
    # linear part L = R(angle) @ Shear_x(shear) / zoom
    a, b = cos / zoom, (cos * tan - sin) / zoom
    c, d = sin / zoom, (sin * tan + cos) / zoom
    # x_in = L (x_out - centre) + centre + shift
    return tf.stack([a, b, cx - a * cx - b * cy + tx, c, d, cy - c * cx - d * cy + ty, 0.0, 0.0])


def random_affine(image, seed, *, rotate_deg=AFFINE_ROTATE_DEG, translate=AFFINE_TRANSLATE,
                  shear_deg=AFFINE_SHEAR_DEG, zoom=AFFINE_ZOOM):
    """Small random rotation, shift, shear and zoom; borders filled by reflection (no black corners).

    The parameters are drawn symmetrically, so sampling the output->input map directly gives the
    same distribution as sampling the forward transform.
    """
    image = tf.cast(image, tf.float32)
    u = _symmetric(seed, 5)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    transform = _affine_matrix(
        height=hf, width=wf,
        angle=u[0] * math.radians(rotate_deg), shear=u[1] * math.radians(shear_deg), zoom=1.0 + u[2] * zoom,
        tx=u[3] * translate * wf, ty=u[4] * translate * hf)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.stack([h, w]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0]
    return tf.clip_by_value(tf.ensure_shape(out, image.shape), 0.0, 255.0)


def random_crop_resize(image, seed, *, scale=CROP_SCALE):
    """Crop a random window holding `scale` of the area (same aspect), resize back bilinearly."""
    image = tf.cast(image, tf.float32)
    u = tf.random.stateless_uniform([3], seed)                # (area, top, left) draws in [0, 1)
    hw = tf.shape(image)[:2]
    side = tf.sqrt(scale[0] + u[0] * (scale[1] - scale[0]))   # fraction of each side kept
    size = tf.maximum(tf.cast(tf.round(tf.cast(hw, tf.float32) * side), tf.int32), 1)
    offset = tf.cast(u[1:] * tf.cast(hw - size + 1, tf.float32), tf.int32)  # top-left corner
    crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0))
    out = tf.image.resize(crop, hw, method="bilinear")
    return tf.clip_by_value(tf.ensure_shape(out, image.shape), 0.0, 255.0)


# ---------------------------------------------------------------- colour


def random_brightness_contrast(image, seed, *, brightness=LIGHT_BRIGHTNESS, contrast=LIGHT_CONTRAST):
    """Add U(-b, b) x 255 to every pixel and scale contrast about the channel means by U(1 - c, 1 + c)."""
    image = tf.cast(image, tf.float32)
    u = _symmetric(seed, 2)                                   # (brightness, contrast) draws
    factor = 1.0 + u[1] * contrast
    mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)  # (1, 1, 3)
    # (x + b - (mean + b)) * f + (mean + b), folded into one multiply-add
    return tf.clip_by_value(image * factor + (mean * (1.0 - factor) + u[0] * brightness * 255.0), 0.0, 255.0)


def random_hue_saturation(image, seed, *, hue=HUE, saturation=SATURATION):
    """Shift hue by U(-hue, hue) of the wheel and scale saturation by U(1 - s, 1 + s)."""
    u = _symmetric(seed, 2)                                   # (hue, saturation) draws
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(tf.cast(image, tf.float32) / 255.0), axis=-1)  # [0, 1]
    h = tf.math.floormod(h + u[0] * hue, 1.0)                 # hue wraps around the wheel
    s = tf.clip_by_value(s * (1.0 + u[1] * saturation), 0.0, 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1)) * 255.0, 0.0, 255.0)


def rgb_to_hed(image):
    """(..., 3) float [0, 255] RGB -> (..., 3) H, E, D stain concentrations (optical density units)."""
    od = -tf.math.log((tf.cast(image, tf.float32) + 1.0) / 256.0)  # +1: no log(0); 0 OD for white
    return tf.tensordot(od, tf.constant(_HED_FROM_RGB, tf.float32), axes=1)


def hed_to_rgb(hed):
    """Inverse of `rgb_to_hed`; float32 [0, 255], clipped."""
    od = tf.tensordot(hed, tf.constant(_RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


def random_hed(image, seed, *, sigma=HED_SIGMA, bias=HED_BIAS):
    """Stain jitter (Tellez et al. 2018): each of H, E, D becomes alpha x + beta, per image.

    Done as one affine map in optical density: od' = od @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED)
    + beta @ RGB_FROM_HED, the same as rgb_to_hed -> jitter -> hed_to_rgb with one matmul.
    """
    u = _symmetric(seed, 6)
    alpha, beta = 1.0 + u[:3] * sigma, u[3:] * bias          # (3,) each: H, E, D
    rgb_from_hed = tf.constant(_RGB_FROM_HED, tf.float32)
    matrix = tf.constant(_HED_FROM_RGB, tf.float32) @ (alpha[:, None] * rgb_from_hed)  # (3, 3)
    od = -tf.math.log((tf.cast(image, tf.float32) + 1.0) / 256.0)   # (H, W, 3)
    od = tf.reshape(tf.reshape(od, [-1, 3]) @ matrix + beta[None, :] @ rgb_from_hed, tf.shape(od))
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


def equalize_histogram(image):
    """Per-channel histogram equalisation of a [0, 255] image (values rounded to integers first).

    Maps each level through the channel's normalised CDF (cdf - cdf_min) / (n - cdf_min) x 255;
    a constant channel is left as it is. Returns float32.
    """
    levels = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.int32)
    channels = tf.shape(levels)[-1]
    offset = tf.range(channels) * 256                      # (C,) one 256-bin block per channel
    flat = tf.reshape(levels + offset, [-1])
    hist = tf.reshape(tf.math.bincount(flat, minlength=256 * channels, maxlength=256 * channels),
                      [channels, 256])                     # (C, 256) pixel counts
    cdf = tf.cast(tf.cumsum(hist, axis=1), tf.float32)     # (C, 256)
    n = cdf[:, -1:]
    cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, n), axis=1, keepdims=True)  # count of the lowest level
    lut = tf.round((cdf - cdf_min) / tf.maximum(n - cdf_min, 1.0) * 255.0)
    lut = tf.where(n > cdf_min, lut, tf.range(256.0)[None, :])  # a constant channel maps to itself
    out = tf.gather(tf.reshape(tf.clip_by_value(lut, 0.0, 255.0), [-1]), flat)
    return tf.reshape(out, tf.shape(image))


def random_noise(image, seed, *, stddev=NOISE_STD):
    """Add N(0, stddev) pixel noise ([0, 255] units)."""
    image = tf.cast(image, tf.float32)
    noise = tf.random.stateless_normal(tf.shape(image), seed, stddev=stddev)
    return tf.clip_by_value(image + noise, 0.0, 255.0)


# ---------------------------------------------------------------- presets


def _equalize_op(image, seed):
    del seed  # deterministic op; takes a seed only to fit the op signature
    return equalize_histogram(image)


# Each preset is the ordered list of ops `op(image, seed) -> image`; geometry first, colour last.
# random_dihedral leads: it permutes the input dtype (uint8 from the reader: 4x fewer bytes than float).
AUGMENT_PRESETS = {
    "none": (),
    "dihedral": (random_dihedral,),
    "light": (random_dihedral, random_brightness_contrast),
    # light + stain variation (HED jitter, hue/saturation): colour robustness across slides/scanners
    "medium": (random_dihedral, random_hed, random_hue_saturation, random_brightness_contrast),
    "strong": (
        random_dihedral,
        random_crop_resize,
        random_affine,
        random_hed,
        random_hue_saturation,
        functools.partial(random_brightness_contrast, brightness=STRONG_BRIGHTNESS,
                          contrast=STRONG_CONTRAST),
    ),
    # seed 001: flips, histogram equalisation, rotation, translation and shear (no zoom)
    "seed001": (random_dihedral, _equalize_op, functools.partial(random_affine, zoom=0.0)),
}


def build_augmenter(preset: str, *, seed: int = 0):
    """`fn(image, seed_pair) -> float32 [0, 255] image` running the preset's ops in order.

    `seed` offsets every per-element `seed_pair`, so two runs with different seeds see different
    augmentations of the same element.
    """
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    ops = AUGMENT_PRESETS[preset]
    offsets = tf.constant([[seed + _OP_SEED_STRIDE * i, 0] for i in range(len(ops))], tf.int64)

    def augment(image, seed_pair):
        out = tf.convert_to_tensor(image)
        if not ops:
            return tf.cast(out, tf.float32)
        # op i draws from (s0 + offset_i, s1): stateless (Philox) streams of distinct keys are
        # independent, and one add is far cheaper than stateless_fold_in / stateless_split
        seeds = tf.cast(seed_pair, tf.int64)[None, :] + offsets  # (n_ops, 2)
        for i, op in enumerate(ops):
            out = op(out, seeds[i])                            # dihedral keeps the dtype, the rest float32
        return tf.cast(out, tf.float32)

    return augment
