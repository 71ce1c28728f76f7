"""Predict the test set with TTA and fold/run ensembles into a validated submission (see --help)."""
from histofold.cli import run_cli, setup_logging, to_list


def main(*, runs="", runs_dir="runs", tfrecords="", tta=8, ensemble="mean", weights="", output="label",
         name="", out_dir="submissions", oof=False, batch_size=256, precision="auto", input="", out=""):
    """Predict with every fold model of the given runs, ensemble them and write a submission CSV.

    With no flags: the latest run under runs/, its tfrecords' test shards, 8-way dihedral TTA, mean of
    the folds -> submissions/<run>.csv in exactly the row order and header of the dataset's
    sample_submission.csv when it has one (binary: id,label with the tumour probability, as Kaggle
    HCD scores ROC AUC). The file is validated (every id once, no extras, no NaN, probabilities in
    [0, 1]); a mismatch is an error, never a short file. Per-fold predictions go to
    runs/<run>/fold<k>/test_tta<n>.csv and the ensembled probabilities to submissions/<name>_probs.csv.

    Examples:
        python predict.py
        python predict.py --runs=runs/resnet50,runs/efficientnetb0 --weights=0.6,0.4 --ensemble=rank
        python predict.py --oof                     # CV score with the same TTA as the submission
        python predict.py --input=new_patches/ --out=predictions.csv

    Args:
        runs: comma list of run directories (runs/<name>); default the most recent run.
        runs_dir: where to look for the most recent run.
        tfrecords: test shards to predict; default the directory the runs were trained on.
        tta: number of dihedral transforms averaged: 1, 2, 4 or 8.
        ensemble: mean | gmean | rank, across folds and then across runs.
        weights: comma list, one weight per run (default equal).
        output: multi-class submissions: label (the class) | probs (one column per class).
        name: submission name (submissions/<name>.csv); default the run names joined by '+'.
        out_dir: where submissions go.
        oof: also recompute every fold's OOF predictions with the same TTA and print the CV score.
        batch_size: inference batch size (large keeps the device busy).
        precision: auto (mixed_float16 on GPUs with tensor cores, else float32) | float32 |
            mixed_float16 | mixed_bfloat16.
        input: a folder or glob of new images to predict instead of the test shards.
        out: with --input, the predictions CSV (default predictions.csv).
    """
    from histofold.predict import PredictConfig, predict_images, run_predict

    setup_logging()
    run_list = tuple(to_list(runs))
    if input:
        if len(run_list) > 1:
            raise ValueError("--input predicts with one run; pass a single --runs=runs/<name>")
        from histofold import runs as runs_mod

        run = run_list[0] if run_list else runs_mod.latest_run(runs_dir)
        summary = predict_images(run=run, input=input, out=out or "predictions.csv", tta=int(tta),
                                 batch_size=int(batch_size), ensemble_method=ensemble)
    else:
        cfg = PredictConfig(runs=run_list, runs_dir=runs_dir, tfrecords=tfrecords, tta=int(tta),
                            ensemble=ensemble, weights=tuple(float(w) for w in to_list(weights)),
                            output=output, name=name, out_dir=out_dir, oof=bool(oof),
                            batch_size=int(batch_size), precision=precision)
        if cfg.tta not in (1, 2, 4, 8):
            raise ValueError(f"--tta={tta}: choose 1, 2, 4 or 8")
        summary = run_predict(cfg)
    return summary  # fire prints it, one `key: value` line each


if __name__ == "__main__":
    run_cli(main)
