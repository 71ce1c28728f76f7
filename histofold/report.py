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
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from histofold import metrics

DPI = 110
STYLE = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3}
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
    report_dir = os.path.join(out_dir, name)
    os.makedirs(os.path.join(report_dir, FIG_DIR), exist_ok=True)
    results = _metrics_section(run, n_boot=n_boot, seed=seed)
    figures = _figures(run, results)
    others = [load_run([c], name=_run_name(c), oof_name=oof_name) for c in (compare or [])]
    if others:
        results["compare"] = [_compare(run, o, n_boot=n_boot, seed=seed) for o in others]
        figures["compare_roc"] = _fig_compare_roc(run, others)
    results["gradcam"], gallery = _gradcam_section(run, enabled=gradcam, n=n_gradcam, load_images=load_images,
                                                   load_model=load_model)
    if gallery is not None:
        figures["gradcam"] = gallery
    paths = _save_figures(figures, report_dir)
    results["meta"] = _meta(run, tfrecords=tfrecords, figures=paths)
    out = _write_outputs(run, results, paths, report_dir=report_dir)
    return {**out, "report_dir": report_dir, "figures": paths, **_headline(run, results)}


def load_run(run_dirs: list[str], *, name: str, oof_name: str = "oof.csv") -> Run:
    """Read config.json, history.csv and oof.csv of every fold; classes must agree across folds."""
    from histofold import runs

    fold_dirs = [d for r in run_dirs for d in runs.fold_dirs(r)]
    if not fold_dirs:
        raise ValueError("no run directories given: pass runs/<name> or runs/<name>/fold<k>")
    configs = [runs.load_config(d) for d in fold_dirs]
    classes = [str(c) for c in configs[0]["classes"]]
    for d, c in zip(fold_dirs, configs):
        if [str(x) for x in c["classes"]] != classes:
            raise ValueError(f"{d}/config.json has classes {c['classes']} but {fold_dirs[0]} has {classes}: "
                             f"report folds of one dataset together")
    oofs = [_read_oof(d, c, classes, oof_name) for d, c in zip(fold_dirs, configs)]
    histories = [_read_csv_or_none(os.path.join(d, runs.HISTORY)) for d in fold_dirs]
    oof = pd.concat(oofs, ignore_index=True)
    dup = oof["id"][oof["id"].duplicated()]
    if len(dup):
        raise ValueError(f"ids {list(dup[:5])} appear in the OOF of more than one fold of {name}: "
                         f"pass each fold directory once, from one run")
    return Run(name=name, fold_dirs=fold_dirs, configs=configs, histories=histories, oof=oof, classes=classes)


def _read_oof(fold_dir: str, config: dict, classes: list[str], oof_name: str = "oof.csv") -> pd.DataFrame:
    path = os.path.join(fold_dir, oof_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the fold did not finish; rerun train.py with the same flags")
    oof = pd.read_csv(path, dtype={"id": str})
    need = ["id", "label"] + [f"p_{c}" for c in classes]
    lacking = [c for c in need if c not in oof.columns]
    if lacking:
        raise ValueError(f"{path} lacks columns {lacking}; expected id,label,fold,p_<class> for classes {classes}")
    if "fold" not in oof.columns:
        oof.insert(2, "fold", int(config.get("fold", -1)))
    bad = oof[need[2:]].isna().any(axis=1) | (oof["label"] < 0)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows have NaN probabilities or no label "
                         f"(e.g. id {oof.loc[bad, 'id'].iloc[0]}); retrain that fold")
    return oof


def _read_csv_or_none(path: str) -> pd.DataFrame | None:
    return pd.read_csv(path) if os.path.exists(path) else None


def _run_name(path: str) -> str:
    """runs/<name>/fold3 -> <name>; runs/<name> -> <name>."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base.startswith("fold") and base[4:].isdigit() else base


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

def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(w, h), dpi=DPI)


def _figures(run: Run, results: dict) -> dict:
    """name -> matplotlib Figure, in report order."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figs = {"roc": _fig_roc(run), "pr": _fig_pr(run), "confusion": _fig_confusion(run),
                "reliability": _fig_reliability(run, results["calibration"]),
                "class_balance": _fig_class_balance(run)}
        if any(h is not None for h in run.histories):
            figs["training"] = _fig_training(run)
    return figs


def _fig_roc(run: Run):
    from sklearn.metrics import roc_curve

    if not run.binary:
        return _fig_ovr(run, kind="roc")
    fig = _new_figure(6.4, 5.6)
    ax = fig.subplots()
    grid, tprs, aucs = np.linspace(0, 1, 201), [], []
    for f, part in run.oof.groupby("fold"):
        y, p = part["label"].to_numpy(int), part[f"p_{run.classes[1]}"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        aucs.append(metrics.fast_auc(y, p))
        ax.plot(fpr, tpr, lw=1, alpha=0.45, label=f"fold {f} (AUC {aucs[-1]:.3f})")
        tprs.append(np.interp(grid, fpr, tpr))
        tprs[-1][0] = 0.0
    if tprs:
        mean, std = np.mean(tprs, axis=0), np.std(tprs, axis=0)
        mean[-1] = 1.0
        ax.plot(grid, mean, color="navy", lw=2.2,
                label=f"mean ROC (AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f})")
        ax.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="navy", alpha=0.15,
                        label="± 1 std")
    _roc_axes(ax, f"ROC per fold - {run.name}")
    fig.tight_layout()
    return fig


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title)
    ax.legend(loc="lower right")


def _fig_ovr(run: Run, *, kind: str):
    """One-vs-rest ROC or precision-recall curve per class on the pooled OOF."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    fig = _new_figure(7.0, 6.0)
    ax = fig.subplots()
    y, P = run.oof["label"].to_numpy(int), run.probs()
    colors = _colors(len(run.classes))
    for i, c in enumerate(run.classes):
        yi = (y == i).astype(int)
        if yi.min() == yi.max():
            continue  # class absent (or everything): no curve
        if kind == "roc":
            fpr, tpr, _ = roc_curve(yi, P[:, i])
            ax.plot(fpr, tpr, color=colors[i], lw=1.6, label=f"{c} (AUC {metrics.fast_auc(yi, P[:, i]):.3f})")
        else:
            prec, rec, _ = precision_recall_curve(yi, P[:, i])
            ax.plot(rec, prec, color=colors[i], lw=1.6, label=f"{c} (AP {average_precision_score(yi, P[:, i]):.3f})")
    if kind == "roc":
        _roc_axes(ax, f"One-vs-rest ROC per class - {run.name}")
    else:
        _pr_axes(ax, f"One-vs-rest precision-recall per class - {run.name}")
    fig.tight_layout()
    return fig


def _fig_pr(run: Run):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if not run.binary:
        return _fig_ovr(run, kind="pr")
    fig = _new_figure(6.4, 5.6)
    ax = fig.subplots()
    for f, part in run.oof.groupby("fold"):
        y, p = part["label"].to_numpy(int), part[f"p_{run.classes[1]}"].to_numpy()
        if y.max() == 0:
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, lw=1, alpha=0.6, label=f"fold {f} (AP {average_precision_score(y, p):.3f})")
    y, p = run.oof["label"].to_numpy(int), run.probs()[:, 1]
    if y.max() > 0:
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, color="navy", lw=2.2, label=f"pooled OOF (AP {average_precision_score(y, p):.3f})")
    ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    _pr_axes(ax, f"Precision-recall per fold - {run.name}")
    fig.tight_layout()
    return fig


def _pr_axes(ax, title: str) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title=title)
    ax.legend(loc="lower left")


def _fig_confusion(run: Run):
    """Counts and row-normalised (recall per true class) confusion matrices, side by side."""
    from sklearn.metrics import confusion_matrix

    k = len(run.classes)
    y, pred = run.oof["label"].to_numpy(int), run.probs().argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    side = max(4.2, 0.7 * k + 2.4)  # inches per panel: cells stay readable up to ~10 classes
    stacked = k > 5  # side by side, two 9-class panels would be scaled down to unreadable text in the HTML
    fig = _new_figure(side + 1.0, 2 * side) if stacked else _new_figure(2 * side + 1.2, side)
    axes = fig.subplots(2, 1) if stacked else fig.subplots(1, 2)
    _matrix(axes[0], cm, run.classes, fmt="{:d}", title=f"{run.name}: counts (argmax, pooled OOF, n = {len(y)})")
    _matrix(axes[1], norm, run.classes, fmt="{:.2f}", title="Row-normalised (recall per true class)", vmax=1.0)
    fig.tight_layout()
    return fig


def _matrix(ax, m: np.ndarray, names: list[str], *, fmt: str, title: str, vmax=None) -> None:
    k = len(names)
    im = ax.imshow(np.nan_to_num(m), cmap="Blues", vmin=0, vmax=vmax or max(1, np.nanmax(m)))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=names)
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    ax.grid(False)
    threshold = (vmax or np.nanmax(m)) / 2
    size = 11 if k <= 5 else 9.5 if k <= 10 else 8
    for i in range(k):
        for j in range(k):
            v = m[i, j]
            text = "-" if isinstance(v, float) and math.isnan(v) else fmt.format(v.item() if hasattr(v, "item") else v)
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if np.nan_to_num(v) > threshold else "black")


def _fig_reliability(run: Run, calibration: dict):
    bins = calibration["bins"]
    edges = np.asarray(bins["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    observed, conf = np.asarray(bins["observed"], float), np.asarray(bins["confidence"], float)
    fig = _new_figure(6.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = np.isfinite(observed)
    top.bar(centers[ok], observed[ok], width=width[ok] * 0.9, color="steelblue", edgecolor="navy", alpha=0.8,
            label="observed")
    top.plot(conf[ok], observed[ok], "o-", color="darkorange", ms=4, label="observed at mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    xlabel, ylabel = (("Mean predicted P(class 1)", "Observed fraction positive") if run.binary
                      else ("Confidence (max class probability)", "Accuracy"))
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel=ylabel,
            title=f"Reliability diagram - ECE = {calibration['ece']:.4f}")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width * 0.9, color="grey")
    bottom.set(xlabel=xlabel, ylabel="count")
    fig.tight_layout()
    return fig


def _fig_training(run: Run):
    """Loss, monitored metric and learning rate per epoch; one colour per fold, validation dashed."""
    fig = _new_figure(15.0, 4.4)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    colors = _colors(len(run.fold_dirs))
    metric_name = None
    for i, (h, c) in enumerate(zip(run.histories, run.configs)):
        if h is None or h.empty:
            continue
        epochs = np.arange(1, len(h) + 1)  # stages restart `epoch`; the row order is the true order
        fold = c.get("fold", i)
        _train_val(ax_loss, h, "loss", epochs, colors[i], f"fold {fold}")
        metric_name = metric_name or _history_metric(h, c.get("monitor", ""))
        if metric_name:
            _train_val(ax_metric, h, metric_name, epochs, colors[i], f"fold {fold}")
        if "lr" in h:
            ax_lr.plot(epochs, h["lr"], color=colors[i], marker=".", label=f"fold {fold}")
    ax_loss.set(title="Loss (solid train, dashed validation)", xlabel="epoch", ylabel="loss")
    ax_metric.set(title=f"{metric_name or 'metric'} (solid train, dashed validation)", xlabel="epoch",
                  ylabel=metric_name or "")
    ax_lr.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="LR")
    if ax_lr.lines and all((line.get_ydata() > 0).all() for line in ax_lr.lines):
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_metric, ax_lr):
        if ax.lines:
            ax.legend(ncol=2 if len(run.fold_dirs) > 3 else 1)
    fig.suptitle(f"Training curves - {run.name}", fontsize=12)
    fig.tight_layout()
    return fig


def _history_metric(h: pd.DataFrame, monitor: str) -> str | None:
    """The monitored metric (without val_) when history.csv has it, else the first other metric."""
    name = monitor[4:] if monitor.startswith("val_") else monitor
    if name and name != "loss" and (name in h or f"val_{name}" in h):
        return name
    others = [c for c in h.columns if c not in ("epoch", "loss", "val_loss", "lr") and not c.startswith("val_")]
    return others[0] if others else None


def _train_val(ax, h: pd.DataFrame, col: str, epochs, color, label: str) -> None:
    if col in h:
        ax.plot(epochs, h[col], color=color, lw=1.5, label=f"{label} train")
    if f"val_{col}" in h:
        ax.plot(epochs, h[f"val_{col}"], color=color, lw=1.5, ls="--", marker=".", label=f"{label} val")


def _fig_class_balance(run: Run):
    counts = pd.crosstab(run.oof["fold"], run.oof["label"]).reindex(columns=range(len(run.classes)), fill_value=0)
    k, folds = len(run.classes), list(counts.index)
    fig = _new_figure(max(6.0, 1.1 * len(folds) + 0.25 * k * len(folds) / 2 + 2), 4.4)
    ax = fig.subplots()
    width = 0.8 / k
    colors = _colors(k)
    for j, c in enumerate(run.classes):
        x = np.arange(len(folds)) + (j - (k - 1) / 2) * width
        bars = ax.bar(x, counts[j].to_numpy(), width=width, color=colors[j], label=c)
        if k * len(folds) <= 24:
            ax.bar_label(bars, fontsize=8, padding=1)
    ax.set_xticks(range(len(folds)), labels=[f"fold {f}" for f in folds])
    ax.set(ylabel="images", title=f"Class balance per validation fold (OOF labels) - {run.name}")
    ax.legend(title="class", ncol=1 if k <= 4 else 2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="x", visible=False)
    fig.tight_layout()
    return fig


def _fig_compare_roc(run: Run, others: list[Run]):
    """Pooled-OOF ROC of every run (binary: P(class 1); multi-class: micro-averaged one-vs-rest)."""
    import matplotlib
    from sklearn.metrics import roc_curve

    with matplotlib.rc_context(STYLE):
        fig = _new_figure(6.4, 5.6)
        ax = fig.subplots()
        for r, color in zip([run] + others, _colors(len(others) + 1)):
            y, P = r.oof["label"].to_numpy(int), r.probs()
            if r.binary:
                yy, pp = y, P[:, 1]
            else:  # micro average: every (row, class) pair is one binary decision
                yy, pp = np.eye(len(r.classes))[y].ravel(), P.ravel()
            fpr, tpr, _ = roc_curve(yy, pp)
            ax.plot(fpr, tpr, color=color, lw=2, label=f"{r.name} (AUC {metrics.fast_auc(yy, pp):.4f}, n={len(y)})")
        _roc_axes(ax, "ROC of compared runs (pooled OOF)" + ("" if run.binary else ", micro-averaged"))
        fig.tight_layout()
    return fig


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


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
             "empty_maps": [c["id"] for c in cells.values() if not c["valid"]]}
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _fig_gallery(run, picks, cells, n=n)
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
            cells[r.id] = {"overlay": gc.overlay(img, m), "valid": bool(ok), "text": _cell_text(run, r)}
    return cells


def _fit_to_model(images: np.ndarray, model) -> np.ndarray:
    """uint8 images -> float32 [0, 255] at the model's input size (bilinear) when it differs."""
    import tensorflow as tf

    x = images.astype(np.float32)
    want = tuple(model.input_shape[1:3])
    if None not in want and want != x.shape[1:3]:
        x = tf.image.resize(x, want, method="bilinear").numpy()
    return x


def _cell_text(run: Run, r) -> str:
    p = np.array([getattr(r, f"p_{c}") for c in run.classes])
    if run.binary:
        return f"{_short(r.id)}\nP({run.classes[1]})={p[1]:.3f}"
    return f"{_short(r.id)}\n{run.classes[int(r.label)]}→{run.classes[int(p.argmax())]} {p.max():.2f}"


def _short(s: str, k: int = 18) -> str:
    s = str(s)
    return s if len(s) <= k else "…" + s[-(k - 1):]


def _fig_gallery(run: Run, picks: dict, cells: dict, *, n: int):
    cats = list(picks)
    fig = _new_figure(2.2 * n + 0.8, 2.55 * len(cats))
    axes = np.atleast_2d(fig.subplots(len(cats), n, squeeze=False))
    for i, cat in enumerate(cats):
        ids = picks[cat]["id"].tolist()
        for j in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(ids):
                cell = cells[ids[j]]
                ax.imshow(cell["overlay"])
                ax.set_title(cell["text"] + ("" if cell["valid"] else "\n(empty map)"), fontsize=8)
            elif j == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        axes[i, 0].text(-0.08, 0.5, cat, rotation=90, ha="right", va="center", fontsize=12, fontweight="bold",
                        transform=axes[i, 0].transAxes)
    fig.suptitle(f"Grad-CAM of the predicted class, most confident OOF images - {run.name}", fontsize=12)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ outputs

def _save_figures(figures: dict, report_dir: str) -> dict:
    paths = {}
    for key, fig in figures.items():
        rel = f"{FIG_DIR}/{key}.png"
        fig.savefig(os.path.join(report_dir, rel), dpi=DPI)
        paths[key] = rel
    return paths


def _write_outputs(run: Run, results: dict, figures: dict, *, report_dir: str) -> dict:
    paths = {k: os.path.join(report_dir, f) for k, f in
             (("metrics_json", "metrics.json"), ("report_md", "report.md"), ("report_html", "report.html"))}
    with open(paths["metrics_json"], "w") as f:
        json.dump(_jsonable(results), f, indent=2, allow_nan=False)
    sections = _sections(run, results)
    with open(paths["report_md"], "w") as f:
        f.write(_markdown(run, sections, figures))
    with open(paths["report_html"], "w") as f:
        f.write(_html(run, sections, figures, report_dir=report_dir))
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
    parents = sorted({os.path.dirname(os.path.normpath(d)) for d in run.fold_dirs})
    folds = ", ".join(os.path.basename(os.path.normpath(d)) for d in run.fold_dirs)
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
                with open(os.path.join(report_dir, figures[key]), "rb") as f:
                    data = base64.b64encode(f.read()).decode("ascii")
                out.append(f"<div><img alt='{key}' src='data:image/png;base64,{data}'></div>")
    out.append("</body></html>")
    return "\n".join(out)
