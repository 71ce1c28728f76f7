"""Tests for histofold/strategy.py on a CPU-only machine: auto picks the default strategy and float32."""
import keras
import pytest
import tensorflow as tf

from histofold import strategy as strat
from histofold.errors import UsageError


@pytest.fixture(autouse=True)
def no_tpu_or_cluster_env(monkeypatch):
    for var in (*strat.TPU_ENV_VARS, "TF_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def test_auto_on_cpu_is_default_strategy_float32():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this test describes a CPU-only machine")
    s, desc = strat.resolve_strategy("auto")
    assert s is tf.distribute.get_strategy() and s.num_replicas_in_sync == 1
    assert desc == "default strategy (CPU)"
    assert strat.resolve_precision("auto", strategy=s) == "float32"


def test_explicit_cpu_strategy_builds_and_runs_a_model():
    s, desc = strat.resolve_strategy("cpu")
    assert isinstance(s, tf.distribute.OneDeviceStrategy) and desc == "OneDeviceStrategy (/cpu:0)"
    with s.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert model(tf.ones((4, 3))).shape == (4, 2)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown --strategy='gpu'; valid: auto, tpu, mirrored"):
        strat.resolve_strategy("gpu")
    with pytest.raises(ValueError, match=r"unknown --precision='fp16'; valid: auto, float32, mixed_float16"):
        strat.resolve_precision("fp16", strategy=None)


def test_multiworker_without_tf_config_says_what_to_set():
    with pytest.raises(UsageError, match="needs the TF_CONFIG environment variable"):
        strat.resolve_strategy("multiworker")


def test_mirrored_without_gpu_errors_clearly():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible")
    with pytest.raises(UsageError, match="needs at least one visible GPU"):
        strat.resolve_strategy("mirrored")


def test_tpu_hint_detection(monkeypatch):
    if strat._tpu_plausible():
        pytest.skip("this machine looks like a TPU host")
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    assert strat._tpu_plausible()


@pytest.mark.parametrize("name", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_explicit_precision_is_returned_and_applied(name):
    assert strat.resolve_precision(name, strategy=None) == name
    assert strat.apply_precision(name) == name
    assert keras.mixed_precision.dtype_policy().name == name
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert layer.compute_dtype == ("float32" if name == "float32" else name.split("_")[1])


def test_apply_precision_rejects_unresolved():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        strat.apply_precision("auto")
