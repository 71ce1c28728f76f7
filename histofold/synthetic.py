"""Deterministic synthetic H&E-like patches for demos and tests: a pure function of (seed, index, size, label, K).

Tissue is drawn as stain concentrations and coloured by Beer-Lambert (RGB = I0 * exp(-OD)):
    eosin        pink stroma: low-frequency density x sinusoidal fibres
    hematoxylin  purple nuclei: soft-edged rotated ellipses stamped in one vectorised scatter-add
Classes are ordinal in "severity" t = label / (K - 1): higher t means more, larger, darker and more
varied nuclei. Each image draws its own density, size and darkness factors (log-normal), its own stain
vectors and sometimes a white blank region, so class distributions overlap: learnable, not trivial.
Field of view is fixed: nuclei radii scale with `size`, their count does not.
"""
from __future__ import annotations

import functools

import numpy as np

# Ruifrok & Johnston optical-density vectors (R, G, B) of the two stains.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)

NUCLEI_PER_PATCH = 22.0      # mean count at t = 0 (fixed field of view)
NUCLEUS_RADIUS = 3.0         # px at size 96, t = 0
BLANK_PROBABILITY = 0.15     # share of patches with a white (fat / background) region


def render(seed: int, index: int, size: int, label: int, num_classes: int) -> np.ndarray:
    """One (size, size, 3) uint8 patch; the same arguments always give the same pixels."""
    if not 0 <= int(label) < int(num_classes):
        raise ValueError(f"synthetic label {label} is outside 0..{int(num_classes) - 1}")
    if int(size) < 8:
        raise ValueError(f"synthetic image size {size} is too small; use 8 or more pixels")
    size = int(size)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(label), int(num_classes)])
    severity = label / max(int(num_classes) - 1, 1)   # 0..1
    eosin = _stroma(rng, size)
    hema = _nuclei(rng, size, severity)
    eosin = eosin * (1.0 - 0.7 * np.minimum(hema, 1.0))  # nuclei displace stroma
    if rng.random() < BLANK_PROBABILITY:
        keep = 1.0 - _blank_mask(rng, size)
        eosin, hema = eosin * keep, hema * keep
    return _colour(rng, hema, eosin)


@functools.lru_cache(maxsize=16)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) linear-interpolation weights: A @ G @ A.T upsamples a (cells, cells) grid."""
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = pos - lo
    a = np.zeros((size, cells), dtype=np.float32)
    a[np.arange(size), lo] = 1.0 - frac
    a[np.arange(size), lo + 1] = frac
    return a


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 low-frequency noise, roughly N(0, 0.5)."""
    a = _interp_matrix(size, cells)
    return a @ rng.standard_normal((cells, cells), dtype=np.float32) @ a.T


def _stroma(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) eosin concentration: patchy density times wavy fibres."""
    theta = rng.uniform(0, np.pi)
    cycles = 2 * np.pi * rng.uniform(6.0, 14.0) / size   # radians per pixel: 6-14 fibres per patch
    pos = np.arange(size, dtype=np.float32)
    phase = (pos * np.float32(cycles * np.sin(theta)))[:, None] + (pos * np.float32(cycles * np.cos(theta)))
    phase += _smooth_noise(rng, size, 4) * np.float32(rng.uniform(1.0, 3.0))  # wavy fibres
    wave = np.sin(phase, out=phase)
    wave = 0.5 + 0.5 * wave
    fibres = wave * wave * wave                          # sharpen: thin bright fibres
    density = 1.0 + 0.25 * _smooth_noise(rng, size, 6)
    return np.float32(rng.uniform(0.25, 0.45)) * density * (0.65 + 0.35 * fibres)


def _nuclei(rng: np.random.Generator, size: int, severity: float) -> np.ndarray:
    """(size, size) hematoxylin concentration of soft elliptical nuclei, scattered in one bincount."""
    count = rng.poisson(NUCLEI_PER_PATCH * np.exp(0.45 * severity) * rng.lognormal(0.0, 0.35))
    mean_r = NUCLEUS_RADIUS * size / 96 * np.exp(0.20 * severity) * rng.lognormal(0.0, 0.15)
    spread = 0.12 + 0.12 * severity                       # pleomorphism: log-sd of nuclear size
    darkness = 1.1 * np.exp(0.15 * severity) * rng.lognormal(0.0, 0.12)
    r_max = int(np.ceil(mean_r * 2.2)) + 1
    semi_a = np.clip(mean_r * rng.lognormal(0.0, spread, count), 1.0, r_max - 1.0).astype(np.float32)
    semi_b = semi_a / rng.uniform(1.0, 1.8, count).astype(np.float32)     # aspect ratio
    angle = rng.uniform(0, np.pi, count).astype(np.float32)
    dark = (darkness * rng.lognormal(0.0, 0.1, count)).astype(np.float32)
    cy, cx = rng.uniform(-r_max / 2, size + r_max / 2, (2, count)).astype(np.float32)
    return _stamp(size=size, r_max=r_max, centre=(cy, cx), axes=(semi_a, semi_b), angle=angle, value=dark)


def _stamp(*, size, r_max, centre, axes, angle, value) -> np.ndarray:
    """Sum of N soft ellipses, each evaluated on its own (W, W) window, W = 2 r_max + 1."""
    cy, cx = centre
    off = np.arange(-r_max, r_max + 1, dtype=np.float32)
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
    dy = off[None, :, None] - (cy - iy)[:, None, None]    # (N, W, 1)
    dx = off[None, None, :] - (cx - ix)[:, None, None]    # (N, 1, W)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (dx * cos + dy * sin) / axes[0][:, None, None]
    v = (dy * cos - dx * sin) / axes[1][:, None, None]
    r2 = u * u + v * v                                     # (N, W, W); 1 on the ellipse edge
    soft = np.clip((1.0 - r2) * 2.5, 0.0, 1.0) * value[:, None, None]
    pad = 2 * r_max                                        # canvas margin so every window fits
    side = size + 2 * pad
    rows = (iy + pad)[:, None, None] + off.astype(np.int64)[None, :, None]
    cols = (ix + pad)[:, None, None] + off.astype(np.int64)[None, None, :]
    flat = (rows * side + cols).ravel()
    canvas = np.bincount(flat, weights=soft.ravel(), minlength=side * side).reshape(side, side)
    return canvas[pad:pad + size, pad:pad + size].astype(np.float32)


def _blank_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) 0..1 mask of a soft-edged white area covering roughly 10-50% of the patch."""
    noise = _smooth_noise(rng, size, 3)
    threshold = np.quantile(noise, rng.uniform(0.5, 0.9))
    return np.clip((noise - threshold) * 6.0, 0.0, 1.0)


def _colour(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Beer-Lambert with per-image stain vectors and light level -> (H, W, 3) uint8."""
    h_vec = HEMATOXYLIN * rng.lognormal(0.0, 0.10, 3).astype(np.float32) * rng.lognormal(0.0, 0.15)
    e_vec = EOSIN * rng.lognormal(0.0, 0.10, 3).astype(np.float32) * rng.lognormal(0.0, 0.15)
    light = rng.uniform(235.0, 255.0, 3)                     # illumination I0 per channel
    grain = rng.random(hema.shape, dtype=np.float32)         # sensor noise: uniform, sd ~2.9 levels
    grain = (grain - np.float32(0.5)) * np.float32(10.0)
    rgb = np.empty(hema.shape + (3,), dtype=np.uint8)
    for c in range(3):  # per channel: contiguous (H, W) maths is ~10x faster than (H, W, 3) broadcasts
        od = hema * np.float32(h_vec[c]) + eosin * np.float32(e_vec[c])
        rgb[:, :, c] = np.clip(np.float32(light[c]) * np.exp(-od) + grain, 0, 255)
    return rgb
