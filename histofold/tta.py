"""Test-time augmentation: the dihedral group D4 on image batches and probability averaging over it."""
from __future__ import annotations

import numpy as np

# k indexes D4 as in augment.dihedral: k % 4 counter-clockwise quarter turns, then a transpose when k >= 4.
# In that numbering k=5 is a horizontal flip (W reversed), k=7 a vertical flip (H reversed), k=2 rot180.
TTA_TRANSFORMS = list(range(8))
HFLIP, VFLIP, ROT180 = 5, 7, 2
TTA_SUBSETS = {
    1: [0],
    2: [0, HFLIP],
    4: [0, HFLIP, VFLIP, ROT180],  # the shape-keeping half of D4: safe for non-square images too
    8: TTA_TRANSFORMS,
}


def tta_subset(n: int) -> list[int]:
    """The dihedral k's averaged for --tta=n."""
    if n not in TTA_SUBSETS:
        raise ValueError(f"--tta={n} is not supported; use one of {sorted(TTA_SUBSETS)}")
    return list(TTA_SUBSETS[n])


def dihedral_batch(x, k: int):
    """D4 element k of a (B, H, W, C) tensor (the same map as augment.dihedral on each image)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4:
        raise ValueError(f"dihedral_batch expects (B, H, W, C), got shape {x.shape}")
    if not 0 <= k < 8:
        raise ValueError(f"dihedral k={k} is outside 0..7")
    out = tf.image.rot90(x, k % 4) if k % 4 else x
    return tf.image.transpose(out) if k >= 4 else out


def dihedral_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """dihedral_batch for a (B, H, W, C) numpy array (a view; no TensorFlow)."""
    if x.ndim != 4:
        raise ValueError(f"dihedral_numpy expects (B, H, W, C), got shape {x.shape}")
    if not 0 <= k < 8:
        raise ValueError(f"dihedral k={k} is outside 0..7")
    out = np.rot90(x, k % 4, axes=(1, 2))  # counter-clockwise, like tf.image.rot90
    return np.swapaxes(out, 1, 2) if k >= 4 else out


def make_forward(model):
    """A compiled inference fn: (B, H, W, 3) batch -> model output as float32 (mixed precision safe)."""
    import tensorflow as tf

    # one trace per model whatever the batch size (the last batch is short); TTA keeps H, W
    _, h, w, c = model.input_shape
    @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32)])
    def forward(x):
        return tf.cast(model(x, training=False), tf.float32)

    return forward


def tta_batch(forward, x, ks: list[int]) -> np.ndarray:
    """Mean of forward(T_k(x)) over ks; one transform at a time so peak memory is one forward pass."""
    total = None
    for k in ks:
        out = np.asarray(forward(dihedral_batch(x, k)), dtype=np.float64)
        total = out if total is None else total + out
    return (total / len(ks)).astype(np.float32)


def predict_tta(model, dataset, *, n: int = 8, verbose: bool = True, return_labels: bool = False):
    """Mean probabilities over n dihedral transforms for every (x, y, id) batch of `dataset`.

    Returns (ids, probs) or, with return_labels, (ids, labels, probs): ids (N,) str, labels (N,) int
    (argmax of one-hot labels; -1 stays -1), probs (N, K_out) float32 with the model's output width
    (1 column, P(class 1), for binary models).
    """
    from tqdm.auto import tqdm

    ks = tta_subset(n)
    forward = make_forward(model)
    ids, labels, probs = [], [], []
    for batch in tqdm(dataset, total=_num_batches(dataset), desc=f"TTA x{n}", unit="batch", disable=not verbose):
        x, y, batch_ids = batch  # (B, H, W, 3) float32, labels, (B,) string ids
        if x.shape[1] != x.shape[2] and any(_swaps_hw(k) for k in ks):
            raise ValueError(f"--tta={n} rotates by 90 degrees, which needs square images (got {x.shape[1]}x"
                             f"{x.shape[2]}); use --tta=4 (flips and rot180 only)")
        probs.append(tta_batch(forward, x, ks))
        labels.append(_label_indices(np.asarray(y)))
        ids.extend(_as_str(i) for i in np.asarray(batch_ids).ravel())
    out_dim = int(model.output.shape[-1])
    probs = np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, out_dim), np.float32)
    ids = np.asarray(ids, dtype=object)
    if return_labels:
        labels = np.concatenate(labels) if labels else np.zeros(0, int)
        return ids, labels, probs
    return ids, probs


def to_class_probs(p, num_classes: int) -> np.ndarray:
    """Model outputs -> (N, K) class probabilities; binary (N,) or (N, 1) P(class 1) -> [1 - p, p]."""
    p = np.asarray(p, dtype=np.float64)
    if num_classes == 2 and (p.ndim == 1 or p.shape[-1] == 1):
        p1 = p.reshape(-1)
        return np.stack([1.0 - p1, p1], axis=1)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"model outputs have shape {p.shape} but the run has {num_classes} classes: "
                         f"check that the weights belong to this run's config.json")
    return p


def _swaps_hw(k: int) -> bool:
    """Odd quarter turns swap H and W, and so does the transpose: k in {1, 3, 4, 6}."""
    return bool((k % 4) % 2) != (k >= 4)


def _num_batches(dataset) -> int | None:
    """Batches per pass for the progress bar; None when unknown (e.g. after a filter)."""
    try:
        n = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return len(dataset) if hasattr(dataset, "__len__") else None
    return n if n >= 0 else None


def _label_indices(y: np.ndarray) -> np.ndarray:
    """Binary (B, 1) floats, int (B,) or one-hot (B, K) labels -> (B,) int class indices."""
    if y.ndim == 2 and y.shape[1] > 1:
        return np.where(y.max(axis=1) > 0, y.argmax(axis=1), -1)  # an all-zero row is unlabeled
    return np.rint(y.reshape(-1)).astype(int)


def _as_str(i) -> str:
    return i.decode("utf-8") if isinstance(i, bytes) else str(i)
