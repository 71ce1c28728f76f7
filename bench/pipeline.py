"""Input-pipeline benchmark: our TFRecord reader vs keras image_dataset_from_directory, and prepare speed.

    .venv/bin/python bench/pipeline.py [--n=3000] [--epochs=2] [--prepare_n=3000]

Prints figures (not a test). Every reader sees the same n JPEGs (default: pcam_jpeg/train, 96x96).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import numpy as np  # noqa: E402

from histofold import records  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam_jpeg" / "train"
BATCH = 64
WARMUP_BATCHES = 5        # excluded from timing: graph tracing, thread pools, file cache
SHARDS_PER_FOLD = 2
FOLDS = 5


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    return (f"{platform.node()} | {cores} usable cores ({os.cpu_count()} online) | {model} | "
            f"load avg {load} | {datetime.datetime.now().isoformat(timespec='seconds')}")


def list_images(source: Path, n: int) -> list[tuple[Path, int]]:
    """The first n images, alternating classes so both are present: (path, label)."""
    per_class = [sorted((source / c).glob("*.jp*g")) for c in sorted(os.listdir(source))]
    out = []
    for i in range(max(len(p) for p in per_class)):
        out += [(p[i], label) for label, p in enumerate(per_class) if i < len(p)]
    if len(out) < n:
        print(f"note: {source} has {len(out)} images; using all of them instead of {n}")
    return out[:n]


def rate(ds, *, images: int, batch: int) -> float:
    """Images per second over `images` images (rounded to batches), after a warm-up."""
    it = iter(ds)
    for _ in range(WARMUP_BATCHES):
        next(it)
    steps = max(1, images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def keras_reader(folder: Path, *, seed: int):
    """image_dataset_from_directory + random flips and quarter turns (like-for-like with dihedral)."""
    import keras
    import tensorflow as tf

    flips = keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)

    def augment(x, y):
        k = tf.random.uniform([], 0, 4, dtype=tf.int32)  # one quarter-turn count per batch
        return tf.image.rot90(flips(x, training=True), k), y

    ds = keras.utils.image_dataset_from_directory(folder, labels="inferred", label_mode="binary",
                                                  batch_size=BATCH, image_size=(96, 96), shuffle=True,
                                                  seed=seed, verbose=False)
    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).repeat().prefetch(tf.data.AUTOTUNE)


def link_class_folders(items, root: Path) -> Path:
    """root/<label>/<name>.jpg symlinks to exactly the chosen images."""
    for path, label in items:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        os.symlink(path, root / str(label) / path.name)
    return root


def write_tfrecords(arrays, labels, *, out: Path, encoding: str) -> None:
    """arrays into FOLDS x SHARDS_PER_FOLD shards + a minimal manifest that data.make_dataset reads."""
    import json

    import tensorflow as tf

    out.mkdir(parents=True)
    folds = np.arange(len(arrays)) % FOLDS
    shards, t0 = [], time.perf_counter()
    for k in range(FOLDS):
        idx = np.flatnonzero(folds == k)
        for i, part in enumerate(np.array_split(idx, SHARDS_PER_FOLD)):
            name = records.shard_name(f"fold{k}", i, len(part))
            with tf.io.TFRecordWriter(str(out / name)) as w:
                for j in part:
                    img = arrays[j]
                    w.write(records.serialize(image=records.encode_image(img, encoding), encoding=encoding,
                                              height=96, width=96, label=int(labels[j]),
                                              id=hashlib.sha1(img.tobytes()).hexdigest(), fold=k, group=str(j)))
            shards.append({"file": name, "split": "train", "fold": k, "count": len(part)})
    size_mb = sum((out / s["file"]).stat().st_size for s in shards) / 1e6
    manifest = {"version": 1, "classes": ["0", "1"], "num_classes": 2, "image_size": [96, 96],
                "encoding": encoding, "folds": FOLDS, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    print(f"  wrote {len(arrays)} {encoding} records ({size_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s")


def single_threaded(ds):
    """The same dataset on one tf.data thread: img/s per core."""
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def bench_readers(items, *, tmp: Path, epochs: int, seed: int) -> list[tuple[str, float]]:
    from PIL import Image

    from histofold import data

    n = len(items)
    rows = [("keras image_dataset_from_directory + flips/rot90",
             rate(keras_reader(link_class_folders(items, tmp / "folders"), seed=seed),
                  images=epochs * n, batch=BATCH))]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p, _ in items]
    labels = [label for _, label in items]
    for encoding in records.ENCODINGS:
        out = tmp / f"tfrec_{encoding}"
        write_tfrecords(arrays, labels, out=out, encoding=encoding)
        for preset in ("dihedral", "light", "stain", "strong"):
            ds = data.make_dataset(str(out), training=True, batch_size=BATCH, augment=preset, seed=seed)
            rows.append((f"histofold {encoding:4s} {preset}", rate(ds, images=epochs * n, batch=BATCH)))
        ds = data.make_dataset(str(out), training=True, batch_size=BATCH, augment="dihedral", seed=seed)
        rows.append((f"histofold {encoding:4s} dihedral, 1 thread (per core)",
                     rate(single_threaded(ds), images=epochs * n, batch=BATCH)))
        ds = data.make_dataset(str(out), training=False, batch_size=BATCH, repeat=True)
        rows.append((f"histofold {encoding:4s} eval (no augment)", rate(ds, images=epochs * n, batch=BATCH)))
    return rows


def write_hcd_layout(items, *, root: Path, test_fraction: float = 0.2) -> int:
    """Kaggle HCD layout from the chosen images: train/<sha1>.tif, train_labels.csv, test/, sample_submission.csv."""
    import pandas as pd
    from PIL import Image

    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    n_test = int(len(items) * test_fraction)
    rows = {"train": [], "test": []}
    seen = set()                                   # HCD ids are pixel hashes: skip pixel duplicates
    for i, (path, label) in enumerate(items):
        img = np.asarray(Image.open(path).convert("RGB"))
        sha = hashlib.sha1(img.tobytes()).hexdigest()
        if sha in seen:
            continue
        seen.add(sha)
        split = "test" if i < n_test else "train"
        Image.fromarray(img).save(root / split / f"{sha}.tif")
        rows[split].append({"id": sha, "label": label if split == "train" else 0})
    pd.DataFrame(rows["train"]).to_csv(root / "train_labels.csv", index=False)
    pd.DataFrame(rows["test"]).to_csv(root / "sample_submission.csv", index=False)
    return len(seen)


def bench_prepare(items, *, tmp: Path) -> list[str]:
    """prepare() img/s on an HCD layout, per encoding (TensorFlow already imported: its ~5 s import is a
    fixed cost of the command, not a per-image one)."""
    try:
        from histofold.prepare import PrepareConfig, prepare
    except ImportError as e:
        return [f"skipped: histofold.prepare not available ({e})"]
    root = tmp / "hcd"
    n_files = write_hcd_layout(items, root=root)
    lines = []
    for encoding in ("auto", "png", "jpeg"):
        t0 = time.perf_counter()
        summary = prepare(PrepareConfig(source="hcd", input=str(root), out=str(tmp / f"tfrecords_{encoding}"),
                                        folds_dir=str(tmp / f"folds_{encoding}"), encoding=encoding))
        seconds = time.perf_counter() - t0
        lines.append(f"{n_files} TIFFs (96x96, HCD layout) -> {summary['encoding']} TFRecords in {seconds:.1f} s: "
                     f"{n_files / seconds:.0f} img/s ({summary['written']} written)")
    return lines


def main(*, n: int = 3000, epochs: int = 2, prepare_n: int = 3000, source: str = str(DEFAULT_SOURCE),
         seed: int = 0):
    """Print img/s of each reader on the same n images, and prepare's img/s on prepare_n TIFFs.

    Args:
        n: images read by every reader.
        epochs: epochs timed per reader (after a warm-up of a few batches).
        prepare_n: images written as Kaggle HCD TIFFs for the prepare benchmark (0 = skip).
        source: class-folder JPEG dataset (folder per label).
        seed: shuffling and augmentation seed.
    """
    print(machine())
    items = list_images(Path(source), n)
    tmp = Path(tempfile.mkdtemp(prefix="histofold_bench_"))
    try:
        rows = bench_readers(items, tmp=tmp, epochs=epochs, seed=seed)
        base = rows[0][1]
        print(f"\nreaders: {len(items)} images 96x96, batch {BATCH}, {epochs} epochs timed after "
              f"{WARMUP_BATCHES} warm-up batches")
        print(f"{'pipeline':52s} {'img/s':>8s} {'vs keras':>9s}")
        for name, r in rows:
            print(f"{name:52s} {r:8.0f} {r / base:8.2f}x")
        if prepare_n:
            print()
            for line in bench_prepare(list_images(Path(source), prepare_n), tmp=tmp):
                print("prepare:", line)
        print(f"\nafter: {machine()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
