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
    """--input: class folders named like the model's classes are scored; an unreadable file is a reject."""
    from PIL import Image

    prepare_tfrecords.main(source="synthetic", count=60, test_count=6, image_size=32, folds=3)
    train.main(fold="0", arch="tiny", epochs=1, batch_size=16)
    from histofold import synthetic

    for label, name in enumerate(["normal", "tumor"]):
        (in_tmp / "new" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(synthetic.render(5, i, 32, label, 2)).save(in_tmp / "new" / name / f"{i}.png")
    (in_tmp / "new" / "tumor" / "broken.png").write_bytes(b"not a png")
    out = predict.main(input="new", predictions="new.csv", tta=2)
    frame = pd.read_csv("new.csv")
    assert out["images"] == out["predicted"] + out["rejected"] == 9 and out["rejected"] == 1
    assert {"id", "label", "p_normal", "p_tumor", "prediction"} <= set(frame.columns)
    assert sorted(frame["label"]) == [0] * 4 + [1] * 4 and 0.0 <= out["input_auc"] <= 1.0
    rejects = pd.read_csv(out["rejects"])
    assert rejects["path"].str.endswith("broken.png").all()


@pytest.mark.parametrize("stain_norm", ["none", "reinhard"])
def test_predict_input_sees_the_same_pixels_as_the_training_reader(in_tmp, stain_norm):
    """The source images of fold 0's records, given to predict.py --input, get exactly the probabilities
    the same model gave those records in oof.csv: prepare's resize (40 -> 32 px), its stain
    normalization and the model-input resize (32 -> 24 px) are the same functions on both paths. The
    test fails if --input skipped the stain normalization or used another resize."""
    import numpy as np
    from PIL import Image

    from histofold import synthetic

    prepare_tfrecords.main(source="synthetic", count=48, test_count=0, image_size=40, folds=2, resize=32,
                           stain_norm=stain_norm)
    train.main(fold="0", arch="tiny", epochs=1, batch_size=16, image_size=24)
    folds = pd.read_csv("folds/folds.csv", dtype={"id": str})
    part = folds[folds["fold"] == 0]
    (in_tmp / "src").mkdir()
    for r in part.itertuples():
        _, seed, index = r.source.split(":")
        Image.fromarray(synthetic.render(int(seed), int(index), 40, int(r.label), 2)).save(in_tmp / "src" / f"{r.id}.png")
    predict.main(runs="runs/tiny/fold0", input="src", predictions="src.csv", tta=1)
    got = pd.read_csv("src.csv")
    got["id"] = got["id"].map(lambda p: p.rsplit("/", 1)[-1][:-4])
    oof = pd.read_csv("runs/tiny/fold0/oof.csv", dtype={"id": str})
    joined = oof.merge(got, on="id", suffixes=("_oof", "_input"))
    assert len(joined) == len(part)
    np.testing.assert_allclose(joined["p_tumor_input"], joined["p_tumor_oof"], atol=2e-5)
    if stain_norm != "none":
        assert json.load(open("tfrecords/manifest.json"))["stain"]["method"] == stain_norm
