"""Grad-CAM heatmaps for flat functional Keras models, and their overlay on the image."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("histofold")


def find_last_conv_layer(model) -> str:
    """Name of the last layer with a 4-D (B, h, w, C) output: models.last_conv_layer, or a local scan."""
    try:
        from histofold.models import last_conv_layer
    except ImportError:
        last_conv_layer = None
    if last_conv_layer is not None:
        return last_conv_layer(model)
    import keras

    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no layer with a 4-D output: Grad-CAM needs a convolutional model")


def gradcam(model, images, *, layer_name: str | None = None, class_index=None, return_valid: bool = False):
    """Grad-CAM maps (B, H, W) float32 in [0, 1] of (B, H, W, 3) images in the model's input range.

    class_index None explains the predicted class of each image: argmax for softmax models; for a
    sigmoid model class 1 when p >= 0.5, else class 0 (a map of what argues *against* class 1).
    An int (or one per image) picks the class. Gradients are taken of the pre-activation logit when
    the model ends in a sigmoid/softmax activation, so saturated probabilities still give maps.
    Maps are upsampled bilinearly to (H, W) and scaled so each image's max is 1; an image whose map
    is all zero (no positive evidence, or dead ReLUs) gets zeros - `return_valid=True` also returns
    the (B,) bool mask of images with a non-zero map.
    """
    import tensorflow as tf

    images = tf.cast(tf.convert_to_tensor(images), tf.float32)  # (B, H, W, 3)
    grad_model, logit_kind = _grad_model(model, layer_name or find_last_conv_layer(model))
    with tf.GradientTape() as tape:
        fmap, head = grad_model(images, training=False)
        fmap = tf.cast(fmap, tf.float32)  # (B, h, w, C); float16 under mixed precision
        head = tf.cast(head, tf.float32)  # (B, K_out) logits or probabilities
        score = _class_score(head, logit_kind, class_index)  # (B,)
    grads = tape.gradient(score, fmap)  # (B, h, w, C)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, C): global-average-pooled gradients
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", fmap, weights))
    cam = tf.image.resize(cam[..., None], tf.shape(images)[1:3], method="bilinear")[..., 0]  # (B, H, W)
    cam = cam.numpy().astype(np.float32)
    peak = cam.reshape(len(cam), -1).max(axis=1)
    valid = peak > 1e-12
    cam = np.where(valid[:, None, None], cam / np.where(valid, peak, 1.0)[:, None, None], 0.0).astype(np.float32)
    if not valid.all():
        log.warning("Grad-CAM: %d of %d maps are all zero (no positive evidence in layer %s)",
                    int((~valid).sum()), len(valid), layer_name or find_last_conv_layer(model))
    return (cam, valid) if return_valid else cam


def _grad_model(model, layer_name: str):
    """keras.Model images -> [feature map, head]; head = logits when the model ends in an activation."""
    import keras

    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Activation) and act in ("sigmoid", "softmax"):
        head, kind = last.input, f"logit_{act}"
    else:
        head, kind = model.output, "prob"
    fmap = model.get_layer(layer_name).output
    return keras.Model(model.inputs, [fmap, head]), kind


def _class_score(head, kind: str, class_index):
    """(B, K_out) head -> (B,) score of the explained class per image."""
    import tensorflow as tf

    binary = head.shape[-1] == 1
    if binary:
        p_or_z = head[:, 0]
        threshold = 0.0 if kind.startswith("logit") else 0.5  # logit 0 == probability 0.5
        if class_index is None:
            cls = tf.cast(p_or_z >= threshold, tf.int32)
        else:
            cls = tf.broadcast_to(tf.cast(class_index, tf.int32), tf.shape(p_or_z))
        positive = tf.cast(cls, tf.bool)
        # class 0 of a sigmoid: logit -z, probability 1 - p
        negative = -p_or_z if kind.startswith("logit") else 1.0 - p_or_z
        return tf.where(positive, p_or_z, negative)
    if class_index is None:
        cls = tf.argmax(head, axis=-1, output_type=tf.int32)
    else:
        cls = tf.broadcast_to(tf.cast(class_index, tf.int32), tf.shape(head)[:1])
    return tf.gather(head, cls, axis=1, batch_dims=1)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 image blended with a colour-mapped (h, w) heatmap in [0, 1] -> (H, W, 3) uint8."""
    import matplotlib

    image = np.asarray(image_uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != image.shape[:2]:
        from PIL import Image

        heat = np.asarray(Image.fromarray(heat).resize((image.shape[1], image.shape[0]), Image.BILINEAR))
    colour = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0  # (H, W, 3) in [0, 255]
    blended = (1.0 - alpha) * image[..., :3].astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
