"""TFRecord schema: the one place that says what a record holds, with its writer and parser side by side.

A record is one image patch:

    image     bytes   encoded pixels (raw uint8 HWC, PNG or JPEG; see `encoding`)
    encoding  bytes   b"raw" | b"png" | b"jpeg"
    height    int64   pixels
    width     int64   pixels
    label     int64   class index into manifest["classes"]; -1 = unlabeled (test)
    id        bytes   the dataset's id (Kaggle HCD: SHA-1 of the pixels), unique per dataset
    fold      int64   0..k-1 for labeled records, -1 for test records
    group     bytes   slide / patient / duplicate cluster that never straddles folds

Shard names carry their record count: ``fold{k}-{i:03d}-{count}.tfrec`` and
``test-{i:03d}-{count}.tfrec``, so epoch sizes are known without reading the data.

The encoding half (`encode_image`) uses only numpy + Pillow so it runs in worker processes that never
import TensorFlow; `serialize` and the parsing half use TensorFlow.
"""
from __future__ import annotations

import io
import re

import numpy as np

ENCODINGS = ("raw", "png", "jpeg")
SHARD_RE = re.compile(r"^(?P<prefix>fold(?P<fold>\d+)|test)-(?P<index>\d{3,})-(?P<count>\d+)\.tfrec$")


def shard_name(prefix: str, index: int, count: int) -> str:
    """``shard_name("fold0", 3, 2048) == "fold0-003-2048.tfrec"``."""
    return f"{prefix}-{index:03d}-{count}.tfrec"


def parse_shard_name(name: str) -> dict | None:
    """Split a shard file name into prefix/fold/index/count; None when it is not a shard name."""
    m = SHARD_RE.match(name.rsplit("/", 1)[-1])
    if not m:
        return None
    fold = m.group("fold")
    return {
        "prefix": m.group("prefix"),
        "fold": int(fold) if fold is not None else -1,
        "index": int(m.group("index")),
        "count": int(m.group("count")),
    }


def encode_image(image: np.ndarray, encoding: str, quality: int = 95) -> bytes:
    """Encode a (H, W, 3) uint8 array as raw bytes, PNG or JPEG (Pillow; no TensorFlow)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image wants (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # level 1: fast, ~same size
    elif encoding == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return buf.getvalue()


def _bytes(v: bytes):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v: int):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def serialize(*, image: bytes, encoding: str, height: int, width: int, label: int, id: str,
              fold: int, group: str) -> bytes:
    """One record as a serialized tf.train.Example (see the module docstring for the fields)."""
    import tensorflow as tf

    feature = {
        "image": _bytes(image),
        "encoding": _bytes(encoding.encode()),
        "height": _int(height),
        "width": _int(width),
        "label": _int(label),
        "id": _bytes(str(id).encode()),
        "fold": _int(fold),
        "group": _bytes(str(group).encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_spec() -> dict:
    """The parsing spec matching `serialize`."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "encoding": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "id": tf.io.FixedLenFeature([], tf.string),
        "fold": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "group": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    }


def parse(serialized):
    """Serialized record -> dict of scalar tensors (image still encoded)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def decode(features, encoding: str | None = None):
    """Parsed record -> (H, W, 3) uint8 image tensor.

    `encoding` is the dataset's one encoding from the manifest; passing it keeps the graph to one
    decoder (faster). Without it the record's own `encoding` field picks the decoder at run time.
    """
    import tensorflow as tf

    def raw():
        flat = tf.io.decode_raw(features["image"], tf.uint8)
        return tf.reshape(flat, tf.stack([features["height"], features["width"], 3]))

    def png():
        return tf.io.decode_png(features["image"], channels=3)

    def jpeg():
        return tf.io.decode_jpeg(features["image"], channels=3)

    if encoding is not None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        image = {"raw": raw, "png": png, "jpeg": jpeg}[encoding]()
    else:
        image = tf.case(
            [(tf.equal(features["encoding"], b"raw"), raw), (tf.equal(features["encoding"], b"png"), png)],
            default=jpeg,
        )
    return tf.ensure_shape(image, [None, None, 3])
