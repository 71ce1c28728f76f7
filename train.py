"""Train fold models on the TFRecords written by prepare_tfrecords.py (see `python train.py --help`)."""
from histofold.cli import run_cli, setup_logging


def main(*, fold="0", arch="resnet50", tfrecords="tfrecords", name="", runs_dir="runs", image_size=0,
         weights="auto", width=0, dropout=None, epochs=10, batch_size=64, lr=1e-3, optimizer="adamw",
         weight_decay=1e-4, schedule="onecycle", warmup=0.3, augment="light", class_weight="balanced",
         label_smoothing=0.0, focal=False, mixup=0.0, ema=0.0, freeze_base_epochs=0, init_run="",
         unfreeze="", train_bn=True, monitor="", patience=0, strategy="auto", precision="auto", seed=42,
         cache=False, steps_per_epoch=0, oof_tta=1, tensorboard=False, overwrite=False, log_level="info"):
    """Train one fold (validating on it, training on the others), every fold in turn, or one model on all.

    Writes runs/<name>/fold<k>/ (runs/<name>/full/ for --fold=full): config.json, model.weights.h5,
    history.csv, oof.csv (the fold predicted by the kept weights), metrics.json, train.log and, last,
    complete.json (sha256 of every file; predict and evaluate only use finished runs). Rerunning a
    killed command resumes from its last finished epoch; a finished fold is skipped unless --overwrite.

    Examples:
        python train.py --fold=0 --arch=resnet50
        python train.py --fold=all --arch=histo_cnn --epochs=12 --augment=stain
        python train.py --fold=full --arch=pcam_cnn --epochs=30 --ema=0.999
        python train.py --fold=0 --arch=efficientnetb0 --weights=/kaggle/input/w/effb0_notop.h5

    Args:
        fold: validation fold k (0..folds-1), a comma list, all (every fold in turn), or full (one
            model on all training folds, no validation fold: its final weights are kept).
        arch: architecture: tiny, simple_cnn, simple_cnn_wide, histo_cnn, pcam_cnn, mobilenetv2,
            resnet50, densenet121, efficientnetb0..b3, efficientnetv2s, convnext_tiny.
        tfrecords: the folder prepare_tfrecords.py wrote (manifest.json + shards; gs:// works).
        name: run name (runs/<name>/fold<k>); default: the arch.
        runs_dir: where run directories go.
        image_size: pixels fed to the model (resized in the input pipeline with the one antialiased
            resize); 0 = the stored size, or the arch's default for pretrained backbones.
        weights: auto (ImageNet when reachable, else random init, logged) | imagenet | none | PATH to
            a local no-top Keras weights file (offline Kaggle notebooks attach one as a dataset).
        width: base width of histo_cnn / pcam_cnn (0 = the arch's default).
        dropout: head dropout (default: the arch's).
        epochs: total epochs (including --freeze_base_epochs).
        batch_size: per-replica batch; the global batch is batch_size x replicas (logged).
        lr: peak learning rate for batch_size on one replica; scaled linearly with the replica count.
        optimizer: adamw | adam | sgd (momentum 0.9, Nesterov).
        weight_decay: decoupled weight decay for adamw/sgd.
        schedule: onecycle (warm-up then cosine annealing) | cosine (linear warm-up, cosine) |
            constant | plateau (halve on plateau of --monitor).
        warmup: fraction of all steps spent warming up (onecycle and cosine); no epoch inside the
            warm-up is kept as the best one.
        augment: none | dihedral | light (dihedral + mild brightness/contrast) | stain (dihedral +
            HED stain, hue, saturation, brightness and contrast jitter in one fused pass) |
            stain_strong (twice the jitter) | strong (stain_strong + affine + crop) | seed001 (flip,
            rotation, translation, shear, histogram equalisation).
        class_weight: balanced | none | a JSON list [1,3] or object {"tumor": 3}; applied as
            per-sample weights inside tf.data, so it also works under TPUStrategy.
        label_smoothing: label smoothing of the cross-entropy.
        focal: use focal loss (gamma 2) instead of cross-entropy.
        mixup: mixup alpha (0 = off); images and labels of a batch blend by lam ~ Beta(alpha, alpha).
        ema: keep an exponential moving average of the weights with this momentum (e.g. 0.999; 0 =
            off); validation, the checkpoint and the final weights use the average.
        freeze_base_epochs: train only the head for this many epochs first, then everything.
        init_run: start from a finished run's weights (a fold directory); what finetune.py sets.
        unfreeze: with --init_run: all, or N top backbone layers to train.
        train_bn: train BatchNorm layers when unfreezing (False keeps them frozen in inference mode).
        monitor: metric picking the kept epoch: val_auc (binary default) | val_macro_f1
            (multi-class default) | val_loss | val_accuracy.
        patience: early-stopping patience in epochs (0 = off).
        strategy: auto | tpu | mirrored | multiworker | one_device | cpu | default.
        precision: auto (fp16 on GPUs >= 7.0, bf16 on TPU, fp32 on CPU) | float32 | mixed_float16 |
            mixed_bfloat16.
        seed: seed for weights, shuffling and augmentation (runs repeat on CPU); logged.
        cache: cache the training records in memory (small datasets).
        steps_per_epoch: 0 = one pass over the training folds.
        oof_tta: dihedral TTA transforms (1, 2, 4, 8) for oof.csv.
        tensorboard: also write TensorBoard logs to the run directory.
        overwrite: retrain folds that already finished.
        log_level: debug | info | warning | error.

    Returns:
        One summary per fold (its OOF metrics and where the run directory is).
    """
    flags = dict(locals())
    from histofold.config import TrainConfig

    config = TrainConfig.from_flags(**flags)
    setup_logging(config.log_level)
    from histofold.loop import train

    return train(config)


if __name__ == "__main__":
    run_cli(main)
