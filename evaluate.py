"""Evaluate trained runs from their OOF predictions into a report worth publishing (see --help)."""
from histofold.cli import run_cli, setup_logging, to_list


def main(*, runs="", runs_dir="runs", compare="", name="", out_dir="reports", oof="oof.csv",
         gradcam=True, n_gradcam=4, n_boot=1000, tfrecords=""):
    """Write reports/<name>/: metrics.json, report.md and a self-contained report.html.

    With no flags: every fold of the latest run under runs/. The report holds per-fold and overall
    out-of-fold metrics (binary: ROC AUC with a bootstrap 95% CI, accuracy, precision, recall/
    sensitivity, specificity, F1, balanced accuracy at 0.5 and at the Youden threshold; multi-class:
    accuracy, macro/weighted P/R/F1, one-vs-rest AUCs, Cohen's kappa), mean +/- std across folds,
    ROC and precision-recall curves, confusion matrices, a reliability diagram with ECE, training
    curves, class balance per fold and a Grad-CAM gallery of the most confident TP/FP/FN/TN.

    Examples:
        python evaluate.py
        python evaluate.py --runs=runs/simple_cnn --compare=runs/simple_cnn_wide
        python evaluate.py --oof=oof_tta8.csv      # after predict.py --oof

    Args:
        runs: the run to report (runs/<name> or one fold dir); default the latest run.
        runs_dir: where to look for the latest run.
        compare: comma list of other runs for a side-by-side table, overlaid ROC curves and the
            AUC difference with its paired bootstrap CI (joined on id).
        name: report name (reports/<name>/); default the run name.
        out_dir: where reports go.
        oof: which OOF file of each fold to read (oof.csv from train.py, or oof_tta<n>.csv from
            predict.py --oof).
        gradcam: include the Grad-CAM gallery (rebuilds each fold model from its run directory).
        n_gradcam: images per gallery row (TP, FP, FN, TN).
        n_boot: bootstrap resamples for confidence intervals.
        tfrecords: where the images for Grad-CAM are; default the run's tfrecords.
    """
    import os

    from histofold import report, runs as runs_mod

    setup_logging()
    run_list = to_list(runs) or [runs_mod.latest_run(runs_dir)]
    if len(run_list) > 1:
        raise ValueError("--runs takes one run; put the others in --compare=")
    run = run_list[0]
    fold_dirs = runs_mod.complete_fold_dirs(run)
    compare_runs = to_list(compare)
    for r in compare_runs:
        runs_mod.complete_fold_dirs(r)  # a clear error now if a compared run is incomplete
    name = name or os.path.basename(os.path.normpath(run if not run.rstrip("/").split("/")[-1]
                                                     .startswith("fold") else os.path.dirname(run)))
    callbacks = {}
    if gradcam:
        loader = runs_mod.image_loader(tfrecords or None)
        callbacks = dict(load_model=lambda d: runs_mod.load_run_model(d)[0],
                         load_images=lambda ids: loader(ids, run_dir=fold_dirs[0]))
    return report.build_report(fold_dirs, out_dir=out_dir, name=name, compare=compare_runs or None,
                               oof_name=oof, gradcam=bool(gradcam), n_gradcam=int(n_gradcam),
                               n_boot=int(n_boot), tfrecords=tfrecords or None, **callbacks)


if __name__ == "__main__":
    run_cli(main)
