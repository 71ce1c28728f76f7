"""The tf.data reader: sharded TFRecords in, batches of float32 [0, 255] images and labels out.

One chain, top to bottom (see `make_dataset`): list shards by name -> interleave (training) ->
cache serialized records (optional) -> shuffle + repeat (training) -> batch the serialized records ->
one map per batch: parse, decode, resize, augment (training), labels and sample weights -> prefetch.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from histofold import augment as aug
from histofold import records

MANIFEST = "manifest.json"
CYCLE_LENGTH = 8          # shards read at once when training: enough mixing, bounded open files
SPLITS = ("train", "test")


def _prepare_hint(tfrec_dir: str) -> str:
    return f"run `python prepare_tfrecords.py --input=<dataset> --out={tfrec_dir}` to write it"


def load_manifest(tfrec_dir: str) -> dict:
    """The dataset's manifest.json (classes, image size, encoding, shards, counts)."""
    path = os.path.join(tfrec_dir, MANIFEST)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: {_prepare_hint(tfrec_dir)}")
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); {_prepare_hint(tfrec_dir)} again") from None


def _all_shards(tfrec_dir: str) -> list[tuple[dict, str]]:
    """(parsed name, path) of every shard in the directory, sorted by (fold, index); test last."""
    if not tf.io.gfile.isdir(tfrec_dir):
        raise FileNotFoundError(f"tfrecords dir {tfrec_dir} not found: {_prepare_hint(tfrec_dir)}")
    found = [(records.parse_shard_name(n), n) for n in tf.io.gfile.listdir(tfrec_dir)]
    shards = [(p, os.path.join(tfrec_dir, n)) for p, n in found if p is not None]
    if not shards:
        raise FileNotFoundError(f"no *.tfrec shards in {tfrec_dir}: {_prepare_hint(tfrec_dir)}")
    # numeric sort: fold10 after fold9, index 1000 after 999; test (fold -1) after every fold
    return sorted(shards, key=lambda s: (s[0]["fold"] < 0, s[0]["fold"], s[0]["index"]))


def shard_files(tfrec_dir: str, *, folds=None, split: str = "train") -> list[str]:
    """Paths of the split's shards (all folds, or only `folds`), in fold then index order.

    split="test" ignores `folds` and gives [] when there is no test set; absent folds are a ValueError.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {', '.join(SPLITS)}")
    shards = _all_shards(tfrec_dir)
    train = [(p, path) for p, path in shards if p["fold"] >= 0]
    available = sorted({p["fold"] for p, _ in train})
    if split == "test":
        return [path for p, path in shards if p["fold"] < 0]   # [] when the dataset has no test set
    if folds is None:
        wanted = set(available)
    else:
        wanted = {int(f) for f in folds}
    missing = sorted(wanted - set(available))
    if missing or not wanted:
        raise ValueError(f"folds {missing or '[]'} have no shards in {tfrec_dir}; available folds: {available}")
    return [path for p, path in train if p["fold"] in wanted]


def count_records(tfrec_dir: str, *, folds=None, split: str = "train") -> int:
    """Records in the selected shards, read from the shard names (no data is read)."""
    return sum(records.parse_shard_name(p)["count"] for p in shard_files(tfrec_dir, folds=folds, split=split))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one pass over n records (training drops the remainder); at least 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return max(1, int(n) // int(batch_size))


def balanced_class_weights(counts) -> list[float]:
    """sklearn's "balanced": n_samples / (n_classes x count_c); 0.0 for a class with no samples."""
    counts = [int(c) for c in counts]
    total, k = sum(counts), len(counts)
    if total == 0:
        raise ValueError(f"class counts {counts} are all zero: no training records to weight")
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


# ---------------------------------------------------------------- per-batch transforms

LABEL_MODES = {
    # labels int64 (B,) -> y; binary (B, 1) float32, categorical (B, K) one-hot float32, int (B,) int32
    "binary": lambda label, k: tf.cast(label, tf.float32)[:, None],
    "categorical": lambda label, k: tf.one_hot(label, k, dtype=tf.float32),
    "int": lambda label, k: tf.cast(label, tf.int32),
}


def _as_size(image_size) -> tuple[int, int] | None:
    if image_size is None or image_size == 0:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def _resolve_augment(augment, *, seed: int):
    """Preset name or callable(images (B, H, W, 3), seed_pair) -> callable, or None for no augmentation."""
    if callable(augment):
        return augment
    if augment in (None, "none"):
        return None
    return aug.build_augmenter(augment, seed=seed)


_SPEC = {k: v for k, v in records.feature_spec().items() if k in ("image", "label", "id")}  # all we read


def _parse_decode_batch(stored: tuple[int, int], encoding: str):
    """serialized (B,) -> (uint8 (B, H, W, 3) images, {label (B,), id (B,)})."""
    def batch(serialized):
        features = tf.io.parse_example(serialized, _SPEC)                # vectorised over the batch
        if encoding == "raw":
            # every record has the manifest's size, so the (B,) strings decode to one (B, H*W*3)
            # tensor (a record of another size fails loudly here or in the reshape)
            images = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [-1, *stored, 3])
        else:
            images = tf.map_fn(lambda e: tf.ensure_shape(records.decode({"image": e}, encoding), [*stored, 3]),
                               features["image"], fn_output_signature=tf.TensorSpec([*stored, 3], tf.uint8))
        return images, {"label": features["label"], "id": features["id"]}
    return batch


def _batch_fn(*, size: tuple[int, int], augment_fn, seed: int, label_mode: str, num_classes: int,
              class_weight, with_ids: bool):
    """(batch index, uint8 images (B, H, W, 3), {label, id}) -> (x (B, H, W, 3) float32 [0, 255], y[, w | id])."""
    to_y = LABEL_MODES[label_mode]
    weights = None if class_weight is None else tf.constant([float(w) for w in class_weight], tf.float32)

    def batch(index, images, features):
        if tuple(images.shape[1:3]) != size:
            images = tf.image.resize(images, size, method="bilinear")     # float32
        if augment_fn is not None:
            # batch i of the (repeated) stream gets seed pair (seed, i): a new draw every batch and
            # epoch, each image its own; it may get uint8 (cheaper to permute) and returns float32
            images = augment_fn(images, tf.stack([tf.constant(seed, tf.int64), index]))
        images = tf.ensure_shape(tf.cast(images, tf.float32), [None, *size, 3])
        label = features["label"]
        y = to_y(label, num_classes)
        if weights is not None:
            # unlabeled records (-1) weigh nothing
            return images, y, tf.where(label >= 0, tf.gather(weights, tf.maximum(label, 0)), 0.0)
        if with_ids:
            return images, y, features["id"]
        return images, y
    return batch


def _check_args(*, manifest: dict, label_mode: str, num_classes: int, class_weight, with_ids: bool,
                training: bool, tfrec_dir: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r}; choose one of {', '.join(LABEL_MODES)}")
    if num_classes != manifest["num_classes"]:
        raise ValueError(f"num_classes={num_classes} but {tfrec_dir}/{MANIFEST} has "
                         f"{manifest['num_classes']} classes {manifest['classes']}; pass "
                         f"num_classes={manifest['num_classes']}")
    if label_mode == "binary" and num_classes != 2:
        raise ValueError(f"label_mode='binary' needs 2 classes, the dataset has {num_classes}; "
                         f"use label_mode='categorical' or 'int'")
    if class_weight is not None and len(class_weight) != num_classes:
        raise ValueError(f"class_weight has {len(class_weight)} entries for {num_classes} classes")
    if with_ids and (training or class_weight is not None):
        raise ValueError("with_ids=True is for evaluation: pass training=False and no class_weight")


# ---------------------------------------------------------------- the chain


def make_dataset(tfrec_dir: str, *, split: str = "train", folds=None, training: bool = False,
                 batch_size: int = 64, image_size=None, augment="none", label_mode: str = "binary",
                 num_classes: int = 2, class_weight=None, with_ids: bool = False, cache: bool = False,
                 seed: int = 0, repeat=None, shuffle_buffer: int = 2048, drop_remainder=None):
    """Batches of (x (B, H, W, 3) float32 [0, 255], y[, w | id]) from the selected shards.

    training=True: interleaved shards, shuffled records, repeated, augmented, remainder dropped.
    training=False: shard then record order, no augmentation, remainder kept. `repeat` and
    `drop_remainder` override those defaults; see docs/design.md for the label shapes.
    `augment` is a preset name (augment.AUGMENT_PRESETS) or a callable
    `fn(images (B, H, W, 3) uint8 or float32, seed_pair (2,) int64) -> (B, H, W, 3) float32 [0, 255]`
    called once per batch with seed_pair = (seed, batch index); give each image its own draws.
    """
    manifest = load_manifest(tfrec_dir)
    _check_args(manifest=manifest, label_mode=label_mode, num_classes=num_classes,
                class_weight=class_weight, with_ids=with_ids, training=training, tfrec_dir=tfrec_dir)
    files = shard_files(tfrec_dir, folds=folds, split=split)
    if not files:
        raise ValueError(f"{tfrec_dir} has no test-*.tfrec shards: prepare a test set or read split='train'")
    stored = tuple(int(s) for s in manifest["image_size"])
    size = _as_size(image_size) or stored
    augment_fn = _resolve_augment(augment, seed=seed) if training else None
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    autotune = tf.data.AUTOTUNE

    if training:
        ds = (tf.data.Dataset.from_tensor_slices(files)
              .shuffle(len(files), seed=seed)
              # deterministic=True keeps --seed runs repeatable on CPU; the reads stay parallel
              .interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), CYCLE_LENGTH),
                          num_parallel_calls=autotune, deterministic=True))
    else:
        ds = tf.data.TFRecordDataset(files)
    if cache:
        ds = ds.cache()                                     # serialized records, in memory
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    encoding = manifest["encoding"]
    if encoding not in records.ENCODINGS:
        raise ValueError(f"{tfrec_dir}/{MANIFEST} has unknown encoding {encoding!r}; "
                         f"choose one of {', '.join(records.ENCODINGS)}")
    batch_fn = _batch_fn(size=size, augment_fn=augment_fn, seed=seed, label_mode=label_mode,
                         num_classes=num_classes, class_weight=class_weight, with_ids=with_ids)
    # batch the serialized records first, then one vectorised map per batch: parse, decode (PNG/JPEG:
    # a map_fn loop inside the batch map, measured faster than a per-record map), resize, augment,
    # labels; per-record maps and per-image augmentation cost more than the work itself
    decode = _parse_decode_batch(stored, encoding)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.enumerate().map(lambda index, serialized: batch_fn(index, *decode(serialized)),
                            num_parallel_calls=autotune)
    if not repeat:  # a known length lets Keras size its progress and never warn "ran out of data"
        n = sum(records.parse_shard_name(f)["count"] for f in files)
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            n // batch_size if drop_remainder else -(-n // batch_size)))
    return ds.prefetch(autotune)
