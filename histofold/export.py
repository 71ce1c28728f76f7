"""Serving export of a trained run: one Keras model, uint8 RGB images in, float32 class probabilities out,
with the run's whole pixel path inside, so a server needs no histofold preprocessing code.

    exports/<run>/model.keras      raw (B, h, w, 3) uint8 of any size -> (B, K) P(class), columns = classes
    exports/<run>/saved_model/     the same through model.export() (TF serving); skipped with stain norm
    exports/<run>/model.onnx       through tf2onnx when it is installed and converts; else a note
    exports/<run>/export.json      classes, input/output spec, preprocessing, source run, sha256 of files

Inside the model, in order (what `predict.py` does to a record or to an --input image):
    StoredPixels   resize to the manifest's stored size (imageops' antialiased bilinear), rounded and
                   clipped to uint8 levels as a record is stored; an image already at that size is
                   untouched (then the numbers equal predict.py's on the records). Pillow does the
                   resize of predict.py --input: the two agree to one uint8 level (imageops docstring).
    StainNormalize the manifest's stain normalizer (histofold.stain, numpy) through tf.numpy_function:
                   the same code, the same pixels; only when the dataset was prepared with --stain_norm.
    ModelInput     data.model_inputs: the one resize to the model input size (float32 [0, 255]).
    the fold model(s) with their own scaling layer (models own their normalization) and float32 head,
    each over the --tta dihedral transforms (tta.TTA_SUBSETS), ClassProbs: sigmoid (B, 1) -> (B, 2);
    the mean over folds x transforms (= predict.py's TTA mean, then --ensemble=mean).
"""
from __future__ import annotations

import datetime
import logging
import re

import keras
import numpy as np
import tensorflow as tf

from histofold import data, imageops, io, runs, tta
from histofold import models  # noqa: F401 - registers the models' own layers (Preprocess, ...) for load_model
from histofold.errors import UsageError

log = logging.getLogger("histofold")

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"


# ---------------------------------------------------------------- layers (registered for load_model)

@keras.saving.register_keras_serializable(package="histofold")
class StoredPixels(keras.layers.Layer):
    """(B, h, w, 3) pixels of any size and dtype -> float32 (B, H, W, 3) at the stored record size, whole
    uint8 levels (rounded, clipped); the identity (a cast) when h, w already are H, W."""

    def __init__(self, size, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.size = imageops.as_size(size)

    def call(self, x):
        x = tf.cast(x, tf.float32)
        same = tf.reduce_all(tf.equal(tf.shape(x)[1:3], tf.constant(self.size, tf.int32)))
        out = tf.cond(same, lambda: x,
                      lambda: tf.clip_by_value(tf.round(imageops.resize(x, self.size)), 0.0, 255.0))
        return tf.ensure_shape(out, [None, *self.size, 3])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size)}


@keras.saving.register_keras_serializable(package="histofold")
class StainNormalize(keras.layers.Layer):
    """The dataset's stain normalization (histofold.stain, numpy, via tf.numpy_function) on whole-level
    float32 pixels -> float32 whole levels; `stain` is the manifest's {"method", "params"}."""

    def __init__(self, stain: dict, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        from histofold.stain import StainNormalizer

        self.stain = stain
        self._normalizer = StainNormalizer.from_json(stain)

    def _apply(self, pixels: np.ndarray) -> np.ndarray:
        return self._normalizer(np.clip(pixels, 0, 255).astype(np.uint8)).astype(np.float32)  # (B, H, W, 3)

    def call(self, x):
        out = tf.numpy_function(self._apply, [x], tf.float32, stateful=False)
        return tf.ensure_shape(out, x.shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "stain": self.stain}


@keras.saving.register_keras_serializable(package="histofold")
class ModelInput(keras.layers.Layer):
    """data.model_inputs: stored pixels -> the model input size (imageops.resize, float32 [0, 255])."""

    def __init__(self, size, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.size = imageops.as_size(size)

    def call(self, x):
        return data.model_inputs(x, self.size)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size)}


@keras.saving.register_keras_serializable(package="histofold")
class Dihedral(keras.layers.Layer):
    """The k-th element of D4 (imageops.dihedral), one TTA transform."""

    def __init__(self, k: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.k = int(k)

    def call(self, x):
        return imageops.dihedral(x, self.k)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, w, h, c) if imageops.swaps_hw(self.k) else (b, h, w, c)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


@keras.saving.register_keras_serializable(package="histofold")
class ClassProbs(keras.layers.Layer):
    """A model's output -> (B, K) float32 class probabilities: binary (B, 1) P(class 1) -> [1 - p, p]
    (tta.to_class_probs), (B, K) softmax unchanged."""

    def __init__(self, num_classes: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)

    def call(self, p):
        p = tf.cast(p, tf.float32)
        if self.num_classes == 2 and p.shape[-1] == 1:
            return tf.concat([1.0 - p, p], axis=-1)
        return p

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


# ---------------------------------------------------------------- the serving model

def chosen_folds(run: str, fold: str) -> list[runs.RunDir]:
    """--fold: a number, full, or all/ensemble (every fold directory, full excluded when folds exist)."""
    dirs = runs.fold_dirs(run)
    if fold in ("all", "ensemble"):
        folds = [d for d in dirs if d.fold != "full"] or dirs
    else:
        want = "full" if fold == "full" else int(fold)
        folds = [d for d in dirs if d.fold == want]
        if not folds:
            raise UsageError(f"--fold={fold}: {run} has {', '.join(d.fold_name for d in dirs)}; pass one of "
                             f"them or --fold=all")
    return folds


def build_serving_model(fold_dirs: list[runs.RunDir], *, tta_n: int = 1,
                        any_size: bool = True) -> tuple[keras.Model, dict]:
    """(serving model, facts for export.json) from complete fold directories of one run (same classes,
    image size and prepared dataset). any_size=False: the input is fixed to the stored size and has no
    StoredPixels resize (for ONNX, which has no antialiased resize op)."""
    from histofold.manifest import Manifest

    first = fold_dirs[0].resolved()
    for d in fold_dirs[1:]:
        r = d.resolved()
        if (r["classes"], r["image_size"], r.get("manifest_sha256")) != (
                first["classes"], first["image_size"], first.get("manifest_sha256")):
            raise UsageError(f"{d.path} differs from {fold_dirs[0].path} in classes, image size or dataset: "
                             f"export one fold with --fold=<k>")
    manifest = Manifest.load(first["tfrecords"])
    stored, size, classes = manifest.image_size, tuple(first["image_size"]), list(first["classes"])
    ks = tta.tta_subset(tta_n)
    if size[0] != size[1] and any(imageops.swaps_hw(k) for k in ks):
        raise UsageError(f"--tta={tta_n} rotates by 90 degrees, which needs a square model input (the run's "
                         f"is {size[0]}x{size[1]}); use --tta=4")
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")  # serving numbers as predict.py's on the CPU
    try:
        image = keras.Input(shape=(None, None, 3) if any_size else (*stored, 3), dtype="uint8", name="image")
        x = (StoredPixels(stored, name="stored_pixels") if any_size else keras.layers.Identity(
            name="stored_pixels", dtype="float32"))(image)
        if manifest.stain:
            x = StainNormalize(manifest.stain, name="stain_normalize")(x)
        x = ModelInput(size, name="model_input")(x)
        views = {k: (Dihedral(k, name=f"tta_d4_{k}")(x) if k else x) for k in ks}
        outputs = []
        for d in fold_dirs:
            trained = d.build_model()
            member = keras.Model(trained.input, trained.output, name=f"model_{d.fold_name}")
            for k in ks:
                outputs.append(ClassProbs(len(classes), name=f"probs_{d.fold_name}_d4_{k}")(member(views[k])))
        probs = (keras.layers.Average(name="probs", dtype="float32")(outputs) if len(outputs) > 1
                 else keras.layers.Identity(name="probs", dtype="float32")(outputs[0]))
        model = keras.Model(image, probs, name=f"{fold_dirs[0].run_name}_serving")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    facts = {"classes": classes, "stored_size": list(stored), "model_input_size": list(size),
             "stain": manifest.stain, "tta": ks, "manifest_sha256": manifest.sha256,
             "arch": fold_dirs[0].config().arch}
    return model, facts


# ---------------------------------------------------------------- writing

def export(config) -> dict:
    """export.py: an ExportConfig -> exports/<run>/ (see the module docstring); returns the summary."""
    run = config.run or runs.latest_run(config.runs_dir)
    fold_dirs = chosen_folds(run, config.fold)
    name = runs.run_name(run) + ("" if config.fold in ("all", "ensemble") else f"_{fold_dirs[0].fold_name}")
    out = config.out or io.join("exports", name)
    io.makedirs(out)
    model, facts = build_serving_model(fold_dirs, tta_n=config.tta)
    files = {"keras": save_keras(model, io.join(out, KERAS_FILE))}
    notes = {}
    if "savedmodel" in config.formats:
        files["savedmodel"], notes["savedmodel"] = save_savedmodel(model, io.join(out, SAVED_MODEL_DIR),
                                                                   stain=facts["stain"])
    if "onnx" in config.formats:
        files["onnx"], notes["onnx"] = save_onnx(lambda: build_serving_model(fold_dirs, tta_n=config.tta,
                                                                             any_size=False)[0],
                                                 io.join(out, ONNX_FILE), stain=facts["stain"])
    record = describe(run=run, fold_dirs=fold_dirs, facts=facts, out=out, files=files, notes=notes)
    io.write_json(io.join(out, EXPORT_JSON), record, indent=2)
    summary = {"out": out, "keras": files["keras"], "folds": [d.fold_name for d in fold_dirs],
               "classes": facts["classes"], "tta": config.tta}
    for fmt in ("savedmodel", "onnx"):
        if fmt in config.formats:
            summary[fmt] = files.get(fmt) or f"skipped: {notes[fmt]}"
            if files.get(fmt) and notes.get(fmt):
                summary[f"{fmt}_note"] = notes[fmt]
    return summary


def save_keras(model: keras.Model, path: str) -> str:
    """model.save through a temporary sibling, then a rename (a reader never sees half a file)."""
    tmp = re.sub(r"\.keras$", "", io.tmp_name(path)) + ".keras"  # keras insists on the suffix
    if io.exists(tmp):
        io.remove(tmp)
    model.save(tmp)
    io.rename(tmp, path, overwrite=True)
    return path


def save_savedmodel(model: keras.Model, path: str, *, stain) -> tuple[str | None, str]:
    """model.export() (a TF SavedModel with a `serve` endpoint) -> (path, "") or (None, why not)."""
    if stain:
        return None, ("stain normalization runs as numpy inside tf.numpy_function, which a SavedModel "
                      "cannot carry: serve model.keras (with histofold importable) instead")
    tmp = io.tmp_name(path)
    if io.exists(tmp):
        io.rmtree(tmp)
    try:
        model.export(tmp, format="tf_saved_model", verbose=False)
    except Exception as e:  # noqa: BLE001 - an optional format: record why and go on
        return None, f"model.export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if io.exists(path):
        io.rmtree(path)
    io.rename(tmp, path, overwrite=True)
    return path, ""


def save_onnx(build, path: str, *, stain) -> tuple[str | None, str]:
    """ONNX through tf2onnx of the fixed-size model `build()` (input at the stored size: ONNX has no
    antialiased resize), only when tf2onnx is installed (no hard dependency), converts every op and
    onnxruntime gives the Keras model's numbers on a random batch; else (None, why not)."""
    if stain:
        return None, "stain normalization runs as numpy (tf.numpy_function): ONNX cannot carry it"
    try:
        import onnxruntime
        import tf2onnx
    except ImportError as e:
        return None, f"{e.name} is not installed (pip install tf2onnx onnx onnxruntime to try)"
    model = build()
    shape = tuple(model.input_shape[1:])
    spec = [tf.TensorSpec([None, *shape], tf.uint8, name="image")]
    fn = tf.function(lambda image: model(image, training=False), input_signature=spec)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as e:  # noqa: BLE001 - an optional format: record why and go on
        return None, f"tf2onnx/onnxruntime failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    diff = float(np.abs(got - model.predict(x, verbose=0)).max())
    if not diff <= 1e-4:
        return None, f"the ONNX model's probabilities differ from the Keras model's by {diff:.2e}"
    io.write_bytes(path, proto.SerializeToString())
    return path, f"input fixed to {shape[0]}x{shape[1]} (the stored size; no resize in ONNX); max |diff| {diff:.1e}"


def _file_digests(path: str) -> dict:
    """{relative name: {sha256, bytes}} of a file or of every file under a directory."""
    import os

    if not io.isdir(path):
        return {io.basename(path): {"sha256": io.sha256(path), "bytes": io.size(path)}}
    out = {}
    for root, _, names in sorted(os.walk(path)):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, os.path.dirname(path))
            out[rel] = {"sha256": io.sha256(full), "bytes": io.size(full)}
    return out


def describe(*, run: str, fold_dirs, facts: dict, out: str, files: dict, notes: dict) -> dict:
    """export.json: what the model takes and returns, how it prepares pixels, where it came from."""
    classes = facts["classes"]
    stain = facts["stain"]
    digests = {}
    for path in files.values():
        if path:
            digests.update(_file_digests(path))
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "classes": classes, "num_classes": len(classes),
        "input": {"name": "image", "dtype": "uint8", "shape": [None, None, None, 3], "channels": "RGB",
                  "size": (f"any; resized to the stored {facts['stored_size'][0]}x{facts['stored_size'][1]} "
                           "(antialiased bilinear, rounded to uint8 levels), untouched at that size")},
        "output": {"name": "probs", "dtype": "float32", "shape": [None, len(classes)],
                   "columns": tta.prob_columns(classes), "meaning": "class probabilities (rows sum to 1)"},
        "preprocessing": {"stored_size": facts["stored_size"], "model_input_size": facts["model_input_size"],
                          "stain": (stain or {}).get("method", "none"), "scaling": f"inside the {facts['arch']} "
                          "model (its own normalization layer)", "tta_d4": facts["tta"],
                          "ensemble": "mean over folds x TTA transforms"},
        "source": {"run": io.absolute(run), "folds": [d.fold_name for d in fold_dirs], "arch": facts["arch"],
                   "manifest_sha256": facts["manifest_sha256"],
                   "weights_sha256": {d.fold_name: io.read_json(d.file(runs.COMPLETE))["files"][runs.WEIGHTS]["sha256"]
                                      for d in fold_dirs}},
        "files": {fmt: (io.basename(p) if p else None) for fmt, p in files.items()},
        "notes": {fmt: why for fmt, why in notes.items() if why},
        "sha256": digests,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "usage": "keras.saving.load_model('model.keras') after `import histofold.export` (registers the "
                 "layers); model.predict(uint8 images) -> probabilities in `output.columns` order",
    }
