"""Fold assignment: stratified, grouped, seeded; balance table."""
import numpy as np
import pandas as pd
import pytest

from histofold import folds as folds_mod
from histofold.errors import UsageError
from histofold.folds import assign_folds, class_balance


def per_class_counts(labels, folds, n_folds):
    return pd.crosstab(folds, labels).reindex(range(n_folds), fill_value=0)


def test_singleton_groups_are_balanced_within_one_per_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 203)
    folds = assign_folds(labels, [str(i) for i in range(203)], n_folds=5, seed=1)
    assert set(folds) == set(range(5))
    table = per_class_counts(labels, folds, 5)
    assert (table.max() - table.min() <= 1).all()


@pytest.mark.parametrize("sklearn_max_groups", [20_000, 10])  # sklearn path and the fast greedy path
def test_groups_never_straddle_folds(sklearn_max_groups):
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, 2, n)
    groups = np.array([f"g{i}" for i in range(n)], dtype=object)
    groups[:60] = [f"slide{i % 7}" for i in range(60)]  # 7 shared groups
    folds = assign_folds(labels, groups, n_folds=5, seed=3, sklearn_max_groups=sklearn_max_groups)
    df = pd.DataFrame({"g": groups, "f": folds, "y": labels})
    assert (df.groupby("g")["f"].nunique() == 1).all()
    assert set(folds) == set(range(5))
    table = per_class_counts(labels, folds, 5)
    assert (table.max() - table.min() <= 12).all()  # shared groups of ~9 allow some imbalance


def test_same_seed_same_folds_different_seed_different():
    labels = np.arange(100) % 2
    groups = [str(i) for i in range(100)]
    a = assign_folds(labels, groups, n_folds=5, seed=7)
    assert (a == assign_folds(labels, groups, n_folds=5, seed=7)).all()
    assert (a != assign_folds(labels, groups, n_folds=5, seed=8)).any()


def test_errors_and_small_class_warning():
    labels, groups = [0, 1, 0, 1], ["a", "b", "c", "d"]
    with pytest.raises(UsageError, match="at least 2"):
        assign_folds(labels, groups, n_folds=1, seed=0)
    with pytest.raises(UsageError, match="--folds <= 4"):
        assign_folds(labels, groups, n_folds=5, seed=0)
    with pytest.warns(UserWarning, match="smallest class"):
        folds = assign_folds([0] * 8 + [1, 1], [str(i) for i in range(10)], n_folds=5, seed=0)
    assert set(folds) == set(range(5))


def test_class_balance_table():
    df = pd.DataFrame({"fold": [0, 0, 1, 1, 1], "label": [0, 1, 0, 0, 1]})
    table = class_balance(df, classes=["neg", "pos"])
    assert list(table.columns) == ["neg", "pos", "total"]
    assert table.loc[1, "neg"] == 2 and table.loc["total", "total"] == 5


def _frame(n=20, label_shift=0):
    return pd.DataFrame({"id": [f"{i:03d}" for i in range(n)], "label": [(i + label_shift) % 2 for i in range(n)],
                         "group": [f"g{i // 2}" for i in range(n)], "source": "x"})


def test_decide_writes_then_reuses_folds_csv(tmp_path):
    folds_dir = str(tmp_path / "folds")
    first, decided = folds_mod.decide(_frame(), folds_dir=folds_dir, n_folds=3, seed=0, overwrite=False)
    assert decided
    assert list(first.columns[:3]) == ["id", "label", "fold"] and set(first["fold"]) == {0, 1, 2}
    assert (first.groupby("group")["fold"].nunique() == 1).all()
    on_disk = pd.read_csv(tmp_path / "folds" / "folds.csv", dtype={"id": str, "group": str})
    assert on_disk["id"].tolist()[:2] == ["000", "001"]  # string ids survive
    pd.testing.assert_frame_equal(on_disk, first.reset_index(drop=True))
    again, decided = folds_mod.decide(_frame(), folds_dir=folds_dir, n_folds=3, seed=0, overwrite=False)
    assert not decided
    pd.testing.assert_frame_equal(again, on_disk)


def test_decide_refuses_a_different_folds_csv_without_overwrite(tmp_path):
    folds_dir = str(tmp_path / "folds")
    folds_mod.decide(_frame(), folds_dir=folds_dir, n_folds=3, seed=0, overwrite=False)
    for change in (dict(seed=1, n_folds=3), dict(seed=0, n_folds=4)):
        with pytest.raises(UsageError, match="--overwrite"):
            folds_mod.decide(_frame(), folds_dir=folds_dir, overwrite=False, **change)
    with pytest.raises(UsageError, match="different ids/labels/groups"):
        folds_mod.decide(_frame(label_shift=1), folds_dir=folds_dir, n_folds=3, seed=0, overwrite=False)
    new, decided = folds_mod.decide(_frame(), folds_dir=folds_dir, n_folds=4, seed=0, overwrite=True)
    assert decided and set(new["fold"]) == {0, 1, 2, 3}
    assert set(pd.read_csv(tmp_path / "folds" / "folds.csv")["fold"]) == {0, 1, 2, 3}
