"""TFRecord schema: what a record holds, its writer and its parser side by side, and shard checks.

A record is one image patch:

    image     bytes   encoded pixels (raw uint8 HWC, PNG or JPEG; see `encoding`)
    encoding  bytes   b"raw" | b"png" | b"jpeg"
    height    int64   pixels
    width     int64   pixels
    label     int64   class index into manifest["classes"]; -1 = unlabeled (test)
    id        bytes   the dataset's id (Kaggle HCD: SHA-1 of the pixels), unique per dataset
    fold      int64   0..k-1 for labeled records, -1 for test records
    group     bytes   slide / patient / duplicate cluster that never straddles folds
    loc_x     int64   whole-slide tiles: level-0 x of the tile's top-left corner; -1 otherwise
    loc_y     int64   ... and y

Shard names carry their record count: ``fold{k}-{i:03d}-{count}.tfrec`` and
``test-{i:03d}-{count}.tfrec``, so epoch sizes are known without reading the data. Records are
serialized deterministically (sorted map keys), so the same inputs give byte-identical shards and
the sha256s in the manifest are stable: a re-prepare can be diffed.

`PixelFormat` is what every stored image went through (resize to the stored size, stain
normalization); every later input path (predict.py --input, slide tiles) applies the same one.
The encoding half and PixelFormat use only numpy + Pillow, so they run in worker processes that
never import TensorFlow; writing, parsing and verifying use TensorFlow.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

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
    return {"prefix": m.group("prefix"), "fold": int(fold) if fold is not None else -1,
            "index": int(m.group("index")), "count": int(m.group("count"))}


# ---------------------------------------------------------------- pixels (numpy + Pillow)

@dataclass(frozen=True)
class PixelFormat:
    """The transform from a loaded image to a record's pixels: resize to `size` (the one resize,
    imageops.resize_array), then stain normalization (`stain`: a StainNormalizer's JSON, or None)."""

    size: tuple | None = None            # (H, W) of every record; None = keep the loaded size
    stain: dict | None = None            # {"method", "params"} (histofold.stain); None = no normalization
    _normalizer: object = field(default=None, repr=False, compare=False)

    def normalizer(self):
        if self.stain is None or self.stain.get("method", "none") == "none":
            return None
        if self._normalizer is None:
            from histofold import stain

            object.__setattr__(self, "_normalizer", stain.StainNormalizer.from_json(self.stain))
        return self._normalizer

    def resize(self, images: np.ndarray) -> np.ndarray:
        """(H, W, 3) or (B, H, W, 3) uint8 -> at `size` (the one resize); unchanged when size is None."""
        from histofold import imageops

        if self.size is None:
            return images
        if images.ndim == 4:
            if tuple(images.shape[1:3]) == tuple(self.size):
                return images
            return np.stack([imageops.resize_array(im, self.size) for im in images])
        return imageops.resize_array(images, self.size)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """Stain normalization (the identity without `stain`)."""
        norm = self.normalizer()
        return images if norm is None else norm(images)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(H, W, 3) or (B, H, W, 3) uint8 -> record pixels: `resize`, then `normalize`."""
        return self.normalize(self.resize(images))


def encode_image(image: np.ndarray, encoding: str, quality: int = 95) -> bytes:
    """Encode a (H, W, 3) uint8 array as raw bytes, PNG (fast, see imageio.encode_png) or JPEG."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image wants (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    if encoding == "png":
        from histofold.imageio import encode_png

        return encode_png(image)
    if encoding == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0)
        return buf.getvalue()
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


# ---------------------------------------------------------------- writing (TensorFlow)

def serialize(*, image: bytes, encoding: str, height: int, width: int, label: int, id: str,
              fold: int, group: str, loc_x: int = -1, loc_y: int = -1) -> bytes:
    """One record as a deterministically serialized tf.train.Example (see the module docstring)."""
    import tensorflow as tf

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    feature = {"image": b(image), "encoding": b(encoding.encode()), "height": i(height), "width": i(width),
               "label": i(label), "id": b(str(id).encode()), "fold": i(fold), "group": b(str(group).encode())}
    if loc_x >= 0 or loc_y >= 0:
        feature.update(loc_x=i(loc_x), loc_y=i(loc_y))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # map order fixed: identical bytes every run


def write_shard(path: str, serialized) -> dict:
    """Write serialized records to `.<name>.tmp`, then rename to `path`: a reader never sees a partial
    shard. Returns {"count", "bytes", "sha256"} of the finished file."""
    import tensorflow as tf

    from histofold import io as hio

    tmp = hio.discard_tmp(path)
    count = 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in serialized:
            writer.write(record)
            count += 1
    facts = {"count": count, "bytes": hio.size(tmp), "sha256": hio.sha256(tmp)}
    hio.rename(tmp, path, overwrite=True)
    return facts


# ---------------------------------------------------------------- parsing (TensorFlow)

def feature_spec() -> dict:
    """The parsing spec matching `serialize` (loc_x/loc_y default to -1 for records without them)."""
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
        "loc_x": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "loc_y": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


def parse(serialized):
    """Serialized record -> dict of scalar tensors (image still encoded)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def decode(features, encoding: str):
    """Parsed record -> (H, W, 3) uint8 image tensor, with the dataset's one encoding (from the manifest)."""
    import tensorflow as tf

    if encoding == "raw":
        flat = tf.io.decode_raw(features["image"], tf.uint8)
        image = tf.reshape(flat, tf.stack([features["height"], features["width"], 3]))
    elif encoding == "png":
        image = tf.io.decode_png(features["image"], channels=3)
    elif encoding == "jpeg":
        image = tf.io.decode_jpeg(features["image"], channels=3)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return tf.ensure_shape(image, [None, None, 3])


def read_shard(path: str, encoding: str, *, images: bool = False) -> list[dict]:
    """Every record of one shard as dicts (id, label, fold, group, loc_x, loc_y, height, width[, image]).

    Decodes every image (so a corrupt one raises here); `images=True` keeps the uint8 pixels.
    """
    import tensorflow as tf

    rows = []
    for serialized in tf.data.TFRecordDataset(path):
        f = parse(serialized)
        image = decode(f, encoding)
        row = {"id": f["id"].numpy().decode(), "label": int(f["label"]), "fold": int(f["fold"]),
               "group": f["group"].numpy().decode(), "loc_x": int(f["loc_x"]), "loc_y": int(f["loc_y"]),
               "height": int(image.shape[0]), "width": int(image.shape[1])}
        if images:
            row["image"] = image.numpy()
        rows.append(row)
    return rows


def read_tile_slides(paths: list[str]) -> dict[str, str]:
    """id -> slide (the record's group) of every whole-slide tile (loc_x >= 0) in `paths`; images are
    not decoded."""
    import tensorflow as tf

    spec = {k: v for k, v in feature_spec().items() if k in ("id", "group", "loc_x")}
    out = {}
    for serialized in tf.data.TFRecordDataset(paths).batch(4096):
        f = tf.io.parse_example(serialized, spec)
        for i, g, x in zip(f["id"].numpy(), f["group"].numpy(), f["loc_x"].numpy()):
            if x >= 0:
                out[i.decode()] = g.decode()
    return out


def find_corrupt_record(paths: list[str]) -> tuple[str, int] | None:
    """(shard, index of the first unreadable record) among `paths`, or None when all read cleanly.

    Used after a DataLossError so the message can name the shard and record (TensorFlow's does not)."""
    import tensorflow as tf

    for path in paths:
        n = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                n += 1
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.NotFoundError):
            return path, n
    return None
