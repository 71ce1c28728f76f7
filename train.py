"""Train fold models on the TFRecords written by prepare_tfrecords.py (see `python train.py --help`)."""
from histofold.cli import run_cli, setup_logging, to_list


def main(*, fold="0", arch="resnet50", tfrecords="tfrecords", name="", runs_dir="runs", image_size=0,
         weights="auto", epochs=10, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=1e-4,
         schedule="onecycle", warmup=0.3, augment="light", class_weight="balanced", label_smoothing=0.0,
         focal=False, freeze_base_epochs=0, monitor="", patience=0, strategy="auto", precision="auto",
         seed=42, cache=False, steps_per_epoch=0, oof_tta=1, dropout=None, width=0, tensorboard=False,
         overwrite=False):
    """Train one fold (validating on it, training on the others), or every fold in turn.

    Writes runs/<name>/fold<k>/: config.json, model.weights.h5 (best by --monitor), history.csv,
    oof.csv (fold k predicted by the best weights), metrics.json, train.log. Rerunning a killed
    command resumes from its last finished epoch; a finished fold is skipped unless --overwrite.

    Examples:
        python train.py --fold=0 --arch=resnet50
        python train.py --fold=all --arch=histo_cnn --epochs=12 --augment=strong
        python train.py --fold=0 --arch=efficientnetb0 --weights=/kaggle/input/w/effb0_notop.h5

    Args:
        fold: validation fold k (0..folds-1), a comma list, or "all" for every fold in turn.
        arch: architecture (tiny, simple_cnn, simple_cnn_wide, histo_cnn, mobilenetv2, resnet50,
            densenet121, efficientnetb0..b3, efficientnetv2s, convnext_tiny).
        tfrecords: directory written by prepare_tfrecords.py (manifest.json + shards; gs:// works).
        name: run name (runs/<name>/fold<k>); default: the arch.
        runs_dir: where run directories go.
        image_size: pixels fed to the model (images are resized in the input pipeline); 0 = the
            stored size, or the arch's default for pretrained backbones. HCD winners upscaled
            96 px patches to 196-224 px.
        weights: auto (ImageNet when reachable, else random init, logged) | imagenet | none | PATH to
            a local no-top Keras weights file (offline Kaggle notebooks attach one as a dataset).
        epochs: total epochs (including --freeze_base_epochs).
        batch_size: per-replica batch; the global batch is batch_size x replicas (logged).
        lr: peak learning rate for batch_size on one replica; scaled linearly with the replica count.
        optimizer: adamw | adam | sgd (momentum 0.9, Nesterov).
        weight_decay: decoupled weight decay for adamw/sgd.
        schedule: onecycle (warm-up then cosine annealing) | cosine (linear warm-up, cosine) |
            constant | plateau (halve on plateau of --monitor).
        warmup: fraction of all steps spent warming up (onecycle and cosine).
        augment: none | dihedral | light (dihedral + mild brightness/contrast) | medium (light + HED
            stain and hue/saturation jitter) | strong (medium + affine + crop) | seed001 (flip,
            rotation, translation, shear, histogram equalisation).
        class_weight: balanced | none | JSON list or {class: weight}; applied as per-sample weights
            inside tf.data, so it also works under TPUStrategy.
        label_smoothing: label smoothing of the cross-entropy.
        focal: use focal loss (gamma 2) instead of cross-entropy.
        freeze_base_epochs: train only the head for this many epochs first, then everything.
        monitor: metric picking the best epoch; default val_auc (binary) / val_macro_f1 (multi-class).
        patience: early-stopping patience in epochs (0 = off).
        strategy: auto | tpu | mirrored | multiworker | one_device | cpu.
        precision: auto (fp16 on GPUs >= 7.0, bf16 on TPU, fp32 on CPU) | float32 | mixed_float16 |
            mixed_bfloat16.
        seed: seed for weights, shuffling and augmentation (runs repeat on CPU).
        cache: cache the training records in memory (small datasets).
        steps_per_epoch: 0 = one pass over the training folds.
        oof_tta: dihedral TTA transforms (1, 2, 4, 8) used for oof.csv.
        dropout: head dropout (default: the arch's).
        width: base width of histo_cnn (0 = its default).
        tensorboard: also write TensorBoard logs to the run directory.
        overwrite: retrain folds that already finished.
    """
    from histofold.loop import TrainConfig, train_fold
    from histofold.data import load_manifest

    setup_logging()
    folds = _folds(fold, load_manifest(tfrecords)["folds"])
    summaries = []
    for k in folds:
        cfg = TrainConfig(tfrecords=tfrecords, fold=k, arch=arch, name=name, runs_dir=runs_dir,
                          image_size=int(image_size), weights=str(weights), epochs=int(epochs),
                          batch_size=int(batch_size), lr=float(lr), optimizer=optimizer,
                          weight_decay=float(weight_decay), schedule=schedule, warmup=float(warmup),
                          augment=augment, class_weight=_str(class_weight),
                          label_smoothing=float(label_smoothing), focal=bool(focal),
                          freeze_base_epochs=int(freeze_base_epochs), monitor=monitor,
                          patience=int(patience), strategy=strategy, precision=precision, seed=int(seed),
                          cache=bool(cache), steps_per_epoch=int(steps_per_epoch), oof_tta=int(oof_tta),
                          dropout=None if dropout is None else float(dropout),
                          arch_kwargs={"width": int(width)} if width else {},
                          tensorboard=bool(tensorboard), overwrite=bool(overwrite))
        summaries.append(train_fold(cfg))
    return summaries[0] if len(summaries) == 1 else summaries


def _folds(fold, n_folds: int) -> list[int]:
    if str(fold) == "all":
        return list(range(n_folds))
    return [int(f) for f in to_list(fold)]


def _str(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


if __name__ == "__main__":
    run_cli(main)
