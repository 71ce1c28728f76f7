"""The training loop shared by train.py and finetune.py: one fold in, one self-describing run directory out.

Reading order: `train` (every fold a TrainConfig asks for) -> `train_fold` (run directory, strategy and
precision, sizes and class weights, datasets, model, compile, callbacks, fit, the kept weights, OOF,
complete.json) -> the small helpers below it. Fine-tuning is the same loop with `init_run` and
`unfreeze` set (finetune.py fills them from a finished run).

Which weights are kept: with a validation fold, the best epoch by --monitor among the epochs after the
warm-up (an epoch inside the warm-up is never picked: its weights are badly calibrated, and pooled OOF
AUC drops); with --ema, validation and the checkpoint use the EMA weights; with --fold=full (no
validation fold) the final weights.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time

import keras
import numpy as np

from histofold import io
from histofold.config import TrainConfig
from histofold.errors import IntegrityError, UsageError
from histofold.manifest import Manifest
from histofold.runs import HISTORY, LOG, METRICS, OOF, WEIGHTS, RunDir

log = logging.getLogger("histofold")

# what a fold's one-line summary (and train.py's table) shows
SUMMARY_KEYS = ("fold", "roc_auc", "accuracy", "macro_f1", "best_monitor", "monitor", "epochs_run", "n_oof", "run_dir")


def train(config: TrainConfig) -> list[dict]:
    """Train every fold `config.fold` names (0 | 0,2 | all | full), each into its own run directory."""
    config.check_registries()
    manifest = Manifest.load(config.tfrecords)
    return [train_fold(config, fold, manifest=manifest) for fold in config.folds_to_run(manifest.n_folds)]


def train_fold(config: TrainConfig, fold, *, manifest: Manifest | None = None) -> dict:
    """Train one fold (an int: validate on it, train on the others; "full": train on all) end to end.

    Returns the summary also written to metrics.json."""
    from histofold import strategy as strat

    manifest = manifest or Manifest.load(config.tfrecords)
    config = config.replace(fold=str(fold))
    run = RunDir.of(config.runs_dir, config.run_name, fold)
    if run.is_complete() and not config.overwrite:
        log.info("%s already finished; pass --overwrite to retrain", run.path)
        return run.metrics()

    # Device and precision come first: datasets and variables are created under them.
    strategy, strategy_desc = strat.resolve_strategy(config.strategy)
    if strat.is_chief(strategy):
        return _fit_fold(config, fold, manifest=manifest, run=run, strategy=strategy, strategy_desc=strategy_desc)
    # Multi-worker, not the chief: the same steps (saving weights takes part in collectives), into a
    # scratch directory of this machine that is deleted after; the chief alone writes the run directory.
    scratch = tempfile.mkdtemp(prefix=f"histofold-worker{strat.task_index(strategy)}-")
    try:
        summary = _fit_fold(config, fold, manifest=manifest, run=RunDir.of(scratch, config.run_name, fold),
                            strategy=strategy, strategy_desc=strategy_desc)
    finally:
        _detach_log_file()
        shutil.rmtree(scratch, ignore_errors=True)
    return {**summary, "run_dir": run.path}


def _fit_fold(config: TrainConfig, fold, *, manifest: Manifest, run: RunDir, strategy, strategy_desc: str) -> dict:
    """train_fold's work once the strategy is known: run directory, sizes, datasets, model, fit, finish."""
    from histofold import data, losses, models, schedules, strategy as strat

    run.start(overwrite=config.overwrite)
    _attach_log_file(run)
    policy = strat.apply_precision(strat.resolve_precision(config.precision, strategy=strategy))
    keras.utils.set_random_seed(config.seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    lr = schedules.scale_lr(config.lr, global_batch, base_batch=config.batch_size)

    image_size = models.input_size(config.arch, config.image_size, stored=manifest.image_size,
                                   weights=config.weights)
    val_folds = [] if fold == "full" else [int(fold)]
    train_folds = [f for f in range(manifest.n_folds) if f not in val_folds]
    n_train, n_val = manifest.count("train", train_folds), (manifest.count("train", val_folds) if val_folds else 0)
    steps = config.steps_per_epoch or max(1, n_train // global_batch)
    class_weight = _class_weights(config, manifest, train_folds)
    monitor = _monitor(config, manifest.num_classes)
    first_eligible = _first_eligible_epoch(config)
    resolved = dict(classes=manifest.classes, num_classes=manifest.num_classes, image_size=list(image_size),
                    stored_image_size=list(manifest.image_size), tfrecords=io.absolute(config.tfrecords),
                    manifest_sha256=manifest.sha256, mpp=manifest.mpp, stain=manifest.stain,
                    train_folds=train_folds, val_folds=val_folds, n_train=n_train, n_val=n_val, steps=steps,
                    global_batch=global_batch, replicas=replicas, lr_scaled=lr, class_weight=class_weight,
                    monitor=monitor, first_eligible_epoch=first_eligible + 1, strategy=strategy_desc,
                    precision=policy, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    log.info("fold %s: %d train / %d val images, %s, %s, global batch %d (%d x %d replicas), lr %.2e, "
             "image %dx%d, seed %d", fold, n_train, n_val, strategy_desc, policy, global_batch,
             config.batch_size, replicas, lr, *image_size, config.seed)

    label_mode = "binary" if manifest.num_classes == 2 else "categorical"
    common = dict(image_size=image_size, label_mode=label_mode)
    train_ds = _per_worker(strategy, lambda batch_size, shard: data.make_dataset(
        manifest, split="train", folds=train_folds, training=True, batch_size=batch_size, augment=config.augment,
        mixup=config.mixup, class_weight=class_weight, cache=config.cache, seed=config.seed, shard=shard, **common),
        global_batch=global_batch, shard=True)
    val_ds = (_per_worker(strategy, lambda batch_size, shard: data.make_dataset(
        manifest, split="train", folds=val_folds, training=False, batch_size=batch_size, **common),
        global_batch=global_batch, shard=False) if val_folds else None)

    with strategy.scope():
        model, weights_used = _build(config, num_classes=manifest.num_classes, image_size=image_size)
        resolved["weights_resolved"] = weights_used
        run.write_config(config, resolved)
        total_steps = steps * config.epochs
        for stage_i, (stage, first_epoch, last_epoch, trainable) in enumerate(_stages(config)):
            models.set_backbone_trainable(model, trainable, freeze_bn=None if config.train_bn else True)
            log.info("stage %s: epochs %d-%d, %d trainable params", stage, first_epoch + 1, last_epoch,
                     models.count_params(model, trainable_only=True))
            model.compile(
                optimizer=_optimizer(config, lr=lr, total_steps=total_steps, first_step=first_epoch * steps),
                loss=losses.make_loss(num_classes=manifest.num_classes, label_smoothing=config.label_smoothing,
                                      focal=config.focal),
                metrics=losses.make_metrics(manifest.num_classes))
            t0 = time.time()
            with reading(manifest, train_folds + val_folds):
                model.fit(train_ds, epochs=last_epoch, initial_epoch=first_epoch, steps_per_epoch=steps,
                          validation_data=val_ds, verbose=2, shuffle=False,  # tf.data shuffles
                          callbacks=_callbacks(config, run=run, monitor=monitor, stage=stage_i,
                                               first_eligible=first_eligible))
            log.info("stage %s took %.1f s", stage, time.time() - t0)
    if monitor == "last":
        model.save_weights(run.file(WEIGHTS))   # the final (EMA when --ema) weights
    else:
        model.load_weights(run.file(WEIGHTS))   # the best eligible epoch
    return _finish(config, model=model, run=run, resolved=resolved, manifest=manifest, fold=fold,
                   image_size=image_size)


# --------------------------------------------------------------------------------------- helpers

def _per_worker(strategy, build, *, global_batch: int, shard: bool):
    """One machine: build(batch_size=global batch, shard=None). Multi-worker: every worker builds its own
    pipeline at the per-replica batch size, reading its part of the shards (`shard`: training) or all of
    them (validation: equal step counts keep the workers' collectives in step, and metrics summed over
    duplicated batches equal one machine's)."""
    from histofold import strategy as strat

    if strat.num_workers(strategy) <= 1:
        return build(batch_size=global_batch, shard=None)
    return strategy.distribute_datasets_from_function(lambda ctx: build(
        batch_size=ctx.get_per_replica_batch_size(global_batch),
        shard=(ctx.num_input_pipelines, ctx.input_pipeline_id) if shard else None))


class reading:
    """Context manager at the train/predict boundary: a corrupt shard (TensorFlow's DataLossError, or a
    record that does not decode) becomes an IntegrityError naming the shard and record."""

    def __init__(self, manifest: Manifest, folds=None, *, split: str = "train"):
        self.manifest, self.folds, self.split = manifest, folds, split

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        import tensorflow as tf

        if kind is None or not issubclass(kind, (tf.errors.DataLossError, tf.errors.InvalidArgumentError)):
            return False
        from histofold import records

        files = self.manifest.files(self.split, self.folds) if (self.split == "test" or self.folds) else []
        found = records.find_corrupt_record(files)
        where = f"shard {found[0]} is corrupt at record {found[1]}" if found else \
            f"a shard of {self.manifest.directory} is corrupt ({str(error).splitlines()[0][:160]})"
        raise IntegrityError(f"{where}: run `python prepare_tfrecords.py --verify --out="
                             f"{self.manifest.directory}` to list the damage, then rerun the same prepare "
                             "command (it rewrites bad shards)") from None


def _detach_log_file() -> None:
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


def _attach_log_file(run: RunDir) -> None:
    """train.log gets everything the histofold logger says (appending, so a resumed run keeps its past)."""
    _detach_log_file()
    if io.is_url(run.path):
        return  # a FileHandler needs a local path; remote runs log to stderr only
    handler = logging.FileHandler(run.file(LOG), mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # the file records INFO whatever stderr shows


def _class_weights(config: TrainConfig, manifest: Manifest, train_folds: list[int]) -> list[float] | None:
    """Per-class weights from the training folds' counts; applied as sample weights inside tf.data."""
    from histofold import data

    spec = config.class_weights_spec()
    if spec is None:
        return None
    if spec == "balanced":
        return [float(w) for w in data.balanced_class_weights(manifest.class_counts(train_folds))]
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in manifest.classes and not (k.isdigit() and int(k) < manifest.num_classes)]
        if unknown:
            raise UsageError(f"--class_weight names {unknown[0]!r}, not a class of the dataset ({manifest.classes})")
        spec = [float(spec.get(n, spec.get(str(i), 1.0))) for i, n in enumerate(manifest.classes)]
    if len(spec) != manifest.num_classes:
        raise UsageError(f"--class_weight has {len(spec)} weights but the dataset has {manifest.num_classes} classes")
    return spec


def _monitor(config: TrainConfig, num_classes: int) -> str:
    """What picks the kept weights: a validation metric, or "last" (--fold=full, or --ema on its own)."""
    from histofold import losses

    if config.fold == "full":
        return "last"
    return config.monitor or losses.default_monitor(num_classes)


def _first_eligible_epoch(config: TrainConfig) -> int:
    """0-based first epoch whose weights may be kept: the one after the warm-up ends."""
    if config.schedule in ("onecycle", "cosine") and config.warmup > 0:
        return min(config.epochs - 1, max(0, math.ceil(config.warmup * config.epochs) - 1))
    return 0


def _build(config: TrainConfig, *, num_classes: int, image_size):
    """Model with the requested weights; weights=auto tries ImageNet and says so when it cannot."""
    from histofold import models

    spec = models.get_arch(config.arch)
    kw = dict(num_classes=num_classes, image_size=image_size, dropout=config.dropout, seed=config.seed,
              **config.arch_kwargs)
    if config.init_run:  # finetune: same architecture as the starting run, its checked weights
        source = RunDir(config.init_run)
        model = models.build_model(config.arch, weights=None, **kw)
        model.load_weights(source.checked(WEIGHTS))
        return model, f"run:{source.path}"
    if config.weights == "auto":
        if not spec.keras_app:
            return models.build_model(config.arch, weights=None, **kw), "none"
        try:
            return models.build_model(config.arch, weights="imagenet", **kw), "imagenet"
        except UsageError as e:
            log.warning("weights=auto: %s -- training %s from scratch instead", e, config.arch)
            return models.build_model(config.arch, weights=None, **kw), "none"
    weights = None if config.weights == "none" else config.weights
    return models.build_model(config.arch, weights=weights, **kw), config.weights


def _stages(config: TrainConfig) -> list[tuple[str, int, int, object]]:
    """(name, first_epoch, last_epoch, backbone trainable) per stage: head-only first when asked."""
    if config.unfreeze:
        return [("finetune", 0, config.epochs, True if config.unfreeze == "all" else int(config.unfreeze))]
    n = min(config.freeze_base_epochs, config.epochs)
    if n <= 0:
        return [("train", 0, config.epochs, True)]
    return [("head", 0, n, False)] + ([("full", n, config.epochs, True)] if n < config.epochs else [])


def _optimizer(config: TrainConfig, *, lr: float, total_steps: int, first_step: int):
    from histofold import schedules

    # A stage that starts mid-run gets a schedule shifted by its first step, so the LR curve is
    # one continuous curve over all stages (the new optimizer's step counter starts at 0).
    sched = schedules.make_schedule(config.schedule, total_steps=total_steps, max_lr=lr, warmup=config.warmup,
                                    offset=first_step)
    ema = dict(use_ema=True, ema_momentum=config.ema) if config.ema else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=sched, weight_decay=config.weight_decay, **ema)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=sched, **ema)
    return keras.optimizers.SGD(learning_rate=sched, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay or None, **ema)


class _BestCheckpoint(keras.callbacks.Callback):
    """Saves the weights when `monitor` improves, from `first_eligible` (0-based epoch) on."""

    def __init__(self, path: str, *, monitor: str, first_eligible: int, best=None):
        super().__init__()
        self.path, self.monitor, self.first_eligible = path, monitor, first_eligible
        self.sign = -1.0 if "loss" in monitor else 1.0
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or epoch < self.first_eligible or not math.isfinite(float(value)):
            return
        if self.best is None or self.sign * float(value) > self.sign * self.best:
            self.best = float(value)
            self.model.save_weights(self.path)


def _callbacks(config: TrainConfig, *, run: RunDir, monitor: str, stage: int, first_eligible: int) -> list:
    cbs = [
        _LearningRateLogger(),  # before _HistoryCSV so the LR lands in history.csv
        _TerminateOnNaN(config),
        # BackupAndRestore before SwapEMAWeights: the backup holds the raw weights and the optimizer's EMA
        keras.callbacks.BackupAndRestore(run.file(f"backup{stage}")),
    ]
    if config.ema:
        cbs.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))  # validate + checkpoint the EMA weights
    if monitor != "last":
        cbs.append(_BestCheckpoint(run.file(WEIGHTS), monitor=monitor, first_eligible=first_eligible,
                                   best=_best_so_far(run, monitor, first_eligible)))
    cbs.append(_HistoryCSV(run.file(HISTORY)))
    if config.patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor=monitor, mode="min" if "loss" in monitor else "max",
                                                 patience=config.patience, start_from_epoch=first_eligible))
    if config.schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor if monitor != "last" else "loss",
                                                     mode="min" if "loss" in monitor else "max", factor=0.5,
                                                     patience=max(1, config.patience // 2 or 2),
                                                     min_lr=config.lr / 100))
    if config.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(run.file("tensorboard")))
    return cbs


def _best_so_far(run: RunDir, monitor: str, first_eligible: int):
    """A resumed run: the best monitored value among the eligible epochs before the interruption."""
    hist = run.history()
    if hist is None or monitor not in hist or not run.has(WEIGHTS):
        return None
    eligible = hist.loc[hist["epoch"] >= first_eligible, monitor] if "epoch" in hist else hist[monitor]
    if eligible.empty:
        return None
    return float(eligible.min() if "loss" in monitor else eligible.max())


def _finish(config: TrainConfig, *, model, run: RunDir, resolved: dict, manifest: Manifest, fold,
            image_size) -> dict:
    """Predict fold k with the kept weights -> oof.csv and metrics.json; remove the backups; complete.json."""
    from histofold import data, tta

    history = run.history()
    summary = {"fold": fold, "run_dir": run.path, "monitor": resolved["monitor"],
               "epochs_run": 0 if history is None else int(len(history))}
    if fold != "full":
        val_ds = data.make_dataset(manifest, split="train", folds=[int(fold)], training=False,
                                   batch_size=config.batch_size * 2, image_size=image_size, with_ids=True,
                                   label_mode="int")
        with reading(manifest, [int(fold)]):
            oof = tta.predict_frame(model, val_ds, n=config.oof_tta, class_names=manifest.classes,
                                    desc=f"OOF fold {fold} TTA x{config.oof_tta}")
        oof.insert(2, "fold", int(fold))
        oof = manifest.with_slides(oof, "train", [int(fold)])  # whole-slide tiles: + slide, for slide metrics
        io.write_csv(run.file(OOF), oof)
        summary.update(_oof_metrics(oof, manifest.classes))
        summary.update(best_monitor=_best_so_far(run, resolved["monitor"], resolved["first_eligible_epoch"] - 1)
                       if resolved["monitor"] != "last" else None, n_oof=len(oof))
    io.write_json(run.file(METRICS), summary)
    summary["weights_digest"] = weights_digest(model)  # equal on every worker of a multi-worker run
    for stage in range(2):
        io.rmtree(run.file(f"backup{stage}"))
    run.mark_complete()
    log.info("fold %s done: %s", fold, ", ".join(f"{k}={summary[k]:.4f}" if isinstance(summary[k], float)
                                                   else f"{k}={summary[k]}" for k in SUMMARY_KEYS if k in summary))
    return summary


def weights_digest(model) -> str:
    """sha256 over every weight array of the model (order and values): two models with the same digest
    hold the same weights, whatever the file bytes."""
    import hashlib

    h = hashlib.sha256()
    for w in model.weights:
        a = np.ascontiguousarray(keras.ops.convert_to_numpy(w))
        h.update(f"{w.path}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _oof_metrics(oof, classes: list[str]) -> dict:
    from histofold import metrics

    y = oof["label"].to_numpy()
    probs = oof[[f"p_{c}" for c in classes]].to_numpy()
    if len(classes) == 2:
        m = metrics.binary_metrics(y, probs[:, 1])
    else:
        m = metrics.multiclass_metrics(y, probs, class_names=classes)
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in m.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


class _HistoryCSV(keras.callbacks.Callback):
    """history.csv, one row per epoch appended (epoch, then the logs' keys sorted, like Keras' CSVLogger),
    written whole through histofold.io at every epoch end: it works on gs:// and ram:// (CSVLogger keeps a
    file handle open, and a GFile has no `closed`), and a reader never sees half a row."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        import pandas as pd

        logs = logs or {}
        row = pd.DataFrame([{"epoch": epoch, **{k: logs[k] for k in sorted(logs)}}])
        old = io.read_csv(self.path) if io.exists(self.path) else None
        io.write_csv(self.path, row if old is None else pd.concat([old, row], ignore_index=True))


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current LR to the epoch logs as `lr` (_HistoryCSV then records it)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _TerminateOnNaN(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and says what usually causes it."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config = config

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        fp16 = "float16" in str(keras.config.dtype_policy().name)
        msg = (f"loss became {loss} at batch {batch}: the LR is likely too high (--lr={self.config.lr}; try "
               f"3-10x lower, or a warm-up schedule)"
               + (", or float16 overflowed (try --precision=float32)" if fp16 else "")
               + "; also check the inputs for NaN")
        log.error(msg)
        self.model.stop_training = True
        raise UsageError(msg)
