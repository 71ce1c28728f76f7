"""Augmentation: pure, seeded tensor ops on image batches, and the named presets that chain them.

Conventions
- Every random op is stateless: `batch_op(images, seed)` with images (B, H, W, 3) and `seed` a
  shape-(2,) int tensor. One stateless draw of shape (B, n) per op per batch gives every image its
  own parameters; the same seed gives the same output, so a training run is reproducible.
- Input images may be uint8 or float32 in [0, 255]. Colour and geometric ops return float32 in
  [0, 255] (clipped); `batch_random_dihedral` only permutes pixels and keeps the dtype. The D4 group
  itself (shared with test-time augmentation) is histofold.imageops.dihedral.
- `build_augmenter(preset, seed=...)` returns `fn(images (B, H, W, 3), seed_pair) -> float32 images`
  of the same shape: the reader calls it once per batch with seed_pair = (seed, batch index).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from histofold import imageops

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

_OP_SEED_STRIDE = 1_000_003    # seed-key offset between the ops of one preset (a prime, beyond run seeds)

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density,
# normalised to unit length; OD (1, 3) @ _HED_FROM_RGB -> stain concentrations (1, 3).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


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


def _dihedral_tables(static_h, static_w, elements, h, w):
    """(len(elements), H*W) int32 gather tables: a graph constant when the size is known."""
    if static_h is not None and static_w is not None:
        return tf.constant(imageops.dihedral_tables(int(static_h), int(static_w), tuple(elements)))
    grid = tf.reshape(tf.range(h * w), tf.stack([h, w, 1]))
    return tf.stack([tf.reshape(imageops.dihedral(grid, k), [-1]) for k in elements])


def batch_random_dihedral(images, seed):
    """A uniformly random D4 element per image of (B, H, W, C); only the 4 shape-keeping ones when H != W.

    Each image draws k (imageops' D4 numbering) and its pixels are moved by one gather through the k-th
    (H*W,) index table (`imageops.dihedral` of an index grid): one pass over the batch whatever the
    draws. Keeps the dtype.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    static_h, static_w = images.shape[1], images.shape[2]
    keeping = tuple(imageops.SHAPE_KEEPING)
    if static_h is not None and static_w is not None:
        elements = tuple(imageops.DIHEDRAL) if static_h == static_w else keeping
        count = tf.constant(len(elements), tf.float32)
    else:  # size known only at run time: all 8 tables, the shape-keeping 4 first; draw from 8 if square
        elements = keeping + tuple(k for k in imageops.DIHEDRAL if k not in keeping)
        count = tf.where(tf.equal(h, w), float(len(elements)), float(len(keeping)))
    tables = _dihedral_tables(static_h, static_w, elements, h, w)  # (n_elements, H*W)
    u = tf.random.stateless_uniform([n], seed, dtype=tf.float32)
    k = tf.minimum(tf.cast(tf.floor(u * count), tf.int32), tf.cast(count, tf.int32) - 1)
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


def rgb_to_hed(image):
    """(..., 3) float [0, 255] RGB -> (..., 3) H, E, D stain concentrations (optical density units)."""
    od = -tf.math.log((tf.cast(image, tf.float32) + 1.0) / 256.0)  # +1: no log(0); 0 OD for white
    return tf.tensordot(od, tf.constant(_HED_FROM_RGB, tf.float32), axes=1)


def hed_to_rgb(hed):
    """Inverse of `rgb_to_hed`; float32 [0, 255], clipped."""
    od = tf.tensordot(hed, tf.constant(_RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


_GREY_AXIS = np.ones(3) / np.sqrt(3.0)
_LOG_256 = math.log(256.0)
_LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R 601 luma weights (saturation scales chroma about luma)


def _hue_saturation_matrices(hue_turns, saturation):
    """(B, 3, 3) row-vector colour matrices: rotate about the grey axis by `hue_turns` of a full turn, then
    scale chroma about luma by `saturation`; x (.., 3) @ M. Both maps are linear in RGB, so any number
    of them fold into one matrix (the linear counterpart of an HSV hue shift and saturation scale: hue
    rotation about (1, 1, 1) keeps grey grey and turns every hue by the same angle)."""
    theta = 2.0 * math.pi * hue_turns                                      # (B,)
    cos, sin = tf.cos(theta)[:, None, None], tf.sin(theta)[:, None, None]
    a = tf.constant(_GREY_AXIS, tf.float32)
    cross = tf.constant([[0.0, -_GREY_AXIS[2], _GREY_AXIS[1]], [_GREY_AXIS[2], 0.0, -_GREY_AXIS[0]],
                         [-_GREY_AXIS[1], _GREY_AXIS[0], 0.0]], tf.float32)
    outer = a[:, None] * a[None, :]
    rotation = cos * tf.eye(3) + sin * cross + (1.0 - cos) * outer          # Rodrigues, column-vector form
    s = saturation[:, None, None]
    luma = tf.constant(_LUMA, tf.float32)
    sat = s * tf.eye(3) + (1.0 - s) * luma[:, None] * tf.ones([1, 3])      # out_c = s x_c + (1 - s) luma
    return tf.linalg.matrix_transpose(rotation) @ sat


def batch_random_stain(images, seed, *, hed_sigma=HED_SIGMA, hed_bias=HED_BIAS, hue=HUE,
                       saturation=SATURATION, brightness=LIGHT_BRIGHTNESS, contrast=LIGHT_CONTRAST):
    """Stain and colour jitter in one pass per batch: HED jitter (Tellez et al. 2019) then hue,
    saturation, contrast and brightness, every image its own draws.

    HED: in optical density each of H, E, D becomes alpha x + beta (alpha ~ U(1 +- hed_sigma),
    beta ~ U(+-hed_bias)) in Ruifrok & Johnston's HED basis (`rgb_to_hed`), one (3, 3) matrix and
    offset per image. Colour:
    hue turned by U(+-hue) of the wheel about the grey axis, chroma scaled by U(1 +- saturation) about
    luma, contrast by U(1 +- contrast) about the image's channel means, brightness U(+-brightness) x 255:
    all linear in RGB, so they fold into one (3, 3) matrix and offset per image. Cost per pixel: one
    log, two 3x3 products, one exp. A zero strength leaves that part out of the draw's effect.
    """
    images = tf.cast(images, tf.float32)
    u = _symmetric(seed, images, 10)                                       # (B, 10) draws per image
    b = tf.shape(images)[0]
    shape = tf.shape(images)
    x = tf.reshape(images, tf.stack([b, -1, 3]))                           # (B, HW, 3)
    if hed_sigma or hed_bias:
        alpha, beta = 1.0 + u[:, :3] * hed_sigma, u[:, 3:6] * hed_bias
        rgb_from_hed = tf.constant(_RGB_FROM_HED, tf.float32)
        matrix = tf.constant(_HED_FROM_RGB, tf.float32) @ (alpha[:, :, None] * rgb_from_hed)
        # od = -log((x + 1) / 256); the jittered od' = od @ matrix + offset maps back as 256 exp(-od') - 1
        # (no clip in between: the final clip bounds the result, and the colour map is linear)
        od = (_LOG_256 - tf.math.log(x + 1.0)) @ matrix + (beta @ rgb_from_hed)[:, None, :]
        x = 256.0 * tf.exp(-od) - 1.0
    colour = _hue_saturation_matrices(u[:, 6] * hue, 1.0 + u[:, 7] * saturation)   # (B, 3, 3)
    factor = (1.0 + u[:, 8] * contrast)[:, None, None]                     # (B, 1, 1)
    mean = tf.reduce_mean(x, axis=1, keepdims=True) @ colour               # (B, 1, 3) mean after colour
    offset = mean * (1.0 - factor) + (u[:, 9] * brightness * 255.0)[:, None, None]
    out = x @ (colour * factor) + offset
    return tf.reshape(tf.clip_by_value(out, 0.0, 255.0), shape)


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


# ---------------------------------------------------------------- mixup


def batch_mixup(images, y, w, seed, *, alpha: float):
    """Mixup (Zhang et al. 2018) within a batch: each image blends with a random partner of the same
    batch by lam ~ Beta(alpha, alpha), folded to lam >= 0.5 so the image stays the major part; labels
    (and sample weights, when given) blend by the same lam. Returns (images, y, w)."""
    n = tf.shape(images)[0]
    key = [_OP_SEED_STRIDE * 100, 0]   # streams apart from every augmentation op's
    g1 = tf.random.stateless_gamma([n], seed + tf.constant(key, seed.dtype), alpha)
    g2 = tf.random.stateless_gamma([n], seed + tf.constant(key, seed.dtype) + 1, alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    lam = tf.maximum(lam, 1.0 - lam)                                       # (B,)
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seed + tf.constant(key, seed.dtype) + 2)
    images = _bcast(lam) * images + _bcast(1.0 - lam) * tf.gather(images, partner)
    lam_y = tf.reshape(lam, [-1] + [1] * (len(y.shape) - 1))
    y = lam_y * y + (1.0 - lam_y) * tf.gather(y, partner)
    if w is not None:
        w = lam * w + (1.0 - lam) * tf.gather(w, partner)
    return images, y, w


# ---------------------------------------------------------------- presets


def _batch_equalize_op(images, seed):
    del seed  # deterministic op; takes a seed only to fit the op signature
    return batch_equalize_histogram(images)


_STRONG_STAIN = dict(hed_sigma=0.05, hed_bias=0.05, hue=0.08, saturation=0.3, brightness=STRONG_BRIGHTNESS,
                     contrast=STRONG_CONTRAST)

# Each preset is the ordered list of batch ops `op(images, seed) -> images`; geometry first, colour last.
# batch_random_dihedral leads: it permutes the input dtype (uint8 from the reader: 4x fewer bytes).
# Measured on 2 cores, 96 px, batches of 64 (bench/pipeline.py): see the README's pipeline table.
AUGMENT_PRESETS = {
    "none": (),
    "dihedral": (batch_random_dihedral,),
    "light": (batch_random_dihedral, batch_random_brightness_contrast),
    # dihedral + HED stain and hue/saturation/brightness/contrast jitter in one fused pass
    "stain": (batch_random_dihedral, batch_random_stain),
    "stain_strong": (batch_random_dihedral, functools.partial(batch_random_stain, **_STRONG_STAIN)),
    "strong": (batch_random_dihedral, batch_random_crop_resize, batch_random_affine,
               functools.partial(batch_random_stain, **_STRONG_STAIN)),
    # seed 001: flips, histogram equalisation, rotation, translation and shear (no zoom)
    "seed001": (batch_random_dihedral, _batch_equalize_op, functools.partial(batch_random_affine, zoom=0.0)),
}
PRESET_ALIASES = {"medium": "stain"}  # the old name of the stain preset


def check_preset(preset: str) -> str:
    """The preset's canonical name; UsageError listing the valid ones when unknown."""
    from histofold.errors import UsageError

    preset = PRESET_ALIASES.get(preset, preset)
    if preset not in AUGMENT_PRESETS:
        raise UsageError(f"--augment={preset!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    return preset


def build_augmenter(preset: str, *, seed: int = 0):
    """`fn(images (B, H, W, 3), seed_pair) -> float32 [0, 255] images` running the preset's ops in order.

    Every image of the batch gets its own draws. `seed` offsets every `seed_pair` (the reader passes
    (run seed, batch index)), so two runs with different seeds see different augmentations.
    """
    ops = AUGMENT_PRESETS[check_preset(preset)]
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
