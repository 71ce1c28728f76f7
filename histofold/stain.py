"""Stain normalization for H&E patches: Reinhard (LAB statistics) and Macenko (stain vectors), numpy only.

Why: slides from different labs and scanners differ in stain colour; normalizing every patch toward one
reference reduces that nuisance variation. The normalizer is fitted once on training images (``fit``),
stored as JSON in the dataset manifest (``StainNormalizer.to_json``) and re-applied unchanged to every
later input (valid/test shards, new images, whole-slide tiles), so training and prediction can never see
differently normalized pixels. It runs at prepare time in worker processes that import numpy (and Pillow
to decode) but never TensorFlow, on whole chunks ``(B, H, W, 3) uint8``.

    norm = stain.fit(train_images, "macenko")          # or "reinhard", or "none"
    manifest["stain"] = norm.to_json()                 # {"method": ..., "params": {...}}
    norm = stain.StainNormalizer.from_json(manifest["stain"])
    out = norm(chunk)                                  # (B, H, W, 3) or (H, W, 3) uint8 -> same

Conventions
-----------
Background is left alone: the pixels a method treats as background come out *exactly* equal to the
input, and an image without enough tissue to estimate its statistics (fewer than ``max(min_tissue_px,
min_tissue_frac * H * W)`` tissue pixels, default 50 px and 1 %), or one that is near-uniform, or whose
estimate is degenerate, is returned unchanged (never NaN, no warnings). On PCam train (3,000 patches)
that is 8 patches for Reinhard and 15 for Macenko: glass, and uniform *dark* or *grey* patches that are
not white at all (see "Failure modes").

Reinhard (Reinhard et al. 2001, "Color transfer between images"), per image:
    sRGB (IEC 61966-2-1, D65 white X,Y,Z = 0.95047, 1, 1.08883) -> linear RGB -> XYZ -> CIE L*a*b* with
    the standard piecewise f(t) (cube root above (6/29)^3); L in [0, 100] (not OpenCV's 0..255 scale).
    Tissue = pixels with L <= ``white_l`` (default 90); background = L > white_l (left alone).
    lab' = (lab - mean_img) * std_target / max(std_img, std_floor) + mean_target, channel-wise, with mean
    and population (ddof=0) std over the image's tissue pixels; only tissue pixels are replaced;
    ``std_floor`` (1.0) caps the gain a flat channel can get. Near-uniform image: all three tissue stds
    below ``min_std`` (3.0 LAB units; real PCam tissue: 1st percentile of the largest std is ~7) ->
    unchanged. Implementation: LAB is an affine map of F = (f(X/Xn), f(Y), f(Z/Zn)), so the per-image
    affine map in LAB is a per-image 3x3 affine map on F (one batched matmul, no LAB array is built);
    sRGB <-> linear are table look-ups (256 entries in; 65,536 out, within 0.03 of a level of exact
    rounding; the round trip RGB -> LAB -> RGB is exact on random colours). Out-of-gamut results are
    clipped in RGB, which is where the output's statistics drift from the target (low-contrast patches
    get large gains).
    Params: ``target_means`` [L, a, b], ``target_stds`` [L, a, b], ``white_l``, ``min_tissue_px``,
    ``min_tissue_frac``, ``min_std``, ``std_floor``.

Macenko (Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis"):
    OD = -log((I + 1) / 256) per channel (the I0 = 256 form: I = 255 -> OD = 0 exactly, I = 0 finite,
    and I = 256 exp(-OD) - 1 inverts it exactly). torchstain / HEnorm_python use -log((I + 1) / Io) with
    Io = 240 by default, which makes bright glass OD < 0; bench/stain.py runs it with Io = 256.
    Pixels with OD >= beta (0.15) in all three channels are used for estimation; pixels with OD < beta
    in *all* channels (I >= 220 in every channel) are background, left exactly alone; the rest are
    normalized but not used for estimation.
    Per image: eigenvectors of the covariance of the estimation pixels' OD (np.linalg.eigh on a (B, 3, 3)
    stack); the plane of the two largest is given an orthonormal basis whose first axis is the
    projection of the mean OD (angles then stay within (-90, 90) degrees: no wrap-around);
    phi = atan2(OD . u2, OD . u1); the alpha and 100 - alpha percentiles (alpha = 1) of phi give the two
    unit stain vectors. Order: the vector with the larger *red* OD component is haematoxylin (H absorbs
    red light, eosin hardly does), the other eosin -- the rule of the reference code (HEnorm_python,
    torchstain). Concentrations C = pinv([H E]) OD (least squares); their ``c_percentile`` (99)
    percentiles over the estimation pixels are the image's max concentrations. Normalized
    OD' = [H_t E_t] diag(maxC_t / maxC_img) C + w (OD - [H E] C), I' = 256 exp(-OD') - 1, rounded and
    clipped to uint8; for a whole image OD' = T @ OD with one 3x3 matrix T per image (one batched
    matmul). w = ``residual_weight``, default 0 = the paper (the OD residual off the stain plane is
    dropped). On PCam JPEGs that residual is ~5 % of the OD norm, so classic Macenko is *not* an
    identity even toward its own image (2-7 levels mean abs diff); w = 1 keeps the residual and makes
    self-normalization exact.
    Degenerate -> unchanged: too few estimation pixels; near-uniform (every channel's intensity std,
    to first order 256 exp(-mean OD) std(OD), below ``min_intensity_std`` = 3 levels); the two vectors
    closer than ``min_angle_deg`` (3 degrees; PCam tissue: 1st percentile ~12, median ~19; uniform dark
    patches 0.7-3); a max concentration <= 0; anything non-finite.
    Known bias (of the method, reproduced, not fixed): eosin's red OD is only ~0.07 per unit of stain, so
    the "all channels >= beta" rule drops pale pure-eosin pixels and the E vector is estimated from
    mixtures, tilted toward H; synthetic images recover E within 3 degrees only when dense pure-eosin
    pixels exist.
    Params: ``stain_matrix`` [[H_r, H_g, H_b], [E_r, E_g, E_b]] (unit rows), ``max_concentrations``
    [H, E], ``beta``, ``alpha``, ``c_percentile``, ``min_tissue_px``, ``min_tissue_frac``,
    ``min_intensity_std``, ``min_angle_deg``, ``residual_weight``.

Every threshold that affects application is stored in params, so a manifest written today applies the
same way after defaults change. ``from_json`` requires the target keys, fills a missing threshold with
its default, and rejects unknown keys or methods (ValueError naming the key). All values are floats or
lists of floats.

fit
---
Both methods estimate per-image statistics (one batched pass per shape group; a list of differently
sized images is grouped by shape) and take the per-component *median* over the images with enough
tissue (Macenko's stain vectors are then renormalized to unit length). Blank, uniform or degenerate
images are skipped (they cannot move the result at all); if none is left, fit raises ValueError.
Median rather than pooling all tissue pixels: (1) pooling weights each image by its tissue area and
mixes slides, and the 1st/99th *angle* percentiles of a pooled cloud are set by the most extreme slides
(pen marks, a badly stained slide), which widens the reference H-E angle; the median of per-image
vectors has a 50 % breakdown point, so blank, one-stain or artefact patches cannot dominate it;
(2) normalization matches *per-image* statistics to the target, so the target should be a typical
per-image value: a pooled Reinhard std would add the between-image variance and over-stretch every
image's contrast. Measured on 60 PCam train patches: pooled gives an H-E angle of 27.7 degrees against
20.5 for the median (per-image median 19); adding 6 blue-green "ink" patches (10 %) rotates the pooled H
vector by 41 degrees and the median's by 0.5. A single image (``--stain_ref=IMAGE``) is a median over
one.

Precision, determinism, vectorization
-------------------------------------
Per-pixel arrays are float32: the input has 8 bits, float32's 24-bit mantissa is far finer than 1/255,
and it halves memory traffic against float64 (numpy's SIMD exp/log/cbrt loops are float32 too).
Per-image statistics (means, covariances, eigenvectors, pseudo-inverses, 3x3 maps) are float64: tiny
arrays, and near-degenerate eigen/inverse problems deserve the margin; covariances are computed on
centred data. Deterministic: no randomness; BLAS only for fixed-shape matmuls.
Everything is numpy over the whole chunk, in a planar (B, 3, H*W) layout (masks broadcast along the
contiguous axis; 3x3 colour maps are matmuls). Python loops: over chunks of ~2**18 pixels, over the 3
channels when (de)interleaving, over shape groups in ``fit``; none over images or pixels. Masked
per-image percentiles (the cost that dominates Macenko) order only each row's tail: a strided subsample
gives a threshold, the few % of candidates beyond it are compacted and sorted -- exactly np.percentile's
"linear" method on each image's tissue pixels, ~4x cheaper than np.partition on the whole rows.
Scratch arrays live in a per-thread workspace reused across chunks: fresh multi-MB temporaries cost a
page fault per 4 KiB (measured: 77,000 faults and 0.22 s of system time per 640 patches, more than the
arithmetic).

Speed (``python bench/stain.py``: ONE core, AMD EPYC (Zen 4) VM with 2 cores shared with a background
job; 640 PCam 96 px patches in batches of 64, CRC-VAL-HE-7K 224 px; torchstain 1.4.1 numpy backend one
image per call, fitted on the same reference; best of 3), img/s:

    ==========  =====================  ==============  =====================  ==============
    size        ours Reinhard          torchstain      ours Macenko           torchstain
    ==========  =====================  ==============  =====================  ==============
    96 px       3,900-4,240            ~860 (4.5-5x)   4,000-4,500            650-716 (6x)
    224 px      760-890                ~182 (4.5x)     800-895                152-159 (5.5x)
    ==========  =====================  ==============  =====================  ==============

(ranges over four runs; the 2-core VM was shared with a long background job, so wall times are noisy.)
One image per call (B = 1) at 96 px: Reinhard ~3,500 img/s, Macenko ~1,500-1,700 (per-call overhead);
``fit`` on 640 patches: Macenko ~4,800-5,700 img/s, Reinhard ~7,800-9,000. Anchors from slideflow (large machine):
~930 img/s Macenko, ~4,200 img/s "fast" Reinhard.

Why our own code rather than torchstain (1.4.1, its numpy backend): beyond being 4-6x slower per core
(it works one image at a time: np.percentile four times, lstsq, boolean-mask power/cbrt in rgb2lab),
it re-synthesizes background instead of leaving it alone, takes Macenko's max concentrations over all
pixels (glass included: the scale then depends on how much glass a patch shows -- the main source of
our 11-level mean difference on PCam, 25 levels on patches with < 50 % tissue, ~1 level on tissue-rich
ones), uses no tissue mask in Reinhard (glass pulls the statistics), truncates instead of rounding
(0.49 level bias), has no batched API and no serializable state, and fails on blank input: Macenko
raises LinAlgError on glass (1 of the 640 PCam patches), returns an all-black image for a patch with a
few tissue pixels, Reinhard turns an all-white or single-colour patch black (0/0 -> NaN -> uint8) and
stretches glass and dark blank patches to the target mean. With its conventions emulated, our
estimates reproduce its output exactly (Macenko: 0.000 levels mean abs diff; Reinhard: 0.49, the
rounding), so the algorithms agree and the differences are the design choices above. Its metadata:
dist 1.4.1 but ``torchstain.__version__ == "1.3.0"``, "Development Status :: 4 - Beta", classifiers
up to Python 3.9, and its wheel installs a top-level ``tests`` package into site-packages (which
shadows a project's own ``tests`` directory when that has no ``__init__.py``).

Failure modes worth knowing (PCam train): uniform dark patches (RGB ~ 45, 35, 41) pass every "is it
tissue?" threshold (OD ~ 1.8 in every channel; L ~ 16) yet hold no stain: a plain Macenko fits two
stain vectors to JPEG noise (angle < 1 degree) and a plain Reinhard multiplies the noise by ~20; the
near-uniform and angle checks return them unchanged. Grey glass (RGB ~ 224, 219, 226) has L ~ 88 < 90,
so Reinhard counts it as tissue: near-uniform again, so unchanged. Pixels just below a threshold are
normalized while their neighbours just above it are not, so a faint halo can appear at tissue edges.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

METHODS = ("none", "reinhard", "macenko")

# Every option that affects how a fitted normalizer is applied is stored in its params.
_OPTION_DEFAULTS: dict[str, dict[str, float]] = {
    "none": {},
    "reinhard": {"white_l": 90.0, "min_tissue_px": 50.0, "min_tissue_frac": 0.01, "min_std": 3.0,
                 "std_floor": 1.0},
    "macenko": {"beta": 0.15, "alpha": 1.0, "c_percentile": 99.0, "min_tissue_px": 50.0,
                "min_tissue_frac": 0.01, "min_intensity_std": 3.0, "min_angle_deg": 3.0, "residual_weight": 0.0},
}
_TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "reinhard": ("target_means", "target_stds"),
    "macenko": ("stain_matrix", "max_concentrations"),
}
_FIT_ONLY_OPTIONS = ("max_images",)

# Pixels per internal chunk (~28 PCam patches, 5 images of 224 px, 1 of 768 px): bounds the workspace;
# measured flat from 2**15 to 2**19 on 96 px, slightly better small for 224 px.
_CHUNK_PIXELS = 1 << 18
_BIG = np.float32(1e30)

# ----------------------------------------------------------------------------------------------------
# Colour constants (sRGB, D65) and tables

_M_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
_M_RGB2XYZN = _M_RGB2XYZ / _WHITE[:, None]                 # linear RGB -> (X/Xn, Y/Yn, Z/Zn)
_M_XYZN2RGB = np.linalg.inv(_M_RGB2XYZN)
_M_RGB2XYZN32 = _M_RGB2XYZN.astype(np.float32)
_M_XYZN2RGB32 = _M_XYZN2RGB.astype(np.float32)
_DELTA = 6.0 / 29.0
_T_EPS = _DELTA ** 3                                         # f(t) = cbrt(t) above, linear below
# LAB = A @ F + K, F = (f(X/Xn), f(Y/Yn), f(Z/Zn))
_A = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_A_INV = np.linalg.inv(_A)
_K = np.array([-16.0, 0.0, 0.0])


def _srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)


_LUT_SIZE = 65536
_SRGB2LIN_LUT = _srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)
_LIN2SRGB_LUT = np.rint(255.0 * _linear_to_srgb(np.arange(_LUT_SIZE) / (_LUT_SIZE - 1.0))).astype(np.uint8)
_OD_LUT64 = -np.log((np.arange(256) + 1.0) / 256.0)
_OD_LUT = _OD_LUT64.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Small helpers

def _as_batch(images: Any) -> tuple[np.ndarray, bool]:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"stain: images must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr[None], True
    if arr.ndim == 4 and arr.shape[-1] == 3:
        return arr, False
    raise ValueError(f"stain: expected (B, H, W, 3) or (H, W, 3) uint8, got shape {arr.shape}")


def _chunks(n_images: int, pixels_per_image: int) -> Iterable[slice]:
    """Even chunks of at most ~_CHUNK_PIXELS pixels (at least one image each)."""
    n_chunks = max(1, -(-n_images * pixels_per_image // _CHUNK_PIXELS))
    step = max(1, -(-n_images // n_chunks))
    for s in range(0, n_images, step):
        yield slice(s, min(n_images, s + step))


def _min_count(n_pixels: int, p: dict) -> int:
    return max(1, int(math.ceil(max(p["min_tissue_px"], p["min_tissue_frac"] * n_pixels))))


# ----------------------------------------------------------------------------------------------------
# Workspace: per-thread scratch buffers, reused across chunks and calls.
#
# Without it every chunk allocates ~15 fresh multi-MB arrays; glibc serves those with mmap and returns
# them on free, so each call pays a page fault per 4 KiB touched: measured 77,000 faults and 0.22 s of
# system time per 640 PCam patches for Reinhard -- more than the arithmetic (0.12 s). The buffers are
# flat arrays grown to the largest request and handed out as contiguous views; they live as long as
# the thread (a few MB at the default chunk size; ~12 bytes x pixels x 4 for one huge image).

_TLS = threading.local()


def _buf(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    cache = getattr(_TLS, "bufs", None)
    if cache is None:
        cache = _TLS.bufs = {}
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    flat = cache.get((name, dtype))
    if flat is None or flat.size < size:
        flat = cache[(name, dtype)] = np.empty(max(size, 1), dtype=dtype)
    return flat[:size].reshape(shape)


_WORKSPACE_KEEP = 64 << 20   # bytes kept between calls; one huge image's buffers are dropped after it


def _trim_workspace() -> None:
    cache = getattr(_TLS, "bufs", None)
    if cache and sum(a.nbytes for a in cache.values()) > _WORKSPACE_KEEP:
        cache.clear()


# ----------------------------------------------------------------------------------------------------
# Masked per-row percentiles

_SUB_STRIDE = 17         # prime, so the subsample is not a few whole image columns


def _smallest_sorted(w: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The k smallest masked values of each row of w (R, N), sorted; +1e30 pads rows with fewer."""
    filled = w + (~mask) * _BIG                        # unmasked entries sort after every masked one
    if k < filled.shape[1]:
        filled = np.partition(filled, k - 1, axis=1)[:, :k]
    filled.sort(axis=1)
    return filled


def _masked_percentile(v: np.ndarray, mask: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """np.percentile(v[r][mask[r]], q) ("linear" method) for every row r of v (R, N) float32, in float64;
    n = mask.sum(1). Rows with n == 0 give a finite garbage value (callers mark them invalid).

    Only the tail beyond the percentile is ordered: the q-th percentile (q > 50: of -v) needs the k
    smallest values, k ~ q% of n. A strided subsample gives a per-row threshold below which at least k
    masked values lie (checked, else that row takes the full path); those candidates (a few % of the
    row) are compacted into a small padded array and sorted. Exact, and ~4x cheaper than np.partition
    on the whole (R, N) array, which is the cost that dominates Macenko."""
    R, N = v.shape
    upper = q > 50.0
    sign = np.float32(-1.0 if upper else 1.0)
    nn = np.maximum(n, 1)
    pos = (100.0 - q if upper else q) / 100.0 * (nn - 1.0)   # position from the tail's end
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, nn - 1).astype(np.intp)
    k = int(hi.max()) + 1 if R else 1                   # the k smallest (of sign * v) suffice
    vlo = np.empty(R)
    vhi = np.empty(R)
    todo = np.ones(R, dtype=bool)
    if R and N >= 64 * _SUB_STRIDE and 8 * k < N:
        sub = v[:, ::_SUB_STRIDE] * sign + (~mask[:, ::_SUB_STRIDE]) * _BIG
        ks = min(sub.shape[1] - 1, 2 * k // _SUB_STRIDE + 8)
        tau = np.partition(sub, ks, axis=1)[:, ks]        # ~ the 2k-th smallest of the row
        cand = _buf("pct_cand", (R, N), bool)
        (np.greater if upper else np.less)(v, (sign * tau)[:, None], out=cand)
        cand &= mask
        counts = cand.sum(axis=1)
        kc = int(counts.max())
        if kc <= N // 4:
            todo = counts < hi + 1                      # the subsample was unlucky: full path
            vals = v[cand] * sign
            starts = np.cumsum(counts) - counts
            rows = np.repeat(np.arange(R), counts)
            tail = np.full((R, max(kc, 1)), _BIG, dtype=np.float32)
            tail[rows, np.arange(vals.size) - starts[rows]] = vals
            tail.sort(axis=1)
            r = np.arange(R)
            vlo[:] = tail[r, np.minimum(lo, tail.shape[1] - 1)]
            vhi[:] = tail[r, np.minimum(hi, tail.shape[1] - 1)]
    if todo.any():
        idx = np.flatnonzero(todo)
        tail = _smallest_sorted(v[idx] * sign, mask[idx], k)
        r = np.arange(idx.size)
        vlo[idx] = tail[r, lo[idx]]
        vhi[idx] = tail[r, hi[idx]]
    res = vlo + (pos - lo) * (vhi - vlo)
    return res * float(sign)


def _check_number(key: str, value: Any, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"stain params: {key!r} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"stain params: {key!r} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"stain params: {key!r} = {v} out of range")
    if hi is not None and v > hi:
        raise ValueError(f"stain params: {key!r} = {v} out of range")
    return v


def _check_array(key: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"stain params: {key!r} must be a numeric list of shape {shape}") from None
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise ValueError(f"stain params: {key!r} must be a finite list of shape {shape}, got {value!r}")
    return arr


_OPTION_RANGES = {
    "white_l": (0.0, 100.0, True), "min_tissue_px": (1.0, None, False),
    "min_tissue_frac": (0.0, 1.0, False), "min_std": (0.0, None, False), "std_floor": (0.0, None, True),
    "beta": (0.0, None, True), "alpha": (0.0, 49.0, False), "c_percentile": (50.0, 100.0, False),
    "min_intensity_std": (0.0, None, False), "min_angle_deg": (0.0, 90.0, False),
    "residual_weight": (0.0, 1.0, False),
}


def _canonical_params(method: str, params: Any) -> dict:
    """Validated, JSON-able copy of params with defaults filled; ValueError naming the bad key."""
    if method not in METHODS:
        raise ValueError(f"stain: unknown method {method!r} (key 'method'); expected one of {METHODS}")
    if not isinstance(params, dict):
        raise ValueError(f"stain: 'params' must be a dict, got {type(params).__name__}")
    allowed = set(_TARGET_KEYS[method]) | set(_OPTION_DEFAULTS[method])
    for key in params:
        if key not in allowed:
            raise ValueError(f"stain params: unknown key {key!r} for method {method!r}")
    for key in _TARGET_KEYS[method]:
        if key not in params:
            raise ValueError(f"stain params: missing key {key!r} for method {method!r}")
    out: dict = {}
    if method == "reinhard":
        out["target_means"] = [float(x) for x in _check_array("target_means", params["target_means"], (3,))]
        stds = _check_array("target_stds", params["target_stds"], (3,))
        if np.any(stds <= 0):
            raise ValueError(f"stain params: 'target_stds' must be > 0, got {params['target_stds']!r}")
        out["target_stds"] = [float(x) for x in stds]
    elif method == "macenko":
        he = _check_array("stain_matrix", params["stain_matrix"], (2, 3))
        norms = np.linalg.norm(he, axis=1)
        if np.any(np.abs(norms - 1.0) > 1e-3):
            raise ValueError(f"stain params: 'stain_matrix' rows must be unit vectors, norms {norms}")
        he = he / norms[:, None]
        if abs(float(he[0] @ he[1])) > 1.0 - 1e-6:
            raise ValueError("stain params: 'stain_matrix' rows are parallel")
        out["stain_matrix"] = [[float(x) for x in row] for row in he]
        mc = _check_array("max_concentrations", params["max_concentrations"], (2,))
        if np.any(mc <= 0):
            raise ValueError(f"stain params: 'max_concentrations' must be > 0, got {mc.tolist()}")
        out["max_concentrations"] = [float(x) for x in mc]
    for key, default in _OPTION_DEFAULTS[method].items():
        lo, hi, lo_open = _OPTION_RANGES[key]
        out[key] = _check_number(key, params.get(key, default), lo, hi, lo_open)
    return out


# ----------------------------------------------------------------------------------------------------
# Layout: internally every image is planar, (B, 3, N) with N = H * W, so that per-pixel masks broadcast
# along a contiguous axis and the 3x3 colour maps are (3, 3) @ (3, N) matmuls (3-4x faster in numpy than
# the interleaved (B, N, 3) layout, whose broadcasts run an inner loop of length 3).

def _to_planar(x: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, N) uint8 workspace view (three strided copies beat a transpose)."""
    B, H, W, _ = x.shape
    xf = x.reshape(B, H * W, 3)
    out = _buf("planar", (B, 3, H * W), np.uint8)
    for c in range(3):
        out[:, c] = xf[:, :, c]
    return out


def _to_interleaved(p: np.ndarray, dest: np.ndarray) -> np.ndarray:
    """(B, 3, N) -> dest (B, H, W, 3), written in place."""
    of = dest.reshape(p.shape[0], -1, 3)
    for c in range(3):
        of[:, :, c] = p[:, c]
    return dest


def _merge(new: np.ndarray, old: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """new (B, 3, N) uint8 with the pixels where keep (B, N) is True replaced by old's, in place.
    Branch-free: uint8 arithmetic wraps modulo 256, so new + keep * (old - new) is exactly old or new."""
    delta = np.subtract(old, new, out=_buf("merge", new.shape, np.uint8))
    delta *= keep[:, None, :].view(np.uint8)
    new += delta
    return new


def _rgb_to_f(xp: np.ndarray, name: str = "f") -> np.ndarray:
    """uint8 sRGB planar (B, 3, N) -> F = (f(X/Xn), f(Y/Yn), f(Z/Zn)) float32 (B, 3, N) workspace view.
    f(t) = cbrt(t) for t > d^3, t / (3 d^2) + 4/29 below (d = 6/29); the linear piece is the tangent of
    cbrt at d^3, so f(t) = cbrt(max(t, d^3)) + min(t - d^3, 0) / (3 d^2) exactly, without a mask."""
    f = _buf(name, xp.shape, np.float32)
    t = _buf("tmp1", xp.shape, np.float32)
    np.take(_SRGB2LIN_LUT, xp, out=f)
    np.matmul(_M_RGB2XYZN32, f, out=t)
    np.maximum(t, np.float32(_T_EPS), out=f)
    np.cbrt(f, out=f)
    t -= np.float32(_T_EPS)
    np.minimum(t, 0.0, out=t)
    t *= np.float32(1.0 / (3.0 * _DELTA ** 2))
    f += t
    return f


def _f_to_rgb(f: np.ndarray, scratch: tuple[str, str] = ("tmp1", "f")) -> np.ndarray:
    """F float32 planar (B, 3, N) -> uint8 sRGB planar workspace view, rounded, out-of-gamut clipped.
    f^-1(u) = u^3 for u > d, 3 d^2 (u - 4/29) below = max(u, d)^3 + 3 d^2 min(u - d, 0) (tangent again).
    f is overwritten; scratch names two workspace buffers that f does not live in."""
    u = _buf(scratch[0], f.shape, np.float32)
    t = _buf(scratch[1], f.shape, np.float32)
    np.maximum(f, np.float32(_DELTA), out=u)
    np.multiply(u, u, out=t)
    t *= u
    f -= np.float32(_DELTA)
    np.minimum(f, 0.0, out=f)
    f *= np.float32(3.0 * _DELTA ** 2)
    t += f
    lin = np.matmul(_M_XYZN2RGB32, t, out=u)
    lin *= np.float32(_LUT_SIZE - 1)
    lin += np.float32(0.5)
    np.clip(lin, 0.0, np.float32(_LUT_SIZE - 1), out=lin)
    idx = _buf("idx16", f.shape, np.uint16)
    np.copyto(idx, lin, casting="unsafe")               # truncation of x + 0.5 (x >= 0) = rounding
    return np.take(_LIN2SRGB_LUT, idx, out=_buf("rgb", f.shape, np.uint8))


def _rgb_to_lab(x: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) -> CIE L*a*b* (D65; L in [0, 100]) float64 (..., 3). Same code path as
    Reinhard uses."""
    x = np.asarray(x, dtype=np.uint8)
    xp = np.ascontiguousarray(x.reshape(1, -1, 3).transpose(0, 2, 1))
    f = _rgb_to_f(xp)                                                   # (1, 3, n)
    lab = _A @ f[0].astype(np.float64) + _K[:, None]
    return lab.T.reshape(x.shape)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (..., 3) -> uint8 sRGB (..., 3), rounded and clipped."""
    lab = np.asarray(lab, dtype=np.float64)
    f = _A_INV @ (lab.reshape(-1, 3).T - _K[:, None])
    return _f_to_rgb(f[None].astype(np.float32))[0].T.reshape(lab.shape).copy()


def _masked_mean_cov(v: np.ndarray, mask: np.ndarray, ddof: int):
    """Per-image mean (B, 3) and covariance (B, 3, 3), float64, of the masked columns of v (B, 3, N)
    float32; centred (two passes) to avoid cancellation. Also returns the counts (B,)."""
    n = mask.sum(axis=1)
    m = _buf("mask32", mask.shape, np.float32)
    np.copyto(m, mask)
    nn = np.maximum(n, 1).astype(np.float64)
    mean = (v @ m[:, :, None])[:, :, 0].astype(np.float64) / nn[:, None]
    d = np.subtract(v, mean[:, :, None].astype(np.float32), out=_buf("tmp2", v.shape, np.float32))
    d *= m[:, None, :]
    # sum m (v - mu)(v - mu)^T == sum m (v - mu) v^T (the masked deviations sum to zero); d @ v^T is a
    # plain gemm, while d @ d^T would go to BLAS syrk, 4x slower for this shape
    cov = (d @ v.transpose(0, 2, 1)).astype(np.float64) / np.maximum(nn - ddof, 1.0)[:, None, None]
    return mean, (cov + cov.transpose(0, 2, 1)) / 2.0, n


# ----------------------------------------------------------------------------------------------------
# Reinhard

def _reinhard_stats(xp: np.ndarray, p: dict):
    """xp (B, 3, N) uint8 -> F (B, 3, N) f32, tissue (B, N) bool, LAB means (B, 3), stds (B, 3), valid (B,)."""
    N = xp.shape[2]
    f = _rgb_to_f(xp)
    fy_max = (p["white_l"] + 16.0) / 116.0             # L <= white_l  <=>  f(Y) <= (white_l + 16) / 116
    tissue = np.less_equal(f[:, 1], np.float32(fy_max), out=_buf("tissue", f[:, 1].shape, bool))
    mean_f, cov_f, n = _masked_mean_cov(f, tissue, ddof=0)
    means = mean_f @ _A.T + _K
    var = np.einsum("ij,bjk,ik->bi", _A, cov_f, _A)    # diag(A cov A^T)
    stds = np.sqrt(np.maximum(var, 0.0))
    valid = (n >= _min_count(N, p)) & (stds.max(axis=1) >= p["min_std"])
    return f, tissue, means, stds, valid


def _reinhard_apply(x: np.ndarray, p: dict, dest: np.ndarray) -> np.ndarray:
    xp = _to_planar(x)
    f, tissue, means, stds, valid = _reinhard_stats(xp, p)
    t_mu = np.asarray(p["target_means"])
    t_sd = np.asarray(p["target_stds"])
    g = t_sd / np.maximum(stds, p["std_floor"])         # (B, 3) gains in LAB
    # lab' = g (lab - mu) + mu_t, lab = A F + K  =>  F' = A^-1 diag(g) A F + A^-1 (g (K - mu) + mu_t - K)
    T = np.einsum("ij,bj,jk->bik", _A_INV, g, _A)
    o = (g * (_K - means) + t_mu - _K) @ _A_INV.T
    f2 = np.matmul(T.astype(np.float32), f, out=_buf("tmp2", f.shape, np.float32))
    f2 += o[:, :, None].astype(np.float32)
    rgb = _f_to_rgb(f2, scratch=("tmp1", "f"))          # F itself is no longer needed
    np.logical_not(tissue, out=tissue)                  # tissue -> keep (background)
    tissue |= ~valid[:, None]
    _merge(rgb, xp, tissue)
    return _to_interleaved(rgb, dest)


def _reinhard_estimate(x: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    _, _, means, stds, valid = _reinhard_stats(_to_planar(x), p)
    return means[valid], stds[valid]


# ----------------------------------------------------------------------------------------------------
# Macenko

def _od_threshold(beta: float) -> int:
    """Smallest intensity whose OD is below beta: OD < beta  <=>  I >= this (OD decreases with I)."""
    below = np.flatnonzero(_OD_LUT64 < beta)
    return int(below[0]) if below.size else 256


def _macenko_masks(xp: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """xp (B, 3, N) uint8 -> (estimation: OD >= beta in all channels, background: OD < beta in all
    channels), each (B, N) bool workspace views; computed on the integers (OD is monotone in I)."""
    i0 = _od_threshold(beta)
    r, g, b = xp[:, 0], xp[:, 1], xp[:, 2]
    est = _buf("est", r.shape, bool)
    bg = _buf("bg", r.shape, bool)
    if i0 > 255:
        est[:] = True
        bg[:] = False
        return est, bg
    tmp = _buf("chan", r.shape, np.uint8)
    np.maximum(np.maximum(r, g, out=tmp), b, out=tmp)
    np.less(tmp, i0, out=est)
    np.minimum(np.minimum(r, g, out=tmp), b, out=tmp)
    np.greater_equal(tmp, i0, out=bg)
    return est, bg


_HE_PLACEHOLDER = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
_HE_PLACEHOLDER /= np.linalg.norm(_HE_PLACEHOLDER, axis=1, keepdims=True)


def _macenko_estimate_od(od: np.ndarray, est: np.ndarray, p: dict):
    """Per-image stain matrices. od (B, 3, N) f32, est (B, N) bool ->
    he (B, 2, 3) f64 unit rows (H, E), maxc (B, 2) f64, pinv (B, 2, 3) f64 (C = pinv @ OD), valid (B,).
    Invalid rows hold finite placeholders."""
    B, _, N = od.shape
    mean, cov, n = _masked_mean_cov(od, est, ddof=1)
    valid = n >= _min_count(N, p)
    # near-uniform: per-channel intensity std, to first order (I + 1) * std(OD) = 256 exp(-OD) std(OD)
    sd_i = 256.0 * np.exp(-mean) * np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))
    valid &= sd_i.max(axis=1) >= p["min_intensity_std"]
    w, v = np.linalg.eigh(cov)                          # ascending eigenvalues
    normal = v[:, :, 0]                                 # smallest: normal of the stain plane
    mp = mean - np.sum(mean * normal, axis=1, keepdims=True) * normal
    mp_norm = np.linalg.norm(mp, axis=1)
    valid &= mp_norm > 1e-9
    u1 = np.where(valid[:, None], mp / np.where(valid, mp_norm, 1.0)[:, None], [1.0, 0.0, 0.0])
    u2 = np.cross(normal, u1)
    u2 /= np.maximum(np.linalg.norm(u2, axis=1, keepdims=True), 1e-12)
    t = np.matmul(np.stack([u1, u2], axis=1).astype(np.float32), od,
                  out=_buf("plane", (B, 2, N), np.float32))                # plane coordinates
    phi = np.arctan2(t[:, 1], t[:, 0], out=_buf("phi", (B, N), np.float32))
    alpha = p["alpha"]
    lo = _masked_percentile(phi, est, n, alpha)
    hi = _masked_percentile(phi, est, n, 100.0 - alpha)
    valid &= (hi - lo) >= math.radians(p["min_angle_deg"])
    v_lo = np.cos(lo)[:, None] * u1 + np.sin(lo)[:, None] * u2
    v_hi = np.cos(hi)[:, None] * u1 + np.sin(hi)[:, None] * u2
    lo_is_h = v_lo[:, 0] > v_hi[:, 0]                   # larger red OD component = haematoxylin
    h = np.where(lo_is_h[:, None], v_lo, v_hi)
    e = np.where(lo_is_h[:, None], v_hi, v_lo)
    he = np.stack([h, e], axis=1)                       # (B, 2, 3)
    gram = he @ he.transpose(0, 2, 1)
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    valid &= np.isfinite(det) & (det > 1e-8)
    he = np.where(valid[:, None, None], he, _HE_PLACEHOLDER)
    pinv = np.linalg.inv(he @ he.transpose(0, 2, 1)) @ he          # (B, 2, 3)
    conc = np.matmul(pinv.astype(np.float32), od, out=t)           # (B, 2, N), reuses the plane buffer
    c_mask = _buf("c_mask", (B, 2, N), bool)
    c_mask[:] = est[:, None, :]
    maxc = _masked_percentile(conc.reshape(2 * B, N), c_mask.reshape(2 * B, N), np.repeat(n, 2),
                              p["c_percentile"]).reshape(B, 2)     # rows: image 0 H, image 0 E, ...
    valid &= np.all(np.isfinite(maxc) & (maxc > 1e-6), axis=1)
    maxc = np.where(valid[:, None], maxc, 1.0)
    return he, maxc, pinv, valid


def _macenko_estimate(xp: np.ndarray, p: dict):
    est, bg = _macenko_masks(xp, p["beta"])
    od = np.take(_OD_LUT, xp, out=_buf("od", xp.shape, np.float32))
    he, maxc, pinv, valid = _macenko_estimate_od(od, est, p)
    return od, bg, he, maxc, pinv, valid


def _macenko_apply(x: np.ndarray, p: dict, dest: np.ndarray) -> np.ndarray:
    xp = _to_planar(x)
    od, bg, he, maxc, pinv, valid = _macenko_estimate(xp, p)
    he_t = np.asarray(p["stain_matrix"])                # (2, 3)
    scale = np.asarray(p["max_concentrations"])[None, :] / maxc
    # C = pinv @ OD; OD' = he_t^T diag(scale) C + w (OD - he^T C)   (w = residual_weight)
    T = (he_t.T[None] * scale[:, None, :]) @ pinv
    if p["residual_weight"]:
        T += p["residual_weight"] * (np.eye(3)[None] - he.transpose(0, 2, 1) @ pinv)
    od2 = np.matmul(T.astype(np.float32), od, out=_buf("tmp1", od.shape, np.float32))
    np.negative(od2, out=od2)
    np.exp(od2, out=od2)
    od2 *= np.float32(256.0)
    od2 -= np.float32(0.5)                             # I = 256 exp(-OD') - 1; + 0.5 then truncate = round
    np.clip(od2, 0.0, 255.0, out=od2)
    out = _buf("rgb", od.shape, np.uint8)
    np.copyto(out, od2, casting="unsafe")
    bg |= ~valid[:, None]
    _merge(out, xp, bg)
    return _to_interleaved(out, dest)


def _macenko_estimate_images(x: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    _, _, he, maxc, _, valid = _macenko_estimate(_to_planar(x), p)
    return he[valid], maxc[valid]


# Public API

_APPLY = {"reinhard": _reinhard_apply, "macenko": _macenko_apply}


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normalizer: ``method`` in METHODS and JSON-able ``params`` (validated and completed
    with defaults on construction). Call it on (B, H, W, 3) or (H, W, 3) uint8 images."""

    method: str
    params: dict

    def __post_init__(self):
        object.__setattr__(self, "params", _canonical_params(self.method, self.params))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return images
        batch, single = _as_batch(images)
        B, H, W, _ = batch.shape
        if B == 0 or H * W == 0:
            return batch[0].copy() if single else batch.copy()
        apply = _APPLY[self.method]
        out = np.empty_like(batch)
        try:
            for s in _chunks(B, H * W):
                apply(batch[s], self.params, out[s])
        finally:
            _trim_workspace()
        return out[0] if single else out

    def to_json(self) -> dict:
        return {"method": self.method, "params": json.loads(json.dumps(self.params))}

    @classmethod
    def from_json(cls, d: dict) -> "StainNormalizer":
        if not isinstance(d, dict):
            raise ValueError(f"stain: expected a dict with keys 'method' and 'params', got {type(d).__name__}")
        for key in ("method", "params"):
            if key not in d:
                raise ValueError(f"stain: missing key {key!r}")
        unknown = sorted(set(d) - {"method", "params"})
        if unknown:
            raise ValueError(f"stain: unknown key {unknown[0]!r}")
        return cls(d["method"], d["params"])


def _image_groups(images: Any) -> list[np.ndarray]:
    """(N, H, W, 3) array, one (H, W, 3) image, or a list of (H, W, 3) images -> same-shape batches."""
    if isinstance(images, np.ndarray):
        batch, _ = _as_batch(images)
        return [batch]
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i, im in enumerate(images):
        arr = np.asarray(im)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"stain.fit: image {i} must be (H, W, 3) uint8, got {arr.dtype} {arr.shape}")
        groups.setdefault(arr.shape, []).append(arr)
    return [np.stack(g) for g in groups.values()]


def fit(images, method: str, **options) -> StainNormalizer:
    """Fit the target (reference) from training images: an (N, H, W, 3) uint8 array, or a list of
    (H, W, 3) arrays of different sizes, or a single reference image (a user's --stain_ref=IMAGE).
    Robust to blank/background patches among them (they must not dominate the reference): per-image
    estimates of the images with enough tissue, per-component median (see the module docstring).

    options: the method's thresholds, stored in the params (reinhard: white_l, min_tissue_px,
    min_tissue_frac, min_std, std_floor; macenko: beta, alpha, c_percentile, min_tissue_px,
    min_tissue_frac, min_intensity_std, min_angle_deg, residual_weight); and ``max_images`` (fit on at
    most that many, evenly spaced; not stored).
    Raises ValueError for an unknown method or option, or when no image has enough tissue.
    """
    if method not in METHODS:
        raise ValueError(f"stain.fit: unknown method {method!r}; expected one of {METHODS}")
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS[method]) - set(_FIT_ONLY_OPTIONS))
    if unknown:
        raise ValueError(f"stain.fit: unknown option {unknown[0]!r} for method {method!r}")
    max_images = options.pop("max_images", None)
    if method == "none":
        return StainNormalizer("none", {})
    p = {**_OPTION_DEFAULTS[method], **options}
    # validate thresholds before the (possibly long) estimation; the target keys are added below
    _canonical_params(method, {**p, **_dummy_targets(method)})
    groups = _image_groups(images)
    if max_images is not None:
        total = sum(len(g) for g in groups)
        if total > int(max_images) >= 1:
            keep = set(np.linspace(0, total - 1, int(max_images)).round().astype(int).tolist())
            flat = [im for g in groups for im in g]
            groups = _image_groups([flat[i] for i in sorted(keep)])
    estimate = _reinhard_estimate if method == "reinhard" else _macenko_estimate_images
    parts_a, parts_b = [], []
    try:
        for g in groups:
            if g.shape[0] == 0 or g.shape[1] * g.shape[2] == 0:
                continue
            for s in _chunks(g.shape[0], g.shape[1] * g.shape[2]):
                a, b = estimate(g[s], p)
                parts_a.append(a)
                parts_b.append(b)
    finally:
        _trim_workspace()
    a = np.concatenate(parts_a) if parts_a else np.zeros((0,))
    if a.shape[0] == 0:
        raise ValueError(f"stain.fit: no image with enough tissue to fit {method!r} "
                         f"(all images blank, uniform or degenerate)")
    b = np.concatenate(parts_b)
    if method == "reinhard":
        params = {"target_means": np.median(a, axis=0).tolist(), "target_stds": np.median(b, axis=0).tolist()}
    else:
        he = np.median(a, axis=0)                           # (2, 3) component-wise median
        he /= np.linalg.norm(he, axis=1, keepdims=True)
        params = {"stain_matrix": he.tolist(), "max_concentrations": np.median(b, axis=0).tolist()}
    return StainNormalizer(method, {**p, **params})


def _dummy_targets(method: str) -> dict:
    if method == "reinhard":
        return {"target_means": [50.0, 0.0, 0.0], "target_stds": [1.0, 1.0, 1.0]}
    return {"stain_matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "max_concentrations": [1.0, 1.0]}
