"""Tests for histofold/models.py: every registered arch builds flat, float32-out, at any precision."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from histofold import models
from histofold.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"resnet50", "densenet121", "efficientnetb1", "efficientnetb2", "efficientnetb3", "efficientnetv2s",
         "convnext_tiny"}


def small_size(arch: str) -> int:
    """The smallest valid input for the arch (fast builds): 32 px for keras applications, else 16 px,
    raised to the arch's minimum and rounded up to its size multiple (pcam_cnn: 32)."""
    spec = models.get_arch(arch)
    size = max(32 if spec.keras_app else 16, spec.min_size)
    mult = spec.size_multiple or 1
    return -(-size // mult) * mult


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test and always restores float32."""
    def set_policy(name):
        keras.mixed_precision.set_dtype_policy(name)
    yield set_policy
    keras.mixed_precision.set_dtype_policy("float32")


def _params():
    for arch in models.ARCHS:
        for pol in ("float32", "mixed_float16"):
            slow = pol == "mixed_float16" and arch in HEAVY
            yield pytest.param(arch, pol, id=f"{arch}-{pol}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("arch,pol", list(_params()))
def test_every_arch_builds_flat_with_float32_output(arch, pol, policy):
    policy(pol)
    size = small_size(arch)
    for k in (2, 3):
        model = models.build_model(arch, num_classes=k, image_size=size)
        x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
        y = keras.ops.convert_to_numpy(model(x, training=False))
        assert y.shape == ((2, 1) if k == 2 else (2, k))
        assert y.dtype == np.float32 and np.all(np.isfinite(y))
        if k > 2:
            np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-3)
    assert not [l.name for l in model.layers if isinstance(l, keras.Model)], "nested sub-model"
    conv = model.get_layer(models.last_conv_layer(model))
    assert len(conv.output.shape) == 4 and not conv.name.startswith("head_")
    assert models.backbone_layers(model) and all(not l.name.startswith("head_")
                                                 for l in models.backbone_layers(model))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UsageError, match=r"--arch='nope': choose one of tiny, simple_cnn, .*pcam_cnn.*resnet50"):
        models.get_arch("nope")


def test_wrong_size_suggests_valid_sizes():
    with pytest.raises(UsageError, match=r"--image_size=100 is not a multiple of 32, as resnet50 needs; pass 96 or 128"):
        models.build_model("resnet50", num_classes=2, image_size=100)
    with pytest.raises(UsageError, match=r"--image_size=16 is below the minimum 32 for mobilenetv2; pass --image_size=32"):
        models.build_model("mobilenetv2", num_classes=2, image_size=16)
    with pytest.raises(UsageError, match=r"--image_size=40 is not a multiple of 16, as pcam_cnn needs; pass 32 or 48"):
        models.build_model("pcam_cnn", num_classes=2, image_size=40)


def test_input_size_owns_the_model_input_size():
    # --image_size when given; else the pretrained keras backbone's size; else the stored record size
    assert models.input_size("histo_cnn", 64, stored=(96, 96)) == (64, 64)
    assert models.input_size("histo_cnn", 0, stored=(96, 96)) == (96, 96)
    assert models.input_size("pcam_cnn", 0, stored=(96, 96)) == (96, 96)
    assert models.input_size("resnet50", 0, stored=(96, 96), weights="imagenet") == (224, 224)
    assert models.input_size("resnet50", 0, stored=(96, 96), weights="none") == (96, 96)
    assert models.input_size("resnet50", 128, stored=(96, 96), weights="imagenet") == (128, 128)
    assert models.input_size("tiny", 0, stored=(20, 24)) == (20, 24)
    with pytest.raises(UsageError, match="--image_size=50 is not a multiple of 32"):
        models.input_size("resnet50", 50, stored=(96, 96))
    with pytest.raises(UsageError, match="--image_size=24 is below the minimum 32 for pcam_cnn"):
        models.input_size("pcam_cnn", 0, stored=(24, 24))       # a too-small stored size is caught too
    with pytest.raises(UsageError, match="--arch='nope'"):
        models.input_size("nope", 0, stored=(96, 96))


def test_space_to_depth_moves_each_block_into_channels():
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype("float32")
    layer = models.SpaceToDepth(2)
    out = keras.ops.convert_to_numpy(layer(x))
    assert out.shape == (2, 4, 6, 12) == layer.compute_output_shape((2, 8, 12, 3))
    np.testing.assert_array_equal(out, tf.nn.space_to_depth(x, 2).numpy())   # TensorFlow's definition
    # pixel (i, j) of block (bi, bj) lands in channels ((i * 2 + j) * 3 .. + 3) of output pixel (bi, bj)
    np.testing.assert_array_equal(out[1, 2, 3, 9:12], x[1, 5, 7])
    assert models.SpaceToDepth.from_config(layer.get_config()).block == 2


def test_pcam_cnn_layout_and_save_load_round_trip(tmp_path):
    model = models.build_model("pcam_cnn", num_classes=2, image_size=96, seed=0)
    assert models.get_arch("pcam_cnn").default_size == 96
    assert 0.9e6 < models.count_params(model) < 1.1e6                      # ~1M parameters at width 32
    assert tuple(model.get_layer("stem_s2d").output.shape) == (None, 48, 48, 12)
    assert tuple(model.get_layer(models.last_conv_layer(model)).output.shape) == (None, 6, 6, 256)
    path = tmp_path / "pcam_cnn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)                                 # SpaceToDepth is registered
    x = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)),
                               keras.ops.convert_to_numpy(model(x, training=False)), rtol=1e-5, atol=1e-6)


def test_default_sizes_and_rectangular_input():
    assert models.get_arch("histo_cnn").default_size == 96
    assert models.get_arch("efficientnetb3").default_size == 300
    m = models.build_model("tiny", num_classes=2, image_size=(24, 40))
    assert tuple(m.input.shape) == (None, 24, 40, 3)


def test_preprocessing_applied_once_per_arch():
    """Exactly one preprocessing stage: our Preprocess layer, or the keras application's own."""
    for arch in ("mobilenetv2", "efficientnetb0", "convnext_tiny"):
        m = models.build_model(arch, num_classes=2, image_size=32)
        ours = [l for l in m.layers if isinstance(l, models.Preprocess)]
        builtin = [l for l in m.layers if isinstance(l, (keras.layers.Rescaling, keras.layers.Normalization))]
        assert (len(ours), bool(builtin)) == ((0, True) if models.get_arch(arch).preprocess == "builtin"
                                             else (1, False)), arch


def test_preprocess_modes_exact():
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")  # (1, 1, 1, 3)
    out = {m: keras.ops.convert_to_numpy(models.Preprocess(m)(x)).ravel() for m in models.Preprocess.MODES}
    np.testing.assert_allclose(out["unit"], [0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(out["symmetric"], [-1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(out["caffe"], [255 - 103.939, 127.5 - 116.779, 0 - 123.68], atol=1e-4)
    np.testing.assert_allclose(out["torch"], [(0 - .485) / .229, (.5 - .456) / .224, (1 - .406) / .225],
                               atol=1e-5)


def _assert_same_backbone(model, reference):
    for layer in reference.layers:
        if layer.weights:
            for a, b in zip(model.get_layer(layer.name).get_weights(), layer.get_weights()):
                np.testing.assert_array_equal(a, b)


def test_weights_path_round_trip_keras_app(tmp_path):
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mnv2_notop.weights.h5"
    base.save_weights(path)
    model = models.build_model("mobilenetv2", num_classes=2, image_size=32, weights=str(path))
    _assert_same_backbone(model, base)
    fresh = models.build_model("mobilenetv2", num_classes=2, image_size=32, seed=7)
    w = fresh.get_layer("Conv1").get_weights()[0]
    assert not np.array_equal(w, base.get_layer("Conv1").get_weights()[0])  # the load did something


def test_weights_path_round_trip_flat_backbone(tmp_path):
    src = models.build_model("histo_cnn", num_classes=3, image_size=32, width=8, seed=1)
    path = tmp_path / "histo_backbone.weights.h5"
    models.backbone_model(src).save_weights(path)
    model = models.build_model("histo_cnn", num_classes=2, image_size=32, width=8, seed=2, weights=str(path))
    _assert_same_backbone(model, models.backbone_model(src))


def test_wrong_arch_weights_file_is_one_line_usage_error(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    models.backbone_model(models.build_model("tiny", num_classes=2, image_size=32)).save_weights(path)
    with pytest.raises(UsageError) as e:
        models.build_model("mobilenetv2", num_classes=2, image_size=32, weights=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "mobilenetv2" in msg
    with pytest.raises(UsageError, match="no such file"):
        models.build_model("tiny", num_classes=2, weights=str(tmp_path / "missing.h5"))


def test_imagenet_offline_is_one_line_usage_error(monkeypatch):
    from keras.src.utils import file_utils  # the download keras.applications call

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x: None -- name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(UsageError) as e:
        models.build_model("resnet50", num_classes=2, image_size=32, weights="imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("could not download ImageNet weights for resnet50 (offline?)")
    assert "--weights=/path/to/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    with pytest.raises(UsageError, match="no pretrained weights exist for simple_cnn"):
        models.build_model("simple_cnn", num_classes=2, weights="imagenet")


def test_efficientnet_official_stats_fixed_after_path_load(tmp_path):
    """The official EfficientNetB* file stores std as the Normalization variance; loading it from a path
    must give the same (x - mean) / std as keras' weights="imagenet" route."""
    src = models.build_model("efficientnetb0", num_classes=2, image_size=32)
    norm = next(l for l in src.layers if isinstance(l, keras.layers.Normalization))
    mean, var, count = norm.get_weights()
    norm.set_weights([np.reshape(models.IMAGENET_MEAN, mean.shape), np.reshape(models.IMAGENET_STD, var.shape),
                      count])
    path = tmp_path / "effb0.weights.h5"
    models.backbone_model(src).save_weights(path)
    model = models.build_model("efficientnetb0", num_classes=2, image_size=32, weights=str(path))
    loaded = next(l for l in model.layers if isinstance(l, keras.layers.Normalization)).get_weights()[1]
    np.testing.assert_allclose(loaded.ravel(), np.square(models.IMAGENET_STD), rtol=1e-6)


def test_set_backbone_trainable_modes():
    model = models.build_model("histo_cnn", num_classes=2, image_size=32, width=8)
    backbone = models.backbone_layers(model)
    models.set_backbone_trainable(model, False)
    assert all(not l.trainable for l in backbone)
    assert models.count_params(model, trainable_only=True) == sum(
        int(np.prod(w.shape)) for l in model.layers if l.name.startswith("head_") for w in l.weights)
    models.set_backbone_trainable(model, 3)  # top 3 layers with weights: conv, BN, conv of the last stage
    top = backbone[-3:]
    assert [l.trainable for l in top] == [not isinstance(l, keras.layers.BatchNormalization) for l in top]
    assert all(not l.trainable for l in backbone[:-3])
    models.set_backbone_trainable(model, True)
    assert all(l.trainable for l in backbone)  # from scratch: BN statistics must move
    models.set_backbone_trainable(model, True, freeze_bn=True)
    assert all(l.trainable != isinstance(l, keras.layers.BatchNormalization) for l in backbone)
    assert models.count_params(model) > models.count_params(model, trainable_only=True)


def test_seed_makes_builds_identical():
    a = models.build_model("histo_cnn", num_classes=2, image_size=16, width=4, seed=3)
    b = models.build_model("histo_cnn", num_classes=2, image_size=16, width=4, seed=3)
    c = models.build_model("histo_cnn", num_classes=2, image_size=16, width=4, seed=4)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_simple_cnn_matches_seed_001():
    m = models.build_model("simple_cnn", num_classes=2, image_size=32)
    assert [l.units for l in m.layers if isinstance(l, keras.layers.Dense)] == [1000, 1]
    assert m.get_layer("head_fc1_dropout").rate == 0.5
    wide = models.build_model("simple_cnn_wide", num_classes=2, image_size=32)
    assert len([l for l in wide.layers if isinstance(l, keras.layers.Dropout)]) == 2


JAX_SCRIPT = textwrap.dedent("""
    import numpy as np, keras
    from histofold import models
    assert keras.backend.backend() == "jax", keras.backend.backend()
    for arch, spec in models.ARCHS.items():
        size = max(32 if spec.keras_app else 16, spec.min_size)
        size = -(-size // (spec.size_multiple or 1)) * (spec.size_multiple or 1)
        m = models.build_model(arch, num_classes=3, image_size=size)
        y = np.asarray(m(np.zeros((1, size, size, 3), "float32")))
        assert y.shape == (1, 3) and y.dtype == np.float32, (arch, y.shape, y.dtype)
        assert not any(isinstance(l, keras.Model) for l in m.layers), arch
        models.last_conv_layer(m)
    print("jax ok", len(models.ARCHS))
""")


@pytest.mark.slow
def test_every_arch_builds_under_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("HISTOFOLD_JAX_PATH", ""),
                                                       os.environ.get("PYTHONPATH", "")]))}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(bool(u.find_spec('jax')))"],
                           env=env, capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip("jax not installed: pip install jax (or set HISTOFOLD_JAX_PATH to a --target dir)")
    out = subprocess.run([sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"jax ok {len(models.ARCHS)}" in out.stdout
