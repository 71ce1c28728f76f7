"""Slide-level metrics through the scripts: prepare --source=slides (with a held-out test split) ->
train -> predict (test) -> evaluate; oof.csv and test_tta<n>.csv carry each tile's slide, and the report's
slide scores are slides.slide_score of those tiles (the aggregate of slides.csv)."""
import json

import numpy as np
import pandas as pd
import pytest

import evaluate
import predict
import prepare_tfrecords
import train
from histofold import metrics, slides
from slide_fixtures import CELL, build_slide, geojson_square

TUMOUR = [(0, 1, 2, 3), (0, 0, 0, 0), (1, 0, 3, 2), (0, 0, 0, 0), (1, 1, 3, 3), (0, 0, 0, 0)]


@pytest.fixture
def six_slides(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for i, tumour in enumerate(TUMOUR):
        build_slide(folder / f"s{i}.tif", rows=3, cols=4, glass_cells=(), tumour=tumour, seed=i, skip=20 * i)
        r0, c0, r1, c1 = tumour
        features = [geojson_square(0, 0, 4 * CELL, 3 * CELL, "normal")]
        if r1 > r0:
            features.append(geojson_square(c0 * CELL, r0 * CELL, c1 * CELL, r1 * CELL, "tumor"))
        (folder / f"s{i}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return folder


def _stem(tile_id: str) -> str:
    return tile_id.rsplit("_", 2)[0]  # slides.list_slide_tiles ids: f"{stem}_{x}_{y}"


def test_slide_ids_flow_from_records_to_slide_metrics(six_slides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_tfrecords.main(source="slides", input=str(six_slides), classes="normal,tumor", mpp=0.972,
                           resize=32, folds=2, holdout=0.34, min_tissue=0.25)
    train.main(fold="all", arch="tiny", epochs=1, batch_size=16, image_size=32)
    predict.main(tta=1)
    out = evaluate.main(n_boot=20, gradcam=False)

    oof = pd.concat([pd.read_csv(f"runs/tiny/fold{f}/oof.csv", dtype={"id": str}) for f in range(2)])
    tests = [pd.read_csv(f"runs/tiny/fold{f}/test_tta1.csv", dtype={"id": str}).set_index("id") for f in range(2)]
    for frame in (oof, *tests):
        assert list(frame["slide"]) == [_stem(i) for i in (frame["id"] if "id" in frame else frame.index)]
    test = tests[0].assign(p_tumor=(tests[0]["p_tumor"] + tests[1]["p_tumor"].loc[tests[0].index]) / 2)
    test = test.reset_index()  # the report scores the fold ensemble (mean), as predict.py does
    train_slides, test_slides = set(oof["slide"]), set(test["slide"])
    assert train_slides and test_slides and not train_slides & test_slides  # slides never straddle splits

    saved = json.load(open(out["metrics_json"]))
    for sl, frame, where in ((saved["slides"], oof, ""), (saved["test"]["slides"], test, "test_")):
        table = pd.DataFrame(sl["table"]).set_index("slide")
        assert set(table.index) == set(frame["slide"])
        for stem, g in frame.groupby("slide"):
            assert table.loc[stem, "score"] == pytest.approx(slides.slide_score(g["p_tumor"].to_numpy(), 10))
            has_tumour = TUMOUR[int(stem[1:])][2] > TUMOUR[int(stem[1:])][0]
            assert table.loc[stem, "label"] == int(has_tumour)
        if 0 < table["label"].sum() < len(table):
            assert sl["roc_auc"] == pytest.approx(metrics.fast_auc(table["label"], table["score"]))
            assert out[f"{where}slide_auc"] == pytest.approx(sl["roc_auc"])
        else:
            assert "roc_auc" not in sl and f"{where}slide_auc" not in out
    assert saved["slides"]["n_slides"] + saved["test"]["slides"]["n_slides"] == 6
    assert "roc_auc" in saved["slides"] and "slide_auc" in out  # stratified holdout: both kinds of slide in the folds
    md = open(out["report_md"]).read()
    assert "## Slide-level metrics (out-of-fold)" in md and "## Slide-level metrics (held-out test)" in md
    assert out["test_auc"] == pytest.approx(saved["test"]["overall"]["auc"])
