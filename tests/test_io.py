"""histofold/io.py on a local folder and on ram:// (tf.io.gfile's in-memory filesystem, the stand-in for
gs://): bytes, strict JSON, CSV with string ids, queries, rename/rmtree/sha256, atomic writes."""
import hashlib
import json
import math
import uuid

import numpy as np
import pandas as pd
import pytest

from histofold import io


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "root")
    else:
        pytest.importorskip("tensorflow")
        url = f"ram://histofold-test-io-{uuid.uuid4().hex}"
        yield url
        io.rmtree(url)


def test_is_url_and_join(root):
    assert io.is_url("gs://b/x") and io.is_url("ram://x") and not io.is_url("/tmp/x")
    assert io.join("gs://bucket/dir", "a", 3) == "gs://bucket/dir/a/3"
    assert io.basename("runs/demo/") == "demo" and io.basename("gs://b/runs/demo/") == "demo"
    assert io.dirname("gs://b/runs/demo") == "gs://b/runs"
    assert io.normpath("gs://b/x/./y/") == "gs://b/x/y"
    assert io.join(root, "a").startswith(root)


def test_bytes_round_trip_creates_folders(root):
    path = io.join(root, "sub", "deeper", "data.bin")
    assert not io.exists(path)
    data = bytes(range(256)) * 10
    io.write_bytes(path, data)
    assert io.exists(path) and io.isfile(path) and not io.isdir(path)
    assert io.isdir(io.join(root, "sub", "deeper"))
    assert io.read_bytes(path) == data
    assert io.size(path) == len(data)
    io.write_bytes(path, b"shorter")                 # overwrite replaces the whole file
    assert io.read_bytes(path) == b"shorter"
    io.write_text(io.join(root, "t.txt"), "héllo\n")
    assert io.read_text(io.join(root, "t.txt")) == "héllo\n"


def test_atomic_write_leaves_no_temporary(root):
    path = io.join(root, "x.json")
    io.write_json(path, {"a": 1})
    io.write_bytes(io.join(root, "y.bin"), b"1")
    io.write_csv(io.join(root, "z.csv"), pd.DataFrame({"id": ["1"]}))
    assert io.listdir(root) == ["x.json", "y.bin", "z.csv"]
    assert io.tmp_name(path) == io.join(root, ".x.json.tmp")
    assert not io.exists(io.tmp_name(path))
    assert io.glob(io.join(root, ".*.tmp")) == []


def test_a_stale_temporary_is_replaced_by_the_next_write(root):
    path = io.join(root, "shard.bin")
    io.write_bytes(io.tmp_name(path), b"half a file from a killed writer")
    io.write_bytes(path, b"whole")
    assert io.read_bytes(path) == b"whole"
    assert io.listdir(root) == ["shard.bin"]


def test_json_is_strict_nan_becomes_null(root):
    path = io.join(root, "m.json")
    obj = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": np.float32(0.25),
           "d": np.arange(3), "e": {1: "x"}, "f": (1, 2), "g": np.int64(7)}
    io.write_json(path, obj)
    text = io.read_text(path)
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert strict == {"a": None, "b": [1.5, None, None], "c": 0.25, "d": [0, 1, 2], "e": {"1": "x"},
                      "f": [1, 2], "g": 7}
    assert io.read_json(path) == strict
    assert io.read_json(io.join(root, "none.json"), default={"x": 1}) == {"x": 1}
    assert io.read_json(io.join(root, "none.json"), None) is None


def test_missing_file_raises_file_not_found(root):
    # read_json's docstring: "`default` when the file does not exist (else FileNotFoundError)"
    io.makedirs(root)
    with pytest.raises(FileNotFoundError):
        io.read_json(io.join(root, "none.json"))
    with pytest.raises(FileNotFoundError):
        io.read_bytes(io.join(root, "none.bin"))


def test_csv_round_trip_keeps_string_ids(root):
    path = io.join(root, "preds.csv")
    frame = pd.DataFrame({"id": ["007", "010", "1e5"], "label": [0, 1, -1], "p_1": [0.25, 0.5, math.pi]})
    io.write_csv(path, frame)
    assert io.read_text(path).splitlines()[0] == "id,label,p_1"   # no index column by default
    back = io.read_csv(path, dtype={"id": str})
    assert back["id"].tolist() == ["007", "010", "1e5"]
    pd.testing.assert_frame_equal(back, frame)
    assert io.read_csv(path, nrows=0).columns.tolist() == ["id", "label", "p_1"]


def test_listdir_glob_rename_copy(root):
    for name in ("b.tfrec", "a.tfrec", "c.json"):
        io.write_bytes(io.join(root, name), name.encode())
    io.makedirs(io.join(root, "sub"))
    assert io.listdir(root) == ["a.tfrec", "b.tfrec", "c.json", "sub"]
    assert io.glob(io.join(root, "*.tfrec")) == [io.join(root, "a.tfrec"), io.join(root, "b.tfrec")]
    assert io.glob(io.join(root, "nothing", "*.tfrec")) == []
    io.rename(io.join(root, "a.tfrec"), io.join(root, "d.tfrec"))
    assert not io.exists(io.join(root, "a.tfrec")) and io.read_bytes(io.join(root, "d.tfrec")) == b"a.tfrec"
    with pytest.raises(Exception):
        io.rename(io.join(root, "d.tfrec"), io.join(root, "b.tfrec"), overwrite=False)
    assert io.read_bytes(io.join(root, "b.tfrec")) == b"b.tfrec"
    io.rename(io.join(root, "d.tfrec"), io.join(root, "b.tfrec"))   # overwrite by default
    assert io.read_bytes(io.join(root, "b.tfrec")) == b"a.tfrec"
    io.copy(io.join(root, "c.json"), io.join(root, "sub", "c2.json"))
    assert io.read_bytes(io.join(root, "sub", "c2.json")) == b"c.json"
    io.remove(io.join(root, "c.json"))
    assert io.listdir(root) == ["b.tfrec", "sub"]


def test_rmtree(root):
    io.write_bytes(io.join(root, "d", "e", "f.bin"), b"x")
    assert io.isdir(io.join(root, "d"))
    io.rmtree(io.join(root, "d"))
    assert not io.exists(io.join(root, "d"))
    io.rmtree(io.join(root, "d"))                   # a missing folder is fine


def test_sha256_streams_in_chunks(root, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    path = io.join(root, "big.bin")
    io.write_bytes(path, data)
    monkeypatch.setattr(io, "CHUNK", 4096)           # many chunks, the last one partial
    assert io.sha256(path) == hashlib.sha256(data).hexdigest() == io.sha256_bytes(data)


def test_mtime_of_a_local_file(tmp_path):
    path = str(tmp_path / "f.bin")
    io.write_bytes(path, b"x")
    assert io.mtime_ns(path) == __import__("os").stat(path).st_mtime_ns > 0
    # (ram:// reports mtime 0; Manifest.load's cache stamp also carries the size)


def test_open_streams(root):
    io.makedirs(root)
    path = io.join(root, "s.txt")
    with io.open(path, "wb") as f:
        f.write(b"abc")
    with io.open(path, "rb") as f:
        assert f.read() == b"abc"


def test_absolute_keeps_urls():
    assert io.absolute("ram://x/y") == "ram://x/y"
    assert io.absolute("rel").startswith("/")
