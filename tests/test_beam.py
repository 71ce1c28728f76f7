"""prepare --runner=beam (histofold/beam.py) writes the same dataset as the local pool: folds.csv, rejects,
the records of every fold (record by record), a manifest that verifies. DirectRunner, in-process."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from histofold.config import PrepareConfig
from histofold.errors import UsageError
from histofold.manifest import Manifest
from histofold.prepare import prepare

BEAM_MISSING = "apache-beam not installed (pip install -r requirements-beam.txt); the Beam runner is optional"


def _needs_beam():
    pytest.importorskip("apache_beam", reason=BEAM_MISSING)


def make_folder(root, *, per_class=14, size=24, seed=0):
    """Two class folders of PNG patches, with what QC must catch: an unreadable file, an exact duplicate
    (one group, never split over folds), a patch of another size."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["benign", "tumor"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([200, 120, 170]) - 60 * c
            image = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"p{c}_{i:02d}.png")
    (root / "benign" / "dup.png").write_bytes((root / "benign" / "p0_03.png").read_bytes())
    (root / "tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.full((size + 8, size + 8, 3), 150, np.uint8)).save(root / "tumor" / "big.png")
    return root


def run_both(tmp_path, beam_args="", **kw):
    """The same prepare twice, local pool and Beam DirectRunner, in sibling folders."""
    out = {}
    for runner in ("local", "beam"):
        config = PrepareConfig(out=str(tmp_path / runner / "tfrecords"), folds_dir=str(tmp_path / runner / "folds"),
                               runner=runner, workers=1, beam_args=beam_args if runner == "beam" else "", **kw)
        out[runner] = prepare(config)
    return out


def raw_records(directory: str) -> dict:
    """fold (-1 = test) -> every serialized record of its shards, in manifest order."""
    import tensorflow as tf

    manifest = json.loads((directory / "manifest.json").read_text())
    by_fold = {}
    for shard in manifest["shards"]:
        rows = [r.numpy() for r in tf.data.TFRecordDataset(str(directory / shard["file"]))]
        by_fold.setdefault(shard["fold"], []).extend(rows)
    return by_fold


def assert_same_dataset(tmp_path):
    local, beam = tmp_path / "local", tmp_path / "beam"
    for name in ("folds.csv", "rejects.csv", "duplicates.csv", "class_balance.csv"):
        assert (beam / "folds" / name).read_bytes() == (local / "folds" / name).read_bytes(), name
    a, b = raw_records(local / "tfrecords"), raw_records(beam / "tfrecords")
    assert sorted(a) == sorted(b)
    for fold in a:
        assert len(a[fold]) == len(b[fold]) > 0, fold
        for k, (x, y) in enumerate(zip(a[fold], b[fold])):
            assert x == y, f"fold {fold} record {k} differs"
    ma, mb = (json.loads((d / "tfrecords" / "manifest.json").read_text()) for d in (local, beam))
    assert mb["counts"] == ma["counts"] and mb["shards"] == ma["shards"]  # same names, counts, bytes, sha256
    assert Manifest.load(str(beam / "tfrecords")).verify()["ok"]
    assert not (beam / "tfrecords" / ".beam").exists()  # the workers' scratch is cleaned up
    return ma


def test_beam_folder_source_same_folds_records_and_manifest(tmp_path):
    _needs_beam()
    root = make_folder(tmp_path / "data")
    out = run_both(tmp_path, source="folder", input=str(root), folds=3, shard_mb=0.004)
    manifest = assert_same_dataset(tmp_path)
    assert out["beam"]["runner"] == "beam"
    assert {k: out["beam"][k] for k in ("inputs", "written", "rejected")} == {"inputs": 31, "written": 29,
                                                                               "rejected": 2}
    assert max(s["count"] for s in manifest["shards"]) < 10  # several shards per fold: boundaries matter


def test_beam_synthetic_with_test_set_and_stain_norm(tmp_path):
    _needs_beam()
    run_both(tmp_path, source="synthetic", source_options={"count": 40, "test_count": 9, "image_size": 32},
             folds=2, stain_norm="reinhard", encoding="png", shard_mb=0.02)
    manifest = assert_same_dataset(tmp_path)
    assert manifest["counts"]["test"] == 9 and manifest["encoding"] == "png"


def test_beam_slides_one_work_item_per_slide(tmp_path, monkeypatch):
    _needs_beam()
    from slide_fixtures import CELL, build_slide, geojson_square

    from histofold import beam, sources

    folder = tmp_path / "slides"
    folder.mkdir()
    for i, tumour in enumerate([(1, 2, 3, 4), (0, 0, 0, 0)]):
        build_slide(folder / f"s{i}.tif", rows=3, cols=4, tumour=tumour, seed=i, skip=100 * i)
        features = [geojson_square(0, 0, 4 * CELL, 3 * CELL, "normal")]
        if tumour[2] > tumour[0]:
            features.append(geojson_square(tumour[1] * CELL, tumour[0] * CELL, tumour[3] * CELL, tumour[2] * CELL,
                                           "tumor"))
        (folder / f"s{i}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    listing = sources.get_source("slides").list(str(folder), classes="normal,tumor", patch_px=96, patch_mpp=0.972,
                                                min_tissue=0.25)
    groups = beam.work_items(listing.train)
    assert len(groups) == 2 and sum(map(len, groups)) == len(listing.train)
    assert all(len({listing.train[k].ref[1] for k in g}) == 1 for g in groups)  # one slide each
    run_both(tmp_path, source="slides", input=str(folder), classes=("normal", "tumor"), mpp=0.972, resize=96,
             folds=2, source_options={"min_tissue": 0.25})
    rows = Manifest.load(str(tmp_path / "beam" / "tfrecords")).read_records()
    assert rows and all(r["loc_x"] >= 0 and r["group"] for r in rows)
    assert_same_dataset(tmp_path)


def test_work_items_chunk_plain_images():
    from histofold import beam
    from histofold.prepare import CHUNK
    from histofold.sources import Item

    items = [Item(f"i{k}", 0, "", ("synthetic", 0, k, 8, 0, 2)) for k in range(2 * CHUNK + 5)]
    assert [len(g) for g in beam.work_items(items)] == [CHUNK, CHUNK, 5]
    assert [k for g in beam.work_items(items) for k in g] == list(range(len(items)))


def test_beam_rerun_is_a_noop_and_resumes(tmp_path):
    _needs_beam()
    config = PrepareConfig(source="synthetic", source_options={"count": 24, "test_count": 0, "image_size": 16},
                           out=str(tmp_path / "t"), folds_dir=str(tmp_path / "f"), folds=2, runner="beam",
                           shard_mb=0.004)
    first = prepare(config)
    assert first["shards_written"] == first["shards"] > 2
    victim = sorted((tmp_path / "t").glob("fold1-*.tfrec"))[0]
    victim.unlink()  # as if the run had died before this shard
    assert prepare(config)["shards_written"] == 1
    assert prepare(config)["shards_written"] == 0
    assert Manifest.load(str(tmp_path / "t")).verify()["ok"]


def test_beam_missing_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam -> ImportError
    config = PrepareConfig(source="synthetic", out=str(tmp_path / "t"), folds_dir=str(tmp_path / "f"), runner="beam")
    with pytest.raises(UsageError, match="requirements-beam.txt"):
        prepare(config)


def test_beam_args_validation():
    with pytest.raises(UsageError, match="--runner=beam"):
        PrepareConfig(source="synthetic", beam_args="--runner=DataflowRunner")
    with pytest.raises(UsageError, match="does not parse"):
        PrepareConfig(source="synthetic", runner="beam", beam_args="--project='unclosed")
    assert PrepareConfig(source="synthetic", runner="beam", beam_args="--direct_num_workers=2").runner == "beam"


def test_beam_multi_processing_direct_runner_same_dataset(tmp_path, monkeypatch):
    """Work items pickled to separate SDK worker processes (what a cluster runner does) change nothing;
    the workers import histofold even when the command runs outside the checkout."""
    _needs_beam()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    run_both(tmp_path, source="synthetic", source_options={"count": 30, "test_count": 6, "image_size": 16},
             folds=2, shard_mb=0.004,
             beam_args="--direct_num_workers=2 --direct_running_mode=multi_processing")
    assert_same_dataset(tmp_path)


def test_remote_runner_without_setup_file_warns(caplog):
    _needs_beam()
    from histofold import beam

    with caplog.at_level("WARNING", logger="histofold"):
        beam.pipeline_options("--runner=DataflowRunner --project=p")
    assert "--setup_file=./setup.py" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="histofold"):
        beam.pipeline_options("--runner=DataflowRunner --project=p --setup_file=./setup.py")
    assert caplog.text == ""
