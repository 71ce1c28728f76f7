"""records.py: deterministic serialization, atomic shard writes with their facts, the read round trip per
encoding, locating a corrupt record, shard names and PixelFormat."""
import hashlib
import os
import struct

import numpy as np
import pytest

from histofold import imageops, records


def _rows(n=6, size=12, seed=0, loc=False):
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        image = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)   # non-square: H and W kept apart
        row = {"image": image, "label": j % 3, "id": f"{j:03d}", "fold": j % 2, "group": f"g{j // 2}"}
        if loc:
            row.update(loc_x=100 * j, loc_y=7 * j)
        rows.append(row)
    return rows


def _serialized(rows, encoding="raw"):
    out = []
    for r in rows:
        extra = {k: r[k] for k in ("loc_x", "loc_y") if k in r}
        out.append(records.serialize(image=records.encode_image(r["image"], encoding), encoding=encoding,
                                     height=r["image"].shape[0], width=r["image"].shape[1], label=r["label"],
                                     id=r["id"], fold=r["fold"], group=r["group"], **extra))
    return out


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- serialization

def test_serialize_is_deterministic_and_sensitive_to_every_field():
    rows = _rows(3)
    assert _serialized(rows) == _serialized(rows)                            # identical bytes
    base = dict(image=b"abc", encoding="raw", height=1, width=1, label=1, id="x", fold=0, group="g")
    one = records.serialize(**base)
    assert records.serialize(**base) == one
    for key, other in [("label", 0), ("id", "y"), ("fold", 1), ("group", "h"), ("image", b"abd")]:
        assert records.serialize(**{**base, key: other}) != one, key
    with_loc = records.serialize(**base, loc_x=5, loc_y=6)
    assert with_loc != one and records.serialize(**base, loc_x=5, loc_y=6) == with_loc
    assert records.serialize(**base, loc_x=-1, loc_y=-1) == one             # -1: fields left out


# ---------------------------------------------------------------- writing

def test_write_shard_twice_gives_the_same_bytes_and_right_facts(tmp_path):
    serialized = _serialized(_rows(5))
    a, b = str(tmp_path / "a" / "fold0-000-5.tfrec"), str(tmp_path / "b" / "fold0-000-5.tfrec")
    os.makedirs(os.path.dirname(a))
    os.makedirs(os.path.dirname(b))
    facts_a = records.write_shard(a, iter(serialized))                       # any iterable
    facts_b = records.write_shard(b, list(serialized))
    assert facts_a == facts_b
    assert facts_a["count"] == 5
    assert facts_a["bytes"] == os.path.getsize(a) == sum(len(s) + 16 for s in serialized)  # TFRecord framing
    assert facts_a["sha256"] == _sha256(a) == _sha256(b)
    assert sorted(os.listdir(tmp_path / "a")) == ["fold0-000-5.tfrec"]       # no .tmp left behind
    facts = records.write_shard(a, serialized[:2])                           # rewriting replaces the file
    assert facts["count"] == 2 and facts["sha256"] == _sha256(a) != facts_a["sha256"]


def test_write_shard_of_nothing_is_an_empty_valid_shard(tmp_path):
    path = str(tmp_path / "test-000-0.tfrec")
    facts = records.write_shard(path, [])
    assert facts["count"] == 0 and facts["bytes"] == 0 == os.path.getsize(path)
    assert records.read_shard(path, "raw") == []


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_read_shard_round_trip_is_exact_for_lossless_encodings(tmp_path, encoding):
    rows = _rows(4)
    path = str(tmp_path / f"fold0-000-4.tfrec")
    records.write_shard(path, _serialized(rows, encoding))
    back = records.read_shard(path, encoding, images=True)
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    assert [r["label"] for r in back] == [r["label"] for r in rows]
    assert [r["fold"] for r in back] == [r["fold"] for r in rows]
    assert [r["group"] for r in back] == [r["group"] for r in rows]
    for got, want in zip(back, rows):
        assert (got["height"], got["width"]) == want["image"].shape[:2]
        assert got["image"].dtype == np.uint8
        np.testing.assert_array_equal(got["image"], want["image"])
        assert (got["loc_x"], got["loc_y"]) == (-1, -1)                     # no location recorded
    assert "image" not in records.read_shard(path, encoding)[0]              # images=False drops pixels


def test_read_shard_jpeg_is_close(tmp_path):
    # smooth content (JPEG's case): quality 95 stays within a few levels
    rows = _rows(3, size=32)
    yy, xx = np.mgrid[0:32, 0:34]
    for j, r in enumerate(rows):
        r["image"] = np.stack([(xx * 4 + 10 * j), (yy * 5), (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    path = str(tmp_path / "test-000-3.tfrec")
    records.write_shard(path, _serialized(rows, "jpeg"))
    back = records.read_shard(path, "jpeg", images=True)
    assert [r["id"] for r in back] == ["000", "001", "002"]
    for got, want in zip(back, rows):
        assert got["image"].shape == want["image"].shape
        err = np.abs(got["image"].astype(int) - want["image"].astype(int))
        assert err.mean() < 2.0 and err.max() <= 16
        assert not np.array_equal(got["image"], want["image"]) or err.max() == 0


def test_read_shard_returns_locations(tmp_path):
    rows = _rows(3, loc=True)
    path = str(tmp_path / "fold0-000-3.tfrec")
    records.write_shard(path, _serialized(rows))
    back = records.read_shard(path, "raw")
    assert [(r["loc_x"], r["loc_y"]) for r in back] == [(0, 0), (100, 7), (200, 14)]


def test_a_wrong_encoding_fails_to_decode(tmp_path):
    path = str(tmp_path / "fold0-000-2.tfrec")
    records.write_shard(path, _serialized(_rows(2), "raw"))
    with pytest.raises(Exception):
        records.read_shard(path, "png")
    with pytest.raises(ValueError, match="unknown encoding 'webp'"):
        records.read_shard(path, "webp")


# ---------------------------------------------------------------- corruption

def _flip_middle(path):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return middle


def _record_at(path, offset):
    """Index of the record whose bytes include `offset` (TFRecord: u64 length, u32 crc, data, u32 crc)."""
    data = open(path, "rb").read()
    pos, index = 0, 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 16 + length
        if pos <= offset < end:
            return index
        pos, index = end, index + 1
    raise AssertionError("offset beyond the file")


def test_find_corrupt_record_names_the_shard_and_record(tmp_path):
    good = str(tmp_path / "fold0-000-6.tfrec")
    bad = str(tmp_path / "fold1-000-6.tfrec")
    also_good = str(tmp_path / "test-000-6.tfrec")
    for p, seed in ((good, 0), (bad, 1), (also_good, 2)):
        records.write_shard(p, _serialized(_rows(6, seed=seed)))
    assert records.find_corrupt_record([good, bad, also_good]) is None
    offset = _flip_middle(bad)
    index = _record_at(bad, offset)
    assert 0 < index < 5                                                     # a record in the middle
    assert records.find_corrupt_record([good, bad, also_good]) == (bad, index)
    assert records.find_corrupt_record([good, also_good]) is None


def test_find_corrupt_record_sees_a_truncated_shard(tmp_path):
    path = str(tmp_path / "fold0-000-6.tfrec")
    records.write_shard(path, _serialized(_rows(6)))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 10])                           # last record cut short
    assert records.find_corrupt_record([path]) == (path, 5)


# ---------------------------------------------------------------- names and encoding

def test_shard_names_round_trip():
    assert records.shard_name("fold0", 3, 2048) == "fold0-003-2048.tfrec"
    assert records.parse_shard_name("fold12-003-2048.tfrec") == {"prefix": "fold12", "fold": 12, "index": 3,
                                                                 "count": 2048}
    assert records.parse_shard_name("gs://b/x/test-010-5.tfrec") == {"prefix": "test", "fold": -1, "index": 10,
                                                                     "count": 5}
    for name in ("manifest.json", "fold0-3-20.tfrec", ".fold0-000-2.tfrec.tmp", "train-000-2.tfrec"):
        assert records.parse_shard_name(name) is None, name


def test_encode_image_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        records.encode_image(np.zeros((4, 4, 3), np.float32), "raw")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        records.encode_image(np.zeros((4, 4), np.uint8), "png")
    with pytest.raises(ValueError, match="unknown encoding 'bmp'"):
        records.encode_image(np.zeros((4, 4, 3), np.uint8), "bmp")


# ---------------------------------------------------------------- PixelFormat

def test_pixel_format_without_size_or_stain_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    batch = np.stack([image, image])
    for fmt in (records.PixelFormat(), records.PixelFormat(stain={"method": "none"})):
        assert fmt.normalizer() is None
        assert fmt.apply(image) is image and fmt.apply(batch) is batch


def test_pixel_format_resizes_with_resize_array():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    fmt = records.PixelFormat(size=(24, 32))
    out = fmt.apply(image)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, imageops.resize_array(image, (24, 32)))
    batch = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fmt.apply(batch), np.stack([imageops.resize_array(b, (24, 32)) for b in batch]))
    same = rng.integers(0, 256, (2, 24, 32, 3), dtype=np.uint8)
    assert fmt.apply(same) is same                                           # already at the stored size


def test_pixel_format_applies_the_recorded_stain_normalizer():
    from histofold import stain

    rng = np.random.default_rng(2)
    reference = rng.integers(60, 220, (32, 32, 3), dtype=np.uint8)
    normalizer = stain.fit([reference], "reinhard")
    fmt = records.PixelFormat(size=(16, 16), stain=normalizer.to_json())
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = stain.StainNormalizer.from_json(normalizer.to_json())(imageops.resize_array(image, 16))
    np.testing.assert_array_equal(fmt.apply(image), expected)
    assert not np.array_equal(fmt.apply(image), imageops.resize_array(image, 16))
    assert records.PixelFormat(size=(16, 16), stain=normalizer.to_json()) == fmt   # the cache is not compared


@pytest.mark.parametrize("where", ["local", "ram"])
def test_write_shard_replaces_a_stale_temporary_from_a_killed_writer(tmp_path, where):
    # a killed prepare leaves `.<name>.tmp`; the next write_shard must not build on its bytes
    from histofold import io as hio

    folder = str(tmp_path) if where == "local" else f"ram://test-records-{os.getpid()}-{id(tmp_path)}"
    path = hio.join(folder, "fold0-000-3.tfrec")
    try:
        hio.write_bytes(hio.tmp_name(path), b"half a shard from a killed writer")
        facts = records.write_shard(path, _serialized(_rows(3)))
        assert facts["count"] == 3 and facts["bytes"] == hio.size(path) == sum(len(s) + 16 for s in _serialized(_rows(3)))
        assert records.find_corrupt_record([path]) is None
        assert [r["id"] for r in records.read_shard(path, "raw")] == ["000", "001", "002"]
        assert not hio.exists(hio.tmp_name(path))
    finally:
        if where == "ram":
            hio.rmtree(folder)
