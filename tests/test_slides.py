"""Whole-slide images: backends, tissue detection, tiling, predictions, outputs, annotations.

Every slide is a small pyramidal TIFF of real PCam patches on a known grid (tests/slide_fixtures.py):
8 x 6 cells of 96 px (+ a 40 px glass margin, so the grid has a partial 9th column and 7th row),
8 glass cells, a 3 x 3 block of tumour (class 1) patches.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from slide_fixtures import CELL, MPP, asap_xml, build_slide, geojson_square
from histofold import slides

MARGIN = 40


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """The default slide: successive tiled IFDs (OpenSlide's generic tiled TIFF), 3 levels, mpp 0.972."""
    return build_slide(tmp_path_factory.mktemp("slide") / "case1.tif", margin=MARGIN)


@pytest.fixture(scope="module")
def model():
    from histofold import models

    return models.build_model("tiny", num_classes=2, image_size=96, weights=None, seed=3)


def cells(truth):
    return [(r, c) for r in range(truth.rows) for c in range(truth.cols)]


# ------------------------------------------------------------------------------------------ opening

@pytest.mark.parametrize("layout, backend, expect_backend, levels", [
    ("ifd", "auto", "openslide", 3),
    ("ifd", "tifffile", "tifffile", 3),
    ("subifd", "auto", "tifffile", 3),     # OpenSlide sees level 0 only: open_slide switches
    ("ome", "auto", "tifffile", 3),        # mpp from OME PhysicalSizeX (no resolution tags)
    ("strip", "auto", "tifffile", 1),      # OpenSlide refuses untiled TIFF
])
def test_open_slide_levels_mpp_and_exact_pixels(tmp_path, slide, layout, backend, expect_backend, levels):
    truth = slide if layout == "ifd" else build_slide(tmp_path / f"s.{'ome.tif' if layout == 'ome' else 'tif'}",
                                                      layout=layout, margin=MARGIN, levels=levels)
    with slides.open_slide(truth.path, backend=backend) as s:
        assert s.backend == expect_backend
        w, h = 8 * CELL + MARGIN, 6 * CELL + MARGIN
        assert s.level_dimensions == [(w >> i, h >> i) for i in range(levels)]
        assert s.level_downsamples == pytest.approx([2.0 ** i for i in range(levels)], rel=1e-2)
        assert s.mpp == pytest.approx(MPP, rel=1e-6)
        for r, c in cells(truth):  # every cell, the partial margin cells padded with white
            np.testing.assert_array_equal(s.read_region(c * CELL, r * CELL, 0, CELL, CELL), truth.patch(r, c))
        outside = s.read_region(w - 10, -5, 0, 30, 20)
        assert outside.shape == (20, 30, 3) and outside.dtype == np.uint8
        assert (outside[:5] == 255).all() and (outside[:, 10:] == 255).all()
        np.testing.assert_array_equal(outside[5:, :10], truth.image[:15, w - 10:])
        if levels > 1:
            np.testing.assert_array_equal(s.read_region(192, 96, 1, 100, 60), truth.levels[1][48:108, 96:196])
    if backend == "auto" and expect_backend == "tifffile":  # threaded reads through the tifffile backend
        xs, ys = [c * CELL for r, c in cells(truth)], [r * CELL for r, c in cells(truth)]
        ds = slides.tile_dataset(truth.path, xs, ys, level=0, read_px=CELL, patch_px=CELL, batch_size=10, threads=4)
        got = np.concatenate([x.numpy() for x, _ in ds])
        np.testing.assert_array_equal(got, np.stack([truth.patch(r, c) for r, c in cells(truth)]))


def test_mpp_override_missing_and_corrupt_files(tmp_path, slide):
    truth = build_slide(tmp_path / "nompp.tif", mpp=None, levels=1)
    with slides.open_slide(truth.path) as s:
        assert s.mpp is None
        with pytest.raises(slides.SlideError, match="--mpp"):
            slides.read_plan(s, patch_px=96, patch_mpp=0.972)
    with slides.open_slide(truth.path, mpp=0.5) as s:
        assert s.mpp == 0.5
    bad = tmp_path / "broken.svs"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(slides.SlideError, match="broken.svs"):
        slides.open_slide(bad)
    with pytest.raises(slides.SlideError, match="no such slide"):
        slides.open_slide(tmp_path / "missing.ndpi")


@pytest.mark.parametrize("mpp, level, tile_level0, read_px", [
    (0.972, 0, 96, 96),     # the training resolution: level 0 as is
    (0.486, 1, 192, 96),    # "20x": level 1 (downsample 2) is exactly the training resolution
    (0.243, 2, 384, 96),    # "40x": level 2
    (0.6, 0, 156, 156),     # in between: read 156 px at level 0, resize to 96
    (0.3, 1, 312, 156),     # scale 3.24: level 1, 156 px
])
def test_read_plan_picks_the_deepest_level_not_finer_than_the_patch(slide, mpp, level, tile_level0, read_px):
    with slides.open_slide(slide.path, mpp=mpp) as s:
        plan = slides.read_plan(s, patch_px=96, patch_mpp=0.972)
    assert (plan["level"], plan["tile_level0"], plan["read_px"], plan["patch_px"]) == (level, tile_level0, read_px, 96)


# ------------------------------------------------------------------------------------------ tissue + grid

@pytest.mark.parametrize("max_side", [2048, 256])  # level-0 mask, and a 3x downsampled one
def test_tissue_grid_is_exactly_the_tissue_cells(slide, max_side):
    with slides.open_slide(slide.path) as s:
        mask, ds = slides.tissue_mask(s, max_side=max_side)
        assert mask.dtype == bool and ds == pytest.approx(max(1.0, (8 * CELL + MARGIN) / max_side))
        grid = slides.tile_grid(s, tile_level0=CELL, mask=mask, mask_downsample=ds)
    assert list(grid.columns[:4]) == ["x", "y", "w", "h"]
    assert len(grid) == slide.rows * slide.cols  # every cell, background and the partial margin cells too
    assert (grid["x"].to_numpy() == grid["col"].to_numpy() * CELL).all()
    is_tissue = grid["is_tissue"].to_numpy().reshape(slide.rows, slide.cols)
    np.testing.assert_array_equal(is_tissue, ~slide.glass)
    assert grid["tissue"].between(0, 1).all()


def test_grid_with_stride_covers_the_slide():
    from histofold.slides import _grid_starts

    assert list(_grid_starts(808, 96, 96)) == [0, 96, 192, 288, 384, 480, 576, 672, 768]
    assert list(_grid_starts(200, 96, 48)) == [0, 48, 96, 144]  # the last tile reaches past 200
    assert list(_grid_starts(50, 96, 48)) == [0]


# ------------------------------------------------------------------------------------------ predicting

def test_predict_slide_tiles_predictions_and_outputs(tmp_path, slide, model):
    import geojson
    import tensorflow as tf
    from PIL import Image

    calls = []

    def predict_fn(dataset):  # what the caller owns: uint8 -> float32 -> the model
        calls.append(1)
        return np.concatenate([model(tf.cast(x, tf.float32), training=False).numpy() for x, _ in dataset])

    row = slides.predict_slide(slide.path, predict_fn=predict_fn, classes=["0", "1"], patch_px=96,
                               patch_mpp=MPP, out_dir=str(tmp_path), batch_size=16, top_k=3, progress=False)
    assert len(calls) == 1
    n_tissue = int((~slide.glass).sum())
    assert row["status"] == "ok" and row["tiles"] == slide.rows * slide.cols and row["tissue_tiles"] == n_tissue
    folder = tmp_path / "case1"
    tiles = pd.read_csv(folder / "tiles.csv")
    assert len(tiles) == slide.rows * slide.cols
    tissue = tiles[tiles["is_tissue"]]
    assert tiles.loc[~tiles["is_tissue"], ["p_0", "p_1"]].isna().all().all()  # not predicted: empty
    # coordinates map back to the source patches, and the predictions are the model's on those patches
    patches = []
    with slides.open_slide(slide.path) as s:
        for x, y in zip(tissue["x"], tissue["y"]):
            r, c = y // CELL, x // CELL
            assert not slide.glass[r, c] and (r, c) in slide.files
            np.testing.assert_array_equal(s.read_region(x, y, 0, CELL, CELL), slide.patch(r, c))
            patches.append(slide.patch(r, c))
    direct = model(np.stack(patches).astype(np.float32), training=False).numpy()[:, 0]
    np.testing.assert_allclose(tissue["p_1"].to_numpy(), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tissue["p_0"].to_numpy(), 1 - direct, rtol=1e-5, atol=1e-6)
    assert row["score"] == pytest.approx(np.sort(direct)[-3:].mean(), rel=1e-5)
    assert row["label"] == ("1" if row["score"] >= 0.5 else "0")
    # the helper predict_fn (histofold.tta forward) gives the same numbers
    ds = slides.tile_dataset(slide.path, tissue["x"], tissue["y"], level=0, read_px=96, patch_px=96, batch_size=7)
    np.testing.assert_allclose(slides.keras_predict_fn(model, num_classes=2)(ds)[:, 1], direct, rtol=1e-5, atol=1e-6)
    # GeoJSON: valid, one QuPath tile feature per tissue tile, probability in the measurements
    fc = geojson.loads((folder / "case1.geojson").read_text())
    assert fc.is_valid and len(fc["features"]) == n_tissue
    first = fc["features"][0]
    x0, y0 = int(tissue["x"].iloc[0]), int(tissue["y"].iloc[0])
    assert first["geometry"]["coordinates"][0][0] == [x0, y0]
    assert first["properties"]["measurements"]["p_1"] == pytest.approx(tissue["p_1"].iloc[0])
    assert first["properties"]["classification"]["name"] in ("0", "1")
    contours = geojson.loads((folder / "case1_contours.geojson").read_text())
    assert contours.is_valid
    assert sum(f["properties"]["measurements"]["tiles"] for f in contours["features"]) == int((direct >= 0.5).sum())
    for name in ("heatmap.png", "overlay.png"):
        with Image.open(folder / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100


def mean_pixel_fn(dataset):
    """A fast stand-in model: P(class 1) = darkness of the patch."""
    return np.concatenate([1 - x.numpy().mean(axis=(1, 2, 3)) / 255.0 for x, _ in dataset])


def test_predict_slides_lists_a_corrupt_slide_and_finishes_the_others(tmp_path, slide):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slide.path, folder / "a.tif")
    (folder / "b_corrupt.svs").write_bytes(b"not a slide at all" * 100)
    data = open(slide.path, "rb").read()
    (folder / "c_truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("ignored")
    shutil.copy(slide.path, folder / "d.tiff")
    out = tmp_path / "out"
    frame = slides.predict_slides(str(folder), out_dir=str(out), predict_fn=mean_pixel_fn, classes=["normal", "tumor"],
                                  patch_px=96, patch_mpp=MPP, progress=False)
    csv = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(csv["slide"]) == ["a", "b_corrupt", "c_truncated", "d"] == list(frame["slide"])
    assert list(csv["status"]) == ["ok", "error", "error", "ok"]
    assert "b_corrupt.svs" in csv["error"][1] and "truncated" in csv["error"][2]
    assert (csv["tissue_tiles"][[0, 3]].astype(float) == int((~slide.glass).sum())).all()
    assert (out / "a" / "tiles.csv").exists() and "c_truncated.tif" in csv["error"][2]
    assert (out / "d" / "d.geojson").exists()


def test_a_read_error_inside_tf_data_surfaces_as_one_slide_error(tmp_path, slide, monkeypatch):
    read_tile = slides.read_tile

    def flaky(s, x, y, *args):
        if (x, y) == (3 * CELL, 3 * CELL):
            raise slides.SlideError(f"{s.path}: reading ({x}, {y}) failed: bad tile")
        return read_tile(s, x, y, *args)

    monkeypatch.setattr(slides, "read_tile", flaky)
    with pytest.raises(slides.SlideError, match=r"case1.tif: reading \(288, 288\) failed"):
        slides.predict_slide(slide.path, predict_fn=mean_pixel_fn, classes=["0", "1"], patch_px=96, patch_mpp=MPP,
                             out_dir=str(tmp_path), batch_size=4, progress=False)


def test_slide_score_is_the_top_k_mean():
    assert slides.slide_score(np.array([0.1, 0.9, 0.5, 0.7]), top_k=2) == pytest.approx(0.8)
    assert slides.slide_score(np.array([0.2, 0.4]), top_k=10) == pytest.approx(0.3)
    assert np.isnan(slides.slide_score(np.array([])))


# ------------------------------------------------------------------------------------------ annotations

def tumour_box(truth):
    """Level-0 rectangle of the tumour block (rows 2..4, cols 4..6) shrunk a little inside."""
    return 4 * CELL + 10, 2 * CELL + 10, 7 * CELL - 10, 5 * CELL - 10


def expected_labels(grid, truth, *, fraction: bool):
    out = []
    for x, y in zip(grid["x"], grid["y"]):
        r, c = y // CELL, x // CELL
        inside = 2 <= r < 5 and 4 <= c < 7
        if not fraction:
            out.append("tumor" if inside else "normal")
        else:  # cells at the block's border are 10 px short of full cover: 76*86/96^2 etc. < 0.95
            interior = r == 3 and c == 5
            out.append("tumor" if interior else (None if inside else "normal"))
    return out


@pytest.mark.parametrize("fmt", ["geojson", "xml"])
def test_label_tiles_from_qupath_geojson_and_asap_xml(tmp_path, slide, fmt):
    from histofold import annotations

    x0, y0, x1, y1 = tumour_box(slide)
    if fmt == "geojson":
        path = tmp_path / "case1.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            geojson_square(x0, y0, x1, y1, "tumor"),
            geojson_square(5 * CELL + 40, 3 * CELL + 40, 5 * CELL + 50, 3 * CELL + 50, "Region*")]}))  # ignored
    else:
        path = tmp_path / "case1.xml"
        path.write_text(asap_xml([("tumor", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])]))
    anns = annotations.load_annotations(path)
    assert [name for _, name in anns][:1] == ["tumor"] and anns[0][0].area == pytest.approx((x1 - x0) * (y1 - y0))
    with slides.open_slide(slide.path) as s:
        grid = slides.tile_grid(s, tile_level0=CELL)
    labels = slides.label_tiles(grid, anns, classes=["normal", "tumor"], background="normal")
    assert labels == expected_labels(grid, slide, fraction=False)
    labels = slides.label_tiles(grid, anns, classes=["normal", "tumor"], background="normal", label_fraction=0.95)
    assert labels == expected_labels(grid, slide, fraction=True)
    skipped = slides.label_tiles(grid, anns, classes=["normal", "tumor"], background=None)
    assert skipped.count("tumor") == 9 and skipped.count(None) == len(grid) - 9


def test_bad_annotation_file_names_it(tmp_path):
    from histofold import annotations

    bad = tmp_path / "x.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.geojson"):
        annotations.load_annotations(bad)
    bad_xml = tmp_path / "y.xml"
    bad_xml.write_text("<ASAP_Annotations><Annotations><Annotation Type='Polygon'>")
    with pytest.raises(ValueError, match="y.xml"):
        annotations.load_annotations(bad_xml)


def test_list_slide_tiles_and_load_tile_equal_tile_dataset(tmp_path, slide):
    folder = tmp_path / "train"
    folder.mkdir()
    shutil.copy(slide.path, folder / "case1.tif")
    x0, y0, x1, y1 = tumour_box(slide)
    (folder / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                      "features": [geojson_square(x0, y0, x1, y1, "tumor")]}))
    shutil.copy(slide.path, folder / "case2.tif")      # a class-index mask instead: all of it class 0
    from PIL import Image

    Image.fromarray(np.zeros((62, 81), np.uint8)).save(folder / "case2_mask.png")
    shutil.copy(slide.path, folder / "case3.tif")      # no annotation: skipped
    # mpp 0.6 -> 156 level-0 px per tile, resized to 96: load_tile and tile_dataset must agree exactly
    records = slides.list_slide_tiles(str(folder), patch_px=96, patch_mpp=MPP, classes=["normal", "tumor"],
                                      background="normal", min_tissue=0.5, mpp=0.6)
    assert {r["slide"] for r in records} == {"case1", "case2"}
    assert {r["label_name"] for r in records if r["slide"] == "case2"} == {"normal"}
    one = [r for r in records if r["slide"] == "case1"]
    assert {r["label_name"] for r in one} == {"normal", "tumor"}
    assert all(r["id"] == f"case1_{r['x']}_{r['y']}" and (r["level"], r["read_px"], r["patch_px"]) == (0, 156, 96)
               for r in one)
    ds = slides.tile_dataset(one[0]["path"], [r["x"] for r in one], [r["y"] for r in one], level=0, read_px=156,
                             patch_px=96, batch_size=5, mpp=0.6)
    got = {}
    for x, idx in ds:
        assert x.dtype.name == "uint8" and x.shape[1:] == (96, 96, 3)
        for img, i in zip(x.numpy(), idx.numpy()):
            got[int(i)] = img
    assert sorted(got) == list(range(len(one)))
    for i, r in enumerate(one):
        tile = slides.load_tile(r["path"], r["x"], r["y"], r["level"], r["read_px"], r["patch_px"])
        np.testing.assert_array_equal(tile, got[i])
