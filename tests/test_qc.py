"""QC: pixel/perceptual hashes, blank patches, duplicate clustering and group merging."""
import numpy as np
import pytest
from PIL import Image

from conftest import shared
from histofold import qc


def dihedral(image):
    """The 8 flips/rotations of an (H, W, C) array."""
    out = []
    for k in range(4):
        r = np.rot90(image, k)
        out += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, ::-1])]
    return out


def tissue(seed, shape=(96, 96)):
    """Smooth random texture (not blank), (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(shape[::-1], Image.Resampling.BICUBIC))


@pytest.mark.parametrize("shape", [(96, 96), (224, 224), (100, 70), (768, 768)])
def test_phash_d4_is_invariant_to_all_dihedral_transforms(shape):
    image = tissue(0, shape)
    assert len({qc.phash_d4(t) for t in dihedral(image)}) == 1


def test_phash_d4_invariant_on_real_patch_and_differs_between_patches():
    root = shared("pcam_jpeg")
    files = sorted((root / "train" / "0").glob("*.jpg"))[:20]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    assert len({qc.phash_d4(t) for t in dihedral(images[0])}) == 1
    hashes = [qc.phash_d4(im) for im in images]
    assert len(set(hashes)) == len(hashes)
    assert all(0 <= h < 2**64 for h in hashes)


def test_pixel_sha1_equal_iff_pixels_equal():
    a = tissue(1)
    b = a.copy()
    assert qc.pixel_sha1(a) == qc.pixel_sha1(b)
    b[0, 0, 0] ^= 1
    assert qc.pixel_sha1(a) != qc.pixel_sha1(b)


def test_blank_detection():
    white = np.full((96, 96, 3), 240, np.uint8) + np.random.default_rng(0).integers(0, 8, (96, 96, 3), dtype=np.uint8)
    black = np.zeros((96, 96, 3), np.uint8)
    pink = np.full((96, 96, 3), (200, 120, 180), np.uint8)
    assert qc.is_blank(white) and qc.is_blank(black) and qc.is_blank(pink)
    assert not qc.is_blank(tissue(2))


def test_near_pairs_finds_pairs_within_radius_only():
    base = np.array([0, 0b1111, 2**63 + 5, 12345678901234], np.uint64)
    hashes = np.concatenate([base, base ^ np.uint64(0b11), [np.uint64(2**40 - 1)]])  # 2 bits from base
    i, j = qc.near_pairs(hashes, max_bits=2)
    pairs = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist())}
    for k in range(4):
        assert (k, k + 4) in pairs
    d = qc.hamming(hashes[i], hashes[j])
    assert (d <= 2).all()
    i1, _ = qc.near_pairs(hashes, max_bits=1)
    assert len(i1) == 0 or (qc.hamming(hashes[i1], hashes[_]) <= 1).all()
    # brute force agreement on random hashes with planted neighbours
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    h[150:] = h[:150] ^ (np.uint64(1) << rng.integers(0, 64, 150).astype(np.uint64))
    i, j = qc.near_pairs(h, max_bits=3)
    got = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist())}
    brute = {(a, b) for a in range(300) for b in range(a + 1, 300) if qc.hamming(h[a], h[b]) <= 3}
    assert got == brute


def test_duplicate_clusters_exact_and_near_and_conflicts():
    a, b, c = tissue(3), tissue(4), tissue(5)
    images = [a, a.copy(), np.ascontiguousarray(np.rot90(b)), b, c]  # 0,1 exact; 2,3 near (rotation); 4 alone
    scans = [qc.scan_image(im) for im in images]
    cluster, exact = qc.duplicate_clusters([s["sha1"] for s in scans],
                                           np.array([s["phash"] for s in scans], np.uint64), near_bits=0)
    assert cluster[0] == cluster[1] and cluster[2] == cluster[3]
    assert len({cluster[0], cluster[2], cluster[4]}) == 3
    assert exact.tolist() == [True, True, False, False, False]
    only_exact, _ = qc.duplicate_clusters([s["sha1"] for s in scans], np.zeros(5, np.uint64), near_bits=None)
    assert only_exact[2] != only_exact[3]
    table = qc.duplicates_table(ids=list("abcde"), labels=[0, 1, 1, 1, 0], splits=["train"] * 5,
                                cluster=cluster, exact=exact)
    assert set(table["id"]) == set("abcd")
    assert table.set_index("id")["kind"].to_dict() == {"a": "exact", "b": "exact", "c": "near", "d": "near"}
    assert table.set_index("id")["conflict"].to_dict() == {"a": True, "b": True, "c": False, "d": False}


def test_merge_groups_joins_source_groups_through_duplicates():
    ids = ["i0", "i1", "i2", "i3", "i4"]
    cluster = np.array([0, 1, 1, 2, 3])  # i1 and i2 are duplicates
    groups = qc.merge_groups(["A", "A", "B", "", ""], cluster, ids)
    assert groups[:3] == ["A+B"] * 3  # A and B joined by the duplicate pair
    assert groups[3:] == ["i3", "i4"]
    assert qc.merge_groups(["", "", ""], np.array([0, 0, 1]), ["x", "y", "z"]) == ["dup-x", "dup-x", "z"]


def test_phash_d4_is_invariant_under_imageops_dihedral():
    # the D4 that augmentation and TTA use (histofold.imageops) is the group phash_d4 is invariant to
    from histofold import imageops

    image = tissue(6, (64, 48))
    outs = [imageops.dihedral(image, k).numpy() for k in imageops.DIHEDRAL]
    assert len({o.tobytes() for o in outs}) == 8
    assert len({qc.phash_d4(o) for o in outs}) == 1
    assert qc.phash_d4(tissue(7, (64, 48))) != qc.phash_d4(image)


def test_prepare_config_near_dup_radius_drives_clustering():
    from histofold.config import PrepareConfig

    assert PrepareConfig(near_dup=True).near_bits == 4
    assert PrepareConfig(near_dup=False).near_bits is None
    assert PrepareConfig(near_dup=-1).near_bits is None
    assert PrepareConfig(near_dup="2").near_bits == 2
    h = np.array([0, 0b111, 0b1], np.uint64)  # 3 bits and 1 bit from image 0
    sha = ["a", "b", "c"]
    wide, _ = qc.duplicate_clusters(sha, h, near_bits=PrepareConfig(near_dup=3).near_bits)
    assert len(set(wide.tolist())) == 1
    narrow, _ = qc.duplicate_clusters(sha, h, near_bits=PrepareConfig(near_dup=1).near_bits)
    assert narrow[0] == narrow[2] != narrow[1]
    exact, _ = qc.duplicate_clusters(sha, h, near_bits=PrepareConfig(near_dup=-1).near_bits)
    assert len(set(exact.tolist())) == 3
