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
    return {"task": "binary" if run.binary else "multiclass", "overall": overall, "folds": per_fold,
            "summary": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()}, "calibration": calibration}


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
    o = results["overall"]
    if run.binary:
        return {"auc": o["auc"], "auc_ci": o["auc_ci"], "accuracy": o["at_0.5"]["accuracy"]}
    return {"accuracy": o["accuracy"], "macro_f1": o["macro_f1"], "macro_auc": o["macro_auc"]}


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
    if run.binary:
        secs = [("Pooled OOF metrics", _binary_intro(overall), [_binary_overall_table(overall)], []),
                ("Per-fold metrics", "Mean ± sample std across folds in the last row.",
                 [_binary_fold_table(folds, summary)], [])]
    else:
        secs = [("Pooled OOF metrics", "Argmax predictions. " + " ".join(overall["notes"]),
                 [_multi_overall_table(overall), _per_class_table(overall)], []),
                ("Per-fold metrics", "Mean ± sample std across folds in the last row.",
                 [_multi_fold_table(folds, summary)], [])]
    secs += [("ROC curves", "", [], ["roc"]), ("Precision-recall curves", "", [], ["pr"]),
             ("Confusion matrices", "", [], ["confusion"]),
             ("Calibration", f"Expected calibration error (10 equal-width bins): "
                             f"{results['calibration']['ece']:.4f}", [], ["reliability"]),
             ("Training curves", "" if any(h is not None for h in run.histories)
              else "No history.csv in the fold directories.", [], ["training"]),
             ("Class balance", "", [], ["class_balance"])]
    secs.append(("Grad-CAM gallery", results["gradcam"].get("skipped", "Heatmaps of the predicted class on the "
                 "most confident OOF images of each outcome, each from the model that did not train on it."),
                 [], ["gradcam"]))
    if results.get("compare"):
        secs.append(("Comparison with other runs", "Joined on id; differences are this run minus the other, "
                     "with paired bootstrap 95% CIs.", [_compare_table(run, results["compare"])], ["compare_roc"]))
    return secs


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
