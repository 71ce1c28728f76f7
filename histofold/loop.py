"""The training loop shared by train.py and finetune.py: one fold in, one self-describing run directory out.

Reading order: `TrainConfig` (every setting, with its meaning) -> `train_fold` (strategy and precision,
datasets, model, compile, callbacks, fit, OOF) -> the small helpers below it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from histofold import runs

log = logging.getLogger("histofold")


@dataclass(frozen=True)
class TrainConfig:
    tfrecords: str = "tfrecords"      # dir written by prepare_tfrecords.py (manifest.json + shards)
    fold: int = 0                     # validation fold; the model trains on every other fold
    arch: str = "resnet50"            # models.ARCHS name
    name: str = ""                    # run name: runs/<name>/fold<k>; "" = the arch
    runs_dir: str = "runs"
    image_size: int = 0               # pixels fed to the model; 0 = the arch's default / stored size
    weights: str = "auto"             # auto | imagenet | none | PATH to a no-top weights file
    arch_kwargs: dict = field(default_factory=dict)  # extra builder arguments (e.g. width of histo_cnn)
    dropout: float | None = None      # head dropout; None = the arch's default
    epochs: int = 10
    batch_size: int = 64              # per replica; global batch = batch_size x replicas
    lr: float = 1e-3                  # max LR for batch_size; scaled linearly with the replica count
    optimizer: str = "adamw"          # adamw | adam | sgd (momentum 0.9, nesterov)
    weight_decay: float = 1e-4        # decoupled (AdamW/SGD); ignored by adam
    schedule: str = "onecycle"        # onecycle | cosine | constant | plateau
    warmup: float = 0.3               # fraction of steps spent warming up (onecycle pct_start, cosine warm-up)
    augment: str = "light"            # augment.AUGMENT_PRESETS name
    class_weight: str = "balanced"    # balanced | none | JSON list/dict of per-class weights
    label_smoothing: float = 0.0
    focal: bool = False               # focal loss (gamma 2) instead of cross-entropy
    freeze_base_epochs: int = 0       # first N epochs train only the head (backbone frozen)
    monitor: str = ""                 # "" = val_auc (binary) / val_macro_f1 (multi-class)
    patience: int = 0                 # early-stopping patience in epochs; 0 = no early stopping
    strategy: str = "auto"
    precision: str = "auto"
    seed: int = 42
    cache: bool = False               # cache the serialized training records in memory (small datasets)
    steps_per_epoch: int = 0          # 0 = one pass over the training folds per epoch
    oof_tta: int = 1                  # dihedral TTA transforms for the OOF predictions (1, 2, 4, 8)
    tensorboard: bool = False
    overwrite: bool = False           # retrain a fold that already finished
    # finetune.py only: where the starting weights come from and what to unfreeze
    init_run: str = ""                # run directory whose best weights start this run
    unfreeze: str = ""                # "" (train.py) | all | N (top N backbone layers)


def run_dir_of(cfg: TrainConfig) -> str:
    return os.path.join(cfg.runs_dir, cfg.name or cfg.arch, f"fold{cfg.fold}")


def train_fold(cfg: TrainConfig) -> dict:
    """Train one fold end to end; returns the summary also written to metrics.json."""
    from histofold import data, losses, models, schedules, strategy as strat

    manifest = data.load_manifest(cfg.tfrecords)
    _check_fold(cfg, manifest)
    run_dir = run_dir_of(cfg)
    if _finished(run_dir) and not cfg.overwrite:
        log.info("%s already finished (metrics.json exists); pass --overwrite to retrain", run_dir)
        return runs.read_json(os.path.join(run_dir, runs.METRICS))
    _prepare_run_dir(run_dir, overwrite=cfg.overwrite)
    _attach_log_file(run_dir)

    # Device and precision come first: datasets and variables are created under them.
    strategy, strategy_desc = strat.resolve_strategy(cfg.strategy)
    policy = strat.apply_precision(strat.resolve_precision(cfg.precision, strategy=strategy))
    keras.utils.set_random_seed(cfg.seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    lr = schedules.scale_lr(cfg.lr, global_batch, base_batch=cfg.batch_size)

    spec = models.get_arch(cfg.arch)
    image_size = _image_size(cfg, manifest, spec)
    num_classes = manifest["num_classes"]
    train_folds = [f for f in range(manifest["folds"]) if f != cfg.fold]
    n_train = data.count_records(cfg.tfrecords, folds=train_folds, split="train")
    n_val = data.count_records(cfg.tfrecords, folds=[cfg.fold], split="train")
    steps = cfg.steps_per_epoch or max(1, n_train // global_batch)
    class_weight = _class_weights(cfg.class_weight, manifest, train_folds)
    monitor = cfg.monitor or losses.default_monitor(num_classes)
    resolved = _resolved_config(cfg, manifest=manifest, image_size=image_size, lr_scaled=lr, steps=steps,
                                global_batch=global_batch, class_weight=class_weight, monitor=monitor,
                                strategy_desc=strategy_desc, policy=policy, replicas=replicas,
                                n_train=n_train, n_val=n_val, train_folds=train_folds)
    log.info("fold %d: %d train / %d val images, %s, %s, global batch %d (%d x %d replicas), lr %.2e",
             cfg.fold, n_train, n_val, strategy_desc, policy, global_batch, cfg.batch_size, replicas, lr)

    label_mode = "binary" if num_classes == 2 else "categorical"
    common = dict(image_size=image_size, label_mode=label_mode, num_classes=num_classes)
    train_ds = data.make_dataset(cfg.tfrecords, split="train", folds=train_folds, training=True,
                                 batch_size=global_batch, augment=cfg.augment, class_weight=class_weight,
                                 cache=cfg.cache, seed=cfg.seed, **common)
    val_ds = data.make_dataset(cfg.tfrecords, split="train", folds=[cfg.fold], training=False,
                               batch_size=global_batch, **common)

    with strategy.scope():
        model, weights_used = _build(cfg, num_classes=num_classes, image_size=image_size)
        resolved["weights_resolved"] = weights_used
        runs.write_json(os.path.join(run_dir, runs.CONFIG), resolved)
        total_steps = steps * cfg.epochs
        stages = _stages(cfg)
        for stage_i, (stage_name, first_epoch, last_epoch, trainable) in enumerate(stages):
            models.set_backbone_trainable(model, trainable)
            log.info("stage %s: epochs %d-%d, %d trainable params", stage_name, first_epoch + 1,
                     last_epoch, _trainable_count(model))
            model.compile(
                optimizer=_optimizer(cfg, lr=lr, total_steps=total_steps, first_step=first_epoch * steps),
                loss=losses.make_loss(num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                                      focal=cfg.focal),
                metrics=losses.make_metrics(num_classes),
            )
            t0 = time.time()
            model.fit(train_ds, epochs=last_epoch, initial_epoch=first_epoch, steps_per_epoch=steps,
                      validation_data=val_ds, verbose=2, shuffle=False,  # tf.data shuffles
                      callbacks=_callbacks(cfg, run_dir=run_dir, monitor=monitor, stage=stage_i))
            log.info("stage %s took %.1f s", stage_name, time.time() - t0)

    model.load_weights(os.path.join(run_dir, runs.WEIGHTS))
    return _finish(cfg, model=model, run_dir=run_dir, resolved=resolved, image_size=image_size,
                   num_classes=num_classes, manifest=manifest)


# --------------------------------------------------------------------------------------- helpers

def _check_fold(cfg: TrainConfig, manifest: dict) -> None:
    k = manifest["folds"]
    if not 0 <= cfg.fold < k:
        raise ValueError(f"--fold={cfg.fold} is out of range: {cfg.tfrecords} holds folds 0..{k - 1}")


def _finished(run_dir: str) -> bool:
    import tensorflow as tf

    return tf.io.gfile.exists(os.path.join(run_dir, runs.METRICS))


def _prepare_run_dir(run_dir: str, *, overwrite: bool) -> None:
    import tensorflow as tf

    if overwrite and tf.io.gfile.exists(run_dir):
        tf.io.gfile.rmtree(run_dir)
    tf.io.gfile.makedirs(run_dir)


def _attach_log_file(run_dir: str) -> None:
    """train.log gets everything the histofold logger says (appending, so a resumed run keeps its past)."""
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    handler = logging.FileHandler(os.path.join(run_dir, runs.LOG), mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _image_size(cfg: TrainConfig, manifest: dict, spec) -> tuple[int, int]:
    """--image_size, else the arch's default for pretrained backbones, else the stored size."""
    if cfg.image_size:
        size = (int(cfg.image_size), int(cfg.image_size))
    elif spec.keras_app and cfg.weights not in ("none", None):
        size = (spec.default_size, spec.default_size)
    else:
        size = tuple(manifest["image_size"])
    mult = spec.size_multiple or 1
    for s in size:
        if s < spec.min_size or s % mult:
            ok = max(spec.min_size, mult * round(s / mult))
            raise ValueError(f"image size {s} does not suit {cfg.arch} (needs >= {spec.min_size} and a "
                             f"multiple of {mult}); pass --image_size={ok}")
    return size


def _class_weights(spec: str, manifest: dict, train_folds: list[int]) -> list[float] | None:
    """Per-class weights from the training folds' counts; applied as sample weights inside tf.data."""
    from histofold import data

    num_classes = manifest["num_classes"]
    if spec in ("none", "", None, False):
        return None
    if spec == "balanced":
        per_fold = manifest["counts"]["per_fold_class"]  # {fold: {class name: count}}
        names = manifest["classes"]
        counts = [sum(int(per_fold[str(f)].get(names[c], per_fold[str(f)].get(str(c), 0))) for f in train_folds)
                  for c in range(num_classes)]
        return [float(w) for w in data.balanced_class_weights(counts)]
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError as e:
        raise ValueError(f"--class_weight={spec!r} is not balanced, none or JSON ({e})") from None
    if isinstance(parsed, dict):
        names = manifest["classes"]
        parsed = [float(parsed.get(n, parsed.get(str(i), 1.0))) for i, n in enumerate(names)]
    if len(parsed) != num_classes:
        raise ValueError(f"--class_weight has {len(parsed)} weights but the dataset has {num_classes} classes")
    return [float(w) for w in parsed]


def _manifest_sha(tfrecords: str) -> str:
    import tensorflow as tf

    with tf.io.gfile.GFile(os.path.join(tfrecords, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _resolved_config(cfg: TrainConfig, *, manifest: dict, image_size, **extra) -> dict:
    resolved = dataclasses.asdict(cfg)
    resolved.update(extra)
    resolved.update(
        name=cfg.name or cfg.arch, run_dir=run_dir_of(cfg), tfrecords=os.path.abspath(cfg.tfrecords)
        if "://" not in cfg.tfrecords else cfg.tfrecords,
        classes=manifest["classes"], num_classes=manifest["num_classes"], image_size=list(image_size),
        stored_image_size=manifest["image_size"], folds=manifest["folds"],
        manifest_sha256=_manifest_sha(cfg.tfrecords), source=manifest.get("source"),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return resolved


def _build(cfg: TrainConfig, *, num_classes: int, image_size):
    """Model with the requested weights; weights=auto tries ImageNet and says so when it cannot."""
    from histofold import models

    spec = models.get_arch(cfg.arch)
    kw = dict(num_classes=num_classes, image_size=image_size, dropout=cfg.dropout, seed=cfg.seed,
              **cfg.arch_kwargs)
    if cfg.init_run:  # finetune: same architecture as the starting run, its best weights
        model = models.build_model(cfg.arch, weights=None, **kw)
        model.load_weights(os.path.join(cfg.init_run, runs.WEIGHTS))
        return model, f"run:{cfg.init_run}"
    weights = cfg.weights
    if weights == "auto":
        if not spec.keras_app:
            return models.build_model(cfg.arch, weights=None, **kw), "none"
        try:
            return models.build_model(cfg.arch, weights="imagenet", **kw), "imagenet"
        except RuntimeError as e:
            log.warning("weights=auto: %s -- training %s from scratch instead", e, cfg.arch)
            return models.build_model(cfg.arch, weights=None, **kw), "none"
    return models.build_model(cfg.arch, weights=None if weights == "none" else weights, **kw), weights


def _stages(cfg: TrainConfig) -> list[tuple[str, int, int, object]]:
    """(name, first_epoch, last_epoch, backbone trainable) per stage: head-only first when asked."""
    if cfg.unfreeze:
        n = cfg.unfreeze
        return [("finetune", 0, cfg.epochs, True if str(n) == "all" else int(n))]
    n = min(cfg.freeze_base_epochs, cfg.epochs)
    if n <= 0:
        return [("train", 0, cfg.epochs, True)]
    stages = [("head", 0, n, False)]
    if n < cfg.epochs:
        stages.append(("full", n, cfg.epochs, True))
    return stages


def _trainable_count(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def _optimizer(cfg: TrainConfig, *, lr: float, total_steps: int, first_step: int):
    from histofold import schedules

    # A stage that starts mid-run gets a schedule shifted by its first step, so the LR curve is
    # one continuous curve over all stages (the new optimizer's step counter starts at 0).
    sched = schedules.make_schedule(cfg.schedule, total_steps=total_steps, max_lr=lr, warmup=cfg.warmup,
                                    offset=first_step)
    name = cfg.optimizer.lower()
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=sched, weight_decay=cfg.weight_decay)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=sched)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=sched, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay or None)
    raise ValueError(f"unknown --optimizer={cfg.optimizer!r}; valid: adamw, adam, sgd")


def _callbacks(cfg: TrainConfig, *, run_dir: str, monitor: str, stage: int) -> list:

    ckpt = keras.callbacks.ModelCheckpoint(os.path.join(run_dir, runs.WEIGHTS), monitor=monitor,
                                           mode=_mode(monitor), save_best_only=True, save_weights_only=True)
    best = _best_so_far(run_dir, monitor)
    if best is not None:  # resumed run: keep the best of the epochs before the interruption
        ckpt.best = best
    cbs = [
        _LearningRateLogger(),  # before CSVLogger so the LR lands in history.csv
        _TerminateOnNaN(cfg),
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, f"backup{stage}")),
        ckpt,
        keras.callbacks.CSVLogger(os.path.join(run_dir, runs.HISTORY), append=True),
    ]
    if cfg.patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=_mode(monitor), patience=cfg.patience,
                                                 restore_best_weights=False))
    if cfg.schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=_mode(monitor), factor=0.5,
                                                     patience=max(1, cfg.patience // 2 or 2), min_lr=cfg.lr / 100))
    if cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")))
    return cbs


def _mode(monitor: str) -> str:
    return "min" if "loss" in monitor else "max"


def _best_so_far(run_dir: str, monitor: str):
    import pandas as pd
    import tensorflow as tf

    path = os.path.join(run_dir, runs.HISTORY)
    if not tf.io.gfile.exists(path) or not tf.io.gfile.exists(os.path.join(run_dir, runs.WEIGHTS)):
        return None
    hist = pd.read_csv(path)
    if monitor not in hist or hist.empty:
        return None
    return float(hist[monitor].min() if _mode(monitor) == "min" else hist[monitor].max())


def _finish(cfg: TrainConfig, *, model, run_dir: str, resolved: dict, image_size, num_classes: int,
            manifest: dict) -> dict:
    """Predict fold k with the best weights -> oof.csv and metrics.json; remove the backups."""
    import tensorflow as tf
    from histofold import data, predict

    val_ds = data.make_dataset(cfg.tfrecords, split="train", folds=[cfg.fold], training=False,
                               batch_size=cfg.batch_size * 2, image_size=image_size, with_ids=True,
                               label_mode="int", num_classes=num_classes)
    oof = predict.predict_frame(model, val_ds, n=cfg.oof_tta, class_names=manifest["classes"])
    oof.insert(2, "fold", cfg.fold)
    with tf.io.gfile.GFile(os.path.join(run_dir, runs.OOF), "w") as f:
        oof.to_csv(f, index=False)
    summary = _oof_metrics(oof, manifest["classes"])
    summary.update(fold=cfg.fold, run_dir=run_dir, monitor=resolved["monitor"],
                   best_monitor=_best_so_far(run_dir, resolved["monitor"]), n_oof=len(oof),
                   epochs_run=int(len(_history(run_dir))))
    runs.write_json(os.path.join(run_dir, runs.METRICS), summary)
    for stage in range(2):
        backup = os.path.join(run_dir, f"backup{stage}")
        if tf.io.gfile.exists(backup):
            tf.io.gfile.rmtree(backup)
    log.info("fold %d done: %s", cfg.fold, json.dumps({k: v for k, v in summary.items()
                                                       if isinstance(v, (int, float))}))
    return summary


def _history(run_dir: str):
    import pandas as pd

    return pd.read_csv(os.path.join(run_dir, runs.HISTORY))


def _oof_metrics(oof, classes: list[str]) -> dict:
    from histofold import metrics

    y = oof["label"].to_numpy()
    probs = oof[[f"p_{c}" for c in classes]].to_numpy()
    if len(classes) == 2:
        m = metrics.binary_metrics(y, probs[:, 1])
    else:
        m = metrics.multiclass_metrics(y, probs, class_names=classes)
    return {k: v for k, v in m.items() if isinstance(v, (int, float, np.floating, np.integer))}


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current LR to the epoch logs as `lr` (CSVLogger then records it)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _TerminateOnNaN(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and says what usually causes it."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        fp16 = "float16" in str(keras.config.dtype_policy().name)
        msg = (f"loss became {loss} at batch {batch}: the LR is likely too high (--lr={self.cfg.lr}; try "
               f"3-10x lower, or a warm-up schedule)"
               + (", or float16 overflowed (try --precision=float32)" if fp16 else "")
               + "; also check the inputs for NaN")
        log.error(msg)
        self.model.stop_training = True
        raise FloatingPointError(msg)
