"""Prediction: test-time augmentation over the dihedral group D4 and the one path from a dataset of
(x, y, id) batches to an id-keyed probability frame, used for OOF, test shards, new images and slides."""
from __future__ import annotations

import numpy as np
import pandas as pd

from histofold import imageops

TTA_SUBSETS = {
    1: [0],
    2: [0, imageops.HFLIP],
    4: list(imageops.SHAPE_KEEPING),   # identity, rot180, two flips: safe for non-square images too
    8: list(imageops.DIHEDRAL),
}


def tta_subset(n: int) -> list[int]:
    """The dihedral k's averaged for --tta=n."""
    if n not in TTA_SUBSETS:
        raise ValueError(f"--tta={n} is not supported; use one of {sorted(TTA_SUBSETS)}")
    return list(TTA_SUBSETS[n])


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
        out = np.asarray(forward(imageops.dihedral(x, k)), dtype=np.float64)
        total = out if total is None else total + out
    return (total / len(ks)).astype(np.float32)


def predict_tta(model, dataset, *, n: int = 8, desc: str = "", verbose: bool = True):
    """(ids (N,) str, labels (N,) int, probs (N, K_out) float32): mean over n dihedral transforms for every
    (x, y, id) batch of `dataset`; labels are class indices (-1 unlabeled), K_out the model's output width."""
    from tqdm.auto import tqdm

    ks = tta_subset(n)
    forward = make_forward(model)
    ids, labels, probs = [], [], []
    for x, y, batch_ids in tqdm(dataset, total=_num_batches(dataset), desc=desc or f"TTA x{n}", unit="batch",
                                disable=not verbose, mininterval=2):
        if x.shape[1] != x.shape[2] and any(imageops.swaps_hw(k) for k in ks):
            raise ValueError(f"--tta={n} rotates by 90 degrees, which needs square images (got {x.shape[1]}x"
                             f"{x.shape[2]}); use --tta=4 (flips and rot180 only)")
        probs.append(tta_batch(forward, x, ks))
        labels.append(_label_indices(np.asarray(y)))
        ids.extend(_as_str(i) for i in np.asarray(batch_ids).ravel())
    out_dim = int(model.output.shape[-1])
    probs = np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, out_dim), np.float32)
    labels = np.concatenate(labels) if labels else np.zeros(0, int)
    return np.asarray(ids, dtype=object), labels, probs


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


def prob_columns(class_names) -> list[str]:
    return [f"p_{c}" for c in class_names]


def predict_frame(model, dataset, *, n: int, class_names: list[str], desc: str = "",
                  verbose: bool = True) -> pd.DataFrame:
    """(x, y, id) batches -> id-keyed frame: id, label, p_<class> for every class (binary too)."""
    ids, labels, probs = predict_tta(model, dataset, n=n, desc=desc, verbose=verbose)
    probs = to_class_probs(probs, len(class_names))  # (N, K)
    frame = pd.DataFrame({"id": ids, "label": np.asarray(labels, dtype=int)})
    for c, col in enumerate(prob_columns(class_names)):
        frame[col] = probs[:, c].astype(np.float64)
    return frame


def _num_batches(dataset) -> int | None:
    """Batches per pass for the progress bar; None when unknown (e.g. a generator)."""
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
