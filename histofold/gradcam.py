"""Grad-CAM heatmaps for flat functional Keras models, corrected for the border response of zero padding,
and their overlay on the image.

Why the correction. Every "same" convolution pads its input with zeros, so the cells of the last
feature map near the image border see a black frame that no training image has inside it; their
features differ from the interior's even on a patch without any content. Plain Grad-CAM
(ReLU(sum_c alpha_c A_c), Selvaraju et al. 2017) paints that difference: on images with no localized
evidence for the explained class (a confident negative, whose class-0 evidence is the *absence* of
tumour everywhere) the map is a near-constant level plus the padding pattern, and per-image max
normalization turns it into the same square frame on every image. Measured on histo_cnn trained on
the synthetic demo data: the class-0 maps of the most confident negatives were within 2% of the map
of a flat patch of their own mean colour, and 13% brighter in an 8 px border band than inside.

The fix, for any architecture and without touching the model: the map of a content-free image (a flat
patch of the image's own mean colour, one extra forward pass) holds the padding response alone; its
deviation from its centre cell is subtracted from the image's map (the level is kept, so evidence that
is strong everywhere is not removed). A map whose weakest cell still holds MIN_CONTRAST or more of its
strongest after that has no localized evidence and is flagged instead of being stretched into a
pattern; so is a map with no positive evidence at all.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("histofold")

MIN_CONTRAST = 0.25  # (max - min) / max below this: the map does not point anywhere


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


def gradcam(model, images, *, layer_name: str | None = None, class_index=None, return_valid: bool = False,
            correct_padding: bool = True):
    """Grad-CAM maps (B, H, W) float32 in [0, 1] of (B, H, W, 3) images in the model's input range.

    class_index None explains the predicted class of each image: argmax for softmax models; for a
    sigmoid model class 1 when p >= 0.5, else class 0 (a map of what argues *against* class 1).
    An int (or one per image) picks the class. Gradients are taken of the pre-activation logit when
    the model ends in a sigmoid/softmax activation, so saturated probabilities still give maps.
    With `correct_padding` (the default) the padding response is removed first (module docstring).
    Maps are upsampled with the one resize (imageops.resize) to (H, W) and scaled so each image's max
    is 1. `return_valid=True` also returns the (B,) bool mask of maps that localize something: some
    positive evidence, and a contrast (max - min) / max of at least MIN_CONTRAST; a map without
    positive evidence is all zeros.
    """
    import tensorflow as tf

    from histofold import imageops

    layer_name = layer_name or find_last_conv_layer(model)
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)  # (B, H, W, 3)
    grad_model, logit_kind = _grad_model(model, layer_name)
    with tf.GradientTape() as tape:
        fmap, head = grad_model(images, training=False)
        fmap = tf.cast(fmap, tf.float32)  # (B, h, w, C); float16 under mixed precision
        head = tf.cast(head, tf.float32)  # (B, K_out) logits or probabilities
        score = _class_score(head, logit_kind, class_index)  # (B,)
    grads = tape.gradient(score, fmap)  # (B, h, w, C)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, C): global-average-pooled gradients
    cam = tf.einsum("bhwc,bc->bhw", fmap, weights)  # (B, h, w) before the ReLU
    if correct_padding:
        cam = cam - padding_response(grad_model, images, weights)
    cam = tf.nn.relu(cam)
    cam = imageops.resize(cam[..., None], tuple(images.shape[1:3]))[..., 0]  # (B, H, W)
    cam = cam.numpy().astype(np.float32)
    flat = cam.reshape(len(cam), -1)
    peak, low = flat.max(axis=1), flat.min(axis=1)
    has_evidence = peak > 1e-12
    cam = np.where(has_evidence[:, None, None], cam / np.where(has_evidence, peak, 1.0)[:, None, None], 0.0)
    contrast = np.where(has_evidence, (peak - low) / np.where(has_evidence, peak, 1.0), 0.0)
    valid = has_evidence & (contrast >= MIN_CONTRAST)
    if not valid.all():
        log.info("Grad-CAM: %d of %d maps localize nothing in layer %s (%d without positive evidence)",
                 int((~valid).sum()), len(valid), layer_name, int((~has_evidence).sum()))
    cam = cam.astype(np.float32)
    return (cam, valid) if return_valid else cam


def padding_response(grad_model, images, weights):
    """(B, h, w): the weighted feature map of a flat patch of each image's mean colour minus its centre
    cell's value: what the zero padding adds near the border, with no content to respond to."""
    import tensorflow as tf

    flat = tf.broadcast_to(tf.reduce_mean(images, axis=(1, 2), keepdims=True), tf.shape(images))
    fmap, _ = grad_model(flat, training=False)
    base = tf.einsum("bhwc,bc->bhw", tf.cast(fmap, tf.float32), weights)  # (B, h, w)
    h, w = base.shape[1], base.shape[2]
    centre = tf.reduce_mean(base[:, (h - 1) // 2:h // 2 + 1, (w - 1) // 2:w // 2 + 1], axis=(1, 2))  # (B,)
    return base - centre[:, None, None]


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
        from histofold import imageops

        heat = np.clip(imageops.resize(heat[..., None], image.shape[:2]).numpy()[..., 0], 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0  # (H, W, 3) in [0, 255]
    blended = (1.0 - alpha) * image[..., :3].astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
