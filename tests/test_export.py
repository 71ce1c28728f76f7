"""export.py: the serving model reloads with keras.saving.load_model and gives predict.py's numbers from
raw uint8 images (test shards, --input images with stain normalization, one fold or the fold ensemble)."""
import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest

import export
import predict
import prepare_tfrecords
import train
from histofold import imageops, io
from histofold.errors import UsageError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """prepare (synthetic, 32 px, 2 folds, labeled test) -> train tiny x 2 folds -> predict --tta=2."""
    root = tmp_path_factory.mktemp("export")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_tfrecords.main(source="synthetic", count=60, test_count=12, image_size=32, folds=2)
        train.main(fold="all", arch="tiny", epochs=2, batch_size=8, lr=0.01)  # enough steps for folds to differ
        predict.main(tta=2)
        yield root
    finally:
        os.chdir(cwd)


def _test_pixels(root):
    from histofold.manifest import Manifest

    rows = Manifest.load(str(root / "tfrecords")).read_records(split="test")
    return np.stack([r["image"] for r in rows]), [r["id"] for r in rows]  # (N, 32, 32, 3) uint8 as stored


def _load(path):
    import keras

    import histofold.export  # noqa: F401 - registers the serving layers

    return keras.saving.load_model(path)


def test_fold_ensemble_export_gives_predicts_numbers(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    out = export.main(tta=2, formats="keras,savedmodel")
    assert out["out"] == "exports/tiny" and out["folds"] == ["fold0", "fold1"]
    x, ids = _test_pixels(tiny_run)
    model = _load(out["keras"])
    assert model.input.dtype == "uint8" and tuple(model.output.shape) == (None, 2)
    got = model.predict(x, verbose=0)
    want = pd.read_csv("submissions/tiny_probs.csv", dtype={"id": str}).set_index("id").loc[ids]
    np.testing.assert_allclose(got, want[["p_normal", "p_tumor"]].to_numpy(), atol=1e-5, rtol=0)
    assert got.dtype == np.float32 and np.allclose(got.sum(1), 1.0, atol=1e-6)

    import tensorflow as tf

    loaded = tf.saved_model.load(out["savedmodel"])  # kept: its variables live as long as it does
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, got, atol=1e-6, rtol=0)

    meta = json.load(open("exports/tiny/export.json"))
    assert meta["classes"] == ["normal", "tumor"] and meta["output"]["columns"] == ["p_normal", "p_tumor"]
    assert meta["input"]["dtype"] == "uint8" and meta["preprocessing"]["tta_d4"] == [0, imageops.HFLIP]
    assert meta["sha256"]["model.keras"]["sha256"] == io.sha256("exports/tiny/model.keras")
    assert meta["source"]["run"] == os.path.abspath("runs/tiny") and meta["source"]["folds"] == ["fold0", "fold1"]
    complete = json.load(open("runs/tiny/fold1/complete.json"))
    assert meta["source"]["weights_sha256"]["fold1"] == complete["files"]["model.weights.h5"]["sha256"]


def test_one_fold_export_equals_that_folds_test_predictions(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    out = export.main(fold=1, tta=2, formats="keras")
    assert out["out"] == "exports/tiny_fold1" and "savedmodel" not in out
    x, ids = _test_pixels(tiny_run)
    want = pd.read_csv("runs/tiny/fold1/test_tta2.csv", dtype={"id": str}).set_index("id").loc[ids]
    got = _load(out["keras"]).predict(x, verbose=0)
    np.testing.assert_allclose(got, want[["p_normal", "p_tumor"]].to_numpy(), atol=1e-5, rtol=0)
    fold0 = pd.read_csv("runs/tiny/fold0/test_tta2.csv", dtype={"id": str}).set_index("id").loc[ids]
    assert np.abs(fold0["p_tumor"].to_numpy() - got[:, 1]).max() > 1e-4  # the folds differ: the fold was chosen


def test_any_image_size_goes_through_the_stored_size_resize(tiny_run, monkeypatch):
    from histofold.export import StoredPixels

    monkeypatch.chdir(tiny_run)
    x, _ = _test_pixels(tiny_run)
    big = np.stack([imageops.resize_array(im, 48) for im in x])           # (N, 48, 48, 3) uint8
    stored = StoredPixels(32)(big).numpy()
    pillow = np.stack([imageops.resize_array(im, 32) for im in big]).astype(np.float32)
    assert stored.shape == (len(x), 32, 32, 3) and np.array_equal(stored, np.round(stored))
    assert np.abs(stored - pillow).max() <= 1.0                        # the imageops contract: one level
    assert np.array_equal(StoredPixels(32)(x).numpy(), x.astype(np.float32))  # the stored size: untouched
    model = _load(export.main(fold=0, tta=1, formats="keras", out="exports/f0")["keras"])
    assert model.predict(big, verbose=0).shape == (len(x), 2)


def test_stain_normalization_is_inside_the_model(tmp_path, monkeypatch):
    """Raw images in, predict.py --input's numbers out: the stain normalizer runs inside the export."""
    from PIL import Image

    from histofold import synthetic
    from histofold.manifest import Manifest

    monkeypatch.chdir(tmp_path)
    prepare_tfrecords.main(source="synthetic", count=60, test_count=0, image_size=32, folds=2,
                           stain_norm="macenko")
    assert Manifest.load("tfrecords").stain["method"] == "macenko"
    train.main(fold="0", arch="tiny", epochs=1, batch_size=16)
    raw = np.stack([synthetic.render(9, i, 32, i % 2, 2) for i in range(6)])
    os.makedirs("new")
    for i, im in enumerate(raw):
        Image.fromarray(im).save(f"new/{i}.png")
    predict.main(input="new", predictions="new.csv", tta=1)
    want = pd.read_csv("new.csv").set_index("id").loc[[f"new/{i}.png" for i in range(6)]]
    out = export.main(tta=1)
    assert "stain" in out["savedmodel"] and "stain" in out["onnx"]  # skipped, saying why
    model = _load(out["keras"])
    assert "stain_normalize" in [layer.name for layer in model.layers]
    np.testing.assert_allclose(model.predict(raw, verbose=0), want[["p_normal", "p_tumor"]].to_numpy(),
                               atol=1e-5, rtol=0)
    from histofold import runs

    plain = runs.RunDir("runs/tiny/fold0").build_model().predict(raw.astype(np.float32), verbose=0)[:, 0]
    assert np.abs(plain - want["p_tumor"].to_numpy()).max() > 1e-4  # without the normalizer: other numbers


def test_onnx_is_written_only_when_tf2onnx_converts(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    out = export.main(fold=0, tta=1, formats="keras,onnx", out="exports/onnx")
    have = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))
    if not have:
        assert out["onnx"].startswith("skipped:") and "not installed" in out["onnx"]
        assert not os.path.exists("exports/onnx/model.onnx")
    else:  # converted, and checked against the Keras model by onnxruntime
        assert out["onnx"] == "exports/onnx/model.onnx" and "max |diff|" in out["onnx_note"]


def test_bad_folds_are_usage_errors(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    with pytest.raises(UsageError, match="fold0, fold1"):
        export.main(fold=5)
    with pytest.raises(UsageError, match="--fold"):
        export.main(fold="first")
    with pytest.raises(UsageError, match="--formats"):
        export.main(formats="keras,tflite")
