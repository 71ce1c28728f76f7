"""histofold.sources: every adapter on the real fixtures and on small layouts built in tmp_path."""
import collections
import csv
import gzip
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image
from conftest import shared

from histofold.errors import DataError, UsageError
from histofold.imageio import load_ref
from histofold.sources import PCAM_MPP, SOURCES, Listing, get_source


def check_accounting(listing: Listing) -> None:
    """Ids unique across train+test, every input in exactly one place, labels valid, splits right."""
    items = listing.train + listing.test
    ids = [i.id for i in items]
    assert len(ids) == len(set(ids))
    assert len(listing.train) + len(listing.test) + len(listing.rejects) == listing.meta["inputs"]
    assert all(0 <= i.label < len(listing.classes) for i in listing.train)
    assert all(-1 <= i.label < len(listing.classes) for i in listing.test)
    assert {i.split for i in listing.train} <= {"train"} and {i.split for i in listing.test} <= {"test"}
    assert all({"id", "path", "reason"} <= set(r) for r in listing.rejects)


def reasons(listing: Listing) -> dict:
    return {r["id"]: r["reason"] for r in listing.rejects}


def png(path, value=100, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- registry

def test_registry_and_option_errors():
    assert set(SOURCES) == {"hcd", "pcam", "folder", "chaoyang", "csv", "slides", "synthetic"}
    assert all(s.help and "\n" not in s.help for s in SOURCES.values())
    with pytest.raises(UsageError, match="--source='kaggle': choose one of hcd, pcam, folder"):
        get_source("kaggle")
    with pytest.raises(UsageError, match="no option colour; valid options: classes, class_depth"):
        get_source("folder").list(".", colour=1)


def test_errors_are_usage_or_data_errors_and_still_value_errors():
    # the scripts print UsageError/DataError as one line; older callers catch ValueError
    assert issubclass(DataError, UsageError) and issubclass(UsageError, ValueError)


# ---------------------------------------------------------------- hcd

def test_hcd_real_fixture():
    root = shared("hcd_kaggle_mock")
    listing = get_source("hcd").list(root)
    check_accounting(listing)
    assert collections.Counter(i.label for i in listing.train) == {0: 10, 1: 5}
    with open(root / "sample_submission.csv") as f:
        order = [r["id"] for r in csv.DictReader(f)]
    assert [i.id for i in listing.test] == order and len(order) == 11
    assert all(i.label == -1 for i in listing.test) and not listing.rejects
    assert listing.classes == ["0", "1"] and listing.meta["test_labeled"] is False
    assert listing.meta["mpp"] == PCAM_MPP == 0.972
    assert listing.sample_submission == str(root / "sample_submission.csv")
    assert load_ref(listing.test[0].ref).shape == (96, 96, 3)


def _hcd_tree(tmp_path, labels, test_ids, submission):
    for d in ("train", "test"):
        (tmp_path / d).mkdir()
    for id, _ in labels:
        if id != "gone":
            png(tmp_path / "train" / f"{id}.tif")
    for id in test_ids:
        png(tmp_path / "test" / f"{id}.tif")
    (tmp_path / "train_labels.csv").write_text("id,label\n" + "".join(f"{i},{l}\n" for i, l in labels))
    (tmp_path / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in submission))


def test_hcd_bad_rows_are_rejected(tmp_path):
    labels = [("a", "0"), ("b", "1"), ("c", "2"), ("a", "1"), ("gone", "0"), ("z", "0"), ("d", "1"), ("d", "1.0")]
    _hcd_tree(tmp_path, labels, test_ids=["t1", "t2", "t3"], submission=["t2", "t1", "t9"])
    (tmp_path / "train" / "z.tif").write_bytes(b"")
    png(tmp_path / "train" / "orphan.tif")  # an image train_labels.csv does not name
    (tmp_path / "groups.csv").write_text("id,wsi\na,slide_1\nb,slide_2\n")
    listing = get_source("hcd").list(tmp_path, groups="groups.csv")
    check_accounting(listing)
    assert [(i.id, i.label, i.group) for i in listing.train] == [("b", 1, "slide_2"), ("d", 1, "")]
    assert [i.id for i in listing.test] == ["t2", "t1"]
    assert sorted((r["id"], r["reason"]) for r in listing.rejects) == sorted([
        ("a", "conflicting labels"), ("a", "conflicting labels"), ("c", "invalid label"), ("gone", "missing file"),
        ("z", "zero-byte file"), ("orphan", "no label row"), ("t9", "missing file"),
        ("t3", "not in sample_submission.csv")])
    # 8 label rows - 1 identical copy of d + 1 unlabeled train image + 4 test images
    assert listing.meta["inputs"] == 8 - 1 + 1 + 4
    stats = listing.meta["label_files"][str(tmp_path / "train_labels.csv")]
    assert stats == {"rows": 8, "identical_duplicates": 1, "conflicting_ids": 1, "conflicting_rows": 2}
    assert listing.label_conflicts == [{"file": str(tmp_path / "train_labels.csv"), "id": "a", "labels": ["0", "1"],
                                        "where": ["line 2", "line 5"]}]
    assert listing.meta["test_order"] == "sample_submission.csv" and "warnings" not in listing.meta


def test_hcd_without_sample_submission_says_which_test_order(tmp_path):
    _hcd_tree(tmp_path, [("a", "0"), ("b", "1")], test_ids=["t2", "t1", "t3"], submission=[])
    os.remove(tmp_path / "sample_submission.csv")
    listing = get_source("hcd").list(tmp_path)
    check_accounting(listing)
    assert [i.id for i in listing.test] == ["t1", "t2", "t3"] and listing.sample_submission is None
    assert listing.meta["test_order"] == "sorted ids"
    [warning] = listing.meta["warnings"]
    assert "no sample_submission.csv" in warning and "sorted id order" in warning and "3 test images" in warning


def test_label_files_in_utf16_or_with_a_bom_parse_and_other_bytes_are_one_data_error(tmp_path):
    _hcd_tree(tmp_path, [("a", "0"), ("b", "1")], test_ids=[], submission=[])
    text = "id,label\na,0\nb,1\n"
    for data in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.replace("\n", "\r\n").encode()):
        (tmp_path / "train_labels.csv").write_bytes(data)
        assert [i.id for i in get_source("hcd").list(tmp_path).train] == ["a", "b"]
    (tmp_path / "train_labels.csv").write_bytes("id,label\nä,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train_labels.csv is not UTF-8 text .*save it as UTF-8"):
        get_source("hcd").list(tmp_path)
    (tmp_path / "train_labels.csv").write_text("id,label\n" + "x" * 200_000 + ",0\n")
    with pytest.raises(DataError, match=r"train_labels.csv line \d+: not valid CSV"):
        get_source("hcd").list(tmp_path)


def test_hcd_escaping_id_is_an_error(tmp_path):
    _hcd_tree(tmp_path, [("a", "0")], test_ids=[], submission=[])
    (tmp_path / "train_labels.csv").write_text("id,label\na,0\n../../etc/x,1\n")
    with pytest.raises(DataError, match=r"train_labels.csv line 3.*escapes"):
        get_source("hcd").list(tmp_path)


# ---------------------------------------------------------------- pcam

def _pcam_split(root, split, n, *, gz=False, y=None, wsi=True, seed=0):
    x = np.random.default_rng(seed).integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
    y = np.arange(n) % 2 if y is None else np.asarray(y)
    stem = root / f"camelyonpatch_level_2_split_{split}"
    for part, data in (("x", x), ("y", y.reshape(n, 1, 1, 1).astype(np.uint8))):
        path = f"{stem}_{part}.h5"
        with h5py.File(path, "w") as f:
            f[part] = data
        if gz:
            with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(path)
    if wsi:
        rows = "".join(f"{i},0,0,False,False,slide_{split}_{i // 2}\n" for i in range(n))
        (root / f"camelyonpatch_level_2_split_{split}_meta.csv").write_text(
            ",coord_y,coord_x,tumor_patch,center_tumor_patch,wsi\n" + rows)   # pandas index column
    return x


def test_pcam_h5_gz_and_meta(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOFOLD_CACHE", str(tmp_path / "cache"))
    x_train = _pcam_split(tmp_path, "train", 6)
    _pcam_split(tmp_path, "valid", 4, gz=True, y=[1, 0, 3, 1], wsi=False, seed=1)   # label 3 invalid
    x_test = _pcam_split(tmp_path, "test", 4, gz=True, seed=2)
    listing = get_source("pcam").list(tmp_path)
    check_accounting(listing)
    assert len(listing.train) == 6 + 3 and len(listing.test) == 4
    assert reasons(listing) == {"pcam-valid-000002": "invalid label"}
    first = listing.train[0]
    assert first.id == "pcam-train-000000" and first.group == "slide_train_0" and first.label == 0
    assert listing.train[3].group == "slide_train_1" and listing.train[3].label == 1
    assert listing.train[6].group == ""           # valid split has no meta csv
    np.testing.assert_array_equal(load_ref(listing.train[5].ref), x_train[5])
    np.testing.assert_array_equal(load_ref(listing.test[3].ref), x_test[3])   # read through .h5.gz
    assert [i.label for i in listing.test] == [0, 1, 0, 1] and listing.meta["test_labeled"] is True
    assert listing.meta["mpp"] == 0.972

    other = get_source("pcam").list(tmp_path, test_split="valid")
    assert {i.id.split("-")[1] for i in other.test} == {"valid"} and len(other.train) == 10


def test_pcam_errors(tmp_path):
    with pytest.raises(DataError, match="no camelyonpatch"):
        get_source("pcam").list(tmp_path)
    _pcam_split(tmp_path, "train", 4)
    (tmp_path / "camelyonpatch_level_2_split_train_meta.csv").write_text("wsi\na\n")
    with pytest.raises(DataError, match="meta.csv has 1 rows"):
        get_source("pcam").list(tmp_path)
    with pytest.raises(UsageError, match="--test_split='holdout'; choose one of train, valid, test or none"):
        get_source("pcam").list(tmp_path, test_split="holdout")


# ---------------------------------------------------------------- folder

def test_folder_pcam_jpeg_with_test_input():
    listing = get_source("folder").list(shared("pcam_jpeg"), test_input="valid")
    check_accounting(listing)
    assert listing.classes == ["0", "1"]
    assert collections.Counter(i.label for i in listing.train) == {0: 1500, 1: 1500}
    assert collections.Counter(i.label for i in listing.test) == {0: 500, 1: 500}
    assert all(i.id.startswith("test/") for i in listing.test)
    assert all("/valid/" not in i.path for i in listing.train)   # the test tree is not trained on
    assert listing.meta["test_labeled"] is True


@pytest.mark.parametrize("name,count,classes", [
    ("lc25000", 100, ["colon_aca", "colon_n", "lung_aca", "lung_n", "lung_scc"]),
    ("crc_he_7k", 70, ["ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]),
    ("nct_crc_he_100k_sample", 9, ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]),
])
def test_folder_real_trees(name, count, classes):
    listing = get_source("folder").list(shared(name))
    check_accounting(listing)
    assert len(listing.train) == count and listing.classes == classes
    per_class = collections.Counter(i.label for i in listing.train)
    assert set(per_class.values()) == {count // len(classes)}
    item = listing.train[0]
    assert os.path.basename(os.path.dirname(item.path)) == classes[item.label]


def test_folder_class_subset_keeps_given_order():
    root = shared("lc25000")
    listing = get_source("folder").list(root, classes="lung_scc,lung_aca,lung_n")
    check_accounting(listing)
    assert listing.classes == ["lung_scc", "lung_aca", "lung_n"] and len(listing.train) == 60
    assert listing.meta["skipped"]["other_class"] == 40
    assert all("lung_scc" in i.path for i in listing.train if i.label == 0)
    with pytest.raises(UsageError, match="--classes=lung_xyz not found; the tree has: colon_aca"):
        get_source("folder").list(root, classes=["lung_xyz"])
    with pytest.raises(UsageError, match="--class_depth=0"):
        get_source("folder").list(root, class_depth=0)
    with pytest.raises(DataError, match="is not a directory"):
        get_source("folder").list(root / "no_such_dir")


def _breakhis(root):
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for kind, subtype, patient in [("benign", "adenosis", "SOB_B_A_14-22549AB"),
                                   ("benign", "fibroadenoma", "SOB_B_F_14-9133"),
                                   ("malignant", "ductal_carcinoma", "SOB_M_DC_14-2523")]:
        for mag in ("40X", "100X"):
            for k in range(2):
                name = patient.replace("_14", "-14")   # files: SOB_B_A-14-22549AB-40-001.png
                png(base / kind / "SOB" / subtype / patient / mag / f"{name}-{mag[:-1]}-{k:03d}.png")
    (base / "benign" / "SOB" / "adenosis" / "notes.txt").write_text("not an image")
    (base / "malignant" / ".DS_Store").write_bytes(b"x")
    return base


def test_folder_breakhis_class_depth_groups_and_include(tmp_path):
    _breakhis(tmp_path)
    listing = get_source("folder").list(tmp_path, class_depth=5, include="/40X/",
                                        group_regex=r"SOB_[BM]_\w+-(\d+-\w+)-\d+-\d+\.png$")
    check_accounting(listing)
    assert listing.classes == ["benign", "malignant"]
    assert collections.Counter(i.label for i in listing.train) == {0: 4, 1: 2}
    assert {i.group for i in listing.train} == {"14-22549AB", "14-9133", "14-2523"}
    assert listing.meta["skipped"] == {"excluded": 6, "non_image": 1, "hidden": 1}
    by_subtype = get_source("folder").list(tmp_path, class_depth=3)
    assert by_subtype.classes == ["adenosis", "ductal_carcinoma", "fibroadenoma"] and len(by_subtype.train) == 12
    with pytest.raises(DataError, match=r"does not match .*SOB_B_A-14-22549AB-100-000.png"):
        get_source("folder").list(tmp_path, class_depth=5, group_regex=r"patient-(\d+)")
    with pytest.raises(DataError, match="no images"):
        get_source("folder").list(tmp_path, include="/400X/")


def test_folder_rejects_and_unlabeled_test(tmp_path):
    train, test = tmp_path / "train", tmp_path / "unlabeled"
    png(train / "a" / "x.png")
    png(train / "a" / "x.jpg")               # same id as x.png -> duplicate
    png(train / "b" / "y.PNG")
    (train / "b" / "empty.tif").write_bytes(b"")
    png(train / "loose.png")                 # no class folder
    png(test / "t1.jpeg")
    png(test / "t2.bmp")
    listing = get_source("folder").list(train, test_input=str(test))
    check_accounting(listing)
    assert listing.classes == ["a", "b"] and [i.id for i in listing.train] == ["a/x", "b/y"]
    assert reasons(listing) == {"a/x": "duplicate id", "b/empty": "zero-byte file",
                                "loose": "not in a class folder (class_depth=1)"}
    assert [(i.id, i.label) for i in listing.test] == [("test/t1", -1), ("test/t2", -1)]
    assert listing.meta["test_labeled"] is False


# ---------------------------------------------------------------- chaoyang

def _chaoyang(root, train, test):
    for entries in (train, test):
        for e in entries:
            if "missing" not in e["name"] and not e["name"].startswith(("..", "/")):
                png(root / e["name"])
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))


def test_chaoyang_layout(tmp_path):
    train = [{"name": f"train/img{i}.JPG", "label": i % 4} for i in range(8)]
    train += [{"name": "train/missing.JPG", "label": 1}, {"name": "train/bad.JPG", "label": 7},
              {"name": "train/flag.JPG", "label": True}]
    test = [{"name": "test/t0.JPG", "label": 2}, {"name": "test/t1.JPG", "label": 3}]
    _chaoyang(tmp_path, train, test)
    listing = get_source("chaoyang").list(tmp_path)
    check_accounting(listing)
    assert listing.classes == ["normal", "serrated", "adenocarcinoma", "adenoma"]
    assert [i.label for i in listing.train] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [(i.id, i.label) for i in listing.test] == [("test/t0", 2), ("test/t1", 3)]
    assert reasons(listing) == {"train/missing": "missing file", "train/bad": "invalid label",
                                "train/flag": "invalid label"}
    assert load_ref(listing.train[0].ref).shape == (8, 8, 3)


@pytest.mark.parametrize("name", ["../outside.JPG", "/etc/passwd", "train/../../x.JPG"])
def test_chaoyang_escape_is_an_error(tmp_path, name):
    _chaoyang(tmp_path, [{"name": "train/a.JPG", "label": 0}], [{"name": name, "label": 0}])
    with pytest.raises(DataError, match=r"test.json entry 0: path .* escapes"):
        get_source("chaoyang").list(tmp_path)


def test_chaoyang_missing_or_malformed_json_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="train.json not found"):
        get_source("chaoyang").list(tmp_path)
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(DataError, match="train.json is not valid JSON"):
        get_source("chaoyang").list(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"name": "a"}))
    with pytest.raises(DataError, match="must hold a JSON list"):
        get_source("chaoyang").list(tmp_path)


# ---------------------------------------------------------------- csv

def test_csv_string_labels_groups_and_test_csv(tmp_path):
    for name in ("img/a.png", "img/b.png", "img/c.png", "img/e.png", "img/t.png", "img/u.png"):
        png(tmp_path / name)
    (tmp_path / "labels.csv").write_text(
        "path,label,patient\nimg/a.png,tumor,p1\nimg/b.png,normal,p2\nimg/c.png,tumor,p2\n"
        "img/d.png,normal,p3\nimg/e.png,,p3\nimg/a.png,normal,p1\n")
    (tmp_path / "test.csv").write_text("path,label\nimg/t.png,\nimg/u.png,tumor\n")
    listing = get_source("csv").list(tmp_path, group_col="patient", test_csv="test.csv")
    check_accounting(listing)
    assert listing.classes == ["normal", "tumor"]
    assert [(i.id, i.label, i.group) for i in listing.train] == [("img/b", 0, "p2"), ("img/c", 1, "p2")]
    assert reasons(listing) == {"img/d": "missing file", "img/e": "invalid label", "img/a": "conflicting labels"}
    assert len(listing.rejects) == 4  # both copies of img/a
    assert [(i.id, i.label) for i in listing.test] == [("img/t", -1), ("img/u", 1)]
    assert listing.meta["test_labeled"] is True


def test_csv_int_labels_id_col_and_csv_input(tmp_path):
    for k in range(4):
        png(tmp_path / "data" / f"{k}.png")
    table = tmp_path / "meta" / "table.csv"
    table.parent.mkdir()
    table.write_text("file,y,key\n0.png,10,k0\n1.png,2,k1\n2.png,2,k2\n3.png,,k3\n")
    listing = get_source("csv").list(table, path_col="file", label_col="y", id_col="key",
                                     root=str(tmp_path / "data"))
    check_accounting(listing)
    assert listing.classes == ["2", "10"]                 # integers sort numerically
    assert [(i.id, i.label) for i in listing.train] == [("k0", 1), ("k1", 0), ("k2", 0)]
    assert reasons(listing) == {"k3": "invalid label"}
    picked = get_source("csv").list(table, path_col="file", label_col="y", id_col="key",
                                    root=str(tmp_path / "data"), classes="10")
    assert picked.classes == ["10"] and [i.id for i in picked.train] == ["k0"]
    assert reasons(picked) == {"k1": "invalid label", "k2": "invalid label", "k3": "invalid label"}


def test_csv_errors(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\na.png,0\n../secret.png,1\n")
    with pytest.raises(DataError, match=r"labels.csv line 3: path '../secret.png' escapes"):
        get_source("csv").list(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match="has no column path .*path_col"):
        get_source("csv").list(tmp_path)
    with pytest.raises(DataError, match="not found"):
        get_source("csv").list(tmp_path / "sub")


# ---------------------------------------------------------------- synthetic

def test_synthetic_listing():
    listing = get_source("synthetic").list("", count=40, test_count=10, image_size=32, seed=3)
    check_accounting(listing)
    assert listing.classes == ["normal", "tumor"] and len(listing.train) == 40 and len(listing.test) == 10
    assert collections.Counter(i.label for i in listing.train + listing.test) == {0: 25, 1: 25}
    assert listing.meta["test_labeled"] is True and all(i.label >= 0 for i in listing.test)
    item = listing.train[0]
    assert item.ref[0] == "synthetic" and load_ref(item.ref).shape == (32, 32, 3)
    again = get_source("synthetic").list("", count=40, test_count=10, image_size=32, seed=3)
    assert again.train == listing.train                   # deterministic listing
    three = get_source("synthetic").list("", count="9", num_classes="3", test_count=0)
    assert three.classes == ["c0", "c1", "c2"] and len(three.train) == 9
    with pytest.raises(UsageError, match="num_classes >= 2"):
        get_source("synthetic").list("", num_classes=1)


# ---------------------------------------------------------------- label conflicts, symlinks, empty folders

def test_conflicting_and_identical_duplicates_in_chaoyang_and_csv(tmp_path):
    train = [{"name": "train/a.JPG", "label": 0}, {"name": "train/b.JPG", "label": 1},
             {"name": "train/a.JPG", "label": 2}, {"name": "train/b.JPG", "label": 1},
             {"name": "train/c.JPG", "label": 3}]
    _chaoyang(tmp_path / "cy", train, [])
    listing = get_source("chaoyang").list(tmp_path / "cy")
    check_accounting(listing)
    assert [(i.id, i.label) for i in listing.train] == [("train/b", 1), ("train/c", 3)]
    assert [(r["id"], r["reason"]) for r in listing.rejects] == [("train/a", "conflicting labels")] * 2
    [conflict] = listing.label_conflicts
    assert conflict["id"] == "train/a" and conflict["labels"] == ["0", "2"] and conflict["where"] == ["entry 0", "entry 2"]
    assert listing.meta["label_files"][str(tmp_path / "cy" / "train.json")]["identical_duplicates"] == 1

    for name in ("a", "b", "c"):
        png(tmp_path / "csv" / f"{name}.png")
    (tmp_path / "csv" / "labels.csv").write_text("path,label\na.png,x\nb.png,y\na.png,y\nb.png,y\nc.png,x\n")
    listing = get_source("csv").list(tmp_path / "csv")
    check_accounting(listing)
    assert [(i.id, i.label) for i in listing.train] == [("b", 1), ("c", 0)]
    assert reasons(listing) == {"a": "conflicting labels"} and len(listing.rejects) == 2
    assert listing.meta["label_files"][str(tmp_path / "csv" / "labels.csv")] == {
        "rows": 5, "identical_duplicates": 1, "conflicting_ids": 1, "conflicting_rows": 2}


def test_csv_same_id_for_two_files_is_still_a_duplicate_id(tmp_path):
    for name in ("a", "b"):
        png(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("path,label,key\na.png,x,k\nb.png,x,k\n")
    listing = get_source("csv").list(tmp_path, id_col="key")
    check_accounting(listing)
    assert [i.path for i in listing.train] == [str(tmp_path / "a.png")] and reasons(listing) == {"k": "duplicate id"}


def test_symlink_loops_in_a_folder_tree_are_rejects_not_oserrors(tmp_path):
    root = tmp_path / "tree"
    png(root / "a" / "x.png")
    png(root / "b" / "y.png")
    os.symlink("..", root / "a" / "up")                 # a directory loop: a/up/a/up/...
    os.symlink("self.png", root / "b" / "self.png")      # a link to itself
    os.symlink("nowhere.png", root / "b" / "gone.png")   # a broken link
    os.symlink(root / "a", root / "b" / "to_a")          # a link to a sibling: followed, no loop
    listing = get_source("folder").list(root)
    check_accounting(listing)
    assert sorted(i.id for i in listing.train) == ["a/x", "b/to_a/x", "b/y"]
    r = reasons(listing)
    assert r["a/up"].startswith("symlink loop") and r["b/self"] == "symlink loop" and r["b/gone"] == "broken symlink"


@pytest.mark.parametrize("source", ["hcd", "chaoyang", "csv"])
def test_a_symlink_out_of_the_root_in_a_label_file_is_a_data_error(tmp_path, source):
    outside = png(tmp_path / "outside" / "secret.png")
    root = tmp_path / "data"
    if source == "hcd":
        root.mkdir()
        _hcd_tree(root, [("a", "0")], test_ids=[], submission=[])
        os.symlink(outside, root / "train" / "b.tif")
        (root / "train_labels.csv").write_text("id,label\na,0\nb,1\n")
        where = "train_labels.csv line 3"
    elif source == "chaoyang":
        _chaoyang(root, [{"name": "train/a.JPG", "label": 0}, {"name": "train/missing_b.JPG", "label": 1}], [])
        os.symlink(outside, root / "train" / "missing_b.JPG")
        where = "train.json entry 1"
    else:
        png(root / "a.png")
        os.symlink(outside.parent, root / "sub")  # a linked folder leads out too
        (root / "labels.csv").write_text("path,label\na.png,0\nsub/secret.png,1\n")
        where = "labels.csv line 3"
    with pytest.raises(DataError, match=rf"{where}: path .* is a symlink to {outside}, outside the dataset root"):
        get_source(source).list(root)


def test_an_input_root_that_is_itself_a_symlink_is_fine(tmp_path):
    _chaoyang(tmp_path / "real", [{"name": "train/a.JPG", "label": 0}], [])
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert [i.id for i in get_source("chaoyang").list(tmp_path / "link").train] == ["train/a"]


def test_empty_class_folders_are_named_in_a_warning(tmp_path):
    root, test = tmp_path / "train", tmp_path / "test"
    png(root / "a" / "x.png")
    png(root / "b" / "y.png")
    (root / "c").mkdir()                       # an empty class folder
    (root / "d" / "deeper").mkdir(parents=True)  # empty all the way down: only d is named
    (root / "e").mkdir()
    (root / "e" / "notes.txt").write_text("no images here")
    png(test / "a" / "t.png")
    (test / "b").mkdir()
    listing = get_source("folder").list(root, test_input=str(test))
    check_accounting(listing)
    assert listing.classes == ["a", "b"]
    assert listing.meta["empty_folders"] == {"input": ["c", "d", "e"], "test_input": ["b"]}
    train_warning, test_warning = listing.meta["warnings"]
    assert "3 empty folder(s) in --input" in train_warning and "c, d, e" in train_warning
    assert str(test) in test_warning and ": b;" in test_warning


def test_hcd_symlink_loop_and_broken_link_are_rejects(tmp_path):
    _hcd_tree(tmp_path, [("a", "0"), ("loop", "1"), ("gone", "1")], test_ids=["t1"], submission=["t1"])
    os.remove(tmp_path / "train" / "loop.tif")
    os.symlink("loop.tif", tmp_path / "train" / "loop.tif")
    os.symlink("nowhere.tif", tmp_path / "train" / "gone.tif")
    os.symlink("orphan.tif", tmp_path / "train" / "orphan.tif")  # a looping link with no label row either
    listing = get_source("hcd").list(tmp_path)
    check_accounting(listing)
    assert [i.id for i in listing.train] == ["a"]
    assert reasons(listing) == {"loop": "symlink loop", "gone": "broken symlink", "orphan": "no label row"}
