"""Inference over run directories: TTA per fold model, id-keyed prediction CSVs, fold/run ensembles, submission.

    runs/<name>/fold{k}/test_tta{n}.csv   one per fold (id, label, p_<class>...)
    runs/<name>/fold{k}/oof_tta{n}.csv    with --oof: the fold's OOF with the same TTA
    submissions/<name>.csv                the validated submission (sample_submission order and header)
    submissions/<name>_probs.csv          the ensembled probabilities, id-keyed
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from histofold import runs

log = logging.getLogger("histofold")


@dataclass(frozen=True)
class PredictConfig:
    runs: tuple = ()                 # run dirs (runs/<name>); () = the latest under runs_dir
    runs_dir: str = "runs"
    tfrecords: str = ""              # "" = the tfrecords dir the runs were trained on
    tta: int = 8                     # dihedral transforms averaged: 1, 2, 4 or 8
    ensemble: str = "mean"           # mean | gmean | rank, over folds and then over runs
    weights: tuple = ()              # one weight per run (default equal)
    output: str = "label"            # multi-class submissions: label | probs
    name: str = ""                   # submissions/<name>.csv; default the run names joined by '+'
    out_dir: str = "submissions"
    oof: bool = False                # also recompute every fold's OOF with the same TTA
    batch_size: int = 256
    precision: str = "auto"          # inference dtype policy: fp16 on tensor-core GPUs, fp32 on CPU


def predict_frame(model, dataset, *, n: int, class_names: list[str], verbose: bool = True) -> pd.DataFrame:
    """(x, y, id) batches -> id-keyed frame: id, label, p_<class> for every class (binary too)."""
    from histofold import tta

    ids, labels, probs = tta.predict_tta(model, dataset, n=n, verbose=verbose, return_labels=True)
    probs = tta.to_class_probs(probs, len(class_names))  # (N, K)
    frame = pd.DataFrame({"id": ids, "label": np.asarray(labels, dtype=int)})
    for c, name in enumerate(class_names):
        frame[f"p_{name}"] = probs[:, c].astype(np.float64)
    return frame


def prob_columns(class_names: list[str]) -> list[str]:
    return [f"p_{c}" for c in class_names]


def run_predict(cfg: PredictConfig) -> dict:
    """Predict the test shards with every fold of every run, ensemble, write and validate the submission."""
    from histofold import data, ensemble, strategy, submission

    run_list = list(cfg.runs) or [runs.latest_run(cfg.runs_dir)]
    # Inference runs on the default device (one GPU, or the CPU/TPU-VM host); mixed precision where
    # the GPU has tensor cores. The output layer stays float32 under any policy.
    default, _ = strategy.resolve_strategy("default")
    policy = strategy.apply_precision(strategy.resolve_precision(cfg.precision, strategy=default))
    log.info("predict: %s inference, %d-way TTA, batch %d", policy, cfg.tta, cfg.batch_size)
    per_run, class_names, tfrec = [], None, None
    for run in run_list:
        frames, conf = _predict_run(run, cfg)
        class_names = _same_classes(class_names, conf["classes"], run)
        tfrec = tfrec or (cfg.tfrecords or conf["tfrecords"])
        per_run.append(ensemble.ensemble(frames, method=cfg.ensemble))
        per_run[-1] = _with_labels(per_run[-1], frames[0])
    weights = list(cfg.weights) or None
    final = _with_labels(ensemble.ensemble(per_run, method=cfg.ensemble, weights=weights), per_run[0])

    manifest = data.load_manifest(tfrec)
    name = cfg.name or "+".join(os.path.basename(os.path.normpath(r)) for r in run_list)
    sample = _sample_submission(tfrec, manifest)
    test_ids = _test_ids(tfrec)
    sub = submission.make_submission(final, class_names=class_names, sample_submission=sample,
                                     test_ids=test_ids, output=cfg.output)
    submission.validate_submission(sub, expected_ids=test_ids, num_classes=len(class_names),
                                   output=cfg.output)
    out = _write(cfg.out_dir, name, sub, final)
    summary = {"submission": out["submission"], "probabilities": out["probs"], "rows": len(sub),
               "runs": run_list, "tta": cfg.tta, "ensemble": cfg.ensemble}
    summary.update(_test_score(final, class_names, manifest))
    if cfg.oof:
        summary.update(_oof_score(run_list, cfg))
    return summary


def _predict_run(run: str, cfg: PredictConfig) -> tuple[list[pd.DataFrame], dict]:
    """Every fold of one run on the test shards (and, with --oof, its own fold)."""
    import keras
    from histofold import data

    frames, conf = [], None
    for fold_dir in runs.complete_fold_dirs(run):
        model, conf = runs.load_run_model(fold_dir)
        tfrec = cfg.tfrecords or conf["tfrecords"]
        common = dict(training=False, batch_size=cfg.batch_size, image_size=tuple(conf["image_size"]),
                      with_ids=True, label_mode="int", num_classes=conf["num_classes"])
        n_test = data.count_records(tfrec, split="test")
        if n_test == 0:
            raise ValueError(f"{tfrec} holds no test records: prepare a test set (prepare_tfrecords.py "
                             f"--test_input=DIR or --holdout=0.2) or use predict.py --input=FOLDER for new images")
        log.info("%s: predicting %d test images with %d-way TTA", fold_dir, n_test, cfg.tta)
        test_ds = data.make_dataset(tfrec, split="test", **common)
        frame = predict_frame(model, test_ds, n=cfg.tta, class_names=conf["classes"])
        _check_finite(frame, fold_dir)
        _write_csv(frame, os.path.join(fold_dir, f"test_tta{cfg.tta}.csv"))
        frames.append(frame)
        if cfg.oof:
            oof_ds = data.make_dataset(tfrec, split="train", folds=[conf["fold"]], **common)
            oof = predict_frame(model, oof_ds, n=cfg.tta, class_names=conf["classes"])
            oof.insert(2, "fold", conf["fold"])
            _write_csv(oof, os.path.join(fold_dir, f"oof_tta{cfg.tta}.csv"))
        keras.backend.clear_session()  # free the fold model before building the next
    return frames, conf


def _same_classes(known, classes, run):
    if known is not None and list(known) != list(classes):
        raise ValueError(f"{run} was trained on classes {classes} but an earlier run on {known}: "
                         f"ensemble only runs of the same dataset")
    return list(classes)


def _with_labels(ens: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Ensembles carry only probabilities; put the (known or -1) test labels back, joined on id."""
    if "label" in ens:
        return ens
    return ens.merge(ref[["id", "label"]], on="id", how="left")


def _check_finite(frame: pd.DataFrame, where: str) -> None:
    cols = [c for c in frame if c.startswith("p_")]
    bad = ~np.isfinite(frame[cols].to_numpy()).all(axis=1)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} predictions are NaN/inf (first id "
                         f"{frame.loc[bad, 'id'].iloc[0]}); the model diverged: retrain with a lower --lr")


def _sample_submission(tfrec: str, manifest: dict) -> str | None:
    name = manifest.get("sample_submission")
    return os.path.join(tfrec, name) if name else None


def _test_ids(tfrec: str) -> list[str]:
    import tensorflow as tf

    path = os.path.join(tfrec, "test_ids.csv")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} is missing: rerun prepare_tfrecords.py for {tfrec}")
    with tf.io.gfile.GFile(path) as f:
        return pd.read_csv(f, dtype={"id": str})["id"].tolist()


def _write_csv(frame: pd.DataFrame, path: str) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "w") as f:
        frame.to_csv(f, index=False)


def _write(out_dir: str, name: str, sub: pd.DataFrame, probs: pd.DataFrame) -> dict:
    paths = {"submission": os.path.join(out_dir, f"{name}.csv"),
             "probs": os.path.join(out_dir, f"{name}_probs.csv")}
    _write_csv(sub, paths["submission"])
    _write_csv(probs, paths["probs"])
    return paths


def _test_score(final: pd.DataFrame, class_names: list[str], manifest: dict) -> dict:
    """When the test records carry labels (PCam valid/test, a labeled --test_input), score them."""
    from histofold import metrics

    labeled = final[final["label"] >= 0]
    if len(labeled) == 0 or len(labeled) != len(final):
        return {}
    probs = labeled[prob_columns(class_names)].to_numpy()
    y = labeled["label"].to_numpy()
    if len(class_names) == 2:
        m = metrics.binary_metrics(y, probs[:, 1])
        return {"test_auc": float(m["roc_auc"]), "test_accuracy": float(m["accuracy"])}
    m = metrics.multiclass_metrics(y, probs, class_names=class_names)
    return {"test_accuracy": float(m["accuracy"]), "test_macro_f1": float(m["macro_f1"])}


def _oof_score(run_list: list[str], cfg: PredictConfig) -> dict:
    """CV score of the TTA OOF predictions (concatenated over folds), per run."""
    from histofold import metrics

    scores = {}
    for run in run_list:
        frames = [pd.read_csv(os.path.join(d, f"oof_tta{cfg.tta}.csv"), dtype={"id": str})
                  for d in runs.complete_fold_dirs(run)]
        oof = pd.concat(frames, ignore_index=True)
        classes = [c[2:] for c in oof.columns if c.startswith("p_")]
        probs = oof[prob_columns(classes)].to_numpy()
        y = oof["label"].to_numpy()
        key = os.path.basename(os.path.normpath(run))
        if len(classes) == 2:
            scores[f"cv_auc[{key}]"] = float(metrics.binary_metrics(y, probs[:, 1])["roc_auc"])
        else:
            scores[f"cv_accuracy[{key}]"] = float(
                metrics.multiclass_metrics(y, probs, class_names=classes)["accuracy"])
    return scores


def predict_images(*, run: str, input: str, out: str, tta: int = 8, batch_size: int = 64,
                   ensemble_method: str = "mean") -> dict:
    """A folder or glob of new images (any format the data stage reads) -> id-keyed predictions CSV."""
    from histofold import ensemble, imageio, tta as tta_mod
    from tqdm import tqdm

    paths = _image_paths(input)
    frames = []
    for fold_dir in runs.complete_fold_dirs(run):
        model, conf = runs.load_run_model(fold_dir)
        forward = tta_mod.make_forward(model)
        size = tuple(conf["image_size"])
        ids, probs, rejects = [], [], []
        for i in tqdm(range(0, len(paths), batch_size), desc=f"predict {os.path.basename(fold_dir)}"):
            batch, batch_ids = [], []
            for p in paths[i:i + batch_size]:
                try:
                    batch.append(imageio.resize(imageio.read_image(p), size[0]))
                    batch_ids.append(p)
                except Exception as e:  # unreadable images are reported, never silently dropped
                    rejects.append({"id": p, "path": p, "reason": str(e)})
            if batch:
                probs.append(_tta_arrays(forward, np.stack(batch).astype("float32"), tta))
                ids.extend(batch_ids)
        p = np.concatenate(probs) if probs else np.zeros((0, 1))
        p = tta_mod.to_class_probs(p, conf["num_classes"])
        frame = pd.DataFrame({"id": ids})
        for c, name in enumerate(conf["classes"]):
            frame[f"p_{name}"] = p[:, c]
        frames.append(frame)
    final = ensemble.ensemble(frames, method=ensemble_method) if len(frames) > 1 else frames[0]
    classes = conf["classes"]
    final["prediction"] = [classes[i] for i in final[prob_columns(classes)].to_numpy().argmax(1)]
    _write_csv(final, out)
    if rejects:
        _write_csv(pd.DataFrame(rejects), os.path.splitext(out)[0] + "_rejects.csv")
    log.info("%d images = %d predicted + %d rejected", len(paths), len(final), len(rejects))
    return {"predictions": out, "images": len(paths), "predicted": len(final), "rejected": len(rejects)}


def _image_paths(input: str) -> list[str]:
    import glob

    exts = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
    if os.path.isdir(input):
        found = [os.path.join(r, f) for r, _, fs in os.walk(input) for f in fs]
    else:
        found = glob.glob(input, recursive=True)
    paths = sorted(p for p in found if p.lower().endswith(exts))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) found at --input={input}")
    return paths


def _tta_arrays(forward, x: np.ndarray, n: int) -> np.ndarray:
    """Mean probability over n dihedral transforms of a (B, H, W, 3) float32 batch."""
    from histofold import tta

    return tta.tta_batch(forward, x, tta.tta_subset(n))
