"""Training-throughput benchmark: is training ever input-bound? TFRecord reader vs the same tensors from memory.

    .venv/bin/python bench/train.py [--archs=tiny,simple_cnn,mobilenetv2,resnet50] [--image_size=96]
                                    [--steps=20] [--batch_size=32] [--source=records|memory|both]
    KERAS_BACKEND=jax python bench/train.py --source=memory --archs=resnet50 --image_size=224 \\
        --precision=mixed_float16                      # a JAX GPU box: no TensorFlow imported at all

Prints figures (not a test). Per arch (build_model(arch, num_classes=2, weights=None), AdamW, BCE,
model.fit) it times training steps fed by
    records  histofold.data.make_dataset(training=True, augment="light") over synthetic TFRecords that
             the real prepare stage writes to a temp dir (stored at 96 px, resized to --image_size);
    memory   the same decoded tensors preloaded (a pool of --pool images read back from those records):
             from_tensor_slices -> cache -> repeat -> batch -> prefetch (TF), or numpy batches (JAX);
in the same run on the same compiled model, warm-up steps excluded. ratio = records / memory: >= 0.95
means training is never input-bound. It also times the reader alone (light augmentation) on one
tf.data thread (img/s per core) and on all cores, which sizes the CPU a GPU needs:
    reader cores to keep a GPU fed = GPU training img/s / reader img/s per core.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

STORED_SIZE = 96          # px of the synthetic records (Kaggle HCD patches are 96 px)
WARMUP_STEPS = 3          # excluded: tracing/compilation, thread pools, first allocations
MIN_TIMED_STEPS = 3       # timed steps kept even when --max_seconds runs out
READER_WARMUP = 5         # batches excluded from the reader timing
# Reader img/s on ONE core (96 px raw records, light augmentation) measured by this script on the dev box
# (2 cores, AMD EPYC, TF 2.21, load avg ~4 from a neighbour; 2026-11-23): used for the GPU rule where the
# reader cannot be timed (the JAX path). Re-measure on the machine that will feed the GPU.
REFERENCE_READER_PER_CORE = {96: 3800, 224: 850}
HEAVY = {"mobilenetv2": 8, "resnet50": 5, "densenet121": 5, "convnext_tiny": 5}  # CPU step caps (TF path)


# ------------------------------------------------------------------------------------------ machine

def backend_name() -> str:
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def versions() -> str:
    import keras

    parts = [f"keras {keras.__version__}", f"backend {keras.backend.backend()}"]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        parts.insert(0, f"TF {tf.__version__}")
    elif keras.backend.backend() == "jax":
        import jax

        parts.append(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    return ", ".join(parts)


def header() -> str:
    return (f"{platform.node()} | {cores()} usable cores ({os.cpu_count()} online) | {cpu_model()} | "
            f"{datetime.datetime.now().isoformat(timespec='seconds')} | load avg {load_avg()}\n{versions()}")


# ------------------------------------------------------------------------------------------ data

def write_records(tmp: Path, *, count: int, encoding: str) -> str:
    """`count` synthetic 96 px patches through the real prepare stage -> tmp/tfrecords."""
    from histofold.prepare import PrepareConfig, prepare

    t0 = time.perf_counter()
    config = PrepareConfig(source="synthetic", out=str(tmp / "tfrecords"), folds_dir=str(tmp / "folds"),
                           encoding=encoding, near_dup=False,
                           source_options={"count": count, "test_count": 0, "image_size": STORED_SIZE})
    summary = prepare(config)
    with open(tmp / "tfrecords" / "manifest.json") as f:
        stored = json.load(f)["encoding"]
    print(f"prepared {count} synthetic {STORED_SIZE}x{STORED_SIZE} records (--encoding={encoding} -> {stored}) in "
          f"{time.perf_counter() - t0:.1f} s -> {config.out} ({summary.get('written', count)} written)")
    return config.out, stored


def records_dataset(tfrec: str, *, image_size: int, batch_size: int, seed: int = 0):
    from histofold import data

    return data.make_dataset(tfrec, training=True, augment="light", batch_size=batch_size,
                             image_size=image_size, class_weight=None, seed=seed)


def pool_from_records(tfrec: str, *, image_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n decoded records, resized like the training pipeline: (n, S, S, 3) float32, (n, 1)."""
    from histofold import data

    xs, ys = [], []
    for x, y in data.make_dataset(tfrec, training=False, batch_size=256, image_size=image_size):
        xs.append(x.numpy())
        ys.append(y.numpy())
        if sum(len(b) for b in xs) >= n:
            break
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def pool_synthetic(*, image_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic patches rendered at image_size with numpy only (the JAX path imports no TF)."""
    from histofold import synthetic

    labels = np.arange(n) % 2
    x = np.stack([synthetic.render(0, i, image_size, int(label), 2) for i, label in enumerate(labels)])
    return x.astype(np.float32), labels.astype(np.float32)[:, None]


def memory_feed(x: np.ndarray, y: np.ndarray, *, batch_size: int):
    """The preloaded pool as an endless feed: tf.data (cache, repeat, batch, prefetch) on TensorFlow,
    a generator of numpy batches elsewhere."""
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return (tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
                .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def batches():
        n = len(x) // batch_size
        i = 0
        while True:
            s = slice((i % n) * batch_size, (i % n + 1) * batch_size)
            yield x[s], y[s]
            i += 1

    return batches()


# ------------------------------------------------------------------------------------------ timing

def make_timer(*, steps: int, min_seconds: float, max_seconds: float):
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time at the end of every step; stops fit once `steps` timed steps took >= `min_seconds`
        (fast models run on until then), or after `max_seconds` (slow models, at least 3 steps)."""

        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float((logs or {}).get("loss", 0.0))  # waits for the step (async dispatch on JAX / GPUs)
            self.ends.append(time.perf_counter())
            timed = len(self.ends) - WARMUP_STEPS
            if timed < 1:
                return
            elapsed = self.ends[-1] - self.ends[WARMUP_STEPS - 1]
            if (timed >= steps and elapsed >= min_seconds) or (timed >= MIN_TIMED_STEPS and elapsed > max_seconds):
                self.model.stop_training = True

        def result(self, batch_size: int) -> tuple[float, int]:
            """(img/s, timed steps) over the steps after the warm-up."""
            timed = len(self.ends) - WARMUP_STEPS
            if timed < 1:
                return float("nan"), 0
            return timed * batch_size / (self.ends[-1] - self.ends[WARMUP_STEPS - 1]), timed

    return StepTimer()


def train_rate(model, feed, *, steps: int, batch_size: int, min_seconds: float, max_seconds: float
               ) -> tuple[float, int]:
    """(img/s, timed steps) of model.fit on an endless feed; the timer callback ends the epoch."""
    timer = make_timer(steps=steps, min_seconds=min_seconds, max_seconds=max_seconds)
    model.fit(feed, epochs=1, steps_per_epoch=WARMUP_STEPS + 1_000_000, callbacks=[timer], verbose=0,
              shuffle=False)  # the feeds are endless; the records feed shuffles itself
    return timer.result(batch_size)


def reader_rate(ds, *, seconds: float, batch_size: int) -> float:
    """Images per second pulled from `ds` for about `seconds` (at least 20 batches) after a warm-up."""
    it = iter(ds)
    for _ in range(READER_WARMUP):
        next(it)
    n, t0 = 0, time.perf_counter()
    while n < 20 or time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def reader_rates(tfrec: str, *, sizes: list[int], batch_size: int, seconds: float) -> dict:
    """{(size, threads label): img/s} of the training reader alone, one thread and all cores."""
    out = {}
    for size in sizes:
        ds = records_dataset(tfrec, image_size=size, batch_size=batch_size)
        out[(size, "1 thread (per core)")] = reader_rate(one_thread(ds), seconds=seconds, batch_size=batch_size)
        out[(size, f"all {cores()} cores")] = reader_rate(ds, seconds=seconds, batch_size=batch_size)
    return out


def one_thread(ds):
    """The same dataset on a private one-thread pool: the reader's img/s per core."""
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


# ------------------------------------------------------------------------------------------ per arch

def build(arch: str, *, image_size: int, precision: str):
    import keras

    from histofold import models

    keras.mixed_precision.set_global_policy(precision)
    # seed=None off TensorFlow: keras.utils.set_random_seed imports TensorFlow whenever it is installed
    seed = 0 if backend_name() == "tensorflow" else None
    model = models.build_model(arch, num_classes=2, image_size=image_size, weights=None, seed=seed)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=1e-4),
                  loss=keras.losses.BinaryCrossentropy())  # jit_compile left to Keras' auto, as train.py does
    return model, models.count_params(model)


def bench_arch(arch: str, *, feeds: dict, image_size: int, steps: int, batch_size: int, precision: str,
               min_seconds: float, max_seconds: float, repeats: int) -> dict:
    """One compiled model, timed on every feed in turn (A B A B ...); the best of `repeats` per feed,
    so a burst of load from other processes on a shared machine does not decide the ratio."""
    t0 = time.perf_counter()
    model, params = build(arch, image_size=image_size, precision=precision)
    row = {"arch": arch, "params": params, "build_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name, make_feed in feeds.items():      # memory first: the ceiling the reader has to match
            rate, timed = train_rate(model, make_feed(), steps=steps, batch_size=batch_size,
                                     min_seconds=min_seconds, max_seconds=max_seconds)
            if rate > row.get(name, 0.0):
                row[name], row[f"{name}_steps"] = rate, timed
    if "records" in row and "memory" in row:
        row["ratio"] = row["records"] / row["memory"]
    row["jit"] = getattr(model, "jit_compile", "?")
    return row


def print_table(rows: list[dict], *, batch_size: int, per_core: float | None) -> None:
    """reader cores = the share of one core the reader needs to keep up with the memory rate: a ratio
    below 0.95 with a tiny reader share is load noise, not an input bottleneck."""
    print(f"\n{'arch':12s} {'params':>11s} {'steps':>7s} {'img/s records':>14s} {'img/s memory':>13s} "
          f"{'ratio':>6s}  {'ms/step mem':>11s} {'reader cores':>12s}")
    for r in rows:
        steps = "/".join(str(r[k]) for k in ("records_steps", "memory_steps") if k in r)
        rec = f"{r['records']:14.1f}" if "records" in r else f"{'-':>14s}"
        mem = f"{r['memory']:13.1f}" if "memory" in r else f"{'-':>13s}"
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else f"{'-':>6s}"
        ms = f"{1000 * batch_size / r['memory']:11.0f}" if "memory" in r else f"{'-':>11s}"
        share = r["memory"] / per_core if per_core and "memory" in r else None
        cores_s = f"{share:12.3f}" if share is not None else f"{'-':>12s}"
        flag = ""
        if "ratio" in r:
            flag = ("  ok" if r["ratio"] >= 0.95 else "  input-bound" if share is None or share > 0.25
                    else "  below 0.95 but the reader needs <25% of a core: load noise")
        print(f"{r['arch']:12s} {r['params']:11,d} {steps:>7s} {rec} {mem} {ratio}  {ms} {cores_s}{flag}")


def print_gpu_rule(per_core: dict, *, encoding: str) -> None:
    """per_core: {image size: reader img/s on one core}."""
    print("\nGPU rule: reader cores needed = GPU training img/s / reader img/s per core, at the same image size,"
          "\naugmentation and encoding (round up; leave a core for the training loop itself).")
    where = "measured here"
    if not per_core:
        print("  no reader timing on this path (no TensorFlow); the figures below were measured on the 2-core dev "
              "box. For this host: `python bench/train.py --source=records --gpu_image_size=S` with TensorFlow.")
        per_core, where, encoding = REFERENCE_READER_PER_CORE, "dev box reference", "raw"
    for size, rate in sorted(per_core.items()):
        print(f"  {where}: {rate:.0f} img/s per core ({STORED_SIZE} px {encoding} records -> {size} px, "
              f"light augmentation): a GPU training at 1000 / 3000 img/s needs {math.ceil(1000 / rate)} / "
              f"{math.ceil(3000 / rate)} reader cores.")


# ------------------------------------------------------------------------------------------ main

def main(*, archs="tiny,simple_cnn,mobilenetv2,resnet50", image_size=96, steps=20, batch_size=32,
         source="both", precision="float32", count=2048, pool=512, encoding="auto", reader_seconds=3.0,
         gpu_image_size=224, min_seconds=2.0, max_seconds=15.0, repeats=2, heavy_steps=True):
    """Print training img/s fed from TFRecords vs from memory, per arch, and the reader's img/s per core.

    Args:
        archs: comma list of histofold.models.ARCHS names.
        image_size: pixels fed to the model (records are stored at 96 px and resized by the reader).
        steps: timed training steps per arch and feed (after 3 warm-up steps).
        batch_size: training and reader batch.
        source: records | memory | both. memory only (no TFRecords) is the one that runs under
            KERAS_BACKEND=jax (or torch) without TensorFlow.
        precision: float32 | mixed_float16 | mixed_bfloat16 (the Keras global policy).
        count: synthetic records written by the prepare stage (records, both).
        pool: preloaded images cycled by the memory feed.
        encoding: record encoding for prepare (auto = raw at 96 px; jpeg as in the Kaggle notebook).
        reader_seconds: seconds timed per reader measurement (after 5 warm-up batches).
        gpu_image_size: also time the reader alone at this size (the GPU case: 96 px patches upscaled
            for ImageNet backbones) for the GPU rule; 0 = only at --image_size.
        min_seconds: time fast archs for at least this long (more than --steps if needed).
        max_seconds: stop timing one arch/feed after this many seconds (at least 3 timed steps).
        repeats: timings per arch and feed, alternating feeds; the best of them is reported.
        heavy_steps: on TensorFlow/CPU cap the steps of heavy archs (resnet50 5, mobilenetv2 8, ...)
            so the whole bench stays under ~5 minutes on 2 cores.
    """
    arch_list = [a.strip() for a in (archs.split(",") if isinstance(archs, str) else archs) if str(a).strip()]
    image_size, steps, batch_size, count, pool = int(image_size), int(steps), int(batch_size), int(count), int(pool)
    if source not in ("records", "memory", "both"):
        raise ValueError(f"--source={source!r}: choose records, memory or both")
    tf_backend = backend_name() == "tensorflow"
    if not tf_backend and source != "memory":
        raise ValueError(f"--source={source} needs TensorFlow (the TFRecord reader); with "
                         f"KERAS_BACKEND={backend_name()} pass --source=memory")
    if pool < batch_size:
        raise ValueError(f"--pool={pool} must hold at least one batch of --batch_size={batch_size}")

    print(header())
    tmp = Path(tempfile.mkdtemp(prefix="histofold_bench_train_"))
    t_start = time.perf_counter()
    try:
        feeds, reader, stored = {}, {}, encoding
        if source == "memory":
            x, y = pool_synthetic(image_size=image_size, n=pool)
        else:
            tfrec, stored = write_records(tmp, count=count, encoding=encoding)
            x, y = pool_from_records(tfrec, image_size=image_size, n=pool)
            sizes = [image_size] + ([int(gpu_image_size)] if int(gpu_image_size) not in (0, image_size) else [])
            reader = reader_rates(tfrec, sizes=sizes, batch_size=batch_size, seconds=float(reader_seconds))
        print(f"memory pool: {x.shape} {x.dtype} ({x.nbytes / 1e6:.0f} MB), labels {y.shape}")
        if source in ("memory", "both"):
            feeds["memory"] = lambda: memory_feed(x, y, batch_size=batch_size)
        if source in ("records", "both"):
            feeds["records"] = lambda: records_dataset(tfrec, image_size=image_size, batch_size=batch_size)

        rows = []
        for arch in arch_list:
            n = min(steps, HEAVY[arch]) if heavy_steps and tf_backend and arch in HEAVY else steps
            row = bench_arch(arch, feeds=feeds, image_size=image_size, steps=n, batch_size=batch_size,
                             precision=precision, min_seconds=float(min_seconds), max_seconds=float(max_seconds),
                             repeats=max(1, int(repeats)))
            rows.append(row)
            print(f"  {arch}: done in {time.perf_counter() - t_start:.0f} s so far (load avg {load_avg()})",
                  flush=True)

        print(f"\ntraining: {image_size} px, batch {batch_size}, {precision}, AdamW + BCE, model.fit; "
              f"{WARMUP_STEPS} warm-up steps excluded"
              + ("; records = make_dataset(training=True, augment='light')" if "records" in feeds else ""))
        per_core = {size: rate for (size, name), rate in reader.items() if name.startswith("1 thread")}
        print_table(rows, batch_size=batch_size, per_core=per_core.get(image_size))
        if reader:
            print(f"\nreader alone ({STORED_SIZE} px {stored} records, light augmentation, batch {batch_size}, "
                  f"~{reader_seconds:g} s timed after {READER_WARMUP} warm-up batches):")
            for (size, name), rate in reader.items():
                print(f"  -> {size:3d} px  {name:22s} {rate:8.0f} img/s")
        print_gpu_rule(per_core, encoding=stored)
        if not tf_backend:
            print(f"\ntensorflow imported: {'tensorflow' in sys.modules}; "
                  f"histofold.data imported: {'histofold.data' in sys.modules}")
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s | after: load avg {load_avg()}")
        return None  # figures are printed; fire would echo a return value
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parse_flags(argv: list[str]) -> dict:
    """--key=value flags for machines without fire (a bare JAX GPU box): values typed like main's defaults."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(main).parameters.items()}
    flags = {}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in defaults:
            raise SystemExit(f"unknown flag --{key}; valid: {', '.join('--' + k for k in defaults)}")
        kind = type(defaults[key])
        flags[key] = (value.lower() not in ("0", "false", "no")) if kind is bool else kind(value) if value else True
    return flags


if __name__ == "__main__":
    try:
        import fire
    except ImportError:
        if any(a in ("-h", "--help") for a in sys.argv[1:]):
            raise SystemExit(main.__doc__)
        main(**_parse_flags(sys.argv[1:]))
    else:
        fire.Fire(main)
