"""Named recipes: the exact flags of prepare_tfrecords.py, train.py and predict.py for a documented use.

A recipe is not a code path: it is the flag list a user would type, kept in one place so that
`make demo`, bench/quality.py and the README run and print the same commands. Each value is tuned by
measurement (see the README's quality table).
"""
from __future__ import annotations

from histofold.errors import UsageError

RECIPES: dict[str, dict[str, dict]] = {
    # The embedded demo: synthetic H&E-like patches, 5 folds, a small CNN, about 5 min on 2 CPU cores.
    "demo": {
        "prepare": {"source": "synthetic", "count": 1500, "test_count": 500, "image_size": 64, "folds": 5},
        "train": {"fold": "all", "arch": "histo_cnn", "width": 16, "epochs": 5, "batch_size": 64,
                  "lr": 3e-3, "augment": "light"},
        "predict": {"tta": 8, "oof": True},
    },
    # Real PCam patches on a 2-core CPU, the quality bar (bench/quality.py scores it on PCam's valid AND
    # test splits): one pcam_cnn on all training folds at the native 96 px, fused stain augmentation,
    # AdamW with a 10% linear warm-up and cosine decay, 8-way TTA. Every choice was measured on both
    # splits (README, "Recipes and quality bar"); whole chain ~16 min on 2 cores.
    "pcam-cpu": {
        "prepare": {"folds": 5, "mpp": 0.972},  # PCam's resolution, so the model can map whole slides
        "train": {"fold": "full", "arch": "pcam_cnn", "epochs": 50, "batch_size": 64, "lr": 2e-3,
                  "schedule": "cosine", "warmup": 0.1, "weight_decay": 1e-4, "augment": "stain"},
        "predict": {"tta": 8},
    },
    # PCam / Kaggle HCD with a GPU (or TPU): an ImageNet-pretrained EfficientNet-B0 at 192 px (PCam's 96 px
    # patches upsampled by the one resize), 5 fold models, one epoch with the backbone frozen, the same
    # stain augmentation and schedule. Not measured by this project (no GPU was lent): the recipe is the
    # community's usual choice; `--weights=PATH` to a local no-top weights file offline.
    "pcam-gpu": {
        "prepare": {"folds": 5},
        "train": {"fold": "all", "arch": "efficientnetb0", "weights": "imagenet", "image_size": 192,
                  "epochs": 12, "batch_size": 128, "lr": 1e-3, "schedule": "cosine", "warmup": 0.1,
                  "weight_decay": 1e-5, "augment": "stain", "freeze_base_epochs": 1},
        "predict": {"tta": 8},
    },
}


def get_recipe(name: str) -> dict[str, dict]:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def as_flags(options: dict) -> list[str]:
    """{"fold": "all", "oof": True} -> ["--fold=all", "--oof"] (what a user types)."""
    flags = []
    for key, value in options.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not False and value is not None:
            flags.append(f"--{key}={value}")
    return flags
