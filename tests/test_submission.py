"""submission.py: sample_submission order and header, label/probs outputs, and validation failures."""
import numpy as np
import pandas as pd
import pytest

from histofold import io, submission
from histofold.errors import DataError, UsageError


def _preds(ids, P, classes):
    P = np.asarray(P, dtype=float)
    return pd.DataFrame({"id": ids, **{f"p_{c}": P[:, i] for i, c in enumerate(classes)}})


def test_binary_follows_sample_order_and_header(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"image_id": ["003", "001", "002"], "has_tumor": [0, 0, 0]}).to_csv(sample, index=False)
    preds = _preds(["001", "002", "003"], [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]], ["0", "1"])
    sub = submission.make_submission(preds, class_names=["0", "1"], sample_submission=str(sample))
    assert list(sub.columns) == ["image_id", "has_tumor"]
    assert sub["image_id"].tolist() == ["003", "001", "002"]  # string ids keep their zeros
    np.testing.assert_allclose(sub["has_tumor"], [0.8, 0.1, 0.6])


def test_binary_without_sample_uses_test_ids_and_id_label():
    preds = _preds(["b", "a"], [[0.3, 0.7], [0.6, 0.4]], ["neg", "pos"])
    sub = submission.make_submission(preds, class_names=["neg", "pos"], sample_submission=None, test_ids=["a", "b"])
    assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == ["a", "b"]
    np.testing.assert_allclose(sub["label"], [0.4, 0.7])


def test_multiclass_label_names_or_indices(tmp_path):
    classes = ["ADI", "LYM", "TUM"]
    preds = _preds(["x", "y"], [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], classes)
    by_name = submission.make_submission(preds, class_names=classes, sample_submission=None, test_ids=["y", "x"])
    assert by_name["label"].tolist() == ["ADI", "TUM"]
    sample = tmp_path / "s.csv"
    pd.DataFrame({"id": ["x", "y"], "category": [0, 0]}).to_csv(sample, index=False)
    by_index = submission.make_submission(preds, class_names=classes, sample_submission=str(sample))
    assert list(by_index.columns) == ["id", "category"] and by_index["category"].tolist() == [2, 0]


def test_multiclass_probs_follow_sample_header(tmp_path):
    classes = ["ADI", "LYM", "TUM"]
    preds = _preds(["x", "y"], [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], classes)
    sample = tmp_path / "s.csv"
    pd.DataFrame({"id": ["y", "x"], "TUM": 0.0, "ADI": 0.0, "LYM": 0.0}).to_csv(sample, index=False)
    sub = submission.make_submission(preds, class_names=classes, sample_submission=str(sample), output="probs")
    assert list(sub.columns) == ["id", "TUM", "ADI", "LYM"]
    np.testing.assert_allclose(sub[["TUM", "ADI", "LYM"]], [[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]])


def test_missing_prediction_names_the_ids():
    preds = _preds(["a"], [[0.5, 0.5]], ["0", "1"])
    with pytest.raises(DataError, match=r"1 of 2 submission ids have no prediction \(e\.g\. b\)"):
        submission.make_submission(preds, class_names=["0", "1"], sample_submission=None, test_ids=["a", "b"])


def _sub(ids, values):
    return pd.DataFrame({"id": ids, "label": values})


@pytest.mark.parametrize("sub, message", [
    (_sub(["a", "b"], [0.1, 0.2]), r"1 missing ids \(e\.g\. c\)"),
    (_sub(["a", "b", "c", "z"], [0.1, 0.2, 0.3, 0.4]), r"1 extra ids \(e\.g\. z\)"),
    (_sub(["a", "b", "c", "c"], [0.1, 0.2, 0.3, 0.3]), r"1 duplicated ids \(e\.g\. c\)"),
    (_sub(["a", "b", "c"], [0.1, np.nan, 0.3]), r"1 NaN values \(e\.g\. ids b\)"),
    (_sub(["a", "b", "c"], [0.1, 1.2, -0.1]), r"2 values of label outside \[0, 1\]"),
])
def test_validation_catches(sub, message):
    with pytest.raises(DataError, match=message) as err:
        submission.validate_submission(sub, expected_ids=["a", "b", "c"], num_classes=2, output="label")
    assert "\n" not in str(err.value)


def test_validation_reports_every_problem_at_once_and_passes_valid():
    bad = _sub(["a", "a", "z"], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match=r"2 missing ids \(e\.g\. b, c\); 1 extra ids \(e\.g\. z\); 1 duplicated"):
        submission.validate_submission(bad, expected_ids=["a", "b", "c"], num_classes=2)
    submission.validate_submission(_sub(["c", "a", "b"], [0.0, 1.0, 0.5]), expected_ids=["a", "b", "c"],
                                   num_classes=2)
    probs = pd.DataFrame({"id": ["a"], "x": [0.2], "y": [0.8]})
    with pytest.raises(DataError, match="2 value columns, expected 3"):
        submission.validate_submission(probs, expected_ids=["a"], num_classes=3, output="probs")


def test_usage_and_data_errors():
    preds = _preds(["a"], [[0.5, 0.5]], ["0", "1"])
    with pytest.raises(UsageError, match="--format='csv'"):
        submission.make_submission(preds, class_names=["0", "1"], sample_submission=None, test_ids=["a"],
                                   output="csv")
    with pytest.raises(DataError, match=r"lack columns \['p_2'\]"):
        submission.make_submission(preds, class_names=["0", "1", "2"], sample_submission=None, test_ids=["a"])
    with pytest.raises(DataError, match="repeat ids"):
        submission.make_submission(pd.concat([preds, preds]), class_names=["0", "1"], sample_submission=None,
                                   test_ids=["a"])


def test_sample_submission_needs_a_value_column(tmp_path):
    sample = tmp_path / "s.csv"
    pd.DataFrame({"id": ["a"]}).to_csv(sample, index=False)
    with pytest.raises(DataError, match="s.csv: a sample submission needs an id column"):
        submission.make_submission(_preds(["a"], [[0.5, 0.5]], ["0", "1"]), class_names=["0", "1"],
                                   sample_submission=str(sample))


def test_sample_submission_is_read_through_io_on_ram_filesystem():
    path = "ram://histofold-test-submission/sample_submission.csv"
    io.write_csv(path, pd.DataFrame({"id": ["002", "001"], "label": [0, 0]}))
    try:
        preds = _preds(["001", "002"], [[0.9, 0.1], [0.3, 0.7]], ["0", "1"])
        sub = submission.make_submission(preds, class_names=["0", "1"], sample_submission=path)
        assert sub["id"].tolist() == ["002", "001"]
        np.testing.assert_allclose(sub["label"], [0.7, 0.1])
    finally:
        io.rmtree("ram://histofold-test-submission")
