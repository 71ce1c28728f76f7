"""Export a trained run as one serving model with its preprocessing inside (see --help)."""
from histofold.cli import run_cli, setup_logging


def main(*, run="", runs_dir="runs", fold="all", out="", tta=1, formats="keras,savedmodel,onnx",
         log_level="info"):
    """Write exports/<name>/: model.keras, saved_model/, model.onnx and export.json.

    The model takes raw uint8 RGB images (B, h, w, 3) of any size and returns float32 class
    probabilities (B, K), one column per class in export.json's order. Inside it: the resize to the
    stored patch size (antialiased bilinear, rounded to uint8 levels; untouched at that size), the
    dataset's stain normalization when it was prepared with one, the resize to the model input, the
    model's own scaling, the --tta dihedral transforms and the mean over folds - the steps
    predict.py takes, so at the stored size it gives predict.py's numbers. Load it with
    keras.saving.load_model after `import histofold.export`. The SavedModel (model.export) and
    ONNX (tf2onnx, when installed) are skipped with a note in export.json when they cannot carry
    the graph (stain normalization runs as numpy).

    Examples:
        python export.py
        python export.py --run=runs/resnet50 --fold=0 --out=exports/resnet50_f0
        python export.py --run=runs/resnet50 --tta=8 --formats=keras

    Args:
        run: the run directory (runs/<name>); default the latest finished run under --runs_dir.
        runs_dir: where to look for the latest run.
        fold: a fold number, full (the --fold=full model) or all (every fold, probabilities
            averaged in one model). Also: ensemble (= all).
        out: output folder; default exports/<run name>/ (exports/<run name>_fold<k>/ for one fold).
        tta: dihedral transforms averaged inside the model: 1, 2, 4 or 8 (as predict.py --tta).
        formats: comma list of keras, savedmodel, onnx (keras is always written).
        log_level: debug | info | warning | error.

    Returns:
        The export folder, the files written (or why a format was skipped), folds and classes.
    """
    flags = dict(locals())
    from histofold.config import ExportConfig

    config = ExportConfig.from_flags(**flags)
    setup_logging(config.log_level)
    from histofold.export import export

    return export(config)


if __name__ == "__main__":
    run_cli(main)
