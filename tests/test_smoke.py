"""End to end through the scripts' main(): prepare -> train -> predict -> evaluate in a temp dir."""
import json
import os

import pandas as pd
import pytest

import evaluate
import predict
import prepare_tfrecords
import train
from conftest import shared


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prepare_train_predict_evaluate_synthetic(in_tmp):
    prepare_tfrecords.main(source="synthetic", count=120, test_count=30, image_size=32, folds=3)
    summaries = train.main(fold="all", arch="tiny", epochs=1, batch_size=16)
    assert [s["fold"] for s in summaries] == [0, 1, 2]
    out = predict.main(tta=8, oof=True)
    sub = pd.read_csv(out["submission"], dtype={"id": str})
    test_ids = pd.read_csv("tfrecords/test_ids.csv", dtype={"id": str})["id"]
    assert list(sub["id"]) == list(test_ids) and list(sub.columns) == ["id", "label"]
    assert sub["label"].between(0, 1).all()
    assert 0.0 <= out["test_auc"] <= 1.0 and "cv_auc[tiny]" in out
    for k in range(3):
        assert os.path.isfile(f"runs/tiny/fold{k}/test_tta8.csv")
        assert os.path.isfile(f"runs/tiny/fold{k}/oof_tta8.csv")
    rep = evaluate.main(n_boot=50)
    assert os.path.isfile(rep["report_html"]) and os.path.isfile(rep["metrics_json"])
    html = open(rep["report_html"]).read()
    assert html.count("data:image/png;base64") >= 5
    metrics = json.load(open(rep["metrics_json"]))
    assert metrics["overall"]["n"] == 120 and len(metrics["folds"]) == 3
    assert metrics["overall"]["auc_ci"][0] <= metrics["overall"]["auc"] <= metrics["overall"]["auc_ci"][1]


def test_hcd_mock_submission_in_sample_submission_order(in_tmp):
    root = shared("hcd_kaggle_mock")
    prepare_tfrecords.main(source="hcd", input=str(root))
    train.main(fold="all", arch="tiny", epochs=1, batch_size=8, image_size=32)
    out = predict.main()
    sub = pd.read_csv(out["submission"], dtype={"id": str})
    sample = pd.read_csv(root / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["id"]) == list(sample["id"]) and len(sub) == 11


def test_predict_errors_when_sample_submission_ids_differ_from_test_shards(in_tmp):
    prepare_tfrecords.main(source="synthetic", count=60, test_count=12, image_size=32, folds=3)
    train.main(fold="all", arch="tiny", epochs=1, batch_size=16)
    ids = pd.read_csv("tfrecords/test_ids.csv", dtype={"id": str})
    pd.DataFrame({"id": list(ids["id"][:-1]) + ["not-a-test-id"], "label": 0}).to_csv(
        "tfrecords/sample_submission.csv", index=False)
    manifest = json.load(open("tfrecords/manifest.json"))
    manifest["sample_submission"] = "sample_submission.csv"
    json.dump(manifest, open("tfrecords/manifest.json", "w"))
    with pytest.raises(ValueError, match="no prediction|missing|extra"):
        predict.main(tta=1)


def test_predict_folder_of_new_images(in_tmp):
    prepare_tfrecords.main(source="synthetic", count=60, test_count=6, image_size=32, folds=3)
    train.main(fold="0", arch="tiny", epochs=1, batch_size=16)
    src = shared("crc_he_7k") / "ADI"
    out = predict.main(input=str(src), out="new.csv", tta=2)
    frame = pd.read_csv("new.csv")
    assert out["images"] == out["predicted"] + out["rejected"] == len(list(src.iterdir()))
    assert {"id", "p_normal", "p_tumor", "prediction"} <= set(frame.columns)
