"""ensemble.py: join on id, the three methods on hand examples, weights, and loud failures."""
import numpy as np
import pandas as pd
import pytest

from histofold import ensemble, io
from histofold.errors import DataError, UsageError


def _binary(ids, p1):
    p1 = np.asarray(p1, dtype=float)
    return pd.DataFrame({"id": ids, "p_0": 1 - p1, "p_1": p1})


def _multi(ids, P):
    P = np.asarray(P, dtype=float)
    return pd.DataFrame({"id": ids, **{f"p_{c}": P[:, i] for i, c in enumerate("abc")}})


def test_mean_gmean_rank_binary_by_hand():
    a = _binary(["x", "y", "z"], [0.2, 0.8, 0.5])
    b = _binary(["x", "y", "z"], [0.8, 0.2, 0.9])
    mean = ensemble.ensemble([a, b], method="mean")
    np.testing.assert_allclose(mean["p_1"], [0.5, 0.5, 0.7])
    np.testing.assert_allclose(mean["p_0"], 1 - mean["p_1"])
    gm = ensemble.ensemble([a, b], method="gmean")
    np.testing.assert_allclose(gm["p_1"], [0.4, 0.4, np.sqrt(0.45)])
    np.testing.assert_allclose(gm["p_0"] + gm["p_1"], 1.0)
    rk = ensemble.ensemble([a, b], method="rank")
    # ranks of p_1 in a: x0 y2 z1 -> 0, 1, .5 ; in b: x1 y0 z2 -> .5, 0, 1
    np.testing.assert_allclose(rk["p_1"], [0.25, 0.5, 0.75])
    assert list(mean["id"]) == ["x", "y", "z"] and list(mean.columns) == ["id", "p_0", "p_1"]


def test_multiclass_gmean_renormalised_mean_exact():
    a = _multi(["u", "v"], [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    b = _multi(["u", "v"], [[0.2, 0.5, 0.3], [0.2, 0.6, 0.2]])
    mean = ensemble.ensemble([a, b], method="mean")
    np.testing.assert_allclose(mean[["p_a", "p_b", "p_c"]], [[0.4, 0.4, 0.2], [0.2, 0.4, 0.4]])
    gm = ensemble.ensemble([a, b], method="gmean")[["p_a", "p_b", "p_c"]].to_numpy()
    raw = np.sqrt(np.array([[0.12, 0.15, 0.03], [0.04, 0.12, 0.12]]))
    np.testing.assert_allclose(gm, raw / raw.sum(1, keepdims=True))
    rk = ensemble.ensemble([a, b], method="rank")[["p_a", "p_b", "p_c"]].to_numpy()
    np.testing.assert_allclose(rk.sum(1), 1.0)


def test_shuffled_rows_give_identical_result():
    rng = np.random.default_rng(0)
    ids = [f"id{i}" for i in range(50)]
    frames = [_multi(ids, rng.dirichlet([1, 1, 1], 50)) for _ in range(3)]
    shuffled = [frames[0]] + [f.sample(frac=1, random_state=i) for i, f in enumerate(frames[1:])]
    for method in ensemble.METHODS:
        pd.testing.assert_frame_equal(ensemble.ensemble(frames, method=method),
                                      ensemble.ensemble(shuffled, method=method))


def test_weights_are_normalised():
    a = _binary(["x", "y"], [0.0, 1.0])
    b = _binary(["x", "y"], [1.0, 0.0])
    out = ensemble.ensemble([a, b], weights=[3, 1])
    np.testing.assert_allclose(out["p_1"], [0.25, 0.75])
    np.testing.assert_allclose(ensemble.ensemble([a, b], weights=[6, 2])["p_1"], out["p_1"])
    with pytest.raises(ValueError, match="2 non-negative"):
        ensemble.ensemble([a, b], weights=[1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble.ensemble([a, b], weights=[-1, 2])


def test_missing_ids_name_the_frame_and_ids():
    a = _binary(["x", "y", "z"], [0.1, 0.2, 0.3])
    b = _binary(["x", "y"], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"b\.csv lacks 1 ids .*e\.g\. z"):
        ensemble.ensemble([a, b], names=["a.csv", "b.csv"])
    c = _binary(["x", "y", "z", "w"], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"frame 0 lacks 1 ids .*w"):
        ensemble.ensemble([a, c])


def test_nan_duplicates_and_columns_raise():
    a = _binary(["x", "y"], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN probabilities in 1 rows .*y"):
        ensemble.ensemble([a, _binary(["x", "y"], [0.1, np.nan])])
    with pytest.raises(ValueError, match="repeats 1 ids"):
        ensemble.ensemble([a, _binary(["x", "y", "y"], [0.1, 0.2, 0.3])])
    with pytest.raises(ValueError, match="columns"):
        ensemble.ensemble([a, _multi(["x", "y"], [[1, 0, 0], [0, 1, 0]])])
    with pytest.raises(ValueError, match="unknown ensemble method 'median'"):
        ensemble.ensemble([a], method="median")


def test_errors_are_usage_and_data_errors():
    a = _binary(["x", "y"], [0.1, 0.2])
    with pytest.raises(UsageError, match="unknown ensemble method"):
        ensemble.ensemble([a], method="median")
    with pytest.raises(UsageError, match="run_weights"):
        ensemble.ensemble([a, a], weights=[0, 0])
    with pytest.raises(DataError, match="lacks 1 ids"):
        ensemble.ensemble([a, _binary(["x"], [0.1])])
    with pytest.raises(DataError, match="not a prediction frame"):
        ensemble.ensemble([pd.DataFrame({"id": ["x"], "score": [0.5]})])


def test_csv_roundtrip_through_io_keeps_string_ids(tmp_path):
    # prediction files are written and read by histofold.io (ensemble itself only joins frames)
    a = _binary(["007", "010"], [0.25, 0.75])
    b = _binary(["010", "007"], [0.5, 0.25])
    pa, pb = str(tmp_path / "sub" / "a.csv"), str(tmp_path / "sub" / "b.csv")
    io.write_csv(pa, a)
    io.write_csv(pb, b)
    back = io.read_csv(pa, dtype={"id": str})
    assert back["id"].tolist() == ["007", "010"]
    pd.testing.assert_frame_equal(back, a)
    out = ensemble.ensemble([back, io.read_csv(pb, dtype={"id": str})], names=[pa, pb])
    assert out["id"].tolist() == ["007", "010"]
    np.testing.assert_allclose(out["p_1"], [0.25, 0.625])
