"""Run directories: find them, read their config, rebuild their model; the one place that knows the layout.

    runs/<name>/fold{k}/config.json  model.weights.h5  history.csv  oof.csv  metrics.json  train.log
"""
from __future__ import annotations

import json
import math
import os
import re

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"
HISTORY = "history.csv"
OOF = "oof.csv"
METRICS = "metrics.json"
LOG = "train.log"
FOLD_DIR_RE = re.compile(r"^fold(\d+)$")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def read_json(path: str) -> dict:
    with _gfile().GFile(path, "r") as f:
        return json.load(f)


def _strict(obj):
    """NaN/inf -> null so the file is strict JSON (a precision with no positive predictions is NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: str, obj: dict) -> None:
    """Write strict JSON via a temp name + rename so a reader never sees half a file."""
    gfile = _gfile()
    tmp = path + ".tmp"
    with gfile.GFile(tmp, "w") as f:
        json.dump(_strict(obj), f, indent=2, sort_keys=False, default=str)
    gfile.rename(tmp, path, overwrite=True)


def load_config(run_dir: str) -> dict:
    """config.json of a fold run directory; a clear error when it is not one."""
    path = os.path.join(run_dir, CONFIG)
    if not _gfile().exists(path):
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no {CONFIG}); pass a fold directory written by "
            f"train.py, e.g. runs/resnet50/fold0")
    return read_json(path)


def fold_dirs(run: str) -> list[str]:
    """A run name dir (runs/<name>) -> its fold dirs with a config.json; a fold dir -> [itself]."""
    gfile = _gfile()
    if gfile.exists(os.path.join(run, CONFIG)):
        return [run]
    if not gfile.isdir(run):
        raise FileNotFoundError(f"run directory {run} does not exist; train one with train.py first")
    found = []
    for name in sorted(gfile.listdir(run)):
        name = name.rstrip("/")
        if FOLD_DIR_RE.match(name) and gfile.exists(os.path.join(run, name, CONFIG)):
            found.append(os.path.join(run, name))
    if not found:
        raise FileNotFoundError(f"{run} holds no fold{{k}}/config.json; train with train.py --fold=all first")
    return sorted(found, key=lambda d: int(FOLD_DIR_RE.match(os.path.basename(d)).group(1)))


def latest_run(runs_dir: str = "runs") -> str:
    """The run (runs/<name>) whose newest fold config.json is the most recent."""
    gfile = _gfile()
    if not gfile.isdir(runs_dir):
        raise FileNotFoundError(f"no {runs_dir}/ directory: train a model with train.py first, or pass --runs=")
    best, best_t = None, -1.0
    for name in gfile.listdir(runs_dir):
        run = os.path.join(runs_dir, name.rstrip("/"))
        try:
            dirs = fold_dirs(run)
        except FileNotFoundError:
            continue
        t = max(gfile.stat(os.path.join(d, CONFIG)).mtime_nsec for d in dirs)
        if t > best_t:
            best, best_t = run, t
    if best is None:
        raise FileNotFoundError(f"no trained runs under {runs_dir}/: train a model with train.py first")
    return best


def complete_fold_dirs(run: str) -> list[str]:
    """Fold dirs of a run that finished (have weights and oof.csv); errors name what is missing."""
    dirs = fold_dirs(run)
    for d in dirs:
        for f in (WEIGHTS, OOF):
            if not _gfile().exists(os.path.join(d, f)):
                raise FileNotFoundError(
                    f"{d} has no {f}: that fold did not finish; rerun train.py with the same flags to resume it")
    return dirs


def build_from_config(config: dict, *, weights_path: str | None = None):
    """Rebuild the fold's model from config.json alone and load its best weights."""
    from histofold.models import build_model

    model = build_model(config["arch"], num_classes=config["num_classes"],
                        image_size=tuple(config["image_size"]), weights=None,
                        dropout=config.get("dropout"), **config.get("arch_kwargs", {}))
    if weights_path:
        model.load_weights(weights_path)
    return model


def load_run_model(run_dir: str):
    """(model, config) of a finished fold run directory."""
    config = load_config(run_dir)
    path = os.path.join(run_dir, WEIGHTS)
    if not _gfile().exists(path):
        raise FileNotFoundError(f"{path} is missing: the run did not finish; rerun train.py to resume it")
    return build_from_config(config, weights_path=path), config


def image_loader(tfrecords: str | None = None):
    """A `load_images(ids, *, run_dir) -> (N, H, W, 3) uint8` for reports (Grad-CAM gallery).

    Scans the labeled shards of the run's tfrecords (or `tfrecords`) in order and stops as soon as
    every requested id is found; raises naming the ids that are not there.
    """

    def load_images(ids, *, run_dir):
        import numpy as np
        from histofold import data

        config = load_config(run_dir)
        wanted = {str(i) for i in ids}
        found = {}
        ds = data.make_dataset(tfrecords or config["tfrecords"], split="train", training=False,
                               batch_size=256, with_ids=True, label_mode="int",
                               num_classes=config["num_classes"])
        for x, _, batch_ids in ds.as_numpy_iterator():
            for img, i in zip(x, batch_ids):
                i = i.decode() if isinstance(i, bytes) else str(i)
                if i in wanted:
                    found[i] = img.astype(np.uint8)
            if len(found) == len(wanted):
                break
        missing = wanted - set(found)
        if missing:
            raise KeyError(f"{len(missing)} ids not in the tfrecords of {run_dir} (e.g. {sorted(missing)[:3]}); "
                           f"pass --tfrecords= where they were prepared")
        return np.stack([found[str(i)] for i in ids])

    return load_images
