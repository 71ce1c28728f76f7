"""The tf.data reader: the manifest's shards in, batches of float32 [0, 255] model inputs and labels out;
and the same model-input transform for every other input path (new images, slide tiles).

One chain, top to bottom (see `make_dataset`): the manifest's shard list (checked against the files) ->
interleave (training) -> cache serialized records (optional) -> shuffle + repeat (training) -> batch
the serialized records -> one map per batch: parse, decode, `model_inputs` (the one resize), augment
and mixup (training), labels and sample weights -> prefetch.

`model_inputs` is the only step between stored pixels and the model: a record, an image passed to
predict.py --input (after the manifest's PixelFormat, which makes it look like a record) and a
slide tile all go through it, so the model sees the same tensor for the same pixels.
"""
from __future__ import annotations

import logging

import tensorflow as tf

from histofold import augment as aug
from histofold import imageops, io, records
from histofold.errors import UsageError
from histofold.manifest import Manifest

log = logging.getLogger("histofold")

MIN_FILES_PER_WORKER = 2  # fewer shards than this per worker: shard by record (by file leaves workers uneven)
CYCLE_LENGTH = 8          # shards read at once when training: enough mixing, bounded open files


def balanced_class_weights(counts) -> list[float]:
    """sklearn's "balanced": n_samples / (n_classes x count_c); 0.0 for a class with no samples."""
    counts = [int(c) for c in counts]
    total, k = sum(counts), len(counts)
    if total == 0:
        raise UsageError(f"class counts {counts} are all zero: no training records to weight")
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


# ---------------------------------------------------------------- per-batch transforms

LABEL_MODES = {
    # labels int64 (B,) -> y; binary (B, 1) float32, categorical (B, K) one-hot float32, int (B,) int32
    "binary": lambda label, k: tf.cast(label, tf.float32)[:, None],
    "categorical": lambda label, k: tf.one_hot(label, k, dtype=tf.float32),
    "int": lambda label, k: tf.cast(label, tf.int32),
}


def model_inputs(images, size):
    """Stored pixels (B, h, w, 3) uint8 -> the model's input (B, H, W, 3) float32 [0, 255] at `size`.

    The one place pixels meet the model (models own their normalization); see the module docstring."""
    return imageops.resize(images, size)


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


def _batch_fn(*, size: tuple[int, int], augment_fn, mixup: float, seed: int, label_mode: str,
              num_classes: int, class_weight, with_ids: bool):
    """(batch index, uint8 images (B, H, W, 3), {label, id}) -> (x (B, H, W, 3) float32 [0, 255], y[, w | id])."""
    to_y = LABEL_MODES[label_mode]
    weights = None if class_weight is None else tf.constant([float(w) for w in class_weight], tf.float32)

    def batch(index, images, features):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), index])
        if augment_fn is not None:
            # batch i of the (repeated) stream gets seed pair (seed, i): a new draw every batch and
            # epoch, each image its own; it may get uint8 (cheaper to permute) and returns float32
            images = augment_fn(images, seed_pair)
        images = tf.ensure_shape(model_inputs(images, size), [None, *size, 3])
        label = features["label"]
        y = to_y(label, num_classes)
        w = None if weights is None else tf.where(label >= 0, tf.gather(weights, tf.maximum(label, 0)), 0.0)
        if mixup:
            images, y, w = aug.batch_mixup(images, y, w, seed_pair, alpha=mixup)
        if w is not None:
            return images, y, w  # unlabeled records (-1) weigh nothing
        if with_ids:
            return images, y, features["id"]
        return images, y
    return batch


def _check_args(*, manifest: Manifest, label_mode: str, num_classes: int, class_weight, with_ids: bool,
                training: bool, mixup: float) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r}; choose one of {', '.join(LABEL_MODES)}")
    if num_classes != manifest.num_classes:
        raise ValueError(f"num_classes={num_classes} but {manifest.path} has {manifest.num_classes} classes "
                         f"{manifest.classes}; pass num_classes={manifest.num_classes}")
    if label_mode == "binary" and num_classes != 2:
        raise ValueError(f"label_mode='binary' needs 2 classes, the dataset has {num_classes}; "
                         f"use label_mode='categorical' or 'int'")
    if class_weight is not None and len(class_weight) != num_classes:
        raise ValueError(f"class_weight has {len(class_weight)} entries for {num_classes} classes")
    if with_ids and (training or class_weight is not None):
        raise ValueError("with_ids=True is for evaluation: pass training=False and no class_weight")
    if mixup and (not training or label_mode == "int"):
        raise ValueError("mixup mixes labels: only for training with binary/categorical labels")


# ---------------------------------------------------------------- the chain


def make_dataset(manifest, *, split: str = "train", folds=None, training: bool = False,
                 batch_size: int = 64, image_size=None, augment="none", mixup: float = 0.0,
                 label_mode: str = "binary", num_classes: int | None = None, class_weight=None,
                 with_ids: bool = False, cache: bool = False, seed: int = 0, repeat=None,
                 shuffle_buffer: int = 2048, drop_remainder=None, check_hashes: bool = False, shard=None):
    """Batches of (x (B, H, W, 3) float32 [0, 255], y[, w | id]) from the selected shards.

    `manifest`: a Manifest or a tfrecords directory. Its shard list is checked against the files first
    (names, counts, sizes; sha256 too with `check_hashes`). training=True: interleaved shards, shuffled
    records, repeated, augmented (+ mixup), remainder dropped. training=False: shard then record order,
    no augmentation, remainder kept. `repeat` and `drop_remainder` override those defaults; see
    docs/design.md for the label shapes. `augment` is a preset name (augment.AUGMENT_PRESETS) or a
    callable `fn(images (B, H, W, 3) uint8 or float32, seed_pair (2,) int64) -> float32 [0, 255]`.
    `shard=(workers, index)`: this worker's part only (`worker_part`: by file, or by record when there
    are too few shards); the caller then hands the per-worker datasets to the strategy.
    """
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    num_classes = manifest.num_classes if num_classes is None else num_classes
    _check_args(manifest=manifest, label_mode=label_mode, num_classes=num_classes, class_weight=class_weight,
                with_ids=with_ids, training=training, mixup=mixup)
    manifest.check(split, folds, hashes=check_hashes)
    part, files, n_records = worker_part(manifest, split, folds, shard=shard)
    if not files:
        raise UsageError(f"{manifest.directory} has no test shards: prepare a test set (--test_input or "
                         "--holdout) or predict new images with predict.py --input")
    stored = manifest.image_size
    size = imageops.as_size(image_size) if image_size else stored
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
    if part == "data":
        ds = ds.shard(shard[0], shard[1])                   # this worker's every n-th record
    if cache:
        ds = ds.cache()                                     # serialized records, in memory
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    batch_fn = _batch_fn(size=size, augment_fn=augment_fn, mixup=mixup if training else 0.0, seed=seed,
                         label_mode=label_mode, num_classes=num_classes, class_weight=class_weight,
                         with_ids=with_ids)
    # batch the serialized records first, then one vectorised map per batch: parse, decode (PNG/JPEG:
    # a map_fn loop inside the batch map, measured faster than a per-record map), resize, augment,
    # labels; per-record maps and per-image augmentation cost more than the work itself
    decode = _parse_decode_batch(stored, manifest.encoding)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.enumerate().map(lambda index, serialized: batch_fn(index, *decode(serialized)),
                            num_parallel_calls=autotune)
    if not repeat:  # a known length lets Keras size its progress and never warn "ran out of data"
        n = n_records
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            n // batch_size if drop_remainder else -(-n // batch_size)))
    return ds.prefetch(autotune)


def worker_part(manifest: Manifest, split: str, folds, *, shard) -> tuple[str, list[str], int]:
    """A worker's part of the selected shards (multi-worker training): ("file", its files, records) when
    every worker gets at least MIN_FILES_PER_WORKER shards, else ("data", every file, its records: every
    n-th one, taken by `ds.shard`); ("all", every file, every record) when `shard` is None. Logged."""
    entries = manifest.shards(split, folds)
    files = [io.join(manifest.directory, e["file"]) for e in entries]
    total = sum(int(e["count"]) for e in entries)
    if shard is None or shard[0] <= 1:
        return "all", files, total
    workers, index = shard
    if len(files) >= MIN_FILES_PER_WORKER * workers:
        mine = entries[index::workers]
        log.info("input sharding over %d workers: FILE (worker %d reads %d of %d shards, %d records)", workers,
                 index, len(mine), len(files), sum(int(e["count"]) for e in mine))
        return "file", files[index::workers], sum(int(e["count"]) for e in mine)
    log.info("input sharding over %d workers: DATA (%d shards, fewer than %d per worker: worker %d keeps every "
             "%d-th record)", workers, len(files), MIN_FILES_PER_WORKER, index, workers)
    return "data", files, (total - index + workers - 1) // workers


def stream_dataset(generator, *, image_shape, image_size, batch_size: int):
    """(x, y, id) batches from a generator of (uint8 (h, w, 3) pixels in record format, label, id)."""
    size = imageops.as_size(image_size)
    signature = (tf.TensorSpec([*image_shape, 3], tf.uint8), tf.TensorSpec([], tf.int64),
                 tf.TensorSpec([], tf.string))
    ds = tf.data.Dataset.from_generator(generator, output_signature=signature)
    return (ds.batch(batch_size)
            .map(lambda x, y, i: (model_inputs(x, size), y, i), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
