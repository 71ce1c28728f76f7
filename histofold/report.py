"""Evaluation reports of fold runs: OOF metrics, figures, Grad-CAM gallery, run comparison -> reports/<name>/.

    reports/<name>/metrics.json   every number in the report (NaN written as null)
    reports/<name>/report.md      tables + links to figures/*.png
    reports/<name>/report.html    the same, self-contained (figures embedded as base64 PNG)
    reports/<name>/figures/*.png
"""
from __future__ import annotations

import base64
import datetime
import html
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from histofold import io, metrics, plots
from histofold import runs as runs_mod

FIG_DIR = "figures"


@dataclass
class Run:
    """One evaluated run: its fold directories, configs, histories and concatenated OOF."""
    name: str
    fold_dirs: list[str]
    configs: list[dict]
    histories: list[pd.DataFrame | None]
    oof: pd.DataFrame                      # id, label, fold, p_<class>...
    classes: list[str] = field(default_factory=list)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def probs(self, frame: pd.DataFrame | None = None) -> np.ndarray:
        frame = self.oof if frame is None else frame
        return frame[[f"p_{c}" for c in self.classes]].to_numpy(np.float64)  # (N, K)


# ------------------------------------------------------------------------------------------ entry point

def evaluate(config) -> dict:
    """evaluate.py: the report of one finished run (an EvaluateConfig), Grad-CAM from its own models."""
    from histofold import runs

    run_path = config.runs[0] if config.runs else runs.latest_run(config.runs_dir)
    fold_dirs = runs.fold_dirs(run_path)
    for other in config.compare:
        runs.fold_dirs(other)  # a clear error now if a compared run is unfinished
    name = config.name or runs.run_name(run_path)
    callbacks = {}
    if config.gradcam:
        callbacks = dict(load_model=lambda d: runs.RunDir(d).build_model(),
                         load_images=lambda ids: load_images(ids, run_dir=fold_dirs[0],
                                                             tfrecords=config.tfrecords or None))
    return build_report([d.path for d in fold_dirs], out_dir=config.out_dir, name=name,
                        compare=list(config.compare) or None, oof_name=config.oof_file, gradcam=config.gradcam,
                        n_gradcam=config.n_gradcam, n_boot=config.n_boot, tfrecords=config.tfrecords or None,
                        **callbacks)


def load_images(ids, *, run_dir, tfrecords: str | None = None):
    """(N, H, W, 3) uint8 stored pixels of `ids` from the run's tfrecords (the labeled shards), in order.

    Scans shards in order and stops once every id is found; DataError naming ids that are not there."""
    from histofold.errors import DataError
    from histofold.manifest import Manifest

    manifest = Manifest.load(tfrecords or run_dir.resolved()["tfrecords"])
    wanted, found = {str(i) for i in ids}, {}
    for path in manifest.files("train"):
        from histofold import records

        for row in records.read_shard(path, manifest.encoding, images=True):
            if row["id"] in wanted:
                found[row["id"]] = row["image"]
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise DataError(f"{len(missing)} ids not in the tfrecords of {run_dir.path} (e.g. {sorted(missing)[:3]}); "
                        "pass --tfrecords= where they were prepared")
    return np.stack([found[str(i)] for i in ids])


def build_report(run_dirs: list[str], *, out_dir: str, name: str, compare: list[str] | None = None,
                 gradcam: bool = True, tfrecords: str | None = None, n_gradcam: int = 4,
                 load_images=None, load_model=None, n_boot: int = 1000, seed: int = 0,
                 oof_name: str = "oof.csv") -> dict:
    """Evaluate the OOF predictions of `run_dirs` (fold dirs, or run dirs expanded to their folds).

    load_images(ids) -> (n, H, W, 3) uint8 and load_model(fold_dir) -> keras.Model feed the Grad-CAM
    gallery; without them (or with gradcam=False) the gallery is skipped with a note. `compare` runs
    are joined on id with this one. `tfrecords` is only recorded (the caller's callbacks read images).
    `oof_name` picks each fold's OOF file (oof.csv, or oof_tta<n>.csv written by predict.py --oof).
    Returns {"report_dir", "metrics_json", "report_md", "report_html", "figures", headline metrics}.
    """
    run = load_run(run_dirs, name=name, oof_name=oof_name)
    report_dir = io.join(out_dir, name)
    io.makedirs(io.join(report_dir, FIG_DIR))
    results = _metrics_section(run, n_boot=n_boot, seed=seed)
    results["settings"] = run_settings(run)
    results["test"] = _test_section(run, n_boot=n_boot, seed=seed, oof_name=oof_name)
    results["tta"] = _tta_section(run, results["test"])
    figures = _figures(run, results)
    others = [load_run([c], name=runs_mod.run_name(c), oof_name=oof_name) for c in (compare or [])]
    if others:
        results["compare"] = [_compare(run, o, n_boot=n_boot, seed=seed) for o in others]
        figures["compare_roc"] = plots.fig_compare_roc(run, others)
    results["gradcam"], gallery = _gradcam_section(run, enabled=gradcam, n=n_gradcam, load_images=load_images,
                                                   load_model=load_model)
    if gallery is not None:
        figures["gradcam"] = gallery
    paths = _save_figures(figures, report_dir)
    results["meta"] = _meta(run, tfrecords=tfrecords, figures=paths)
    out = _write_outputs(run, results, paths, report_dir=report_dir)
    return {**out, "report_dir": report_dir, "figures": paths, **_headline(run, results)}


def load_run(run_dirs: list[str], *, name: str, oof_name: str = "oof.csv") -> Run:
    """Read config.json, history.csv and the OOF file of every finished fold; classes must agree."""
    from histofold.errors import DataError

    fold_dirs = [d for r in run_dirs for d in runs_mod.fold_dirs(r) if d.fold != "full"]
    if not fold_dirs:
        raise DataError(f"{', '.join(run_dirs)} holds no fold with out-of-fold predictions (a --fold=full "
                        "run has none): train with --fold=all to evaluate OOF")
    configs = [{**d.raw_config(), **d.resolved()} for d in fold_dirs]
    classes = [str(c) for c in configs[0]["classes"]]
    for d, c in zip(fold_dirs, configs):
        if [str(x) for x in c["classes"]] != classes:
            raise DataError(f"{d.file('config.json')} has classes {c['classes']} but {fold_dirs[0].path} has "
                            f"{classes}: report folds of one dataset together")
    oofs = [_read_oof(d, classes, oof_name) for d in fold_dirs]
    oof = pd.concat(oofs, ignore_index=True)
    dup = oof["id"][oof["id"].duplicated()]
    if len(dup):
        raise DataError(f"ids {list(dup[:5])} appear in the OOF of more than one fold of {name}: "
                        f"pass each fold directory once, from one run")
    return Run(name=name, fold_dirs=[d.path for d in fold_dirs], configs=configs,
               histories=[d.history() for d in fold_dirs], oof=oof, classes=classes)


def _read_oof(fold_dir, classes: list[str], oof_name: str = "oof.csv") -> pd.DataFrame:
    from histofold.errors import DataError

    oof = fold_dir.oof(oof_name)
    path = fold_dir.file(oof_name)
    need = ["id", "label"] + [f"p_{c}" for c in classes]
    lacking = [c for c in need if c not in oof.columns]
    if lacking:
        raise DataError(f"{path} lacks columns {lacking}; expected id,label,fold,p_<class> for classes {classes}")
    if "fold" not in oof.columns:
        oof.insert(2, "fold", int(fold_dir.fold))
    bad = oof[need[2:]].isna().any(axis=1) | (oof["label"] < 0)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} rows have NaN probabilities or no label "
                        f"(e.g. id {oof.loc[bad, 'id'].iloc[0]}); {fold_dir.retrain_hint()}")
    return oof


# ------------------------------------------------------------------------------------------ metrics

def _metrics_section(run: Run, *, n_boot: int, seed: int) -> dict:
    """Overall OOF metrics, per-fold metrics and their mean/std, calibration."""
    y, P = run.oof["label"].to_numpy(int), run.probs()
    folds = sorted(run.oof["fold"].unique())
    per_fold = []
    for f in folds:
        sel = (run.oof["fold"] == f).to_numpy()
        per_fold.append({"fold": int(f), **_evaluate(run, y[sel], P[sel], n_boot=n_boot, seed=seed)})
    overall = _evaluate(run, y, P, n_boot=n_boot, seed=seed)
    summary = metrics.summarize_folds([_flat(m) for m in per_fold])
    summary.pop("fold", None)
    conf_input = P[:, 1] if run.binary else P
    calibration = {"ece": metrics.expected_calibration_error(y, conf_input),
                   "bins": metrics.reliability_bins(y, conf_input)}
    summary = {k: {"mean": m, "std": s} for k, (m, s) in summary.items()}
    key = "auc" if run.binary else "macro_auc"
    agreement = pooled_vs_folds(overall[key], summary.get(key, {}).get("mean", math.nan),
                                summary.get(key, {}).get("std", math.nan), metric=key)
    return {"task": "binary" if run.binary else "multiclass", "overall": overall, "folds": per_fold,
            "summary": summary, "pooled_vs_folds": agreement, "calibration": calibration,
            "slides": slide_metrics(run.oof, run.classes)}


AUC_GAP = 0.01  # |pooled - mean fold| AUC beyond this (or beyond the folds' sd) gets the note below
DIVERGE_NOTE = ("pooled OOF AUC mixes fold calibrations; folds' scores are not on one scale - see per-fold "
                "table")


def pooled_vs_folds(pooled: float, mean: float, sd: float, *, metric: str = "auc") -> dict:
    """The pooled OOF AUC beside the mean fold AUC +- sample sd, and whether they diverge.

    Pooling ranks every image against images of other folds, scored by other models: when the fold
    models are calibrated differently the pooled AUC drops below (or rises above) the folds' own. The
    two diverge when |pooled - mean| > AUC_GAP or > sd (sd NaN with one fold: only the first test)."""
    gap = float(pooled) - float(mean)
    diverge = math.isfinite(gap) and (abs(gap) > AUC_GAP or (math.isfinite(sd) and abs(gap) > sd))
    return {"metric": metric, "pooled": float(pooled), "mean": float(mean), "sd": float(sd), "gap": gap,
            "diverge": bool(diverge), "note": DIVERGE_NOTE if diverge else ""}


def _evaluate(run: Run, y: np.ndarray, P: np.ndarray, *, n_boot: int, seed: int) -> dict:
    if run.binary:
        return metrics.binary_report(y, P[:, 1], n_boot=n_boot, seed=seed)
    return metrics.multiclass_metrics(y, P, class_names=run.classes)


def _flat(m: dict) -> dict:
    """Scalar metrics of one fold, binary threshold metrics prefixed (`at_0.5/f1`)."""
    out = {k: v for k, v in m.items() if _is_number(v)}
    for key in ("at_0.5", "at_youden"):
        if key in m:
            out.update({f"{key}/{k}": v for k, v in m[key].items() if _is_number(v)})
    return out


def _headline(run: Run, results: dict) -> dict:
    """What evaluate.py prints: pooled OOF metrics, the mean fold AUC +- sd beside the pooled one (and
    the note when they diverge), held-out test and slide-level metrics when the report has them."""
    o, agree = results["overall"], results["pooled_vs_folds"]
    if run.binary:
        out = {"auc": o["auc"], "auc_ci": o["auc_ci"], "mean_fold_auc": agree["mean"], "fold_auc_sd": agree["sd"],
               "accuracy": o["at_0.5"]["accuracy"]}
    else:
        out = {"accuracy": o["accuracy"], "macro_f1": o["macro_f1"], "macro_auc": o["macro_auc"],
               "mean_fold_macro_auc": agree["mean"], "fold_macro_auc_sd": agree["sd"]}
    if agree["diverge"]:
        out["auc_note"] = agree["note"]
    test = results.get("test") or {}
    if "overall" in test:
        t = test["overall"]
        out.update({"test_auc": t["auc"], "test_accuracy": t["at_0.5"]["accuracy"]} if run.binary else
                   {"test_accuracy": t["accuracy"], "test_macro_f1": t["macro_f1"]})
    for where, sl in (("", results.get("slides")), ("test_", test.get("slides"))):
        if sl and "roc_auc" in sl:
            out.update({f"{where}slide_auc": sl["roc_auc"], f"{where}n_slides": sl["n_slides"]})
    return out


def _compare(run: Run, other: Run, *, n_boot: int, seed: int) -> dict:
    """Metrics of both runs on their shared ids and the paired-bootstrap difference (this - other)."""
    if other.classes != run.classes:
        raise ValueError(f"--compare run {other.name} has classes {other.classes}, {run.name} has {run.classes}")
    joined = run.oof.merge(other.oof, on="id", suffixes=("", "_other"))
    if joined.empty:
        raise ValueError(f"{run.name} and {other.name} share no OOF ids: compare runs trained on the same folds")
    if (joined["label"] != joined["label_other"]).any():
        raise ValueError(f"{run.name} and {other.name} disagree on labels of shared ids: different datasets?")
    y = joined["label"].to_numpy(int)
    pa = run.probs(joined)
    pb = joined[[f"p_{c}_other" for c in run.classes]].to_numpy(np.float64)
    out = {"name": other.name, "n_shared": int(len(joined)), "n_self": int(len(run.oof)),
           "n_other": int(len(other.oof))}
    if run.binary:
        out.update(self=metrics.binary_metrics(y, pa[:, 1]), other=metrics.binary_metrics(y, pb[:, 1]),
                   auc_diff=metrics.bootstrap_auc_diff(y, pa[:, 1], pb[:, 1], n_boot=n_boot, seed=seed))
    else:
        out.update(self=_scalars(metrics.multiclass_metrics(y, pa, class_names=run.classes)),
                   other=_scalars(metrics.multiclass_metrics(y, pb, class_names=run.classes)),
                   accuracy_diff=metrics.bootstrap_accuracy_diff(y, pa.argmax(1), pb.argmax(1),
                                                                 n_boot=n_boot, seed=seed))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if _is_number(v)}


def _meta(run: Run, *, tfrecords, figures: dict) -> dict:
    c = run.configs[0]
    return {"name": run.name, "fold_dirs": run.fold_dirs, "classes": run.classes, "arch": c.get("arch"),
            "image_size": c.get("image_size"), "tfrecords": tfrecords or c.get("tfrecords"),
            "monitor": c.get("monitor"), "n_oof": int(len(run.oof)),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "figures": figures}


# ------------------------------------------------------------------------------------------ settings

# (label, how to read it from a fold's config.json: TrainConfig flags merged with its "resolved" facts)
SETTINGS = [
    ("architecture", lambda c: c.get("arch")),
    ("weights", lambda c: c.get("weights_resolved", c.get("weights"))),
    ("model input size", lambda c: _size(c.get("image_size"))),
    ("stored patch size", lambda c: _size(c.get("stored_image_size"))),
    ("epochs", lambda c: c.get("epochs")),
    ("batch size (global)", lambda c: c.get("global_batch", c.get("batch_size"))),
    ("learning rate (flag / scaled)", lambda c: _parts(c.get("lr"), c.get("lr_scaled", c.get("lr")))),
    ("optimizer, weight decay", lambda c: _parts(c.get("optimizer"), c.get("weight_decay"), sep=", ")),
    ("schedule, warm-up", lambda c: _parts(c.get("schedule"), c.get("warmup"), sep=", ")),
    ("augmentation", lambda c: c.get("augment")),
    ("mixup / label smoothing / focal", lambda c: _parts(c.get("mixup"), c.get("label_smoothing"), c.get("focal"))),
    ("class weight", lambda c: _short_value(c.get("class_weight"))),
    ("EMA / dropout", lambda c: _parts(c.get("ema"), c.get("dropout"))),
    ("stain normalization", lambda c: (c.get("stain") or {}).get("method", "none")),
    ("OOF TTA", lambda c: c.get("oof_tta")),
    ("folds (validation / all)", lambda c: _folds_text(c)),
    ("seed", lambda c: c.get("seed")),
    ("precision", lambda c: c.get("precision")),
    ("strategy", lambda c: c.get("strategy")),
    ("monitor, patience", lambda c: _parts(c.get("monitor"), c.get("patience"), sep=", ")),
    ("fine-tuned from", lambda c: c.get("init_run") or "-"),
    ("tfrecords", lambda c: c.get("tfrecords")),
]


def run_settings(run: Run) -> list[dict]:
    """The run's settings from its folds' config.json: [{setting, value, varies}], value of the first
    fold; `varies` lists every fold's value when the folds were not trained alike (fold-specific
    entries such as the validation fold are shown per fold by construction)."""
    rows = []
    for label, read in SETTINGS:
        values = [_short_value(read(c)) for c in run.configs]
        fold_specific = label.startswith("folds")
        varies = "" if fold_specific or len(set(values)) == 1 else " | ".join(values)
        value = ", ".join(values) if fold_specific else values[0]
        rows.append({"setting": label, "value": value, "varies": varies})
    return rows


def _size(v) -> str:
    return "x".join(str(int(x)) for x in v) if isinstance(v, (list, tuple)) else _short_value(v)


def _short_value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_short_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None or v == "" else str(v)


def _parts(*values, sep: str = " / ") -> str:
    return sep.join(_short_value(v) for v in values)


def _folds_text(c: dict) -> str:
    if "val_folds" not in c:
        return "-"
    val, train = c.get("val_folds") or [], c.get("train_folds") or []
    return f"{','.join(map(str, val)) or 'none (full)'} / {len(val) + len(train)}"


# ------------------------------------------------------------------------------------------ held-out test

TEST_RE = re.compile(r"^test_tta(\d+)\.csv$")
OOF_TTA_RE = re.compile(r"^oof_tta(\d+)\.csv$")


def _tta_files(fold_dirs: list[str], pattern: re.Pattern) -> list[int]:
    """TTA sizes n whose file (test_tta<n>.csv / oof_tta<n>.csv) every fold directory holds, ascending."""
    common = None
    for d in fold_dirs:
        found = {int(m.group(1)) for m in map(pattern.match, io.listdir(d)) if m}
        common = found if common is None else common & found
    return sorted(common or ())


def _test_frames(run: Run, n: int) -> list[pd.DataFrame]:
    """Every fold's test_tta<n>.csv, in fold order."""
    return [io.read_csv(io.join(d, f"test_tta{n}.csv"), dtype={"id": str, "slide": str}) for d in run.fold_dirs]


def test_frame(run: Run, n: int, frames: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """The fold ensemble (mean, as predict.py --ensemble=mean) of the folds' test_tta<n>.csv (`frames`, read
    when not given), with labels (and the slide column when the predictions carry one), in the first fold's
    row order."""
    from histofold import ensemble

    frames = frames if frames is not None else _test_frames(run, n)
    ens = ensemble.ensemble(frames, method="mean", names=[io.join(d, f"test_tta{n}.csv") for d in run.fold_dirs])
    extra = [c for c in ("label", "slide") if c in frames[0]]
    return ens.merge(frames[0][["id", *extra]], on="id", how="left")


def _test_section(run: Run, *, n_boot: int, seed: int, oof_name: str) -> dict:
    """Metrics of the held-out test set when predict.py scored it (test_tta<n>.csv in every fold) and its
    rows are labeled: the fold ensemble overall, each fold model alone, slide-level when slide ids exist.
    The TTA is the one of `oof_name` (oof_tta<n>.csv) when predicted, else the largest."""
    from histofold.errors import DataError

    sizes = _tta_files(run.fold_dirs, TEST_RE)
    if not sizes:
        return {"skipped": "no test predictions: run predict.py (it writes test_tta<n>.csv into every fold)"}
    m = OOF_TTA_RE.match(oof_name)
    n = int(m.group(1)) if m and int(m.group(1)) in sizes else sizes[-1]
    frames = _test_frames(run, n)
    try:
        frame = test_frame(run, n, frames)
    except DataError as e:  # e.g. a stale test_tta<n>.csv predicted from other tfrecords
        return {"skipped": f"test predictions do not ensemble: {e}", "tta": n}
    if "label" not in frame or (frame["label"] < 0).any() or frame["label"].isna().any():
        return {"skipped": f"the test set is unlabeled ({len(frame)} images): no test metrics", "tta": n}
    y = frame["label"].to_numpy(int)
    folds = []
    for d, fold_frame in zip(run.fold_dirs, frames):
        f = fold_frame.set_index("id").loc[frame["id"]]
        folds.append({"fold": io.basename(d), **_flat(_evaluate(run, y, run.probs(f), n_boot=n_boot, seed=seed))})
    return {"tta": n, "ensemble": "mean", "n": int(len(frame)), "sizes": sizes,
            "overall": _evaluate(run, y, run.probs(frame), n_boot=n_boot, seed=seed), "folds": folds,
            "slides": slide_metrics(frame, run.classes)}


# ------------------------------------------------------------------------------------------ TTA

def _score(run: Run, frame: pd.DataFrame) -> float:
    """The TTA figure's number: ROC AUC of P(class 1) (binary) or accuracy (multi-class)."""
    y, P = frame["label"].to_numpy(int), run.probs(frame)
    return metrics.fast_auc(y, P[:, 1]) if run.binary else float((P.argmax(1) == y).mean())


def _tta_section(run: Run, test: dict) -> dict:
    """The score per TTA size for the pooled OOF (oof.csv with the run's --oof_tta, oof_tta<n>.csv from
    predict.py --oof) and for the held-out test fold ensemble (test_tta<n>.csv), kept apart."""
    oof = {}
    oof_tta = run.configs[0].get("oof_tta")
    if oof_tta is not None and all(c.get("oof_tta") == oof_tta for c in run.configs):
        oof[int(oof_tta)] = _score(run, run.oof)
    for n in _tta_files(run.fold_dirs, OOF_TTA_RE):
        try:
            frame = load_run(run.fold_dirs, name=run.name, oof_name=f"oof_tta{n}.csv").oof
        except (ValueError, KeyError):  # a partial or stale file: shown nowhere rather than wrong
            continue
        oof[n] = _score(run, frame)
    tests = {}
    if "overall" in test:
        for n in test["sizes"]:
            tests[n] = _score(run, test_frame(run, n))
    return {"metric": "roc_auc" if run.binary else "accuracy", "oof": oof, "test": tests,
            "n_oof": int(len(run.oof)), "n_test": int(test.get("n", 0))}


# ------------------------------------------------------------------------------------------ slides

def slide_metrics(frame: pd.DataFrame, classes: list[str], *, top_k: int = 10) -> dict:
    """Slide-level metrics when the tile predictions carry a `slide` column; {} otherwise.

    A slide's score is `slides.slide_score` of its tiles' P(last class) - the aggregate that
    predict.py --slides writes to slides.csv, with its default top_k - and a slide is positive when any
    of its tiles is labeled with the last class (the positive class of the slide maps)."""
    from histofold.slides import slide_score

    if "slide" not in frame or frame.empty or frame["slide"].isna().all():
        return {}
    pos_col, pos = f"p_{classes[-1]}", len(classes) - 1
    table = pd.DataFrame([{"slide": str(s), "tiles": int(len(g)), "label": int((g["label"] == pos).any()),
                           "score": slide_score(g[pos_col].to_numpy(), top_k)}
                          for s, g in frame.groupby("slide", sort=True)])
    m = metrics.binary_metrics(table["label"].to_numpy(), table["score"].to_numpy())
    out = {"n_slides": int(len(table)), "n_pos": int(table["label"].sum()), "top_k": int(top_k),
           "positive_class": classes[-1], "table": table.to_dict("records"),
           **{k: m[k] for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy")}}
    if table["label"].nunique() == 2:
        out["roc_auc"] = m["roc_auc"]
    else:
        out["note"] = f"all {len(table)} slides are {'positive' if table['label'].all() else 'negative'}: no slide AUC."
    return out


# ------------------------------------------------------------------------------------------ figures

def _figures(run: Run, results: dict) -> dict:
    """name -> matplotlib Figure, in report order."""
    import matplotlib

    with matplotlib.rc_context(plots.STYLE):
        figs = {"roc": plots.fig_roc(run), "pr": plots.fig_pr(run), "confusion": plots.fig_confusion(run),
                "reliability": plots.fig_reliability(run, results["calibration"]),
                "class_balance": plots.fig_class_balance(run)}
        if any(h is not None for h in run.histories):
            figs["training"] = plots.fig_training(run)
        tta = results.get("tta") or {}
        if len(tta.get("oof", {})) + len(tta.get("test", {})) >= 2:
            figs["tta"] = plots.fig_tta(run, tta)
    return figs


# ------------------------------------------------------------------------------------------ Grad-CAM

GALLERY_BINARY = {  # category -> (row filter, sort key: most confident first)
    "TP": (lambda y, p: (y == 1) & (p >= 0.5), lambda p: -p),
    "FP": (lambda y, p: (y == 0) & (p >= 0.5), lambda p: -p),
    "FN": (lambda y, p: (y == 1) & (p < 0.5), lambda p: p),
    "TN": (lambda y, p: (y == 0) & (p < 0.5), lambda p: p),
}


def gallery_picks(run: Run, n: int) -> dict[str, pd.DataFrame]:
    """Most confident OOF rows per outcome: TP/FP/FN/TN (binary) or correct/wrong (multi-class)."""
    y, P = run.oof["label"].to_numpy(int), run.probs()
    if run.binary:
        p = P[:, 1]
        return {name: run.oof.iloc[np.flatnonzero(keep(y, p))[np.argsort(key(p[keep(y, p)]), kind="stable")][:n]]
                for name, (keep, key) in GALLERY_BINARY.items()}
    conf, pred = P.max(1), P.argmax(1)
    picks = {}
    for name, keep in (("correct", pred == y), ("wrong", pred != y)):
        idx = np.flatnonzero(keep)
        picks[name] = run.oof.iloc[idx[np.argsort(-conf[idx], kind="stable")][:n]]
    return picks


def _gradcam_section(run: Run, *, enabled: bool, n: int, load_images, load_model):
    """(metrics entry, Figure or None): Grad-CAM of the most confident picks, each by its own fold's model."""
    if not enabled:
        return {"skipped": "disabled (gradcam=False)"}, None
    if load_images is None or load_model is None:
        return {"skipped": "no load_images/load_model callbacks given: evaluate.py passes them when the "
                           "tfrecords and model weights are available"}, None
    picks = gallery_picks(run, n)
    rows = pd.concat([df.assign(category=cat) for cat, df in picks.items()], ignore_index=True)
    if rows.empty:
        return {"skipped": "no OOF rows to show"}, None
    cells = _gradcam_cells(run, rows, load_images=load_images, load_model=load_model)
    entry = {"categories": {cat: df["id"].tolist() for cat, df in picks.items()},
             "not_localized": [i for i, c in cells.items() if not c["valid"]]}
    import matplotlib

    with matplotlib.rc_context(plots.STYLE):
        fig = plots.fig_gallery(run, picks, cells, n=n)
    return entry, fig


def _gradcam_cells(run: Run, rows: pd.DataFrame, *, load_images, load_model) -> dict:
    """id -> {overlay uint8, valid, text}, one model load per fold."""
    from histofold import gradcam as gc

    cells = {}
    fold_dir_of = {int(c.get("fold", i)): d for i, (c, d) in enumerate(zip(run.configs, run.fold_dirs))}
    for fold, part in rows.groupby("fold"):
        model = load_model(fold_dir_of[int(fold)])
        images = np.asarray(load_images(part["id"].tolist()))  # (n, H, W, 3) uint8
        x = _fit_to_model(images, model)
        maps, valid = gc.gradcam(model, x, return_valid=True)
        for r, img, m, ok in zip(part.itertuples(index=False), images, maps, valid):
            # a map that localizes nothing is not painted: stretching it would invent a pattern
            cells[r.id] = {"overlay": gc.overlay(img, m) if ok else img, "valid": bool(ok),
                           "text": _cell_text(run, r)}
    return cells


def _fit_to_model(images: np.ndarray, model) -> np.ndarray:
    """Stored uint8 pixels -> the model's float32 input (data.model_inputs: the one resize)."""
    from histofold.data import model_inputs

    return model_inputs(images, tuple(model.input_shape[1:3])).numpy()


def _cell_text(run: Run, r) -> str:
    p = np.array([getattr(r, f"p_{c}") for c in run.classes])
    if run.binary:
        return f"{_short(r.id)}\nP({run.classes[1]})={p[1]:.3f}"
    return f"{_short(r.id)}\n{run.classes[int(r.label)]}→{run.classes[int(p.argmax())]} {p.max():.2f}"


def _short(s: str, k: int = 18) -> str:
    s = str(s)
    return s if len(s) <= k else "…" + s[-(k - 1):]


# ------------------------------------------------------------------------------------------ outputs

def _save_figures(figures: dict, report_dir: str) -> dict:
    import io as stdio

    paths = {}
    for key, fig in figures.items():
        rel = f"{FIG_DIR}/{key}.png"
        buf = stdio.BytesIO()
        fig.savefig(buf, format="png", dpi=plots.DPI)
        io.write_bytes(io.join(report_dir, rel), buf.getvalue())
        paths[key] = rel
    return paths


def _write_outputs(run: Run, results: dict, figures: dict, *, report_dir: str) -> dict:
    paths = {k: io.join(report_dir, f) for k, f in
             (("metrics_json", "metrics.json"), ("report_md", "report.md"), ("report_html", "report.html"))}
    io.write_json(paths["metrics_json"], _jsonable(results), indent=2)
    sections = _sections(run, results)
    io.write_text(paths["report_md"], _markdown(run, sections, figures))
    io.write_text(paths["report_html"], _html(run, sections, figures, report_dir=report_dir))
    return paths


def _jsonable(obj):
    """NaN/inf -> None and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# A section is (title, intro text, list of tables, list of figure keys); a table is (header, rows).
def _sections(run: Run, results: dict) -> list[tuple]:
    overall, folds, summary = results["overall"], results["folds"], results["summary"]
    secs = [("Headline", _headline_intro(results), [_headline_table(run, results)], []),
            ("Settings", "From the folds' config.json (flags and what train.py resolved at run time).",
             [_settings_table(results["settings"])], [])]
    if run.binary:
        secs += [("Pooled OOF metrics", _binary_intro(overall), [_binary_overall_table(overall)], []),
                ("Per-fold metrics", "Mean ± sample std across folds in the last row.",
                 [_binary_fold_table(folds, summary)], [])]
    else:
        secs += [("Pooled OOF metrics", "Argmax predictions. " + " ".join(overall["notes"]),
                 [_multi_overall_table(overall), _per_class_table(overall)], []),
                ("Per-fold metrics", "Mean ± sample std across folds in the last row.",
                 [_multi_fold_table(folds, summary)], [])]
    secs += _test_sections(run, results)
    secs += [("ROC curves", "", [], ["roc"]), ("Precision-recall curves", "", [], ["pr"]),
             ("Confusion matrices", "", [], ["confusion"]),
             ("Calibration", f"Expected calibration error (10 equal-width bins): "
                             f"{results['calibration']['ece']:.4f}", [], ["reliability"]),
             ("Training curves", "" if any(h is not None for h in run.histories)
              else "No history.csv in the fold directories.", [], ["training"]),
             ("Class balance", "", [], ["class_balance"])]
    if "tta" in results.get("meta", {}).get("figures", {}):
        secs.append(("Test-time augmentation", "Pooled OOF and held-out test scores per TTA size, in "
                     "separate panels: they are different images scored by different models.", [], ["tta"]))
    secs.append(("Grad-CAM gallery", results["gradcam"].get("skipped", "Heatmaps of the predicted class on the "
                 "most confident OOF images of each outcome, each from the model that did not train on it."),
                 [], ["gradcam"]))
    if results.get("compare"):
        secs.append(("Comparison with other runs", "Joined on id; differences are this run minus the other, "
                     "with paired bootstrap 95% CIs.", [_compare_table(run, results["compare"])], ["compare_roc"]))
    return secs


def _headline_intro(results: dict) -> str:
    a = results["pooled_vs_folds"]
    name = "AUC" if a["metric"] == "auc" else "macro AUC"
    text = (f"Pooled OOF {name} {_f(a['pooled'])}: every out-of-fold prediction ranked together; mean fold "
            f"{name} {_f(a['mean'])} ± {_f(a['sd'])} (sample sd): each fold scored by its own model. ")
    if a["diverge"]:
        return text + f"They differ by {a['gap']:+.4f}: {a['note']}."
    return text + f"They agree (difference {a['gap']:+.4f}, within {AUC_GAP} and one sd)."


def _headline_table(run: Run, results: dict) -> tuple:
    a, o = results["pooled_vs_folds"], results["overall"]
    rows = [[("ROC AUC" if run.binary else "macro one-vs-rest AUC"), _f(a["pooled"]), f"{_f(a['mean'])} ± {_f(a['sd'])}"]]
    acc = o["at_0.5"]["accuracy"] if run.binary else o["accuracy"]
    rows.append(["accuracy" + (" at 0.5" if run.binary else ""), _f(acc), _pm(results["summary"],
                                                                          "at_0.5/accuracy" if run.binary else "accuracy")])
    test = results.get("test") or {}
    header = ["metric", "pooled OOF", "mean fold ± sd"]
    if "overall" in test:
        t = test["overall"]
        header.append(f"held-out test (fold ensemble, TTA x{test['tta']})")
        rows[0].append(_f(t["auc"] if run.binary else t["macro_auc"]))
        rows[1].append(_f(t["at_0.5"]["accuracy"] if run.binary else t["accuracy"]))
    for where, sl in (("OOF", results.get("slides")), ("test", test.get("slides"))):
        if sl:
            row = [f"slide ROC AUC ({where}, {sl['n_slides']} slides)", "", ""] + ([""] if "overall" in test else [])
            row[1 if where == "OOF" else 3] = _f(sl.get("roc_auc"))
            rows.append(row)
    return header, rows


def _settings_table(settings: list[dict]) -> tuple:
    varies = any(r["varies"] for r in settings)
    header = ["setting", "value"] + (["per fold (differs)"] if varies else [])
    return header, [[r["setting"], r["value"]] + ([r["varies"]] if varies else []) for r in settings]


def _test_sections(run: Run, results: dict) -> list[tuple]:
    """Held-out test metrics (fold ensemble and each fold model) and slide-level metrics, when present."""
    test, secs = results.get("test") or {}, []
    if "overall" in test:
        t = test["overall"]
        intro = (f"{test['n']} labeled test images scored by predict.py (test_tta{test['tta']}.csv of every fold), "
                 f"fold models averaged (mean). ")
        keys = TEST_KEYS[run.binary]
        rows = [[r["fold"]] + [_f(r.get(k)) for k in keys] for r in test["folds"]]
        rows.append(["fold ensemble"] + [_f(_flat(t).get(k)) for k in keys])
        tables = [(["model"] + [k.split("/")[-1] for k in keys], rows)]
        if run.binary:
            intro += _binary_intro(t)
            tables.append(_binary_overall_table(t))
        else:
            tables.append(_multi_overall_table(t))
        secs.append(("Held-out test", intro.strip(), tables, []))
    elif "skipped" in test:
        secs.append(("Held-out test", test["skipped"] + ".", [], []))
    for where, sl in (("out-of-fold", results.get("slides")), ("held-out test", test.get("slides"))):
        if sl:
            intro = (f"{sl['n_slides']} slides ({sl['n_pos']} positive: a tile labeled {sl['positive_class']}) from "
                     f"the {where} tile predictions; slide score = mean of the top {sl['top_k']} tile "
                     f"P({sl['positive_class']}), as in slides.csv. " + sl.get("note", ""))
            summary = [["slide ROC AUC", _f(sl.get("roc_auc"))]] + [[k, _f(sl[k])] for k in
                                                                   ("accuracy", "sensitivity", "specificity")]
            rows = [[r["slide"], str(r["tiles"]), str(r["label"]), _f(r["score"])] for r in sl["table"]]
            secs.append((f"Slide-level metrics ({where})", intro.strip(), [(["metric (threshold 0.5)", "value"], summary),
                         (["slide", "tiles", "positive", "score"], rows)], []))
    return secs


TEST_KEYS = {True: ("auc", "at_0.5/accuracy", "at_0.5/sensitivity", "at_0.5/specificity", "at_0.5/f1"),
             False: ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "cohen_kappa")}


def _binary_intro(o: dict) -> str:
    lo, hi = o["auc_ci"]
    return (f"ROC AUC {_f(o['auc'])} (95% CI {_f(lo)}-{_f(hi)}, stratified bootstrap, {o['n_boot']} resamples); "
            f"n = {o['n']}, positives = {o['n_pos']}; Youden threshold {o['youden_threshold']:.3f}; "
            f"ECE {_f(o['ece'])}.")


BINARY_ROWS = [("accuracy", "Accuracy"), ("precision", "Precision (PPV)"), ("recall", "Recall / sensitivity"),
               ("specificity", "Specificity"), ("f1", "F1"), ("balanced_accuracy", "Balanced accuracy"),
               ("tp", "TP"), ("fp", "FP"), ("tn", "TN"), ("fn", "FN")]


def _binary_overall_table(o: dict) -> tuple:
    header = ["metric", "threshold 0.5", f"Youden threshold {o['youden_threshold']:.3f}"]
    return header, [[label, _f(o["at_0.5"][k]), _f(o["at_youden"][k])] for k, label in BINARY_ROWS]


def _binary_fold_table(folds: list[dict], summary: dict) -> tuple:
    cols = [("at_0.5/accuracy", "accuracy"), ("at_0.5/sensitivity", "sensitivity"),
            ("at_0.5/specificity", "specificity"), ("at_0.5/f1", "F1"),
            ("at_0.5/balanced_accuracy", "bal. acc."), ("youden_threshold", "Youden t"), ("ece", "ECE")]
    header = ["fold", "n", "pos. rate", "AUC [95% CI]"] + [c[1] for c in cols]
    rows = []
    for m in folds:
        flat = _flat(m)
        rows.append([str(m["fold"]), str(m["n"]), _f(m["n_pos"] / max(m["n"], 1), 3),
                     f"{_f(m['auc'])} [{_f(m['auc_ci'][0])}, {_f(m['auc_ci'][1])}]"] + [_f(flat[k]) for k, _ in cols])
    rows.append(["mean ± std", "", "", _pm(summary, "auc")] + [_pm(summary, k) for k, _ in cols])
    return header, rows


MULTI_ROWS = [("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
              ("macro_precision", "Macro precision"), ("macro_recall", "Macro recall"), ("macro_f1", "Macro F1"),
              ("weighted_precision", "Weighted precision"), ("weighted_recall", "Weighted recall"),
              ("weighted_f1", "Weighted F1"), ("macro_auc", "Macro one-vs-rest AUC"),
              ("cohen_kappa", "Cohen's kappa"), ("quadratic_kappa", "Quadratic-weighted kappa")]


def _multi_overall_table(o: dict) -> tuple:
    return ["metric", "value"], [[label, _f(o[k])] for k, label in MULTI_ROWS]


def _per_class_table(o: dict) -> tuple:
    rows = [[c, str(m["support"]), _f(m["precision"]), _f(m["recall"]), _f(m["f1"]), _f(m["auc"])]
            for c, m in o["per_class"].items()]
    return ["class", "support", "precision", "recall", "F1", "OvR AUC"], rows


def _multi_fold_table(folds: list[dict], summary: dict) -> tuple:
    cols = [("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc."), ("macro_f1", "macro F1"),
            ("weighted_f1", "weighted F1"), ("macro_auc", "macro AUC"), ("cohen_kappa", "kappa"),
            ("quadratic_kappa", "QW kappa")]
    rows = [[str(m["fold"]), str(m["n"])] + [_f(m[k]) for k, _ in cols] for m in folds]
    rows.append(["mean ± std", ""] + [_pm(summary, k) for k, _ in cols])
    return ["fold", "n"] + [c[1] for c in cols], rows


def _compare_table(run: Run, comps: list[dict]) -> tuple:
    keys = (["roc_auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy"] if run.binary
            else ["accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "cohen_kappa"])
    diff_name = "auc_diff" if run.binary else "accuracy_diff"
    header = ["run", "shared ids"] + keys + [f"{'AUC' if run.binary else 'accuracy'} diff [95% CI]", "p"]
    rows = []
    for c in comps:
        d = c[diff_name]
        rows.append([f"{run.name} (this)", str(c["n_shared"])] + [_f(c["self"][k]) for k in keys] + ["", ""])
        rows.append([c["name"], str(c["n_shared"])] + [_f(c["other"][k]) for k in keys]
                    + [f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]", _p_value(d)])
    return header, rows


def _p_value(d: dict) -> str:
    """Bootstrap p-values resolve 1/n_boot at best: 0 is shown as '< 1/n_boot'."""
    p = d.get("p_value")
    if p is None:
        return "-"
    return f"< {1 / d['n_boot']:.3g}" if p == 0 else _f(p, 3)


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _pm(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    return f"{_f(summary[key]['mean'])} ± {_f(summary[key]['std'])}"


def _header_lines(run: Run) -> list[str]:
    c = run.configs[0]
    parents = sorted({io.dirname(d) for d in run.fold_dirs})
    folds = ", ".join(io.basename(d) for d in run.fold_dirs)
    return [f"Run: {run.name} - {len(run.fold_dirs)} folds ({folds}) in {', '.join(parents)}",
            f"Architecture: {c.get('arch')}, image size {c.get('image_size')}, classes {', '.join(run.classes)}",
            f"OOF predictions: {len(run.oof)} images; generated "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}"]


def _markdown(run: Run, sections: list[tuple], figures: dict) -> str:
    out = [f"# Evaluation report: {run.name}", ""] + [f"- {line}" for line in _header_lines(run)] + [""]
    for title, intro, tables, figs in sections:
        out += [f"## {title}", ""] + ([intro, ""] if intro else [])
        for header, rows in tables:
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        out += [f"![{key}]({figures[key]})\n" for key in figs if key in figures]
    return "\n".join(out) + "\n"


HTML_CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1320px;margin:24px auto;
padding:0 20px;color:#1d2430;line-height:1.45}h1{border-bottom:2px solid #2b4c7e;padding-bottom:6px}
h2{margin-top:34px;color:#2b4c7e;border-bottom:1px solid #d5dbe5;padding-bottom:4px}
table{border-collapse:collapse;margin:10px 0 16px;font-size:14px}th,td{border:1px solid #d5dbe5;padding:4px 10px;
text-align:right}th{background:#eef2f8}td:first-child,th:first-child{text-align:left}
tr.summary td{font-weight:600;background:#f7f9fc}img{max-width:100%;height:auto;border:1px solid #e3e7ee;margin:6px 0}
.meta{color:#4a5566;font-size:14px}.intro{max-width:1000px}"""


def _html(run: Run, sections: list[tuple], figures: dict, *, report_dir: str) -> str:
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>Evaluation report: {html.escape(run.name)}</title><style>{HTML_CSS}</style></head><body>",
           f"<h1>Evaluation report: {html.escape(run.name)}</h1>"]
    out += [f"<div class='meta'>{html.escape(line)}</div>" for line in _header_lines(run)]
    for title, intro, tables, figs in sections:
        out.append(f"<h2>{html.escape(title)}</h2>")
        if intro:
            out.append(f"<p class='intro'>{html.escape(intro)}</p>")
        for header, rows in tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            out += [("<tr class='summary'>" if r[0].startswith("mean") else "<tr>")
                    + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows]
            out.append("</table>")
        for key in figs:
            if key in figures:
                data = base64.b64encode(io.read_bytes(io.join(report_dir, figures[key]))).decode("ascii")
                out.append(f"<div><img alt='{key}' src='data:image/png;base64,{data}'></div>")
    out.append("</body></html>")
    return "\n".join(out)
