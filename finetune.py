"""Fine-tune a trained fold model with its backbone unfrozen (see `python finetune.py --help`)."""
from histofold.cli import run_cli, setup_logging


def main(*, run, unfreeze="all", lr=None, epochs=5, name="", schedule="cosine", warmup=0.1,
         augment=None, batch_size=None, patience=0, runs_dir=None, overwrite=False):
    """Continue training a finished fold run with all or the top N backbone layers unfrozen.

    Loads runs/<name>/fold<k>/config.json and its best weights, unfreezes the backbone (BatchNorm
    layers stay frozen in inference mode, as fine-tuning wants), and trains with the same loop as
    train.py into its own run directory (default runs/<name>_ft/fold<k>) with its own oof.csv.
    This is seed 004's fine-tuning stage.

    Example:
        python finetune.py --run=runs/resnet50/fold0 --unfreeze=all --lr=1e-4 --epochs=5

    Args:
        run: a fold run directory written by train.py (runs/<name>/fold<k>).
        unfreeze: "all" or N, the number of top backbone layers to unfreeze.
        lr: peak learning rate; default a tenth of the run's.
        epochs: fine-tuning epochs.
        name: run name of the result; default <name>_ft.
        schedule: LR schedule (cosine with a short warm-up suits fine-tuning).
        warmup: fraction of steps spent warming up.
        augment: augmentation preset; default the run's.
        batch_size: per-replica batch; default the run's.
        patience: early-stopping patience (0 = off).
        runs_dir: where the new run goes; default the run's runs_dir.
        overwrite: redo a fine-tuning run that already finished.
    """
    import dataclasses

    from histofold import runs
    from histofold.loop import TrainConfig, train_fold

    setup_logging()
    src = runs.load_config(run)
    if str(unfreeze) != "all" and not str(unfreeze).isdigit():
        raise ValueError(f"--unfreeze={unfreeze!r}: pass all or a number of top backbone layers")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in src.items() if k in fields}
    base.update(
        init_run=run, unfreeze=str(unfreeze), lr=float(lr) if lr is not None else float(src["lr"]) / 10,
        epochs=int(epochs), name=name or f"{src['name']}_ft", schedule=schedule, warmup=float(warmup),
        freeze_base_epochs=0, patience=int(patience), overwrite=bool(overwrite),
        image_size=int(src["image_size"][0]), weights="none",
    )
    if augment is not None:
        base["augment"] = augment
    if batch_size is not None:
        base["batch_size"] = int(batch_size)
    if runs_dir is not None:
        base["runs_dir"] = runs_dir
    return train_fold(TrainConfig(**base))


if __name__ == "__main__":
    run_cli(main)
