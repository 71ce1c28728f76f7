"""Inference over run directories: every fold model of every run, TTA, fold then run ensembles, on the
test shards (-> a validated submission), on new images (--input) or on whole slides (--slides).

    runs/<name>/fold{k}/test_tta{n}.csv   one per fold (id, label, p_<class>...)
    runs/<name>/fold{k}/oof_tta{n}.csv    with --oof: the fold's OOF with the same TTA
    submissions/<name>.csv                the validated submission (sample_submission order and header)
    submissions/<name>_probs.csv          the ensembled probabilities, id-keyed

One path for every input: a tf.data dataset of (x, y, id) batches whose x went through the run's
PixelFormat (the manifest's stored size and stain normalization, as every record did) and
`data.model_inputs` (the one resize), then `tta.predict_frame`, then `ensemble`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from histofold import io, runs, tta
from histofold.config import PredictConfig
from histofold.errors import DataError, UsageError
from histofold.manifest import Manifest

log = logging.getLogger("histofold")

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
PRELOAD_BYTES = 2 << 30  # --input images are decoded once and kept in memory below this size


def run(config: PredictConfig) -> dict:
    """predict.py: test shards (default), a folder of new images (--input) or whole slides (--slides)."""
    from histofold import strategy

    run_list = list(config.runs) or [runs.latest_run(config.runs_dir)]
    members = {r: runs.fold_dirs(r) for r in run_list}       # complete fold dirs, or a DataError now
    # Inference runs on the default device (one GPU, or the CPU/TPU-VM host); mixed precision where
    # the GPU has tensor cores. The output layer stays float32 under any policy.
    default, _ = strategy.resolve_strategy("default")
    policy = strategy.apply_precision(strategy.resolve_precision(config.precision, strategy=default))
    log.info("predict: %s inference, %d-way TTA, batch %d, %s", policy, config.tta, config.batch_size,
             ", ".join(f"{runs.run_name(r)} ({len(d)} folds)" for r, d in members.items()))
    if config.slides:
        return predict_slides(config, members)
    if config.input:
        return predict_images(config, members)
    return predict_test(config, members)


# ---------------------------------------------------------------- members -> one frame

def ensemble_members(config: PredictConfig, members: dict, dataset_for: Callable, *, what: str,
                     fold_csv: str | None = None, annotate: Callable | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Predict `dataset_for(run_dir, manifest, image_size)` with every fold model; ensemble the folds
    of each run, then the runs (--ensemble, --run_weights). Returns (frame, class names).
    `fold_csv`: each fold's frame is also written there, through `annotate(frame)` when given."""
    import keras

    from histofold import ensemble

    per_run, classes = [], None
    for run_path, fold_dirs in members.items():
        frames = []
        for rd in fold_dirs:
            resolved = rd.resolved()
            classes = _same_classes(classes, resolved["classes"], rd.path)
            model = rd.build_model()
            manifest = Manifest.load(resolved["tfrecords"])
            frame = tta.predict_frame(model, dataset_for(rd, manifest, tuple(resolved["image_size"])),
                                      n=config.tta, class_names=classes,
                                      desc=f"{what} {runs.run_name(rd.path)}/{rd.fold_name} TTA x{config.tta}")
            _check_finite(frame, rd.path)
            if fold_csv:
                io.write_csv(rd.file(fold_csv), annotate(frame) if annotate else frame)
            frames.append(frame)
            keras.backend.clear_session()  # free the fold model before building the next
        per_run.append(_with_labels(ensemble.ensemble(frames, method=config.ensemble), frames[0]))
    weights = list(config.weights()) or None
    final = ensemble.ensemble(per_run, method=config.ensemble, weights=weights,
                              names=[runs.run_name(r) for r in members])
    return _with_labels(final, per_run[0]), classes


def _same_classes(known, classes, where):
    if known is not None and list(known) != list(classes):
        raise UsageError(f"{where} was trained on classes {classes} but an earlier model on {known}: "
                         f"ensemble only runs of the same dataset")
    return list(classes)


def _with_labels(ens: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Ensembles carry only probabilities; put the (known or -1) labels back, joined on id."""
    return ens if "label" in ens else ens.merge(ref[["id", "label"]], on="id", how="left")


def _check_finite(frame: pd.DataFrame, where: str) -> None:
    cols = [c for c in frame if c.startswith("p_")]
    bad = ~np.isfinite(frame[cols].to_numpy()).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} predictions are NaN/inf (first id "
                        f"{frame.loc[bad, 'id'].iloc[0]}); the model diverged: retrain with a lower --lr")


# ---------------------------------------------------------------- test shards -> submission

def predict_test(config: PredictConfig, members: dict) -> dict:
    """Predict the test shards, ensemble, write and validate the submission (and score labeled tests)."""
    from histofold import data, submission
    from histofold.loop import reading

    first = next(iter(members.values()))[0]
    manifest = Manifest.load(config.tfrecords or first.resolved()["tfrecords"])
    n_test = manifest.count("test")
    if n_test == 0:
        raise UsageError(f"{manifest.directory} holds no test records: prepare a test set (prepare_tfrecords.py "
                         "--test_input=DIR or --holdout=0.2) or predict new images with --input=FOLDER")
    manifest.check("test", hashes=True)  # sha256 of every test shard before anything is predicted from it

    def dataset_for(rd, _manifest, image_size):
        return data.make_dataset(manifest, split="test", training=False, batch_size=config.batch_size,
                                 image_size=image_size, with_ids=True, label_mode="int")

    with reading(manifest, split="test"):
        final, classes = ensemble_members(config, members, dataset_for, what="test",
                                          fold_csv=f"test_tta{config.tta}.csv",
                                          annotate=lambda frame: manifest.with_slides(frame, "test"))
    name = config.name or "+".join(runs.run_name(r) for r in members)
    test_ids = manifest.test_ids()
    sub = submission.make_submission(final, class_names=classes, sample_submission=manifest.sample_submission(),
                                     test_ids=test_ids, output=config.format)
    paths = {"submission": io.join(config.output_dir, f"{name}.csv"),
             "probabilities": io.join(config.output_dir, f"{name}_probs.csv")}
    io.write_csv(paths["submission"], sub)
    io.write_csv(paths["probabilities"], final)
    summary = {**paths, "rows": len(sub), "runs": list(members), "tta": config.tta, "ensemble": config.ensemble}
    summary.update(score_frame(final, classes, prefix="test_"))
    if config.oof:
        summary.update(_oof_scores(config, members))
    return summary


def score_frame(frame: pd.DataFrame, classes: list[str], *, prefix: str) -> dict:
    """When every row carries a label (PCam valid/test, a labeled --test_input or --input), score it."""
    from histofold import metrics

    if len(frame) == 0 or (frame["label"] < 0).any():
        return {}
    probs = frame[tta.prob_columns(classes)].to_numpy()
    y = frame["label"].to_numpy().astype(int)
    if len(classes) == 2:
        m = metrics.binary_metrics(y, probs[:, 1])
        return {f"{prefix}auc": float(m["roc_auc"]), f"{prefix}accuracy": float(m["accuracy"])}
    m = metrics.multiclass_metrics(y, probs, class_names=classes)
    return {f"{prefix}accuracy": float(m["accuracy"]), f"{prefix}macro_f1": float(m["macro_f1"])}


def _oof_scores(config: PredictConfig, members: dict) -> dict:
    """Every fold's OOF with the same TTA (oof_tta<n>.csv): pooled CV score and the mean of the folds'."""
    from histofold import data, metrics
    from histofold.loop import reading

    scores = {}
    for run_path, fold_dirs in members.items():
        frames = []
        for rd in fold_dirs:
            if rd.fold == "full":
                continue  # trained on every fold: it has no out-of-fold predictions
            resolved = rd.resolved()
            manifest = Manifest.load(resolved["tfrecords"])
            model = rd.build_model()
            ds = data.make_dataset(manifest, split="train", folds=[rd.fold], training=False,
                                   batch_size=config.batch_size, image_size=tuple(resolved["image_size"]),
                                   with_ids=True, label_mode="int")
            with reading(manifest, [rd.fold]):
                oof = tta.predict_frame(model, ds, n=config.tta, class_names=resolved["classes"],
                                        desc=f"OOF {runs.run_name(rd.path)}/{rd.fold_name} TTA x{config.tta}")
            oof.insert(2, "fold", rd.fold)
            io.write_csv(rd.file(f"oof_tta{config.tta}.csv"), manifest.with_slides(oof, "train", [rd.fold]))
            frames.append(oof)
        if not frames:
            continue
        key = runs.run_name(run_path)
        classes = [c[2:] for c in frames[0].columns if c.startswith("p_")]
        pooled = pd.concat(frames, ignore_index=True)
        if len(classes) == 2:
            fold_aucs = [metrics.fast_auc(f["label"].to_numpy(), f[f"p_{classes[1]}"].to_numpy()) for f in frames]
            scores[f"cv_auc[{key}]"] = metrics.fast_auc(pooled["label"].to_numpy(), pooled[f"p_{classes[1]}"].to_numpy())
            scores[f"mean_fold_auc[{key}]"] = float(np.mean(fold_aucs))
        else:
            acc = [float((f[tta.prob_columns(classes)].to_numpy().argmax(1) == f["label"]).mean()) for f in frames]
            scores[f"cv_accuracy[{key}]"] = float(
                (pooled[tta.prob_columns(classes)].to_numpy().argmax(1) == pooled["label"]).mean())
            scores[f"mean_fold_accuracy[{key}]"] = float(np.mean(acc))
    return scores


# ---------------------------------------------------------------- --input: new images

def image_paths(input: str) -> list[str]:
    """Image files of a folder (recursively, sorted) or a glob; DataError when there are none."""
    import glob

    if io.isdir(input):
        if io.is_url(input):
            found = [p for p in io.glob(io.join(input, "*")) + io.glob(io.join(input, "*", "*"))]
        else:
            import os

            found = [os.path.join(r, f) for r, _, fs in os.walk(input) for f in fs]
    else:
        found = io.glob(input) if io.is_url(input) else glob.glob(input, recursive=True)
    paths = sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found at --input={input}")
    return paths


def _labels_from_folders(paths: list[str], root: str, classes: list[str]) -> np.ndarray:
    """Class index per image when every image sits in a folder named after a class (else -1 for all)."""
    if not io.isdir(root):
        return np.full(len(paths), -1)
    index = {c: i for i, c in enumerate(classes)}
    parents = [io.basename(io.dirname(p)) for p in paths]
    if all(p in index for p in parents):
        return np.array([index[p] for p in parents])
    return np.full(len(paths), -1)


def load_images(paths: list[str], pixel_format, *, threads: int = 8) -> tuple[list, list[dict]]:
    """(pixels per path in record format, or None when unreadable; rejects) with a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    from histofold import imageio
    from histofold.errors import ImageError

    def one(path):
        try:
            return pixel_format.apply(imageio.read_image(path)), None
        except ImageError as e:
            return None, {"id": path, "path": path, "reason": str(e)}

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, paths))
    return [r[0] for r in results], [r[1] for r in results if r[1] is not None]


def predict_images(config: PredictConfig, members: dict) -> dict:
    """A folder or glob of new images -> id-keyed predictions CSV (+ rejects CSV, + score when labeled).

    Each image goes through the run's PixelFormat (stored size, stain normalization) and the one
    model-input resize, exactly as a record does in training."""
    from histofold import data

    paths = image_paths(config.input)
    cache: dict = {}  # pixel format -> (pixels, rejects): decoded once per distinct format

    def pixels_for(manifest):
        fmt = manifest.pixel_format
        key = (fmt.size, str(fmt.stain))
        if key not in cache:
            cache[key] = load_images(paths, fmt)
        return cache[key]

    first_manifest = Manifest.load(next(iter(members.values()))[0].resolved()["tfrecords"])
    labels = _labels_from_folders(paths, config.input, first_manifest.classes)

    def dataset_for(rd, manifest, image_size):
        pixels, _ = pixels_for(manifest)
        keep = [i for i, p in enumerate(pixels) if p is not None]
        if not keep:
            raise DataError(f"none of the {len(paths)} images at --input={config.input} could be read "
                            f"(see the rejects CSV)")

        def generator():
            for i in keep:
                yield pixels[i], int(labels[i]), paths[i]

        return data.stream_dataset(generator, image_shape=manifest.image_size, image_size=image_size,
                                   batch_size=config.batch_size)

    final, classes = ensemble_members(config, members, dataset_for, what="images")
    final["prediction"] = [classes[i] for i in final[tta.prob_columns(classes)].to_numpy().argmax(1)]
    rejects = next(iter(cache.values()))[1]
    io.write_csv(config.predictions, final)
    summary = {"predictions": config.predictions, "images": len(paths), "predicted": len(final),
               "rejected": len(rejects)}
    if rejects:
        summary["rejects"] = config.predictions.rsplit(".", 1)[0] + "_rejects.csv"
        io.write_csv(summary["rejects"], pd.DataFrame(rejects, columns=["id", "path", "reason"]))
    log.info("%d images = %d predicted + %d rejected", len(paths), len(final), len(rejects))
    summary.update(score_frame(final, classes, prefix="input_"))
    return summary


# ---------------------------------------------------------------- --slides: whole-slide images

def predict_slides(config: PredictConfig, members: dict) -> dict:
    """Tile, predict and map every slide at --slides with the fold ensemble (histofold/slides.py).

    Tiles are read at the resolution of the training patches (the manifest's mpp) and resized to the
    stored patch size with the one resize (slides.read_tile); each batch then gets the manifest's stain
    normalization and the model-input resize, as records do, and every fold model of every run
    predicts it in the same pass (the models are loaded once for all slides)."""
    from histofold import data, ensemble, slides

    first = next(iter(members.values()))[0]
    manifest = Manifest.load(first.resolved()["tfrecords"])
    if manifest.mpp is None:
        raise UsageError(f"{manifest.path} does not record the patches' resolution: rerun prepare_tfrecords.py "
                         "with --mpp=<microns per pixel of the input images> (PCam/Kaggle HCD: 0.972)")
    fmt, ks = manifest.pixel_format, tta.tta_subset(config.tta)
    models = []  # (run, forward, image size, classes)
    classes = None
    for run_path, fold_dirs in members.items():
        for rd in fold_dirs:
            resolved = rd.resolved()
            classes = _same_classes(classes, resolved["classes"], rd.path)
            if Manifest.load(resolved["tfrecords"]).pixel_format != fmt:
                raise UsageError(f"{rd.path} was trained on records of another size or stain normalization "
                                 f"than {first.path}: map slides with runs of one prepared dataset")
            models.append((run_path, tta.make_forward(rd.build_model()), tuple(resolved["image_size"])))

    def predict_fn(tile_ds) -> np.ndarray:
        """Slide tiles (uint8 (B, P, P, 3), index) -> (N, K) ensemble probabilities in tile order."""
        outputs = [[] for _ in models]
        for tiles, _ in tile_ds:
            pixels = fmt.normalize(np.asarray(tiles))            # stain, as every record got it
            for out, (_, forward, size) in zip(outputs, models):
                out.append(tta.tta_batch(forward, data.model_inputs(pixels, size), ks))
        ids = None
        per_run: dict = {}
        for out, (run_path, _, _) in zip(outputs, models):
            probs = tta.to_class_probs(np.concatenate(out) if out else np.zeros((0, 1)), len(classes))
            ids = np.arange(len(probs)).astype(str) if ids is None else ids
            frame = pd.DataFrame(probs, columns=tta.prob_columns(classes)).assign(id=ids)
            per_run.setdefault(run_path, []).append(frame)
        runs_frames = [ensemble.ensemble(frames, method=config.ensemble) for frames in per_run.values()]
        final = ensemble.ensemble(runs_frames, method=config.ensemble, weights=list(config.weights()) or None)
        return final.set_index("id").loc[ids, tta.prob_columns(classes)].to_numpy()

    out_dir = config.output_dir
    table = slides.predict_slides(config.slides, out_dir=out_dir, predict_fn=predict_fn, classes=classes,
                                  patch_px=manifest.image_size[0], patch_mpp=manifest.mpp, mpp=config.mpp,
                                  stride=config.stride, min_tissue=config.min_tissue,
                                  batch_size=config.batch_size, top_k=config.top_k)
    ok = int((table["status"] == "ok").sum()) if len(table) else 0
    if ok == 0:
        raise DataError(f"no slide at --slides={config.slides} could be mapped; see {io.join(out_dir, 'slides.csv')}")
    return {"slides_csv": io.join(out_dir, "slides.csv"), "slides": len(table), "mapped": ok,
            "failed": len(table) - ok}
