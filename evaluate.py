"""Evaluate trained runs from their OOF predictions into a report worth publishing (see --help)."""
from histofold.cli import run_cli, setup_logging


def main(*, runs="", runs_dir="runs", compare="", name="", out_dir="reports", oof_file="oof.csv",
         gradcam=True, n_gradcam=4, n_boot=1000, tfrecords="", log_level="info"):
    """Write reports/<name>/: metrics.json, report.md and a self-contained report.html.

    With no flags: every fold of the latest finished run under runs/. The report holds the run's
    settings, per-fold and pooled out-of-fold metrics (binary: ROC AUC with a bootstrap 95% CI,
    accuracy, precision, recall/sensitivity, specificity, F1, balanced accuracy at 0.5 and at the
    Youden threshold; multi-class: accuracy, macro/weighted P/R/F1, one-vs-rest AUCs, Cohen's kappa),
    the mean of the folds' AUCs beside the pooled one (with a note when they diverge), test-set
    metrics when predict.py scored a labeled test set, slide-level metrics when the predictions
    carry slide ids, ROC and precision-recall curves, confusion matrices, a reliability diagram with
    ECE, training curves, class balance per fold and a Grad-CAM gallery of the most confident
    TP/FP/FN/TN.

    Examples:
        python evaluate.py
        python evaluate.py --runs=runs/simple_cnn --compare=runs/simple_cnn_wide
        python evaluate.py --oof_file=oof_tta8.csv      # after predict.py --oof

    Args:
        runs: the run to report (runs/<name> or one fold dir); default the latest finished run.
        runs_dir: where to look for the latest run.
        compare: comma list of other runs for a side-by-side table, overlaid ROC curves and the
            AUC difference with its paired bootstrap CI (joined on id).
        name: report name (reports/<name>/); default the run name.
        out_dir: where reports go.
        oof_file: which OOF file of each fold to read (oof.csv from train.py, or oof_tta<n>.csv
            from predict.py --oof). Old name: --oof.
        gradcam: include the Grad-CAM gallery (rebuilds each fold model from its run directory).
        n_gradcam: images per gallery row (TP, FP, FN, TN).
        n_boot: bootstrap resamples for confidence intervals.
        tfrecords: where the images for Grad-CAM are; default the run's tfrecords.
        log_level: debug | info | warning | error.

    Returns:
        The report's paths and headline metrics: pooled OOF AUC and its CI, mean fold AUC and its
        sd (auc_note when they diverge), test and slide-level AUCs when the report has them.
    """
    flags = dict(locals())
    from histofold.config import EvaluateConfig

    config = EvaluateConfig.from_flags(**flags)
    setup_logging(config.log_level)
    from histofold.report import evaluate

    return evaluate(config)


if __name__ == "__main__":
    run_cli(main)
