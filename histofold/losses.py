"""Loss, metrics and the default checkpoint monitor for binary (1 sigmoid unit) and multi-class (softmax) heads."""
from __future__ import annotations

import keras


def make_loss(*, num_classes: int, label_smoothing: float = 0.0, focal: bool = False, focal_gamma: float = 2.0):
    """Binary: labels (B, 1) float vs sigmoid probabilities; multi-class: one-hot (B, K) vs softmax.
    Focal loss (Lin et al. 2017) down-weights easy examples by (1 - p_t)^gamma; gamma=0 is cross-entropy.
    Label smoothing pulls targets toward 1/2 (binary) or 1/K (multi-class) by `label_smoothing`."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label_smoothing={label_smoothing}: must be in [0, 1)")
    if num_classes == 2:
        if focal:
            # alpha balancing off: class imbalance is handled by --class_weight
            return keras.losses.BinaryFocalCrossentropy(gamma=focal_gamma, label_smoothing=label_smoothing,
                                                        name="binary_focal")
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing, name="bce")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if focal:
        # CategoricalFocalCrossentropy's default alpha=0.25 scales every class equally; 1.0 keeps the loss on
        # the cross-entropy scale so gamma=0 equals CategoricalCrossentropy
        return keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=focal_gamma,
                                                         label_smoothing=label_smoothing, name="categorical_focal")
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, name="cce")


def make_metrics(num_classes: int) -> list:
    """Binary: ROC AUC + accuracy at 0.5; multi-class: accuracy, macro F1, one-vs-rest ROC AUC (averaged)."""
    if num_classes == 2:
        return [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        # F1 of the argmax class: threshold=None picks the max probability per row
        keras.metrics.F1Score(average="macro", threshold=None, name="macro_f1"),
        keras.metrics.AUC(multi_label=True, num_labels=num_classes, name="auc"),
    ]


def default_monitor(num_classes: int) -> str:
    """The validation metric that picks the best checkpoint: ROC AUC (binary), macro F1 (multi-class)."""
    return "val_auc" if num_classes == 2 else "val_macro_f1"
