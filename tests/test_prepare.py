"""The data stage end to end: folds, shards, manifest, rejects, duplicates, resume, verify, determinism."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import shared
from histofold import imageio, records
from histofold.errors import IntegrityError, UsageError
from histofold.manifest import Manifest
from histofold.prepare import PrepareConfig, prepare


def read_records(directory, split=None):
    return Manifest.load(directory).read_records(split=split)


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(tmp_path, **kw):
    config = PrepareConfig(out=str(tmp_path / "tfrecords"), folds_dir=str(tmp_path / "folds"), **kw)
    return prepare(config), config


def manifest_of(tmp_path):
    return json.loads((tmp_path / "tfrecords" / "manifest.json").read_text())


def assert_identity(summary, tmp_path):
    m = manifest_of(tmp_path)["counts"]
    rejects = pd.read_csv(tmp_path / "folds" / "rejects.csv")
    assert summary["inputs"] == summary["written"] + summary["rejected"] == m["inputs"]
    assert m["written"] == m["train"] + m["test"] and m["rejected"] == len(rejects)
    records = read_records(str(tmp_path / "tfrecords"))
    assert len(records) == m["written"] and len({r["id"] for r in records}) == len(records)
    return records, rejects


def test_hcd_mock_end_to_end_raw_round_trip_and_noop_rerun(tmp_path):
    root = shared("hcd_kaggle_mock")
    summary, config = run(tmp_path, source="hcd", input=str(root), verify=True)
    folds = pd.read_csv(tmp_path / "folds" / "folds.csv", dtype={"id": str})
    assert len(folds) == 15 and sorted(folds["fold"].unique()) == list(range(5))
    assert (folds.groupby("fold")["label"].agg(lambda s: (s == 0).sum()) == 2).all()
    assert (folds.groupby("fold")["label"].sum() == 1).all()
    assert {"id", "label", "fold", "group", "source", "class", "blank"} <= set(folds.columns)
    balance = pd.read_csv(tmp_path / "folds" / "class_balance.csv")
    assert balance[["0", "1"]].iloc[:5].values.tolist() == [[2, 1]] * 5
    records, _ = assert_identity(summary, tmp_path)
    m = manifest_of(tmp_path)
    assert (m["counts"]["train"], m["counts"]["test"], m["encoding"]) == (15, 11, "raw")
    assert m["image_size"] == [96, 96] and m["sample_submission"] == "sample_submission.csv"
    assert m["mpp"] == 0.972 and m["stain"] == {"method": "none"}     # PCam resolution, no normalization
    assert Manifest.load(str(tmp_path / "tfrecords")).stain is None
    for shard in m["shards"]:                                         # entries carry size and hash
        path = tmp_path / "tfrecords" / shard["file"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256_of(path)
    sub = pd.read_csv(root / "sample_submission.csv", dtype={"id": str})
    test_ids = pd.read_csv(tmp_path / "tfrecords" / "test_ids.csv", dtype={"id": str})
    assert test_ids["id"].tolist() == sub["id"].tolist() and (test_ids["label"] == -1).all()
    assert [r["id"] for r in records if r["fold"] == -1] == sub["id"].tolist()
    fold_of = dict(zip(folds["id"], folds["fold"]))
    for r in records:
        path = root / ("train" if r["fold"] >= 0 else "test") / f"{r['id']}.tif"
        assert np.array_equal(r["image"], imageio.read_image(path))  # raw is pixel-identical
        assert r["fold"] == fold_of.get(r["id"], -1)
    assert summary["verify"] is True
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tfrecords").iterdir()}
    again = prepare(config)
    assert again["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tfrecords").iterdir()
            if not p.name.startswith(".")} == {k: v for k, v in before.items() if not k.startswith(".")}


def test_png_round_trip_and_changed_folds_need_overwrite(tmp_path):
    root = shared("hcd_kaggle_mock")
    run(tmp_path, source="hcd", input=str(root), encoding="png")
    records = read_records(str(tmp_path / "tfrecords"), split="train")
    assert manifest_of(tmp_path)["encoding"] == "png"
    for r in records[:5]:
        assert np.array_equal(r["image"], imageio.read_image(root / "train" / f"{r['id']}.tif"))
    with pytest.raises(UsageError, match="folds.csv exists.*--overwrite"):
        run(tmp_path, source="hcd", input=str(root), encoding="png", seed=7)
    summary, _ = run(tmp_path, source="hcd", input=str(root), encoding="png", seed=7, overwrite=True)
    assert summary["written"] == 26 and manifest_of(tmp_path)["seed"] == 7


def test_lc25000_folder_resized_jpeg(tmp_path):
    summary, _ = run(tmp_path, source="folder", input=str(shared("lc25000")), resize=160, folds=4)
    m = manifest_of(tmp_path)
    assert summary["inputs"] == 100 and m["num_classes"] == 5 and m["image_size"] == [160, 160]
    assert m["encoding"] == "jpeg" and m["mpp"] is None               # a folder tree has no known mpp
    assert Manifest.load(str(tmp_path / "tfrecords")).resized
    assert_identity(summary, tmp_path)
    table = pd.read_csv(tmp_path / "folds" / "folds.csv").groupby(["fold", "label"]).size().unstack()
    assert (table == 5).all().all()  # 20 per class over 4 folds


def test_synthetic_and_unknown_option(tmp_path):
    summary, _ = run(tmp_path, source="synthetic", source_options={"count": 40, "test_count": 10,
                                                                   "image_size": 64})
    assert (summary["train"], summary["test"], summary["image_size"]) == (40, 10, [64, 64])
    assert manifest_of(tmp_path)["test_labeled"] is True
    assert_identity(summary, tmp_path)
    with pytest.raises(UsageError, match="unknown flag --bogus"):
        run(tmp_path, source="synthetic", source_options={"bogus": 1})
    with pytest.raises(UsageError, match="--test_split is not an option of --source=synthetic .*--count"):
        run(tmp_path, source="synthetic", source_options={"test_split": "valid"})


def test_size_is_the_deprecated_alias_of_resize_and_near_dup_is_a_radius(tmp_path):
    with pytest.warns(FutureWarning, match="--size is deprecated: use --resize"):
        config = PrepareConfig.from_flags(size=48)
    assert config.resize == 48
    assert PrepareConfig.from_flags(near_dup=True).near_dup == 4
    assert PrepareConfig.from_flags(near_dup=False).near_bits is None
    assert PrepareConfig.from_flags(near_dup=6).near_bits == 6
    assert PrepareConfig.from_flags(source="folder", classes="a,b").classes == ("a", "b")


def test_resize_scales_the_recorded_mpp_and_stain_is_recorded(tmp_path):
    opts = {"count": 24, "test_count": 0, "image_size": 64}
    summary, _ = run(tmp_path, source="synthetic", source_options=opts, resize=32, mpp=0.5, folds=2,
                     stain_norm="reinhard")
    m = Manifest.load(str(tmp_path / "tfrecords"))
    assert m.image_size == (32, 32) and summary["mpp"] == m.mpp == pytest.approx(1.0)  # 0.5 um/px at 64 -> 32
    assert m.stain is not None and m.stain["method"] == "reinhard" and summary["stain_norm"] == "reinhard"
    assert m.pixel_format.size == (32, 32) and m.pixel_format.stain == m.stain


def make_hcd(root: Path, n=12, size=96):
    """A small Kaggle-HCD layout from random textures; returns the train ids."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    ids = [f"{i:040x}" for i in range(n)]
    for i in ids:
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(root / "train" / f"{i}.tif")
    pd.DataFrame({"id": ids, "label": [k % 2 for k in range(n)]}).to_csv(root / "train_labels.csv", index=False)
    tests = [f"{i:040x}" for i in range(1000, 1004)]
    for i in tests:
        shutil.copy(root / "train" / f"{ids[0]}.tif", root / "test" / f"{i}.tif")  # test dup of a train image
    pd.DataFrame({"id": tests, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
    return ids


def test_bad_inputs_become_rejects_and_identity_holds(tmp_path):
    root = tmp_path / "hcd"
    ids = make_hcd(root)
    (root / "train" / f"{ids[1]}.tif").write_bytes(b"")  # zero-byte
    data = (root / "train" / f"{ids[2]}.tif").read_bytes()
    (root / "train" / f"{ids[2]}.tif").write_bytes(data[: len(data) // 2])  # truncated
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(root / "train" / f"{ids[3]}.tif")  # wrong size
    shutil.copy(root / "train" / f"{ids[5]}.tif", root / "train" / f"{ids[4]}.tif")  # exact dup, other label
    labels = pd.read_csv(root / "train_labels.csv", dtype={"id": str})
    extra = pd.DataFrame({"id": ["f" * 40, ids[6], "e" * 40], "label": [1, 1, 7]})  # missing, dup id, bad label
    shutil.copy(root / "train" / f"{ids[7]}.tif", root / "train" / f"{'e' * 40}.tif")
    pd.concat([labels, extra]).to_csv(root / "train_labels.csv", index=False)
    summary, _ = run(tmp_path / "o", source="hcd", input=str(root), folds=2)
    records, rejects = assert_identity(summary, tmp_path / "o")
    reasons = dict(zip(rejects["id"], rejects["reason"]))
    for bad in [ids[1], ids[2], ids[3], "f" * 40, ids[6], "e" * 40]:
        assert bad in reasons, (bad, reasons)
    assert "pass --resize=N" in reasons[ids[3]]
    dups = pd.read_csv(tmp_path / "o" / "folds" / "duplicates.csv", dtype={"id": str})
    pair = dups[dups["id"].isin([ids[4], ids[5]])]
    assert len(pair) == 2 and pair["conflict"].all() and (pair["kind"] == "exact").all()
    assert dups["split"].eq("test").sum() == 4  # test duplicates reported, never dropped
    folds = pd.read_csv(tmp_path / "o" / "folds" / "folds.csv", dtype={"id": str, "group": str})
    assert folds.loc[folds["id"].isin([ids[4], ids[5]]), "fold"].nunique() == 1
    assert summary["test"] == 4


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    opts = {"count": 120, "test_count": 20, "image_size": 32}
    calls = []

    def crash(name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")

    config = PrepareConfig(source="synthetic", out=str(tmp_path / "tfrecords"), folds_dir=str(tmp_path / "folds"),
                           shard_mb=0.03, source_options=opts)  # ~9 records per shard
    from histofold import prepare as prep

    with pytest.raises(RuntimeError, match="simulated"):
        prep.prepare(config, on_shard=crash)
    assert not (tmp_path / "tfrecords" / "manifest.json").exists()
    finished = sorted(p.name for p in (tmp_path / "tfrecords").glob("*.tfrec"))
    assert finished == sorted(calls)
    summary = prep.prepare(config)
    assert summary["shards"] > 10 and summary["shards_written"] == summary["shards"] - 2
    rows = read_records(str(tmp_path / "tfrecords"))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 140
    assert Manifest.load(str(tmp_path / "tfrecords")).verify() == {"shards": summary["shards"], "records": 140,
                                                                   "ok": True}
    assert not [p for p in os.listdir(tmp_path / "tfrecords") if p.endswith(".tmp")]


def test_rerun_rewrites_only_a_damaged_shard(tmp_path):
    opts = {"count": 60, "test_count": 10, "image_size": 32}
    config = PrepareConfig(source="synthetic", out=str(tmp_path / "tfrecords"), folds_dir=str(tmp_path / "folds"),
                           shard_mb=0.03, folds=2, source_options=opts)
    first = prepare(config)
    out = tmp_path / "tfrecords"
    victim = sorted(out.glob("fold1-*.tfrec"))[0]
    good = sha256_of(victim)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=victim.name):
        Manifest.load(str(out)).verify()
    again = prepare(config)
    assert again["shards_written"] == 1 and again["shards"] == first["shards"]
    assert sha256_of(victim) == good
    assert Manifest.load(str(out)).verify()["ok"]


def test_two_identical_prepares_give_byte_identical_shards(tmp_path):
    opts = {"count": 50, "test_count": 10, "image_size": 32}
    digests = []
    for name in ("a", "b"):
        config = PrepareConfig(source="synthetic", out=str(tmp_path / name / "tfrecords"),
                               folds_dir=str(tmp_path / name / "folds"), shard_mb=0.03, folds=3,
                               encoding="png", source_options=opts)
        prepare(config)
        out = tmp_path / name / "tfrecords"
        manifest = json.loads((out / "manifest.json").read_text())
        on_disk = {p.name: sha256_of(p) for p in out.glob("*.tfrec")}
        assert on_disk == {s["file"]: s["sha256"] for s in manifest["shards"]}
        digests.append(on_disk)
    assert len(digests[0]) > 3 and digests[0] == digests[1]
    assert (tmp_path / "a" / "folds" / "folds.csv").read_bytes() == (tmp_path / "b" / "folds" / "folds.csv").read_bytes()


@pytest.mark.slow
def test_pcam_jpeg_train_duplicates_found(tmp_path):
    summary, _ = run(tmp_path, source="folder", input=str(shared("pcam_jpeg") / "train"), workers=2)
    dups = pd.read_csv(tmp_path / "folds" / "duplicates.csv")
    exact = dups[dups["kind"] == "exact"]
    assert summary["inputs"] == 3000 and 40 <= len(exact) <= 60  # ~23 pixel-identical pairs
    folds = pd.read_csv(tmp_path / "folds" / "folds.csv")
    in_cluster = folds[folds["id"].isin(exact["id"])]
    merged = in_cluster.merge(dups[["id", "cluster"]], on="id")
    assert (merged.groupby("cluster")["fold"].nunique() == 1).all()
    assert_identity(summary, tmp_path)


def test_pool_forks_only_without_tensorflow(monkeypatch):
    import sys

    import histofold.prepare as prep

    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    assert prep._start_method() == "spawn"  # TensorFlow is not fork-safe
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert prep._start_method() == "fork"  # the CLI: TensorFlow is first imported after pass 1
    assert prep._make_pool(1, 10_000) is None and prep._make_pool(4, 10) is None


def test_png_and_raw_records_are_lossless():
    rgb = np.random.default_rng(3).integers(0, 256, (96, 96, 3), np.uint8)
    assert records.encode_image(rgb, "png") == imageio.encode_png(rgb)   # the one PNG encoder
    np.testing.assert_array_equal(imageio.decode_image(records.encode_image(rgb, "png")), rgb)
    np.testing.assert_array_equal(np.frombuffer(records.encode_image(rgb, "raw"), np.uint8).reshape(rgb.shape), rgb)


def test_mode_conversions_are_counted_in_the_summary(tmp_path):
    """RGBA, L, I;16 and P inputs are converted to RGB (imageio's rules) and counted by source mode, not
    converted silently; RGB inputs are not counted."""
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    makers = {"RGB": lambda: Image.fromarray(rgb()),
              "RGBA": lambda: Image.fromarray(np.dstack([rgb(), np.full((16, 16), 200, np.uint8)])),
              "L": lambda: Image.fromarray(rgb()[..., 0]),
              "I;16": lambda: Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
              "P": lambda: Image.fromarray(rgb()).quantize(16)}
    counts = {"RGB": 4, "RGBA": 3, "L": 2, "I;16": 2, "P": 1}
    for k, (mode, n) in enumerate(counts.items()):
        for i in range(n):
            cls = ["a", "b"][(k + i) % 2]
            (tmp_path / "in" / cls).mkdir(parents=True, exist_ok=True)
            image = makers[mode]()
            assert image.mode == mode
            image.save(tmp_path / "in" / cls / f"{mode.replace(';', '')}-{i}.png")
    summary, _ = run(tmp_path, source="folder", input=str(tmp_path / "in"), folds=2, near_dup=-1)
    assert summary["written"] == 12 and summary["rejected"] == 0
    assert summary["mode_conversions"] == {"I;16": 2, "L": 2, "P": 1, "RGBA": 3}
