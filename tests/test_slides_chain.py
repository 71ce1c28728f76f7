"""Whole slides through the scripts: prepare --source=slides (annotated) -> train -> predict --slides."""
import json

import numpy as np
import pandas as pd
import pytest

import predict
import prepare_tfrecords
import train
from slide_fixtures import CELL, build_slide, geojson_square


@pytest.fixture
def slide_dir(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    truths = []
    for i, tumour in enumerate([(1, 2, 4, 6), (0, 0, 0, 0)]):  # slide 1 has no tumour
        truth = build_slide(folder / f"s{i}.tif", rows=5, cols=6, tumour=tumour, seed=i, skip=100 * i)
        r0, c0, r1, c1 = tumour
        features = [geojson_square(0, 0, 6 * CELL, 5 * CELL, "normal")]
        if r1 > r0:
            features.append(geojson_square(c0 * CELL, r0 * CELL, c1 * CELL, r1 * CELL, "tumor"))
        (folder / f"s{i}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        truths.append(truth)
    return folder, truths


def test_annotated_slides_to_records_to_slide_maps(slide_dir, tmp_path, monkeypatch):
    from histofold.manifest import Manifest

    folder, truths = slide_dir
    monkeypatch.chdir(tmp_path)
    summary = prepare_tfrecords.main(source="slides", input=str(folder), classes="normal,tumor", mpp=0.972,
                                     resize=96, folds=2, min_tissue=0.25)
    manifest = Manifest.load("tfrecords")
    assert manifest.classes == ["normal", "tumor"] and manifest.mpp == pytest.approx(0.972)
    rows = manifest.read_records()
    from histofold import slides

    detected = slides.list_slide_tiles(str(folder), patch_px=96, patch_mpp=0.972, classes=["normal", "tumor"],
                                       min_tissue=0.25)
    assert summary["written"] == len(rows) == len(detected)  # every detected tissue tile, once
    assert len(rows) >= sum(int((~t.glass).sum()) for t in truths) - 2  # at most a pale patch or two missed
    assert not any(truths[int(r["group"][1:])].glass[r["loc_y"] // CELL, r["loc_x"] // CELL] for r in rows)
    for r in rows:  # each record: its slide as group, its level-0 location, the label of its cell
        truth = truths[int(r["group"][1:])]
        row, col = r["loc_y"] // CELL, r["loc_x"] // CELL
        assert r["label"] == truth.label[row, col]
        np.testing.assert_array_equal(r["image"], truth.image[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL])
    folds = pd.read_csv("folds/folds.csv")
    assert folds.groupby("group")["fold"].nunique().max() == 1  # a slide never straddles folds

    train.main(fold="0", arch="tiny", epochs=1, batch_size=16)
    out = predict.main(slides=str(folder), out_dir="maps", tta=2)
    assert out["mapped"] == 2 and out["failed"] == 0
    table = pd.read_csv("maps/slides.csv")
    assert list(table["status"]) == ["ok", "ok"]
    for i, truth in enumerate(truths):
        tiles = pd.read_csv(f"maps/s{i}/tiles.csv")
        assert len(tiles) == truth.rows * truth.cols
        assert not (tiles["is_tissue"].to_numpy() & truth.glass.ravel()).any()  # glass is never predicted
        assert tiles.loc[tiles["is_tissue"], "p_tumor"].between(0, 1).all()
        assert tiles.loc[~tiles["is_tissue"], "p_tumor"].isna().all()
        for name in ("heatmap.png", "overlay.png", f"s{i}.geojson"):
            assert (tmp_path / "maps" / f"s{i}" / name).is_file()
