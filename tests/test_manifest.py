"""manifest.py: loading (cached per process, reparsed on change), facts, shard selection and counts, the
quick check against the files (missing / truncated / changed shards) and the deep verify()."""
import json
import os

import pytest

from helpers_records import write_fake_tfrecords
from histofold import manifest as manifest_mod
from histofold import records
from histofold.errors import DataError, IntegrityError
from histofold.manifest import Manifest

N_PER_FOLD, FOLDS, N_TEST = 6, 3, 5


@pytest.fixture
def tfrec(tmp_path):
    """A fresh fake tfrecords dir per test (tests here damage it)."""
    directory = str(tmp_path / "tfrecords")
    return directory, write_fake_tfrecords(directory, n_per_fold=N_PER_FOLD, folds=FOLDS, n_test=N_TEST,
                                           size=16, encoding="raw")


def _rewrite(directory, change):
    path = os.path.join(directory, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _flip_middle(path):
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    blob[len(blob) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(blob))


# ---------------------------------------------------------------- loading

def test_load_is_cached_and_reparsed_after_the_file_changes(tfrec):
    directory, written = tfrec
    first = Manifest.load(directory)
    assert Manifest.load(directory) is first
    assert Manifest.load(directory + "/") is first                    # the same dir, normalised
    assert first.data == written and first.directory == os.path.normpath(directory)
    _rewrite(directory, lambda d: d.update(classes=["neg", "pos"], mpp=0.5))
    second = Manifest.load(directory)
    assert second is not first
    assert second.classes == ["neg", "pos"] and second.mpp == 0.5
    assert Manifest.load(directory) is second
    assert second.sha256 != first.sha256


def test_load_reparses_a_same_size_rewrite(tfrec):
    directory, _ = tfrec
    first = Manifest.load(directory)
    path = os.path.join(directory, "manifest.json")
    text = open(path).read()
    assert '"source": "fake"' in text
    with open(path, "w") as f:
        f.write(text.replace('"source": "fake"', '"source": "FAKE"'))  # same size, new content
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later mtime
    assert Manifest.load(directory).data["source"] == "FAKE"
    assert first.data["source"] == "fake"


def test_missing_manifest_names_prepare_tfrecords(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*manifest\.json not found.*prepare_tfrecords\.py"):
        Manifest.load(str(tmp_path / "nowhere"))


def test_malformed_manifest_is_a_data_error(tmp_path):
    directory = tmp_path / "tfrecords"
    directory.mkdir()
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON.*prepare_tfrecords.py"):
        Manifest.load(str(directory))
    (directory / "manifest.json").write_text(json.dumps({"classes": ["a"], "image_size": [8, 8]}))
    with pytest.raises(DataError, match="has no 'encoding'"):
        Manifest.load(str(directory))


# ---------------------------------------------------------------- facts

def test_facts(tfrec):
    directory, written = tfrec
    m = Manifest.load(directory)
    assert m.classes == ["0", "1"] and m.num_classes == 2
    assert m.image_size == (16, 16) and m.encoding == "raw" and m.n_folds == FOLDS
    assert m.mpp is None and m.stain is None and not m.test_labeled and not m.resized
    assert m.pixel_format == records.PixelFormat(size=(16, 16), stain=None)
    assert m.counts == written["counts"]
    # fake labels cycle 0, 1, 1: per fold of 6 -> 2 of class 0, 4 of class 1
    assert m.class_counts([0]) == [2, 4] and m.class_counts([0, 2]) == [4, 8]
    assert m.path == os.path.join(os.path.normpath(directory), "manifest.json")
    assert m.sample_submission() == os.path.join(os.path.normpath(directory), "sample_submission.csv")
    ids = m.test_ids()
    assert len(ids) == N_TEST and ids == [r["id"] for r in m.read_records(split="test")]


def test_stain_off_reads_as_none_and_on_as_its_json(tfrec):
    directory, _ = tfrec
    _rewrite(directory, lambda d: d.update(stain={"method": "none"}))
    assert Manifest.load(directory).stain is None
    on = {"method": "reinhard", "params": {"x": 1}}
    _rewrite(directory, lambda d: d.update(stain=on, mpp=0.972))
    m = Manifest.load(directory)
    assert m.stain == on and m.pixel_format.stain == on and m.mpp == 0.972


def test_unknown_encoding_is_a_data_error(tfrec):
    directory, _ = tfrec
    _rewrite(directory, lambda d: d.update(encoding="webp"))
    with pytest.raises(DataError, match="unknown encoding 'webp'"):
        Manifest.load(directory).encoding


# ---------------------------------------------------------------- shards

def test_shards_files_and_counts_by_split_and_fold(tfrec):
    directory, written = tfrec
    m = Manifest.load(directory)
    train = m.shards("train")
    assert [s["file"] for s in train] == [s["file"] for s in written["shards"] if s["split"] == "train"]
    assert len(train) == FOLDS * 2 and {s["fold"] for s in train} == set(range(FOLDS))
    sel = m.shards("train", folds=[2, 0])
    assert [(s["fold"], records.parse_shard_name(s["file"])["index"]) for s in sel] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert [os.path.basename(f) for f in m.files("train", [2, 0])] == [s["file"] for s in sel]
    assert all(f.startswith(os.path.normpath(directory)) and os.path.exists(f) for f in m.files())
    assert [records.parse_shard_name(f)["prefix"] for f in m.files("test")] == ["test", "test"]
    assert m.count() == FOLDS * N_PER_FOLD == written["counts"]["train"]
    assert m.count("test") == N_TEST
    for k in range(FOLDS):
        assert m.count(folds=[k]) == written["counts"]["per_fold"][str(k)] == N_PER_FOLD
    assert m.count(folds=[0, 1]) == 2 * N_PER_FOLD


def test_absent_folds_and_bad_split(tfrec):
    directory, _ = tfrec
    m = Manifest.load(directory)
    with pytest.raises(DataError, match=r"\[3, 7\].*available folds: \[0, 1, 2\]"):
        m.shards("train", folds=[0, 3, 7])
    with pytest.raises(DataError, match="available folds"):
        m.count(folds=[])
    with pytest.raises(ValueError, match="split='valid'"):
        m.files("valid")


def test_no_test_set_has_no_test_shards(tmp_path):
    directory = str(tmp_path / "tfrecords")
    write_fake_tfrecords(directory, n_per_fold=3, folds=2, n_test=0, size=8)
    m = Manifest.load(directory)
    assert m.shards("test") == [] and m.files("test") == [] and m.count("test") == 0
    m.check("test")


# ---------------------------------------------------------------- check

def test_check_passes_on_a_good_dir(tfrec):
    directory, _ = tfrec
    m = Manifest.load(directory)
    for split in ("train", "test"):
        m.check(split)
        m.check(split, hashes=True)
    m.check("train", folds=[1], hashes=True)


def _shard(directory, fold):
    m = Manifest.load(directory)
    s = m.shards("train", [fold])[0]
    return s["file"], os.path.join(directory, s["file"])


def test_check_names_a_deleted_shard(tfrec):
    directory, _ = tfrec
    name, path = _shard(directory, 1)
    os.remove(path)
    m = Manifest.load(directory)
    with pytest.raises(IntegrityError, match=rf"{name} is missing .*prepare_tfrecords\.py"):
        m.check("train")
    m.check("train", folds=[0, 2])                                     # the other folds are intact


def test_check_names_a_truncated_shard(tfrec):
    directory, _ = tfrec
    name, path = _shard(directory, 2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(IntegrityError, match=rf"{name} has {size - 7} bytes, the manifest says {size}"):
        Manifest.load(directory).check("train", folds=[2])


def test_check_with_hashes_names_a_changed_shard_of_the_same_size(tfrec):
    directory, _ = tfrec
    name, path = _shard(directory, 0)
    size = os.path.getsize(path)
    _flip_middle(path)
    assert os.path.getsize(path) == size
    m = Manifest.load(directory)
    m.check("train")                                                   # sizes agree: the quick check passes
    with pytest.raises(IntegrityError, match=rf"{name} does not match its sha256"):
        m.check("train", hashes=True)


def test_check_refuses_a_count_the_shard_name_contradicts(tfrec):
    directory, _ = tfrec

    def bump(d):
        d["shards"][0]["count"] += 1
    _rewrite(directory, bump)
    with pytest.raises(IntegrityError, match="with count .* which its name contradicts"):
        Manifest.load(directory).check("train")


def test_missing_test_ids_is_an_integrity_error(tfrec):
    directory, _ = tfrec
    os.remove(os.path.join(directory, manifest_mod.TEST_IDS))
    with pytest.raises(IntegrityError, match="test_ids.csv is missing"):
        Manifest.load(directory).test_ids()


# ---------------------------------------------------------------- verify (deep)

@pytest.fixture
def prepared(tmp_path):
    from histofold.config import PrepareConfig
    from histofold.prepare import prepare

    config = PrepareConfig(source="synthetic", out=str(tmp_path / "tfrecords"), folds_dir=str(tmp_path / "folds"),
                           folds=2, shard_mb=0.02, source_options={"count": 30, "test_count": 6, "image_size": 24})
    summary = prepare(config)
    return str(tmp_path / "tfrecords"), summary


def test_verify_passes_on_a_prepared_dir(prepared):
    directory, summary = prepared
    m = Manifest.load(directory)
    result = m.verify()
    assert result == {"shards": summary["shards"], "records": 36, "ok": True}
    assert result["shards"] == len(m.data["shards"]) > 3
    assert m.count() == 30 and m.count("test") == 6 and m.test_labeled
    m.check("train", hashes=True)
    m.check("test", hashes=True)
    rows = m.read_records()
    assert len(rows) == 36 and all(r["image"].shape == (24, 24, 3) for r in rows)


def test_verify_names_a_damaged_shard(prepared):
    directory, _ = prepared
    m = Manifest.load(directory)
    victim = m.shards("train", [1])[0]["file"]
    _flip_middle(os.path.join(directory, victim))
    with pytest.raises(IntegrityError, match=victim) as err:
        Manifest.load(directory).verify()
    assert f"{victim}: sha256 differs from the manifest" in str(err.value)
    assert str(err.value).startswith(f"verify {os.path.normpath(directory)}")


def test_verify_names_a_missing_shard_and_the_ids_it_held(prepared):
    directory, _ = prepared
    victim = Manifest.load(directory).shards("test")[0]
    os.remove(os.path.join(directory, victim["file"]))
    with pytest.raises(IntegrityError) as err:
        Manifest.load(directory).verify()
    message = str(err.value)
    assert f"{victim['file']}: missing" in message
    assert f"{victim['count']} ids of folds.csv/test_ids.csv are in no shard" in message
