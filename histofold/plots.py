"""Figures of the evaluation report: ROC/PR curves, confusion matrices, calibration, training curves,
class balance, TTA (OOF and test apart), run comparison, the Grad-CAM gallery. Every function takes a run (anything with the
report's `Run` attributes: name, classes, binary, oof, probs(), histories, configs, fold_dirs) and
returns a matplotlib Figure (the Figure API: no pyplot, no global state, no GUI backend)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from histofold import metrics

DPI = 110
STYLE = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3}


def new_figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(w, h), dpi=DPI)


def fig_roc(run):
    from sklearn.metrics import roc_curve

    if not run.binary:
        return _fig_ovr(run, kind="roc")
    fig = new_figure(6.4, 5.6)
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


def _fig_ovr(run, *, kind: str):
    """One-vs-rest ROC or precision-recall curve per class on the pooled OOF."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    fig = new_figure(7.0, 6.0)
    ax = fig.subplots()
    y, P = run.oof["label"].to_numpy(int), run.probs()
    colors = palette(len(run.classes))
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


def fig_pr(run):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if not run.binary:
        return _fig_ovr(run, kind="pr")
    fig = new_figure(6.4, 5.6)
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


def fig_confusion(run):
    """Counts and row-normalised (recall per true class) confusion matrices, side by side."""
    from sklearn.metrics import confusion_matrix

    k = len(run.classes)
    y, pred = run.oof["label"].to_numpy(int), run.probs().argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    side = max(4.2, 0.7 * k + 2.4)  # inches per panel: cells stay readable up to ~10 classes
    stacked = k > 5  # side by side, two 9-class panels would be scaled down to unreadable text in the HTML
    fig = new_figure(side + 1.0, 2 * side) if stacked else new_figure(2 * side + 1.2, side)
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


def fig_reliability(run, calibration: dict):
    bins = calibration["bins"]
    edges = np.asarray(bins["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    observed, conf = np.asarray(bins["observed"], float), np.asarray(bins["confidence"], float)
    fig = new_figure(6.0, 6.4)
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


def fig_training(run):
    """Loss, monitored metric and learning rate per epoch; one colour per fold, validation dashed."""
    fig = new_figure(15.0, 4.4)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    colors = palette(len(run.fold_dirs))
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
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_metric, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
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


def fig_class_balance(run):
    counts = pd.crosstab(run.oof["fold"], run.oof["label"]).reindex(columns=range(len(run.classes)), fill_value=0)
    k, folds = len(run.classes), list(counts.index)
    fig = new_figure(max(6.0, 1.1 * len(folds) + 0.25 * k * len(folds) / 2 + 2), 4.4)
    ax = fig.subplots()
    width = 0.8 / k
    colors = palette(k)
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


TTA_PANELS = (("oof", "Out-of-fold (OOF, pooled)", "n_oof"), ("test", "Held-out test (fold ensemble)", "n_test"))


def fig_tta(run, tta: dict):
    """Score per TTA size as bars, one panel per source: OOF (pooled out-of-fold) and held-out test
    (fold ensemble) never share an axis, and every title, label and bar says which it is.

    tta: {"metric": "roc_auc" | "accuracy", "oof": {n: score}, "test": {n: score}, "n_oof", "n_test"}."""
    panels = [(key, title, tta[n_key]) for key, title, n_key in TTA_PANELS if tta.get(key)]
    metric = "ROC AUC" if tta["metric"] == "roc_auc" else "accuracy"
    fig = new_figure(4.8 * len(panels) + 0.6, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, title, n_images), color in zip(axes, panels, palette(2)):
        scores = dict(sorted(tta[key].items()))
        where = "OOF" if key == "oof" else "test"
        labels = [f"{where} TTA x{n}" for n in scores]
        bars = ax.bar(labels, list(scores.values()), color=color, width=0.6)
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in scores.values()], fontsize=8, padding=1)
        values = np.array(list(scores.values()), dtype=float)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        pad = max(0.01, (hi - lo) * 0.5)
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + 0.005)
        ax.set(title=f"{title}: {metric} by TTA, n={n_images}", xlabel="TTA size (dihedral transforms averaged)",
               ylabel=f"{where} {metric}")
        ax.grid(axis="x", visible=False)
    fig.suptitle(f"Test-time augmentation - {run.name}", fontsize=12)
    fig.tight_layout()
    return fig


def fig_compare_roc(run, others: list):
    """Pooled-OOF ROC of every run (binary: P(class 1); multi-class: micro-averaged one-vs-rest)."""
    import matplotlib
    from sklearn.metrics import roc_curve

    with matplotlib.rc_context(STYLE):
        fig = new_figure(6.4, 5.6)
        ax = fig.subplots()
        for r, color in zip([run] + others, palette(len(others) + 1)):
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


def palette(n: int) -> list:
    """n distinct colours (tab10, or tab20 beyond 10)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def fig_gallery(run, picks: dict, cells: dict, *, n: int):
    cats = list(picks)
    fig = new_figure(2.2 * n + 0.8, 2.55 * len(cats))
    axes = np.atleast_2d(fig.subplots(len(cats), n, squeeze=False))
    for i, cat in enumerate(cats):
        ids = picks[cat]["id"].tolist()
        for j in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(ids):
                cell = cells[ids[j]]
                ax.imshow(cell["overlay"])
                ax.set_title(cell["text"] + ("" if cell["valid"] else "\n(no localized evidence)"), fontsize=8)
            elif j == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        axes[i, 0].text(-0.08, 0.5, cat, rotation=90, ha="right", va="center", fontsize=12, fontweight="bold",
                        transform=axes[i, 0].transAxes)
    fig.suptitle(f"Grad-CAM of the predicted class, most confident OOF images - {run.name}", fontsize=12)
    fig.tight_layout()
    return fig
