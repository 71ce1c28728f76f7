"""Predict the test set with TTA and fold/run ensembles into a validated submission (see --help)."""
from histofold.cli import run_cli, setup_logging


def main(*, runs="", runs_dir="runs", tfrecords="", tta=8, ensemble="mean", run_weights="", format="label",
         name="", out_dir="", oof=False, batch_size=256, precision="auto", input="",
         predictions="predictions.csv", slides="", mpp=None, stride=None, min_tissue=0.25, top_k=10,
         log_level="info"):
    """Predict with every fold model of the given runs, ensemble them and write a submission CSV.

    With no flags: the latest finished run under runs/, its tfrecords' test shards (sha256-checked),
    8-way dihedral TTA, mean of the folds -> submissions/<run>.csv in exactly the row order and
    header of the dataset's sample_submission.csv when it has one (binary: id,label with the tumour
    probability, as Kaggle HCD scores ROC AUC). The file is validated (every id once, no extras, no
    NaN, probabilities in [0, 1]); a mismatch is an error, never a short file. Per-fold predictions
    go to runs/<run>/fold<k>/test_tta<n>.csv and the ensembled probabilities to
    submissions/<name>_probs.csv; labeled test sets are scored.

    --input predicts a folder (or glob) of new images: each goes through the run's stored size and
    stain normalization and the same antialiased resize as the training records; images in folders
    named after the classes are scored. --slides tiles whole-slide images at the training resolution
    and writes tiles.csv, heatmap.png, overlay.png and a GeoJSON per slide, plus slides.csv.

    Examples:
        python predict.py
        python predict.py --runs=runs/resnet50,runs/efficientnetb0 --run_weights=0.6,0.4 --ensemble=rank
        python predict.py --oof                     # CV score with the same TTA as the submission
        python predict.py --input=new_patches/ --predictions=new.csv
        python predict.py --slides=slides/ --out_dir=slide_maps --stride=48

    Args:
        runs: comma list of run directories (runs/<name>); default the most recent finished run.
        runs_dir: where to look for the most recent run.
        tfrecords: test shards to predict; default the folder the runs were trained on.
        tta: number of dihedral transforms averaged: 1, 2, 4 or 8.
        ensemble: mean | gmean | rank, across folds and then across runs.
        run_weights: comma list, one weight per run (default equal). Old name: --weights.
        format: multi-class submissions: label (the class) | probs (one column per class). Old name:
            --output.
        name: submission name (submissions/<name>.csv); default the run names joined by '+'.
        out_dir: where submissions go (default submissions/); with --slides, where the slide maps
            go (default slide_maps/).
        oof: also recompute every fold's OOF predictions with the same TTA and print the pooled CV
            score and the mean of the folds' scores.
        batch_size: inference batch size (large keeps the device busy).
        precision: auto (mixed_float16 on GPUs with tensor cores, else float32) | float32 |
            mixed_float16 | mixed_bfloat16.
        input: a folder or glob of new images to predict instead of the test shards.
        predictions: with --input, the predictions CSV (unreadable images go to <name>_rejects.csv).
            Old name: --out.
        slides: a whole-slide image or a folder of them (.svs .ndpi .mrxs .tif ...) to map.
        mpp: with --slides: microns per pixel of level 0 for slides whose metadata lacks it.
        stride: with --slides: tile stride in level-0 pixels (default: the tile size, no overlap).
        min_tissue: with --slides: minimum tissue fraction of a tile to be predicted.
        top_k: with --slides: the slide score is the mean of the top-k tile probabilities.
        log_level: debug | info | warning | error.

    Returns:
        The submission's path, row count and test scores when the test set is labeled.
    """
    flags = dict(locals())
    from histofold.config import PredictConfig

    config = PredictConfig.from_flags(**flags)
    setup_logging(config.log_level)
    from histofold.predict import run

    return run(config)


if __name__ == "__main__":
    run_cli(main)
