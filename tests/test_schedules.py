"""Tests for histofold/schedules.py: exact LR values at chosen steps, monotone phases, serialization."""
import math

import keras
import numpy as np
import pytest

from histofold import schedules
from histofold.errors import UsageError


def lr(fn, step, **kw):
    return float(keras.ops.convert_to_numpy(fn(step, **kw)))


def test_onecycle_exact_values():
    kw = dict(total_steps=100, max_lr=1e-2, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    initial, final = 1e-2 / 25, 1e-2 / 25 / 1e4
    up_end, down_end = 0.3 * 100 - 1, 99.0  # PyTorch OneCycleLR phase ends

    def cos_anneal(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    assert lr(schedules.onecycle, 0, **kw) == pytest.approx(initial, rel=1e-5)
    assert lr(schedules.onecycle, 10, **kw) == pytest.approx(cos_anneal(initial, 1e-2, 10 / up_end), rel=1e-5)
    assert lr(schedules.onecycle, 29, **kw) == pytest.approx(1e-2, rel=1e-5)  # end of warm-up
    mid = (up_end + down_end) / 2  # midpoint of annealing: half way between max and final
    assert lr(schedules.onecycle, mid, **kw) == pytest.approx((1e-2 + final) / 2, rel=1e-5)
    assert lr(schedules.onecycle, 70, **kw) == pytest.approx(cos_anneal(1e-2, final, (70 - up_end) / 70),
                                                             rel=1e-5)
    assert lr(schedules.onecycle, 99, **kw) == pytest.approx(final, rel=1e-3, abs=1e-9)
    assert lr(schedules.onecycle, 500, **kw) == pytest.approx(final, rel=1e-3, abs=1e-9)  # clamped past the end


def test_onecycle_phases_monotone_and_tensor_steps():
    kw = dict(total_steps=200, max_lr=3e-3)
    values = keras.ops.convert_to_numpy(schedules.onecycle(keras.ops.arange(200), **kw))
    peak = int(np.argmax(values))
    assert peak == 59
    assert np.all(np.diff(values[: peak + 1]) > 0) and np.all(np.diff(values[peak:]) < 0)
    assert lr(schedules.onecycle, 37, **kw) == pytest.approx(values[37], rel=1e-5)


def test_warmup_cosine_exact_values():
    kw = dict(total_steps=110, max_lr=0.1, warmup_steps=10, min_lr=0.001)
    assert lr(schedules.warmup_cosine, 0, **kw) == 0.0
    assert lr(schedules.warmup_cosine, 5, **kw) == pytest.approx(0.05)
    assert lr(schedules.warmup_cosine, 10, **kw) == pytest.approx(0.1)
    assert lr(schedules.warmup_cosine, 60, **kw) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr(schedules.warmup_cosine, 35, **kw) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(schedules.warmup_cosine, 110, **kw) == pytest.approx(0.001)
    assert lr(schedules.warmup_cosine, 1000, **kw) == pytest.approx(0.001)
    assert lr(schedules.constant, 123, lr=0.5) == 0.5


@pytest.mark.parametrize("name", ["onecycle", "cosine", "constant"])
def test_schedules_serialize_round_trip(name):
    sched = schedules.make_schedule(name, total_steps=50, max_lr=2e-3, warmup=0.2, offset=5)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    assert type(restored) is type(sched) and restored.get_config() == sched.get_config()
    for step in (0, 7, 30, 49):
        assert float(restored(step)) == pytest.approx(float(sched(step)))
    again = type(sched).from_config(sched.get_config())
    assert float(again(3)) == pytest.approx(float(sched(3)))


def test_offset_continues_the_curve():
    whole = schedules.make_schedule("onecycle", total_steps=100, max_lr=1e-3, warmup=0.3)
    later = schedules.make_schedule("onecycle", total_steps=100, max_lr=1e-3, warmup=0.3, offset=40)
    assert float(later(0)) == pytest.approx(float(whole(40)))
    assert float(later(10)) == pytest.approx(float(whole(50)))


def test_registry_plateau_and_errors():
    assert schedules.make_schedule("plateau", total_steps=10, max_lr=1e-3) == 1e-3  # a float for ReduceLROnPlateau
    opt = keras.optimizers.AdamW(learning_rate=schedules.make_schedule("cosine", total_steps=10, max_lr=1e-3))
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == 0.0  # cosine warm-up starts at 0
    with pytest.raises(UsageError, match=r"--schedule='linear': choose one of onecycle, cosine"):
        schedules.make_schedule("linear", total_steps=10, max_lr=1e-3)
    assert schedules.check_schedule("cosine") == "cosine"
    with pytest.raises(UsageError, match=r"--schedule='step': choose one of"):
        schedules.check_schedule("step")
    with pytest.raises(ValueError, match="at least one step"):
        schedules.make_schedule("onecycle", total_steps=0, max_lr=1e-3)


def test_scale_lr_linear():
    assert schedules.scale_lr(1e-3, 512, base_batch=64) == pytest.approx(8e-3)
    assert schedules.scale_lr(1e-3, 64) == pytest.approx(1e-3)
    assert schedules.scale_lr(1e-3, 32, 64) == pytest.approx(5e-4)
