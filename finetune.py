"""Fine-tune a trained fold model with its backbone unfrozen (see `python finetune.py --help`)."""
from histofold.cli import run_cli, setup_logging


def main(*, run="", unfreeze="all", lr=None, epochs=5, name="", schedule="cosine", warmup=0.1,
         augment=None, batch_size=None, patience=0, train_bn=False, runs_dir=None, overwrite=False,
         log_level="info"):
    """Continue training a finished fold run with all or the top N backbone layers unfrozen.

    Loads runs/<name>/fold<k>/config.json and its checked weights, unfreezes the backbone and trains
    with the same loop as train.py (train.py --init_run=... --unfreeze=...) into its own run
    directory (default runs/<name>_ft/fold<k>) with its own oof.csv. BatchNorm layers stay frozen in
    inference mode unless --train_bn (on 2,400 PCam patches frozen BatchNorm fine-tuned more stably;
    see the README). This is seed 004's fine-tuning stage.

    Example:
        python finetune.py --run=runs/resnet50/fold0 --unfreeze=all --lr=1e-4 --epochs=5

    Args:
        run: a finished fold run directory written by train.py (runs/<name>/fold<k>).
        unfreeze: all, or N: the number of top backbone layers to unfreeze.
        lr: peak learning rate; default a tenth of the run's.
        epochs: fine-tuning epochs.
        name: run name of the result; default <name>_ft.
        schedule: LR schedule (cosine with a short warm-up suits fine-tuning).
        warmup: fraction of steps spent warming up.
        augment: augmentation preset; default the run's.
        batch_size: per-replica batch; default the run's.
        patience: early-stopping patience (0 = off).
        train_bn: also train the BatchNorm layers (default: frozen, in inference mode).
        runs_dir: where the new run goes; default the run's runs_dir.
        overwrite: redo a fine-tuning run that already finished.
        log_level: debug | info | warning | error.

    Returns:
        The fine-tuned fold's summary.
    """
    flags = dict(locals())
    from histofold.config import FinetuneConfig

    config = FinetuneConfig.from_flags(**flags)
    setup_logging(config.log_level)
    from histofold.loop import train_fold
    from histofold.runs import RunDir

    source = RunDir(config.run)
    source.require_complete()
    train_config = config.train_config(source.config())
    return train_fold(train_config, source.fold)


if __name__ == "__main__":
    run_cli(main)
