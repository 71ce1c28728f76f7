"""Learning-rate schedules as pure functions of the optimizer step, their serializable Keras wrappers, and a registry."""
from __future__ import annotations

import math

import keras
from keras import ops


def _cos_interp(start, end, frac):
    """Cosine interpolation from `start` (frac=0) to `end` (frac=1); frac in [0, 1]."""
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * frac))


def _as_float(step):
    return ops.cast(step, "float32")


def onecycle(step, *, total_steps: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4):
    """PyTorch OneCycleLR (anneal_strategy="cos", three_phase=False), step counted from 0.

    initial = max_lr / div_factor; final = initial / final_div_factor.
    Phase 1, steps [0, pct_start * total_steps - 1]: cosine from initial up to max_lr.
    Phase 2, up to step total_steps - 1: cosine from max_lr down to final.
    Steps >= total_steps - 1 stay at final (a resumed or over-long run never extrapolates).
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * total_steps) - 1.0     # step where max_lr is reached (PyTorch's convention)
    down_end = float(total_steps) - 1.0               # step where `final` is reached
    s = ops.clip(_as_float(step), 0.0, down_end)
    # phase 1 (warm-up): fraction of the warm-up done
    warm = _cos_interp(initial, max_lr, ops.clip(s / max(up_end, 1e-8), 0.0, 1.0))
    # phase 2 (annealing): fraction of the annealing done
    anneal = _cos_interp(max_lr, final, ops.clip((s - up_end) / max(down_end - up_end, 1e-8), 0.0, 1.0))
    return ops.where(s <= up_end, warm, anneal)


def warmup_cosine(step, *, total_steps: int, max_lr: float, warmup_steps: int, min_lr: float = 0.0):
    """Linear warm-up from 0 to max_lr over `warmup_steps` (max_lr reached at step warmup_steps), then
    cosine decay to min_lr at step total_steps; clamped at min_lr afterwards."""
    s = _as_float(step)
    # phase 1 (warm-up): linear, lr = max_lr * step / warmup_steps
    warm = max_lr * s / max(float(warmup_steps), 1.0)
    # phase 2 (decay): cosine over the remaining steps
    frac = ops.clip((s - warmup_steps) / max(float(total_steps - warmup_steps), 1.0), 0.0, 1.0)
    decay = _cos_interp(max_lr, min_lr, frac)
    return ops.where(s < warmup_steps, warm, decay)


def constant(step, *, lr: float):
    """lr at every step (shape follows the step)."""
    return ops.zeros_like(_as_float(step)) + lr


# ------------------------------------------------------------------------------------------ Keras wrappers

class _Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Calls `fn(step + offset, **kwargs)`; offset lets a later training stage (a new optimizer whose step
    counter restarts at 0) continue the same curve."""

    fn = None

    def __init__(self, offset: int = 0, **kwargs):
        super().__init__()
        self.offset = int(offset)
        self.kwargs = kwargs

    def __call__(self, step):
        return type(self).fn(_as_float(step) + self.offset, **self.kwargs)

    def get_config(self):
        return {"offset": self.offset, **self.kwargs}


@keras.saving.register_keras_serializable(package="histofold")
class OneCycle(_Schedule):
    fn = staticmethod(onecycle)

    def __init__(self, *, total_steps, max_lr, pct_start=0.3, div_factor=25.0, final_div_factor=1e4, offset=0):
        super().__init__(offset, total_steps=int(total_steps), max_lr=float(max_lr), pct_start=float(pct_start),
                         div_factor=float(div_factor), final_div_factor=float(final_div_factor))


@keras.saving.register_keras_serializable(package="histofold")
class WarmupCosine(_Schedule):
    fn = staticmethod(warmup_cosine)

    def __init__(self, *, total_steps, max_lr, warmup_steps, min_lr=0.0, offset=0):
        super().__init__(offset, total_steps=int(total_steps), max_lr=float(max_lr),
                         warmup_steps=int(warmup_steps), min_lr=float(min_lr))


@keras.saving.register_keras_serializable(package="histofold")
class Constant(_Schedule):
    fn = staticmethod(constant)

    def __init__(self, *, lr, offset=0):
        super().__init__(offset, lr=float(lr))


# ------------------------------------------------------------------------------------------ registry

def _make_onecycle(*, total_steps, max_lr, warmup=0.3, offset=0, **kw):
    return OneCycle(total_steps=total_steps, max_lr=max_lr, pct_start=warmup, offset=offset, **kw)


def _make_cosine(*, total_steps, max_lr, warmup=0.1, offset=0, min_lr=0.0):
    return WarmupCosine(total_steps=total_steps, max_lr=max_lr, warmup_steps=round(warmup * total_steps),
                        min_lr=min_lr, offset=offset)


def _make_constant(*, total_steps, max_lr, warmup=0.0, offset=0):
    return Constant(lr=max_lr)


def _make_plateau(*, total_steps, max_lr, warmup=0.0, offset=0):
    # A plain float: the loop adds keras.callbacks.ReduceLROnPlateau, which can only change a float LR
    # (it cannot overwrite a LearningRateSchedule).
    return float(max_lr)


SCHEDULES = {
    "onecycle": _make_onecycle,   # warmup = pct_start (fraction of steps spent rising)
    "cosine": _make_cosine,       # warmup = fraction of steps of linear warm-up
    "warmup_cosine": _make_cosine,
    "constant": _make_constant,
    "plateau": _make_plateau,
}


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        from histofold.errors import UsageError

        raise UsageError(f"--schedule={name!r}: choose one of {', '.join(SCHEDULES)}")
    return name


def make_schedule(name: str, *, total_steps: int, max_lr: float, **kw):
    """Registry lookup. kw: warmup (fraction of total_steps), offset (steps already done by an earlier
    stage), and schedule-specific options (div_factor, final_div_factor, min_lr)."""
    check_schedule(name)
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: a schedule needs at least one step (check --epochs "
                         f"and --steps_per_epoch)")
    return SCHEDULES[name](total_steps=int(total_steps), max_lr=float(max_lr), **kw)


def scale_lr(base_lr: float, global_batch: int, base_batch: int = 64) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr = base_lr * global_batch / base_batch, so adding replicas
    keeps the per-example step size. Adam/AdamW are sometimes scaled by sqrt instead; linear is used here
    for every optimizer, with the warm-up of onecycle/cosine absorbing the larger early steps."""
    return float(base_lr) * float(global_batch) / float(base_batch)
