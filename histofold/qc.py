"""Image quality control: pixel hashes, dihedral-invariant perceptual hashes, blank patches, duplicate clusters.

Everything here is numpy/Pillow (plus scipy's connected components in the parent) so it runs in worker
processes that never import TensorFlow. Duplicates matter in histopathology because the same tissue
(or the same blank glass) seen in train and validation inflates CV scores: duplicates are clustered and
each cluster becomes one group, so it never straddles folds.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

HASH_SIDE = 32    # pHash works on a 32x32 grayscale thumbnail ...
HASH_BLOCK = 8    # ... and keeps its 8x8 lowest DCT frequencies -> 64 bits
BLANK_STD = 4.0   # std of the 32x32 luma thumbnail (0..255 units) below which a patch is near-uniform
WHITE_LEVEL = 215  # a pixel is background glass when all of R, G, B are >= this
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 RGB -> gray weights
WHITE_FRAC = 0.95  # ... and a patch is blank when more than this fraction of pixels is glass


def pixel_sha1(image: np.ndarray) -> str:
    """SHA-1 hex digest of the raw pixel bytes of a (H, W, 3) uint8 image: equal iff pixel-identical."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@lru_cache(maxsize=None)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D (n, n): dct2(X) = D @ X @ D.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


@lru_cache(maxsize=64)
def _area_matrix(n: int) -> np.ndarray:
    """(32, n) box-filter weights: row k averages input pixels over [k, k+1) * n/32 by overlap length."""
    edges = np.arange(HASH_SIDE + 1) * (n / HASH_SIDE)
    lo, hi = edges[:-1, None], edges[1:, None]
    i = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
    return overlap / (n / HASH_SIDE)


@lru_cache(maxsize=None)
def _flip_signs() -> np.ndarray:
    """(4, 8, 8) DCT sign patterns of identity, horizontal, vertical and both flips."""
    keep, flip = np.ones(HASH_BLOCK), (-1.0) ** np.arange(HASH_BLOCK)
    return np.stack([np.outer(rows, cols) for rows in (keep, flip) for cols in (keep, flip)])


def gray_thumb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (32, 32) float64 luma, area-averaged, commuting with flips and rotations."""
    h, w = image.shape[:2]
    fy, fx = h // HASH_SIDE, w // HASH_SIDE
    if h % HASH_SIDE or w % HASH_SIDE:
        # exact box filter for any size (PIL's resize rounds asymmetrically, breaking the invariance)
        return _area_matrix(h) @ (image @ LUMA) @ _area_matrix(w).T
    # block sums by strided adds: exact integers, symmetric under flips/rotations
    a = image.astype(np.uint16 if fy * fx <= 256 else np.uint32)  # uint16 holds 256 * 255
    rows = sum(a[i::fy] for i in range(fy))  # (32, W, 3)
    sums = sum(rows[:, j::fx] for j in range(fx))  # (32, 32, 3)
    return (sums @ LUMA) / (fy * fx)


def phash_d4(image: np.ndarray, *, thumb: np.ndarray | None = None) -> int:
    """Perceptual hash invariant to the 8 dihedral transforms (flips, 90-degree rotations).

    DCT pHash of the 32x32 grayscale thumbnail: bit set where a low-frequency (8x8) DCT coefficient
    exceeds the median of the AC ones. The 8 transforms of the image map its DCT block to sign flips
    ((-1)^u on rows, (-1)^v on columns) and a transpose, so all 8 hashes come from one DCT and their
    minimum is the canonical, transform-invariant hash. Returns an int in [0, 2**64).
    `thumb`: the image's `gray_thumb`, when the caller already has it.
    """
    d = _dct_matrix(HASH_SIDE)
    thumb = gray_thumb(image) if thumb is None else thumb
    block = (d @ thumb @ d.T)[:HASH_BLOCK, :HASH_BLOCK]  # (8, 8) low frequencies
    signs = _flip_signs()
    variants = np.concatenate([signs * block, signs * block.T]).reshape(8, -1)  # (8, 64): the 8 transforms
    ac = variants[:, 1:]  # 63 AC coefficients: the median is the 32nd smallest (DC excluded)
    on = variants > np.partition(ac, ac.shape[1] // 2, axis=1)[:, ac.shape[1] // 2:ac.shape[1] // 2 + 1]
    return int(np.packbits(on, axis=1).view(">u8").min())


def blank_stats(image: np.ndarray, *, thumb: np.ndarray | None = None) -> tuple[float, float]:
    """(std of the 32x32 luma thumbnail in 0..255 units, fraction of near-white glass pixels).

    The thumbnail's std ignores pixel noise, so blank glass and black frames read near 0 while tissue
    reads ~15-40.
    """
    thumb = gray_thumb(image) if thumb is None else thumb
    px = np.ascontiguousarray(image).reshape(-1, 3)
    darkest = np.minimum(np.minimum(px[:, 0], px[:, 1]), px[:, 2])  # glass: every channel >= WHITE_LEVEL
    white = np.count_nonzero(darkest >= WHITE_LEVEL) / max(len(px), 1)
    return float(thumb.std()), float(white)


def is_blank(image: np.ndarray, *, thumb: np.ndarray | None = None, std_max: float = BLANK_STD,
             white_frac: float = WHITE_FRAC) -> bool:
    """True for a patch without tissue: near-uniform (any colour, e.g. black) or mostly background glass."""
    std, white = blank_stats(image, thumb=thumb)
    return std < std_max or white > white_frac


def scan_image(image: np.ndarray) -> dict:
    """The QC facts prepare records per image: sha1, phash (d4-invariant), blank flag, shape (H, W)."""
    thumb = gray_thumb(image)
    return {"sha1": pixel_sha1(image), "phash": phash_d4(image, thumb=thumb),
            "blank": is_blank(image, thumb=thumb), "shape": tuple(image.shape[:2])}


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hash arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64)))


def _equal_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) chaining every run of equal keys (enough edges for connected components)."""
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]
    return order[:-1][same], order[1:][same]


def near_pairs(hashes: np.ndarray, *, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of 64-bit hashes within `max_bits` Hamming distance, without the O(n^2) scan.

    Equal hashes are chained first; distinct values are then matched by multi-index banding: split the
    64 bits into max_bits + 1 bands, so by pigeonhole any pair within max_bits agrees exactly on one
    band; candidates are neighbours in each band's sort order, checked with a popcount.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    i, j = _equal_pairs(hashes)
    if max_bits <= 0 or len(hashes) < 2:
        return i, j
    values, first = np.unique(hashes, return_index=True)  # one representative per distinct hash
    pi, pj = [i], [j]
    edges = np.linspace(0, 64, max_bits + 2).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = (values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(band, kind="stable")
        band, vals = band[order], values[order]
        for step in range(1, len(vals)):  # compare each value with the next `step`-th in its bucket
            same = band[step:] == band[:-step]
            if not same.any():
                break
            close = same & (hamming(vals[step:], vals[:-step]) <= max_bits)
            pi.append(first[order[:-step][close]])
            pj.append(first[order[step:][close]])
    return np.concatenate(pi), np.concatenate(pj)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over n nodes with edges (i, j): component label per node, numbered by first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # number components in order of first appearance
    return rank[labels]


def duplicate_clusters(sha1: list[str], phash: np.ndarray, *, near_bits: int | None,
                       near_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster exact (same pixels) and near (same or close d4-pHash) duplicates.

    Args:
      sha1: pixel SHA-1 per image.
      phash: d4-invariant pHash per image (uint64).
      near_bits: Hamming radius for near duplicates; None disables them (exact only).
      near_mask: bool per image, False to keep an image out of near matching (blank patches: their
        hashes are noise, and uniform glass would chain into one giant cluster).

    Returns:
      (cluster, exact): cluster label per image (components numbered by first member; singletons get
      their own), and a bool per image that is True when another image has the same pixels.
    """
    n = len(sha1)
    keys = np.unique(np.asarray(sha1), return_inverse=True)[1]
    ei, ej = _equal_pairs(keys)
    exact = np.zeros(n, bool)
    exact[ei] = exact[ej] = True
    pi, pj = [ei], [ej]
    if near_bits is not None:
        idx = np.arange(n) if near_mask is None else np.flatnonzero(near_mask)
        ni, nj = near_pairs(np.asarray(phash, np.uint64)[idx], max_bits=near_bits)
        pi.append(idx[ni])
        pj.append(idx[nj])
    return components(n, np.concatenate(pi), np.concatenate(pj)), exact


def merge_groups(source_groups: list[str], cluster: np.ndarray, ids: list[str]) -> list[str]:
    """One group per connected component of (source group ∪ duplicate cluster), named readably.

    A component keeps its source group name ("A+B" when duplicates join groups A and B); without source
    groups it is "dup-<first id>" for a duplicate cluster and the item's id for a singleton.
    """
    n = len(ids)
    src = np.asarray([g if g else "" for g in source_groups], dtype=object)
    has = np.flatnonzero(src != "")
    keys = np.unique(src[has].astype(str), return_inverse=True)[1] if len(has) else np.zeros(0, int)
    gi, gj = _equal_pairs(keys)
    ci, cj = _equal_pairs(np.asarray(cluster))
    comp = components(n, np.concatenate([has[gi], ci]), np.concatenate([has[gj], cj]))
    names: dict[int, set] = {}
    for k in has:
        names.setdefault(comp[k], set()).add(src[k])
    size = np.bincount(comp, minlength=n)
    first = {}
    for k in range(n):
        first.setdefault(comp[k], ids[k])
    out = []
    for k in range(n):
        c = comp[k]
        if c in names:
            out.append("+".join(sorted(names[c])))
        else:
            out.append(f"dup-{first[c]}" if size[c] > 1 else str(ids[k]))
    return out


def duplicates_table(*, ids: list[str], labels: list[int], splits: list[str], cluster: np.ndarray,
                     exact: np.ndarray):
    """DataFrame of every image in a duplicate cluster: cluster, id, label, split, kind, conflict.

    kind is "exact" when another image has the same pixels, else "near"; conflict is True when the
    cluster's labeled members (label >= 0) disagree, i.e. the same tissue carries two labels.
    """
    import pandas as pd

    df = pd.DataFrame({"cluster": np.asarray(cluster), "id": ids, "label": labels, "split": splits,
                       "kind": np.where(exact, "exact", "near")})
    df = df[df.groupby("cluster")["id"].transform("size") > 1]
    labeled = df[df["label"] >= 0]
    n_labels = labeled.groupby("cluster")["label"].nunique()
    df = df.assign(conflict=df["cluster"].map(n_labels).fillna(0).astype(int) > 1)
    return df.sort_values(["cluster", "id"], kind="stable").reset_index(drop=True)
