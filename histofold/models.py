"""Model registry: every architecture by name, with its own preprocessing inside and a shared classifier head."""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import keras
from keras import layers, ops

from histofold.errors import UsageError

# ImageNet statistics of RGB pixels scaled to [0, 1] (the "torch" convention) and the caffe BGR means
# of pixels in [0, 255] (ResNet50's original weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="histofold")
class Preprocess(layers.Layer):
    """Maps float pixels in [0, 255] to what a backbone expects; weightless, so no-top weight files that
    were saved without it still load by topology. Runs in float32 under any mixed policy (precision of
    the mean subtraction), the next layer casts to the compute dtype.

    modes: unit -> [0, 1]; symmetric -> [-1, 1]; caffe -> BGR minus the caffe means;
           torch -> (x / 255 - ImageNet mean) / ImageNet std.
    """

    MODES = ("unit", "symmetric", "caffe", "torch")

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; valid: {', '.join(self.MODES)}")
        self.mode = mode

    def call(self, x):  # (B, H, W, 3) float in [0, 255]
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=x.dtype)
        mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=x.dtype)
        std = ops.convert_to_tensor(IMAGENET_STD, dtype=x.dtype)
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class ArchSpec:
    builder: Callable              # builder(x, *, weights, **kw) -> (B, h, w, C) features; x is preprocessed
    default_size: int              # pixels (square); the native resolution of the ImageNet weights
    size_multiple: int             # image size must be a multiple of this (1 = any size)
    min_size: int                  # smallest image size the downsampling allows
    preprocess: str                # Preprocess mode, or "builtin" when the keras application owns it
    keras_app: str | None = None   # keras.applications function name; None = no pretrained weights
    weights_file: str = ""         # the keras no-top ImageNet file name (for the offline error message)
    head_pool: str = "avg"         # avg (global average pooling) | flatten (seed 001's dense head)
    head_hidden: tuple = ()        # Dense+ReLU+Dropout units between pooling and the classifier
    dropout: float = 0.2           # default head dropout
    help: str = ""
    defaults: dict = field(default_factory=dict)  # builder keyword defaults (overridable via arch_kwargs)


# ------------------------------------------------------------------------------------------ builders

def _tiny(x, *, weights=None):
    """Two strided convs (a few hundred parameters): for tests that must train in seconds."""
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="tiny_conv1")(x)
    return layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="tiny_conv2")(x)


def _simple_cnn(x, *, weights=None, filters=(32, 64, 128)):
    """Seed 001's plain CNN body: (conv 3x3 + ReLU, 2x2 max-pool) per block; its dense head is in the spec."""
    for i, f in enumerate(filters, start=1):
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return x


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # momentum 0.9 (PyTorch's 0.1): short CPU runs (a few hundred steps) leave Keras' default 0.99
    # moving averages still ~20% at their initial values, and validation collapses (measured on PCam)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _histo_cnn(x, *, weights=None, width=32, stages=4, depth=2):
    """Small modern CNN for CPU: per stage `depth` x (conv-BN-ReLU), width doubling, 2x2 max-pool between
    stages. width=32, stages=4 -> widths 32, 64, 128, 256, total stride 8."""
    for s in range(stages):
        if s:
            x = layers.MaxPooling2D(2, name=f"stage{s + 1}_pool")(x)
        for d in range(depth):
            x = _conv_bn_relu(x, width * 2 ** s, name=f"stage{s + 1}_{d + 1}")
    return x


@keras.saving.register_keras_serializable(package="histofold")
class SpaceToDepth(layers.Layer):
    """(B, H, W, C) -> (B, H/b, W/b, b*b*C): every b x b block of pixels becomes one pixel's channels.

    A lossless stem: the first convolution sees full-resolution detail at a quarter of the positions,
    which on a 2-core CPU trains as fast as a stride-2 conv and keeps what a max-pool would drop."""

    def __init__(self, block: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.block = int(block)

    def call(self, x):
        b = self.block
        _, h, w, c = x.shape
        x = ops.reshape(x, (-1, h // b, b, w // b, b, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, h // b, w // b, b * b * c))

    def compute_output_shape(self, shape):
        b = self.block
        return (shape[0], shape[1] // b, shape[2] // b, shape[3] * b * b)

    def get_config(self):
        return {**super().get_config(), "block": self.block}


def _pcam_cnn(x, *, weights=None, width=32):
    """The CPU recipe's network for 96 px patches (measured in the README's recipe table):
    space-to-depth stem (96 -> 48 px, 12 channels) + conv(width), then conv-BN-ReLU stages of 2w, 4w,
    8w, 8w channels with a 2x2 max-pool between them (48 -> 24 -> 12 -> 6). ~1M parameters at width 32."""
    x = SpaceToDepth(2, name="stem_s2d")(x)
    x = _conv_bn_relu(x, width, name="stem")
    for i, mult in enumerate((2, 4, 8, 8)):
        if i:
            x = layers.MaxPooling2D(2, name=f"stage{i + 1}_pool")(x)
        x = _conv_bn_relu(x, width * mult, name=f"stage{i + 1}")
    return x


def _keras_app(x, *, weights=None, app: str, app_kwargs: tuple = ()):
    """A keras.applications backbone built on the preprocessed tensor, so its layers join the outer graph.
    weights: None | "imagenet" | PATH (loaded by keras into the application's own topology)."""
    fn = getattr(keras.applications, app)
    base = fn(include_top=False, weights=weights, input_tensor=x, input_shape=tuple(x.shape[1:]),
              **dict(app_kwargs))
    if any(isinstance(layer, keras.Model) for layer in base.layers):
        return _flat_output(base)
    return base.output


def _flat_output(base: keras.Model):
    """Re-applies `base`'s own layer objects (weights shared) with nested Sequential blocks (ConvNeXt's
    stem and downsampling) unrolled into their layers, so the outer model stays one flat graph."""
    cfg = base.get_config()
    tensors = {_history(cfg["input_layers"]): base.inputs[0]}  # (layer, node, index) -> tensor
    ops_by_name = {op.name: op for op in base.operations}  # layers and bare ops (ConvNeXt's residual `+`)

    def resolve(obj):
        if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
            return tensors[tuple(obj["config"]["keras_history"])]
        if isinstance(obj, dict):
            return {k: resolve(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(resolve(v) for v in obj)
        return obj

    for layer_cfg in cfg["layers"]:
        layer = ops_by_name[layer_cfg["name"]]
        for node_index, node in enumerate(layer_cfg["inbound_nodes"]):
            args, kwargs = resolve(node["args"]), resolve(node["kwargs"])
            if isinstance(layer, keras.Sequential):
                out = args[0]
                for sub in layer.layers:
                    out = sub(out)
            else:
                out = layer(*args, **kwargs)
            for i, t in enumerate(out if isinstance(out, (list, tuple)) else [out]):
                tensors[(layer.name, node_index, i)] = t
    return tensors[_history(cfg["output_layers"])]


def _history(spec) -> tuple:
    """[name, node, index] or [[name, node, index]] (one input/output) -> a tensors key."""
    return tuple(spec[0] if isinstance(spec[0], list) else spec)


def _app(app: str, **app_kwargs) -> Callable:
    return functools.partial(_keras_app, app=app, app_kwargs=tuple(app_kwargs.items()))


def _app_spec(app: str, *, size: int, preprocess: str, weights_file: str, multiple: int = 32,
              help: str = "", **app_kwargs) -> ArchSpec:
    return ArchSpec(builder=_app(app, **app_kwargs), default_size=size, size_multiple=multiple, min_size=32,
                    preprocess=preprocess, keras_app=app, weights_file=weights_file, help=help)


# Sizes: ImageNet backbones default to the resolution their weights were trained at. size_multiple=32
# where valid-padded downsampling would silently crop borders at other sizes (ResNet, DenseNet, ConvNeXt,
# and MobileNetV2 whose weights exist for 96..224 in steps of 32); EfficientNets pad "same"-style and
# run at any size (their native 240/260/300 are not multiples of 32).
ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec(_tiny, default_size=32, size_multiple=1, min_size=8, preprocess="unit", dropout=0.0,
                     help="two strided convs, for tests"),
    "simple_cnn": ArchSpec(_simple_cnn, default_size=96, size_multiple=1, min_size=8, preprocess="unit",
                           head_pool="flatten", head_hidden=(1000,), dropout=0.5,
                           help="seed 001: conv+ReLU+max-pool x3 (32-64-128), Flatten, Dense 1000, Dropout 0.5"),
    "simple_cnn_wide": ArchSpec(_simple_cnn, default_size=96, size_multiple=1, min_size=8, preprocess="unit",
                                head_pool="flatten", head_hidden=(1000, 500), dropout=0.5,
                                help="seed 001's modified model: one more Dense(500) + Dropout"),
    "histo_cnn": ArchSpec(_histo_cnn, default_size=96, size_multiple=1, min_size=16, preprocess="unit",
                          dropout=0.3, defaults={"width": 32, "stages": 4, "depth": 2},
                          help="conv-BN-ReLU stages (width 32-64-128-256), GAP; a CPU-sized modern CNN"),
    "pcam_cnn": ArchSpec(_pcam_cnn, default_size=96, size_multiple=16, min_size=32, preprocess="unit",
                         dropout=0.3, defaults={"width": 32},
                         help="space-to-depth stem + conv-BN-ReLU stages (32-64-128-256-256), GAP; the pcam-cpu recipe"),
    "mobilenetv2": _app_spec("MobileNetV2", size=224, preprocess="symmetric",
                             weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                             help="MobileNetV2 (alpha 1.0), inputs in [-1, 1]"),
    "resnet50": _app_spec("ResNet50", size=224, preprocess="caffe",
                          weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          help="ResNet50, caffe BGR mean subtraction"),
    "densenet121": _app_spec("DenseNet121", size=224, preprocess="torch",
                             weights_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             help="DenseNet121, ImageNet mean/std"),
    "efficientnetb0": _app_spec("EfficientNetB0", size=224, multiple=1, preprocess="builtin",
                                weights_file="efficientnetb0_notop.h5", help="EfficientNetB0 (own preprocessing)"),
    "efficientnetb1": _app_spec("EfficientNetB1", size=240, multiple=1, preprocess="builtin",
                                weights_file="efficientnetb1_notop.h5", help="EfficientNetB1 (own preprocessing)"),
    "efficientnetb2": _app_spec("EfficientNetB2", size=260, multiple=1, preprocess="builtin",
                                weights_file="efficientnetb2_notop.h5", help="EfficientNetB2 (own preprocessing)"),
    "efficientnetb3": _app_spec("EfficientNetB3", size=300, multiple=1, preprocess="builtin",
                                weights_file="efficientnetb3_notop.h5", help="EfficientNetB3 (own preprocessing)"),
    "efficientnetv2s": _app_spec("EfficientNetV2S", size=384, multiple=1, preprocess="builtin",
                                 weights_file="efficientnetv2-s_notop.h5", include_preprocessing=True,
                                 help="EfficientNetV2-S (own Rescaling to [-1, 1])"),
    "convnext_tiny": _app_spec("ConvNeXtTiny", size=224, preprocess="builtin",
                               weights_file="convnext_tiny_notop.h5", include_preprocessing=True,
                               help="ConvNeXt-Tiny (own ImageNet normalization)"),
}


def get_arch(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise UsageError(f"--arch={name!r}: choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


# ------------------------------------------------------------------------------------------ input size

def input_size(arch: str, requested: int, *, stored, weights: str = "none") -> tuple[int, int]:
    """The model's input (H, W): the one owner of this fact for train, finetune, predict and slides.

    `requested` (--image_size) when given, else the arch's default for a pretrained keras backbone
    (ImageNet weights were trained at that size), else the stored record size. Checked against the
    arch's minimum and size multiple (UsageError naming --image_size and a valid value)."""
    spec = get_arch(arch)
    if requested:
        size = (int(requested), int(requested))
    elif spec.keras_app and weights not in ("none", None, ""):
        size = (spec.default_size, spec.default_size)
    else:
        size = tuple(int(s) for s in stored)
    return _check_size(arch, spec, size)


# ------------------------------------------------------------------------------------------ build

def build_model(arch: str, *, num_classes: int, image_size=None, weights=None, dropout=None, seed=None,
                **arch_kwargs) -> keras.Model:
    """Flat functional model: float32 (B, H, W, 3) pixels in [0, 255] -> float32 probabilities
    (B, 1) sigmoid when num_classes == 2, else (B, K) softmax.

    image_size: int or (H, W); None = the arch's default. weights: None | "none" | "imagenet" | PATH to a
    no-top weights file. seed: seeds Python, NumPy and the backend so equal seeds give equal weights.
    arch_kwargs: builder options (e.g. width=48 for histo_cnn).
    """
    spec = get_arch(arch)
    size = _check_size(arch, spec, image_size)
    weights = _check_weights(arch, spec, weights)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    inputs = keras.Input(shape=(*size, 3), dtype="float32", name="image")
    x = inputs if spec.preprocess == "builtin" else Preprocess(spec.preprocess, name="preprocess")(inputs)
    kw = {**spec.defaults, **arch_kwargs}
    features, loaded = _run_builder(arch, spec, x, weights=weights, kw=kw)
    outputs = _head(features, spec=spec, num_classes=num_classes,
                    dropout=spec.dropout if dropout is None else dropout)
    model = keras.Model(inputs, outputs, name=arch)
    if weights not in (None, "imagenet"):
        if not loaded:  # small CNNs, or a file saved from backbone_model(): load into the flat backbone
            _load_backbone_weights(model, path=weights, arch=arch, spec=spec)
        if spec.keras_app and spec.keras_app.startswith("EfficientNetB"):
            _fix_efficientnet_v1_stats(model)
    return model


def _check_size(arch: str, spec: ArchSpec, image_size) -> tuple[int, int]:
    """(H, W) from an int, a pair or None (the arch's default), checked against the arch's minimum and
    size multiple (UsageError naming --image_size and the nearest valid values)."""
    size = spec.default_size if image_size is None else image_size
    hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    mult = spec.size_multiple or 1
    for s in hw:
        if s < spec.min_size:
            raise UsageError(f"--image_size={s} is below the minimum {spec.min_size} for {arch}; "
                             f"pass --image_size={max(spec.min_size, mult)} or more")
        if s % mult:
            lo, hi = max(mult * (s // mult), spec.min_size), mult * (s // mult + 1)
            raise UsageError(f"--image_size={s} is not a multiple of {mult}, as {arch} needs; pass {lo} or {hi}")
    return hw


def _check_weights(arch: str, spec: ArchSpec, weights):
    if weights in (None, "none", "None", ""):
        return None
    if weights == "imagenet" and not spec.keras_app:
        raise UsageError(f"--weights=imagenet: no pretrained weights exist for {arch}; "
                         f"use --weights=none or an ImageNet arch ({', '.join(a for a in ARCHS if ARCHS[a].keras_app)})")
    if weights != "imagenet":
        if not os.path.isfile(str(weights)):
            raise UsageError(f"--weights={weights}: no such file; pass none, imagenet or the path of a "
                             f"no-top weights file for {arch}")
    return weights


def _run_builder(arch: str, spec: ArchSpec, x, *, weights, kw: dict):
    """-> (features, weights_loaded). ImageNet downloads that fail offline become one actionable line;
    a PATH is first given to keras.applications (official no-top files load by its own topology)."""
    if weights is None or not spec.keras_app:
        return spec.builder(x, weights=None, **kw), False
    if weights != "imagenet":
        try:
            with warnings.catch_warnings():  # keras warns per layer before raising its own error
                warnings.simplefilter("ignore")
                return spec.builder(x, weights=weights, **kw), True
        except (ValueError, KeyError, OSError, TypeError):
            return spec.builder(x, weights=None, **kw), False  # build_model retries on the flat backbone
    try:
        return spec.builder(x, weights="imagenet", **kw), True
    except Exception as e:  # keras.utils.get_file raises a bare Exception("URL fetch failure ...")
        if not _is_download_error(e):
            raise
        raise UsageError(
            f"could not download ImageNet weights for {arch} (offline?): pass --weights=/path/to/"
            f"{spec.weights_file} (a no-top weights file; on Kaggle attach a dataset with it)") from None


def _is_download_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (OSError, ConnectionError)) or "fetch failure" in text or "urlopen" in text


def _head(x, *, spec: ArchSpec, num_classes: int, dropout: float):
    """(B, h, w, C) features -> probabilities; the classifier runs in float32 so outputs stay float32
    under mixed_float16 / mixed_bfloat16."""
    if spec.head_pool == "flatten":
        x = layers.Flatten(name="head_flatten")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    for i, units in enumerate(spec.head_hidden, start=1):
        x = layers.Dense(units, activation="relu", name=f"head_fc{i}")(x)
        x = layers.Dropout(dropout, name=f"head_fc{i}_dropout")(x)
    if not spec.head_hidden and dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    binary = num_classes == 2
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    # Logits stay addressable by name (head_logits) for Grad-CAM on saturated sigmoids.
    x = layers.Dense(1 if binary else num_classes, dtype="float32", name="head_logits")(x)
    return layers.Activation("sigmoid" if binary else "softmax", dtype="float32", name="head_probs")(x)


def _load_backbone_weights(model: keras.Model, *, path: str, arch: str, spec: ArchSpec) -> None:
    """Loads a no-top weights file (keras .h5 or .weights.h5) into the backbone by topology."""
    backbone = backbone_model(model)
    try:
        with warnings.catch_warnings():  # keras warns per layer before raising its own (long) error
            warnings.simplefilter("ignore")
            backbone.load_weights(path)
    except (ValueError, KeyError, OSError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--weights={path} does not fit {arch}'s backbone ({first[:160]}); pass a no-top "
                         f"weights file saved from {arch} (e.g. {spec.weights_file or 'backbone_model(m).save_weights'})") from None


def _fix_efficientnet_v1_stats(model: keras.Model) -> None:
    """keras' EfficientNetB* only adds its 1/sqrt(std) Rescaling for weights="imagenet": the official file
    stores std (not std^2) as the Normalization variance. Loading that file from a path would leave the
    inputs mis-scaled, so set variance = std^2 when the loaded stats are exactly the official ones."""
    norm = next((l for l in model.layers if isinstance(l, layers.Normalization)), None)
    if norm is None:
        return
    mean, var, count = norm.get_weights()
    official = all(abs(float(v) - s) < 1e-4 for v, s in zip(var.reshape(-1), IMAGENET_STD))
    if official:
        norm.set_weights([mean, var * var, count])


# ------------------------------------------------------------------------------------------ helpers

def backbone_layers(model: keras.Model) -> list:
    """Layers that hold weights and are not part of the head (head layers are named head_*)."""
    return [l for l in model.layers if l.weights and not l.name.startswith("head_")]


def backbone_model(model: keras.Model) -> keras.Model:
    """The backbone as a model (input -> last feature map), sharing layers with `model`; its
    save_weights file is a no-top weights file that build_model(weights=PATH) accepts."""
    return keras.Model(model.inputs, model.get_layer(last_conv_layer(model)).output,
                       name=f"{model.name}_backbone")


def set_backbone_trainable(model: keras.Model, trainable, *, freeze_bn=None) -> None:
    """trainable: True (whole backbone) | False (head only) | int N (the top N backbone layers).

    freeze_bn: BatchNormalization layers stay frozen (inference mode, moving stats kept) when fine-tuning;
    None = freeze them for a partial unfreeze (int N) or a frozen backbone, train them with True (training
    from scratch needs BN statistics to move). Recompile after calling this.
    """
    partial = not isinstance(trainable, bool)
    freeze_bn = (partial or not trainable) if freeze_bn is None else freeze_bn
    backbone = backbone_layers(model)
    n = len(backbone) if trainable is True else 0 if trainable is False else int(trainable)
    if n < 0:
        raise ValueError(f"unfreeze={trainable}: pass a non-negative number of top backbone layers")
    for i, layer in enumerate(backbone):
        on = i >= len(backbone) - n
        layer.trainable = on and not (freeze_bn and isinstance(layer, layers.BatchNormalization))
    for layer in model.layers:
        if layer.name.startswith("head_"):
            layer.trainable = True


def last_conv_layer(model: keras.Model) -> str:
    """Name of the last non-head layer with a 4-D (B, h, w, C) output: the Grad-CAM target."""
    for layer in reversed(model.layers):
        if layer.name.startswith("head_") or isinstance(layer, keras.layers.InputLayer):
            continue
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no 4-D feature layer before its head")


def count_params(model: keras.Model, trainable_only: bool = False) -> int:
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(math.prod(w.shape) for w in weights))
