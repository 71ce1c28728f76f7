"""Device strategy (TPU / multi-GPU / multi-worker / one device) and mixed-precision policy, chosen by name.

Measured on the 2-core AVX-512 CPU this project is developed on: mixed_float16 trains ~6x slower than
float32 (no fp16 kernels, casts everywhere), so "auto" keeps float32 off GPU; forcing jit_compile=True
was 2-9x slower on CPU, so compile() keeps Keras' jit_compile="auto".
"""
from __future__ import annotations

import glob
import json
import os

from histofold.errors import UsageError

STRATEGIES = ("auto", "tpu", "mirrored", "multiworker", "one_device", "cpu", "default")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
TPU_ENV_VARS = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "KAGGLE_TPU")


def resolve_strategy(name: str = "auto", *, tpu: str | None = None):
    """-> (tf.distribute.Strategy, one-line description). Create it before datasets and models.

    auto: a TPU when one is plausibly attached (env vars, /dev/accel*, libtpu) -> TF_CONFIG set ->
    multiworker -> >= 2 GPUs -> mirrored -> otherwise the default strategy (one device, no wrapping).
    """
    if name not in STRATEGIES:
        raise UsageError(f"unknown --strategy={name!r}; valid: {', '.join(STRATEGIES)}")
    if name == "auto":
        return _auto(tpu)
    return _BUILDERS[name](tpu)


def _auto(tpu):
    import tensorflow as tf

    if tpu or _tpu_plausible():
        try:
            return _tpu(tpu)
        except (ValueError, RuntimeError) as e:  # no TPU after all (UsageError is a ValueError): fall through to GPUs / CPU
            import logging

            logging.getLogger("histofold").warning("strategy=auto: TPU hint found but no TPU (%s)", e)
    if os.environ.get("TF_CONFIG"):
        return _multiworker(tpu)
    if len(tf.config.list_logical_devices("GPU")) >= 2:
        return _mirrored(tpu)
    strategy = tf.distribute.get_strategy()
    return strategy, f"default strategy ({_first_device()})"


def _tpu_plausible() -> bool:
    """Cheap checks so CPU/GPU machines never wait on a TPU resolver's network timeout."""
    if any(os.environ.get(v) for v in TPU_ENV_VARS):
        return True
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def _tpu(tpu):
    """TPUStrategy: tries the given/env TPU (Colab, Kaggle TPU v3 node), then 'local' (TPU VMs, v3-8/v5e)."""
    import tensorflow as tf

    errors = []
    for candidate in ([tpu] if tpu else [None, "local"]):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=candidate)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
            return strategy, f"TPU ({candidate or 'auto'}, {strategy.num_replicas_in_sync} cores)"
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            errors.append(f"tpu={candidate!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise UsageError(f"--strategy=tpu: no TPU found ({'; '.join(errors)}); on Kaggle/Colab pick a TPU "
                       f"accelerator, elsewhere pass --tpu=<name or grpc://address>")


def _mirrored(tpu):
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        raise UsageError("--strategy=mirrored needs at least one visible GPU (none found; check "
                           "CUDA_VISIBLE_DEVICES and nvidia-smi) -- use --strategy=auto or cpu")
    strategy = tf.distribute.MirroredStrategy()
    return strategy, f"MirroredStrategy ({len(gpus)} GPUs)"


def _multiworker(tpu):
    import tensorflow as tf

    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise UsageError("--strategy=multiworker needs the TF_CONFIG environment variable (cluster spec "
                           "and this worker's task index), set on every worker; see tf.distribute docs")
    try:
        workers = len(json.loads(raw).get("cluster", {}).get("worker", []))
    except json.JSONDecodeError as e:
        raise UsageError(f"TF_CONFIG is not valid JSON ({e}); fix the environment variable") from None
    strategy = _multiworker_class()()
    return strategy, f"MultiWorkerMirroredStrategy ({workers} workers, {strategy.num_replicas_in_sync} replicas)"


def _cluster(strategy) -> tuple[str | None, int, dict]:
    """(this task's type, its index, the cluster spec as a dict) of a multi-worker strategy; (None, 0, {})
    for every other strategy (one machine: nothing to coordinate)."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None, 0, {}
    resolver = strategy.cluster_resolver
    return resolver.task_type, int(resolver.task_id or 0), resolver.cluster_spec().as_dict()


def is_chief(strategy) -> bool:
    """Whether this process writes the run directory: always on one machine; in multi-worker training
    the "chief" task, or worker 0 when the cluster has no chief (TensorFlow's convention)."""
    task_type, index, cluster = _cluster(strategy)
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and index == 0 and "chief" not in cluster


def task_index(strategy) -> int:
    """This worker's index in TF_CONFIG (0 on one machine)."""
    return _cluster(strategy)[1]


def num_workers(strategy) -> int:
    """Machines taking part in training: chief + workers of TF_CONFIG's cluster (1 on one machine)."""
    _, _, cluster = _cluster(strategy)
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def _multiworker_class():
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3's fit hands it (keras-team/keras#20585,
    still so in Keras 3.15): a nested structure (its first (x, y, w) batch, to build the model: "Attempt
    to convert a value (PerReplica...) to a Tensor") is reduced leaf by leaf, and a scalar with axis=0
    (every epoch's logs: "Invalid reduction dimension 0 for input with 0 dimensions") across replicas
    only. Everything else reaches the stock reduce unchanged."""
    import tensorflow as tf

    class NestedReduceMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super()

            def one(v):
                scalar = all(getattr(t, "shape", None) is not None and t.shape.rank == 0
                             for t in self.experimental_local_results(v))
                return parent.reduce(reduce_op, v, axis=None if scalar else axis)

            return tf.nest.map_structure(one, value)

    return NestedReduceMultiWorkerMirroredStrategy


def _one_device(tpu):
    import tensorflow as tf

    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device), f"OneDeviceStrategy ({device})"


def _cpu(tpu):
    import tensorflow as tf

    return tf.distribute.OneDeviceStrategy("/cpu:0"), "OneDeviceStrategy (/cpu:0)"


def _default(tpu):
    import tensorflow as tf

    return tf.distribute.get_strategy(), f"default strategy ({_first_device()})"


def _first_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"{len(gpus)} GPU" if gpus else "CPU"


_BUILDERS = {"tpu": _tpu, "mirrored": _mirrored, "multiworker": _multiworker, "one_device": _one_device,
             "cpu": _cpu, "default": _default}


# ------------------------------------------------------------------------------------------ precision

def resolve_precision(name: str = "auto", *, strategy) -> str:
    """-> a keras dtype policy name. auto: mixed_bfloat16 on TPU; mixed_float16 when every visible GPU has
    compute capability >= 7.0 (tensor cores: V100, T4, A100, H100); float32 otherwise (CPU, P100)."""
    if name not in PRECISIONS:
        raise UsageError(f"unknown --precision={name!r}; valid: {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and all(_compute_capability(g) >= (7, 0) for g in gpus):
        return "mixed_float16"
    return "float32"


def _compute_capability(gpu) -> tuple[int, int]:
    import tensorflow as tf

    return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))


def apply_precision(policy: str) -> str:
    """Sets the global Keras dtype policy (before the model is built) and returns its name."""
    import keras

    if policy not in PRECISIONS or policy == "auto":
        raise ValueError(f"apply_precision({policy!r}): pass a resolved policy "
                         f"({', '.join(p for p in PRECISIONS if p != 'auto')}); resolve 'auto' first")
    keras.mixed_precision.set_dtype_policy(policy)
    return keras.mixed_precision.dtype_policy().name
