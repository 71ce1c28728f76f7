"""Dataset adapters: one per layout, each listing (id, label, group, image reference) without loading pixels.

CONTRACT (other modules rely on it; keep it):

    SOURCES: dict[str, Source]          registry; unknown names list the valid ones (get_source)
    Source.list(input, **options) -> Listing
    histofold.imageio.load_ref(ref) -> (H, W, 3) uint8 RGB; raises errors.ImageError(reason) when unreadable

An `Item.ref` is a small picklable tuple that `imageio.load_ref` understands, so worker processes can load
pixels without the adapter object:
    ("file", path)                      any Pillow-readable file (TIFF, PNG, JPEG, BMP, ...)
    ("h5", path, key, index)            one patch of an HDF5 array (PCam)
    ("synthetic", seed, index, size, label, num_classes)   generated on demand, deterministic

Rules every adapter keeps:
- every input it sees ends in exactly one of train, test, rejects (`meta["inputs"]` counts them);
  inputs it deliberately leaves out (other classes, non-image files) are counted in `meta["skipped"]`;
- ids are unique across train and test (a repeat is rejected as "duplicate id");
- a labeled item with an invalid label, a missing or a zero-byte file is rejected, not an error;
- a path in a label file (CSV, JSON) that escapes the dataset root is a ValueError naming the file
  and row: it is a broken or hostile label file, not a bad image;
- relative path options (test_input=, csv=, groups=, ...) are looked up under the input directory
  first, then the current directory.
- `meta["test_labeled"]` says whether the test items carry real labels.
"""
from __future__ import annotations

import json
import os
import re
from csv import DictReader
from dataclasses import dataclass, field
from typing import Callable

from histofold.errors import DataError, UsageError

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
PCAM_MPP = 0.972  # um/px of PatchCamelyon / Kaggle HCD patches (Camelyon16 level 2: 0.243 x 4)


@dataclass(frozen=True)
class Item:
    id: str
    label: int          # class index into Listing.classes; -1 = unlabeled
    group: str          # slide/patient id; "" = unknown (prepare falls back to duplicate cluster / id)
    ref: tuple          # see module docstring
    split: str = "train"  # "train" -> k-fold shards, "test" -> test shards
    path: str = ""      # human-readable origin for folds.csv `source` and rejects.csv


@dataclass
class Listing:
    classes: list[str]
    train: list[Item]
    test: list[Item]
    rejects: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}: found while listing
    sample_submission: str | None = None  # path of the dataset's sample_submission.csv, if any
    meta: dict = field(default_factory=dict)  # anything worth recording in the manifest


@dataclass(frozen=True)
class Source:
    name: str
    help: str                           # one line, shown by the CLI
    lister: Callable[..., Listing]      # lister(input, **options) with every option given
    options: dict = field(default_factory=dict)  # option name -> default value

    def list(self, input, **options) -> Listing:
        """List the dataset at `input`; unknown options raise ValueError naming the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise UsageError(f"source {self.name!r} has no option {', '.join(unknown)}; valid options: {valid}")
        return self.lister(os.fspath(input) if input is not None else "", **{**self.options, **options})


# ---------------------------------------------------------------- shared helpers

class _Collector:
    """Accumulates items and rejects, enforcing unique ids, so every input is counted exactly once."""

    def __init__(self):
        self.train, self.test, self.rejects, self.ids = [], [], [], set()

    def add(self, item: Item) -> None:
        if item.id in self.ids:
            self.reject(item.id, item.path, "duplicate id")
            return
        self.ids.add(item.id)
        (self.test if item.split == "test" else self.train).append(item)

    def add_file(self, item: Item, size: int | None) -> None:
        """Add a file-backed item, rejecting it when the file is missing (size None) or empty."""
        if size is None:
            self.reject(item.id, item.path, "missing file")
        elif size == 0:
            self.reject(item.id, item.path, "zero-byte file")
        else:
            self.add(item)

    def reject(self, id: str, path: str, reason: str) -> None:
        self.rejects.append({"id": id, "path": path, "reason": reason})

    def listing(self, classes: list[str], **kwargs) -> Listing:
        meta = kwargs.pop("meta", {})
        meta["inputs"] = len(self.train) + len(self.test) + len(self.rejects)
        return Listing(classes=list(classes), train=self.train, test=self.test, rejects=self.rejects,
                       meta=meta, **kwargs)


def _file_size(path: str) -> int | None:
    """Size in bytes; None when there is no such file."""
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


def _resolve(path: str, base: str) -> str:
    """A relative option path: under `base` (the input dir) when it exists there, else as given."""
    if os.path.isabs(path) or not base:
        return path
    under = os.path.join(base, path)
    return under if os.path.exists(under) else path


def _inside(root: str, rel: str, *, where: str) -> str:
    """root/rel, or ValueError (naming `where`) when rel is absolute outside root or climbs out with ../."""
    root = os.path.abspath(root)
    full = os.path.normpath(os.path.join(root, rel))
    if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
        raise DataError(f"{where}: path {rel!r} escapes the dataset root {root}; "
                         "label files may only name files inside it (fix or remove the entry)")
    return full


def _int_label(value, num_classes: int) -> int | None:
    """An integer class index in 0..num_classes-1 from an int or a string like "1"; None when invalid."""
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    if not f.is_integer() or not 0 <= f < num_classes:
        return None
    return int(f)


def _read_csv(path: str, *, required: tuple[str, ...], hint: str = "") -> list[dict]:
    """Rows of a CSV as dicts; ValueError naming the file when it is absent or lacks a column."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; pass the dataset directory that holds it")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(columns)})"
                             + (f"; {hint}" if hint else ""))
        return list(reader)


def _stem_id(rel: str) -> str:
    """Relative path without its extension, '/'-joined: the id of a file in a tree."""
    return os.path.splitext(rel.replace(os.sep, "/"))[0]


def _as_list(value) -> list[str] | None:
    """A comma-separated string or a sequence -> list of stripped names; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


# ---------------------------------------------------------------- hcd (Kaggle)

def _group_map(path: str | None, base: str) -> dict[str, str]:
    """id -> slide from a CSV with `id` and one of wsi / slide / group; {} when no path."""
    if not path:
        return {}
    path = _resolve(path, base)
    rows = _read_csv(path, required=("id",))
    column = next((c for c in ("wsi", "slide", "group") if rows and c in rows[0]), None)
    if rows and column is None:
        raise DataError(f"groups file {path} needs a wsi, slide or group column next to id")
    return {r["id"]: r[column] for r in rows}


def list_hcd(input: str, *, groups=None) -> Listing:
    """Kaggle Histopathologic Cancer Detection: train_labels.csv + train/<id>.tif, test/ in submission order."""
    out, group_of = _Collector(), _group_map(groups, input)
    train_dir, test_dir = os.path.join(input, "train"), os.path.join(input, "test")
    train_sizes = _dir_sizes(train_dir)
    labels_csv = os.path.join(input, "train_labels.csv")
    for line, row in enumerate(_read_csv(labels_csv, required=("id", "label")), start=2):
        id = row["id"]
        path = _inside(train_dir, id + ".tif", where=f"{labels_csv} line {line}")
        label = _int_label(row["label"], 2)
        if label is None:
            out.reject(id, path, "invalid label")
            continue
        out.add_file(Item(id, label, group_of.get(id, ""), ("file", path), "train", path), train_sizes.get(id))
    submission = os.path.join(input, "sample_submission.csv")
    has_submission = os.path.isfile(submission)
    _list_hcd_test(out, test_dir, submission if has_submission else None)
    return out.listing(["0", "1"], sample_submission=submission if has_submission else None,
                       meta={"test_labeled": False, "groups": bool(group_of), "mpp": PCAM_MPP})


def _dir_sizes(directory: str, ext: str = ".tif") -> dict[str, int]:
    """{stem: size in bytes} of the `ext` files directly in `directory` (one scandir, no per-id stat)."""
    if not os.path.isdir(directory):
        return {}
    with os.scandir(directory) as entries:
        return {e.name[: -len(ext)]: e.stat().st_size for e in entries
                if e.name.endswith(ext) and e.is_file()}


def _list_hcd_test(out: _Collector, test_dir: str, submission: str | None) -> None:
    """Test items in sample_submission order; files it does not name are rejected so counts add up."""
    sizes = _dir_sizes(test_dir)
    order = ([r["id"] for r in _read_csv(submission, required=("id",))] if submission
             else sorted(sizes))
    for line, id in enumerate(order, start=2):
        path = _inside(test_dir, id + ".tif", where=f"{submission or test_dir} line {line}")
        out.add_file(Item(id, -1, "", ("file", path), "test", path), sizes.get(id))
    for id in sorted(set(sizes) - set(order)):
        out.reject(id, os.path.join(test_dir, id + ".tif"), "not in sample_submission.csv")


# ---------------------------------------------------------------- pcam (h5)

PCAM_SPLITS = ("train", "valid", "test")


def _pcam_file(input: str, split: str, part: str) -> str | None:
    """Path of camelyonpatch_level_2_split_{split}_{part}.h5 or .h5.gz; None when neither exists."""
    stem = os.path.join(input, f"camelyonpatch_level_2_split_{split}_{part}")
    return next((p for p in (stem + ".h5", stem + ".h5.gz") if os.path.isfile(p)), None)


def _pcam_groups(input: str, split: str, count: int) -> list[str]:
    """The `wsi` column of the split's meta CSV (one row per patch); blanks when absent."""
    path = os.path.join(input, f"camelyonpatch_level_2_split_{split}_meta.csv")
    if not os.path.isfile(path):
        return [""] * count
    rows = _read_csv(path, required=("wsi",))
    if len(rows) != count:
        raise DataError(f"{path} has {len(rows)} rows but the {split} split has {count} patches")
    return [r["wsi"] for r in rows]


def _pcam_labels(x_path: str, y_path: str | None, split: str) -> list[int | None]:
    """Labels of the split from its y file (N, 1, 1, 1): 0/1, None when invalid, -1 when no y file."""
    import numpy as np

    from histofold.imageio import h5_dataset, h5_length

    count = h5_length(x_path, "x")
    if y_path is None:
        return [-1] * count
    y = np.asarray(h5_dataset(y_path, "y")[...]).reshape(-1)
    if len(y) != count:
        raise DataError(f"{y_path} holds {len(y)} labels but {x_path} holds {count} patches")
    return [_int_label(v, 2) for v in y.tolist()]


def list_pcam(input: str, *, test_split="test") -> Listing:
    """PatchCamelyon h5 files; `test_split` becomes labeled test items, the other splits train items."""
    if test_split not in (*PCAM_SPLITS, None, "", "none"):
        raise UsageError(f"--test_split={test_split!r}; choose one of {', '.join(PCAM_SPLITS)} or none")
    present = [s for s in PCAM_SPLITS if _pcam_file(input, s, "x")]
    if not present:
        raise DataError(f"no camelyonpatch_level_2_split_{{train,valid,test}}_x.h5[.gz] in {input}")
    out, test_labeled = _Collector(), None
    for split in present:
        x_path, y_path = _pcam_file(input, split, "x"), _pcam_file(input, split, "y")
        role = "test" if split == test_split else "train"
        if y_path is None and role == "train":
            raise DataError(f"{x_path} has no labels file camelyonpatch_level_2_split_{split}_y.h5[.gz] "
                             f"next to it; add it or make this split the test split (test_split={split})")
        labels = _pcam_labels(x_path, y_path, split)
        for index, (label, group) in enumerate(zip(labels, _pcam_groups(input, split, len(labels)))):
            id = f"pcam-{split}-{index:06d}"
            if label is None:
                out.reject(id, f"{x_path}[{index}]", "invalid label")
                continue
            out.add(Item(id, label, group, ("h5", x_path, "x", index), role, f"{x_path}[{index}]"))
        if role == "test":
            test_labeled = y_path is not None
    return out.listing(["0", "1"], meta={"splits": present, "test_labeled": bool(test_labeled), "mpp": PCAM_MPP,
                                         "test_split": test_split if test_split in present else None})


# ---------------------------------------------------------------- folder (class per directory)

def _walk(root: str, *, exclude: str | None, counts: dict):
    """Yield (relative posix path, absolute path, size) of image files under root, sorted, recursively.

    Hidden entries (".DS_Store", "__MACOSX"-style "._x.png") and non-image files are counted in
    `counts` and skipped; `exclude` (an absolute dir) is not entered.
    """
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.name.startswith(".") or e.name == "__MACOSX":
                counts["hidden"] = counts.get("hidden", 0) + 1
            elif e.is_dir():
                if not (exclude and os.path.abspath(e.path) == exclude):
                    subdirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.relpath(e.path, root).replace(os.sep, "/"), e.path, e.stat().st_size
            else:
                counts["non_image"] = counts.get("non_image", 0) + 1
        stack.extend(reversed(subdirs))  # depth-first in name order


def _class_of(rel: str, depth: int) -> str | None:
    """Name of the directory `depth` levels above the file (1 = parent); None when too shallow."""
    parts = rel.split("/")[:-1]
    return parts[-depth] if len(parts) >= depth else None


def _group_of(rel: str, pattern: re.Pattern | None, *, root: str, required: bool) -> str:
    """First capture group (or whole match) of group_regex on the relative path."""
    if pattern is None:
        return ""
    m = pattern.search(rel)
    if m is None:
        if required:
            raise DataError(f"group_regex {pattern.pattern!r} does not match {os.path.join(root, rel)}; "
                             "fix the regex so every training file has a group")
        return ""
    return m.group(1) if m.groups() else m.group(0)


def _scan_tree(root: str, *, depth: int, include, exclude=None) -> tuple[list, dict]:
    """[(rel, abs, size, class or None)] of a tree's images and counts of what was skipped."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory; pass the folder that holds the class folders")
    counts: dict = {}
    files = []
    for rel, path, size in _walk(root, exclude=exclude, counts=counts):
        if include is not None and not include.search(rel):
            counts["excluded"] = counts.get("excluded", 0) + 1
            continue
        files.append((rel, path, size, _class_of(rel, depth)))
    return files, counts


def _pick_classes(found: set[str], wanted) -> list[str]:
    """The requested classes in the given order (all known), else every found class sorted."""
    wanted = _as_list(wanted)
    if wanted is None:
        return sorted(found)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise UsageError(f"--classes={','.join(unknown)} not found; the tree has: {', '.join(sorted(found))}")
    return wanted


def list_folder(input: str, *, classes=None, class_depth=1, group_regex=None, include=None,
                test_input=None) -> Listing:
    """Class-per-folder trees: class = name of the directory `class_depth` levels above each image.

    class_depth  1 = the folder holding the image (LC25000 lung_aca/, CRC ADI/, PCam 0/ 1/); BreakHis
                 .../{benign,malignant}/SOB/<subtype>/<patient>/<mag>X/x.png: 5 = benign/malignant,
                 3 = subtype. Folders of the same name anywhere in the tree are one class.
    classes      subset and order (comma list); images of other classes are skipped, not rejected.
    group_regex  re.search on the relative path; group = first capture group (else the whole match);
                 a training file it does not match is an error.
    include      re.search on the relative path; only matching images are listed (e.g. "/40X/").
    test_input   a second tree: images in class folders are labeled test items, images directly in
                 it unlabeled ones; when it lies inside `input` it is left out of training.
    """
    depth = int(class_depth)
    if depth < 1:
        raise UsageError(f"--class_depth={class_depth}; use 1 for the parent folder, 2 for the grandparent, ...")
    group_re = re.compile(group_regex) if group_regex else None
    include_re = re.compile(include) if include else None
    test_root = os.path.abspath(_resolve(test_input, input)) if test_input else None
    files, skipped = _scan_tree(input, depth=depth, include=include_re, exclude=test_root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {input} (skipped: {skipped})")
    names = _pick_classes({c for *_, c in files if c is not None}, classes)
    index = {c: i for i, c in enumerate(names)}
    out = _Collector()
    for rel, path, size, cls in files:
        if cls is not None and cls not in index:
            skipped["other_class"] = skipped.get("other_class", 0) + 1
        elif cls is None:
            out.reject(_stem_id(rel), path, f"not in a class folder (class_depth={depth})")
        else:
            group = _group_of(rel, group_re, root=input, required=True) if size else ""
            out.add_file(Item(_stem_id(rel), index[cls], group, ("file", path), "train", path), size)
    test_labeled = _list_folder_test(out, test_root, depth=depth, index=index, include=include_re,
                                     skipped=skipped, group_re=group_re) if test_root else None
    return out.listing(names, meta={"skipped": skipped, "class_depth": depth,
                                    "test_labeled": bool(test_labeled)})


def _list_folder_test(out: _Collector, root: str, *, depth, index, include, skipped, group_re) -> bool:
    """Test items from a second tree: labeled in class folders, unlabeled (-1) directly in `root`."""
    files, counts = _scan_tree(root, depth=depth, include=include)
    for k, v in counts.items():
        skipped[f"test_{k}"] = skipped.get(f"test_{k}", 0) + v
    labeled = False
    for rel, path, size, cls in files:
        id = "test/" + _stem_id(rel)
        if "/" not in rel:
            label = -1   # directly in the test folder: unlabeled
        elif cls in index:
            label, labeled = index[cls], True
        elif cls is None:
            out.reject(id, path, f"not in a class folder (class_depth={depth})")
            continue
        else:
            skipped["test_other_class"] = skipped.get("test_other_class", 0) + 1
            continue
        group = _group_of(rel, group_re, root=root, required=False)
        out.add_file(Item(id, label, group, ("file", path), "test", path), size)
    return labeled


# ---------------------------------------------------------------- chaoyang (json)

CHAOYANG_CLASSES = ["normal", "serrated", "adenocarcinoma", "adenoma"]


def _chaoyang_entries(path: str) -> list[dict]:
    """The JSON list of {"name", "label"} entries; ValueError naming the file when malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path} must hold a JSON list of {{\"name\": ..., \"label\": ...}} entries")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise DataError(f"{path} entry {i} ({e!r}) has no string \"name\"")
    return entries


def _json_label(value, num_classes: int) -> int | None:
    """A JSON int (or digit string) class index; None for anything else (true/false, floats, null)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return _int_label(value, num_classes)


def list_chaoyang(input: str) -> Listing:
    """Chaoyang: train.json / test.json lists of {"name": "train/x.JPG", "label": 0..3} under the root."""
    train_json = os.path.join(input, "train.json")
    if not os.path.isfile(train_json):
        raise DataError(f"{train_json} not found; pass the Chaoyang root that holds train.json and test.json")
    out = _Collector()
    for split, json_path in (("train", train_json), ("test", os.path.join(input, "test.json"))):
        if split == "test" and not os.path.isfile(json_path):
            continue
        for i, entry in enumerate(_chaoyang_entries(json_path)):
            path = _inside(input, entry["name"], where=f"{json_path} entry {i}")
            id = _stem_id(os.path.relpath(path, os.path.abspath(input)))
            label = _json_label(entry.get("label"), len(CHAOYANG_CLASSES))
            if label is None:
                out.reject(id, path, "invalid label")
                continue
            out.add_file(Item(id, label, "", ("file", path), split, path), _file_size(path))
    return out.listing(CHAOYANG_CLASSES, meta={"test_labeled": bool(out.test)})


# ---------------------------------------------------------------- csv

def _csv_class_names(labels: list[str]) -> list[str]:
    """Distinct non-empty labels as class names: numerically sorted when all are integers, else sorted."""
    names = {s.strip() for s in labels if s.strip()}
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def list_csv(input: str, *, csv=None, path_col="path", label_col="label", group_col=None, id_col=None,
             root=None, test_csv=None, classes=None) -> Listing:
    """A CSV of image paths (relative to its folder or root=) and labels; integer labels name classes too.

    Classes are the distinct labels (sorted numerically when all are integers, else alphabetically),
    or `classes=` (in that order; rows with other labels are rejected as invalid).
    """
    base = input if os.path.isdir(input) else os.path.dirname(input)
    csv_path = _resolve(csv, base) if csv else (input if input.lower().endswith(".csv")
                                                else os.path.join(input, "labels.csv"))
    cols = {"path": path_col, "label": label_col, "group": group_col, "id": id_col}
    hint = "name the right columns with path_col=, label_col=, group_col=, id_col="
    rows = _read_csv(csv_path, required=tuple(c for c in (path_col, label_col, group_col, id_col) if c),
                     hint=hint)
    names = _as_list(classes) or _csv_class_names([r[label_col] or "" for r in rows])
    out = _Collector()
    root_dir = _resolve(root, base) if root else os.path.dirname(os.path.abspath(csv_path))
    _add_csv_rows(out, rows, csv_path=csv_path, root=root_dir, cols=cols, names=names, split="train")
    test_labeled = False
    if test_csv:
        test_path = _resolve(test_csv, base)
        test_rows = _read_csv(test_path, required=tuple(c for c in (path_col, id_col) if c), hint=hint)
        test_root = _resolve(root, base) if root else os.path.dirname(os.path.abspath(test_path))
        _add_csv_rows(out, test_rows, csv_path=test_path, root=test_root, cols=cols, names=names, split="test")
        test_labeled = any(i.label >= 0 for i in out.test)
    return out.listing(names, meta={"csv": csv_path, "test_labeled": test_labeled})


def _add_csv_rows(out: _Collector, rows, *, csv_path, root, cols, names, split) -> None:
    """Items of one CSV; a test row with no label (or no label column) is unlabeled (-1)."""
    index = {n: i for i, n in enumerate(names)}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        rel = row[cols["path"]] or ""
        path = _inside(root, rel, where=f"{csv_path} line {line}")
        id = row[cols["id"]] if cols["id"] else _stem_id(os.path.relpath(path, os.path.abspath(root)))
        raw = (row.get(cols["label"]) or "").strip()
        if split == "test" and not raw:
            label = -1
        elif raw in index:
            label = index[raw]
        else:
            out.reject(id, path, "invalid label")
            continue
        group = (row.get(cols["group"]) or "") if cols["group"] else ""
        out.add_file(Item(id, label, group, ("file", path), split, path), _file_size(path))


# ---------------------------------------------------------------- synthetic

def list_synthetic(input: str, *, count=2000, image_size=96, num_classes=2, test_count=500, seed=0) -> Listing:
    """Generated H&E-like patches (histofold.synthetic); `input` is ignored. Test items keep their labels."""
    import numpy as np

    count, size, k, test_count, seed = int(count), int(image_size), int(num_classes), int(test_count), int(seed)
    if k < 2 or count < 0 or test_count < 0:
        raise UsageError(f"synthetic needs num_classes >= 2 and counts >= 0 (got {k}, {count}, {test_count})")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count + test_count) % k)  # balanced, shuffled
    out = _Collector()
    for index, label in enumerate(labels.tolist()):
        split = "train" if index < count else "test"
        id = f"syn-{index:06d}" if split == "train" else f"syn-test-{index:06d}"
        ref = ("synthetic", seed, index, size, label, k)
        out.add(Item(id, label, "", ref, split, f"synthetic:{seed}:{index}"))
    classes = ["normal", "tumor"] if k == 2 else [f"c{i}" for i in range(k)]
    return out.listing(classes, meta={"test_labeled": True, "seed": seed, "image_size": size})


# ---------------------------------------------------------------- slides (annotated whole-slide images)

def list_slides(input: str, *, patch_px=96, patch_mpp=PCAM_MPP, slide_mpp=None, classes=None, background=None,
                label_fraction=None, min_tissue=0.5, stride=None) -> Listing:
    """Annotated whole-slide images -> labelled tiles (histofold.slides.list_slide_tiles): tiles cut at
    `patch_mpp` um/px as `patch_px` squares (prepare's --mpp and --resize), labelled by the annotation
    covering the tile centre (or `label_fraction` of it), glass skipped by the tissue detector; the
    group is the slide, so folds never split one. Refs ("slide", path, x, y, level, read_px, patch_px)."""
    from histofold import slides

    names = _as_list(classes)
    try:
        tiles = slides.list_slide_tiles(input, patch_px=int(patch_px), patch_mpp=float(patch_mpp), classes=names,
                                        background=background, label_fraction=label_fraction,
                                        min_tissue=float(min_tissue), stride=stride, mpp=slide_mpp)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    names = names or sorted({t["label_name"] for t in tiles})
    index = {c: i for i, c in enumerate(names)}
    out = _Collector()
    for t in tiles:
        ref = ("slide", t["path"], t["x"], t["y"], t["level"], t["read_px"], t["patch_px"])
        where = f"{t['path']}@{t['x']},{t['y']}"
        if t["label_name"] not in index:
            out.reject(t["id"], where, f"label {t['label_name']!r} is not one of --classes")
            continue
        out.add(Item(t["id"], index[t["label_name"]], t["slide"], ref, "train", where))
    return out.listing(names, meta={"mpp": float(patch_mpp), "slides": sorted({t["slide"] for t in tiles}),
                                    "test_labeled": False, "record_fields": ["loc_x", "loc_y"]})


# ---------------------------------------------------------------- registry

SOURCES: dict[str, Source] = {
    s.name: s for s in (
        Source("hcd", "Kaggle Histopathologic Cancer Detection: train_labels.csv, train/, test/, "
               "sample_submission.csv", list_hcd, {"groups": None}),
        Source("pcam", "PatchCamelyon h5 files camelyonpatch_level_2_split_*_{x,y}.h5[.gz] (+ _meta.csv wsi)",
               list_pcam, {"test_split": "test"}),
        Source("folder", "class-per-folder image trees (LC25000, CRC-HE, NCT-CRC, BreakHis, PCam JPEG)",
               list_folder, {"classes": None, "class_depth": 1, "group_regex": None, "include": None,
                             "test_input": None}),
        Source("chaoyang", "Chaoyang: train.json / test.json of {name, label} under the root", list_chaoyang),
        Source("csv", "a CSV of image paths and labels (labels.csv in the input dir by default)", list_csv,
               {"csv": None, "path_col": "path", "label_col": "label", "group_col": None, "id_col": None,
                "root": None, "test_csv": None, "classes": None}),
        Source("slides", "annotated whole-slide images (QuPath GeoJSON, ASAP XML or <stem>_mask.png beside each)",
               list_slides, {"patch_px": 96, "patch_mpp": PCAM_MPP, "slide_mpp": None, "classes": None,
                             "background": None, "label_fraction": None, "min_tissue": 0.5, "stride": None}),
        Source("synthetic", "generated H&E-like patches for demos and tests (no files)", list_synthetic,
               {"count": 2000, "image_size": 96, "num_classes": 2, "test_count": 500, "seed": 0}),
    )
}


def get_source(name: str) -> Source:
    """The registered adapter; unknown names raise ValueError listing the valid ones."""
    if name not in SOURCES:
        raise UsageError(f"--source={name!r}: choose one of {', '.join(SOURCES)}")
    return SOURCES[name]
