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
- a labeled item with an invalid label, a missing or a zero-byte file, a broken symlink or a symlink
  loop is rejected, not an error; a Kaggle HCD train image without a label row is rejected
  ("no label row");
- one id repeated in a label file: copies with the same label (and path) keep the first and are counted
  (`meta["label_files"][file]["identical_duplicates"]`); copies with different labels are all rejected as
  "conflicting labels" and listed in `Listing.label_conflicts` (prepare's --strict_labels fails on them);
- a path in a label file (CSV, JSON) that escapes the dataset root, lexically (../, absolute) or through a
  symlink (real paths are compared), is a DataError naming the file and row: it is a broken or hostile
  label file, not a bad image; a label file that is not text (UTF-8, or UTF-16/32 with a BOM) or not
  valid CSV/JSON is a DataError naming the file;
- what a user should know but that is no error (an empty class folder, the test order used without
  sample_submission.csv) is a line in `meta["warnings"]`, which prepare logs and puts in its summary;
- relative path options (test_input=, csv=, groups=, ...) are looked up under the input directory
  first, then the current directory.
- `meta["test_labeled"]` says whether the test items carry real labels.
"""
from __future__ import annotations

import csv as csvlib
import errno
import io
import json
import os
import re
import stat
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
    label_conflicts: list[dict] = field(default_factory=list)  # {"file", "id", "labels", "where"} per id


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
        self.conflicts, self.label_files, self.warnings = [], {}, []

    def add(self, item: Item) -> None:
        if item.id in self.ids:
            self.reject(item.id, item.path, "duplicate id")
            return
        self.ids.add(item.id)
        (self.test if item.split == "test" else self.train).append(item)

    def add_file(self, item: Item, size: int | str | None) -> None:
        """Add a file-backed item; `size` is its size in bytes, or why it cannot be read (see _file_size),
        None for a missing file. Unreadable and empty files are rejected."""
        if size is None:
            self.reject(item.id, item.path, "missing file")
        elif isinstance(size, str):
            self.reject(item.id, item.path, size)
        elif size == 0:
            self.reject(item.id, item.path, "zero-byte file")
        else:
            self.add(item)

    def reject(self, id: str, path: str, reason: str) -> None:
        self.rejects.append({"id": id, "path": path, "reason": reason})

    def listing(self, classes: list[str], **kwargs) -> Listing:
        meta = kwargs.pop("meta", {})
        meta["inputs"] = len(self.train) + len(self.test) + len(self.rejects)
        if self.label_files:
            meta["label_files"] = self.label_files
        if self.warnings:
            meta["warnings"] = list(self.warnings)
        return Listing(classes=list(classes), train=self.train, test=self.test, rejects=self.rejects,
                       meta=meta, label_conflicts=self.conflicts, **kwargs)


def _unique_labels(out: _Collector, entries: list[dict], *, file: str) -> list[dict]:
    """The entries of one label file with repeated ids settled, in file order.

    Each entry is {"id", "path", "label" (what is compared: the parsed label or the raw text), "where"}.
    Copies of an id with one label and one path: the first is kept, the rest counted as identical
    duplicates. Copies with different labels: every copy is rejected as "conflicting labels" and the id
    goes into `out.conflicts`. Copies with one label but different files stay (out.add rejects the later
    ones as "duplicate id")."""
    copies: dict[str, list[dict]] = {}
    for e in entries:
        copies.setdefault(e["id"], []).append(e)
    stats = {"rows": len(entries), "identical_duplicates": 0, "conflicting_ids": 0, "conflicting_rows": 0}
    kept = []
    for e in entries:
        group = copies[e["id"]]
        if len(group) == 1:
            kept.append(e)
        elif e is group[0]:
            labels = list(dict.fromkeys(str(c["label"]) for c in group))
            if len(labels) > 1:
                for c in group:
                    out.reject(c["id"], c["path"], "conflicting labels")
                out.conflicts.append({"file": file, "id": e["id"], "labels": labels,
                                      "where": [c["where"] for c in group]})
                stats["conflicting_ids"] += 1
                stats["conflicting_rows"] += len(group)
            elif len({c["path"] for c in group}) == 1:
                kept.append(e)
                stats["identical_duplicates"] += len(group) - 1
            else:
                kept.extend(group)
    out.label_files[file] = stats
    return kept


def _file_size(path: str) -> int | str | None:
    """Size in bytes of a file (symlinks followed); None when there is no such file; a reject reason
    when the path is a broken symlink, a symlink loop or not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else None
    except OSError as e:
        return _os_reason(e)
    except ValueError:  # a NUL byte in the path
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else "not a regular file"


def _os_reason(e: OSError) -> str:
    """A short reject reason for an OSError met while listing (ELOOP is the one that matters)."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return f"unreadable ({e.strerror or e})"


def _resolve(path: str, base: str) -> str:
    """A relative option path: under `base` (the input dir) when it exists there, else as given."""
    if os.path.isabs(path) or not base:
        return path
    under = os.path.join(base, path)
    return under if os.path.exists(under) else path


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Root:
    """A dataset root that the paths in a label file must stay inside, lexically and once symlinks are
    resolved (os.path.realpath); real parent directories are cached, so Kaggle HCD's 220k ids cost one
    lstat each."""

    def __init__(self, root: str):
        self.path = os.path.abspath(root)
        self.real = os.path.realpath(self.path)
        self._real_dirs: dict[str, str] = {}

    def join(self, rel: str, *, where: str) -> str:
        """root/rel (normalized, not resolved), or DataError naming `where` when it escapes the root."""
        if "\0" in rel:
            raise DataError(f"{where}: path {rel!r} holds a NUL byte; fix or remove the entry")
        full = os.path.normpath(os.path.join(self.path, rel))
        if not _under(full, self.path):
            raise DataError(f"{where}: path {rel!r} escapes the dataset root {self.path}; "
                            "label files may only name files inside it (fix or remove the entry)")
        real = self._realpath(full)
        if not _under(real, self.real):
            raise DataError(f"{where}: path {rel!r} is a symlink to {real}, outside the dataset root {self.real}; "
                            "label files may only name files inside it (replace the link with the file, or "
                            "pass the folder that holds the real files as --input)")
        return full

    def _realpath(self, path: str) -> str:
        if os.path.islink(path):
            return os.path.realpath(path)
        parent = os.path.dirname(path)
        if parent not in self._real_dirs:
            self._real_dirs[parent] = os.path.realpath(parent)
        return os.path.join(self._real_dirs[parent], os.path.basename(path))


def _inside(root: str, rel: str, *, where: str) -> str:
    """root/rel, or DataError (naming `where`) when rel leaves root (../, absolute, or a symlink out)."""
    return _Root(root).join(rel, where=where)


def _int_label(value, num_classes: int) -> int | None:
    """An integer class index in 0..num_classes-1 from an int or a string like "1"; None when invalid."""
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    if not f.is_integer() or not 0 <= f < num_classes:
        return None
    return int(f)


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _read_text(path: str) -> str:
    """A label file's text: UTF-8 (BOM or not), or UTF-16/32 with a BOM; DataError naming the file else."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not {encoding.upper().replace('-SIG', '')} text (byte {e.start}: "
                        f"{e.reason}); save it as UTF-8") from None


def _read_csv(path: str, *, required: tuple[str, ...], hint: str = "") -> list[dict]:
    """Rows of a CSV as dicts (a short row's missing cells are None); DataError naming the file when it is
    absent, not text, not CSV or lacks a column."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; pass the dataset directory that holds it")
    reader = csvlib.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            shown = ", ".join(c if c.isprintable() else repr(c) for c in columns)  # a quoted "a\nb" stays one line
            raise DataError(f"{path} has no column {', '.join(missing)} (columns: {shown})"
                            + (f"; {hint}" if hint else ""))
        return list(reader)
    except csvlib.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None


def _cell(row: dict, column: str | None) -> str:
    """A cell as text; "" for a missing column or a short row's missing cell."""
    value = row.get(column) if column else None
    return value if isinstance(value, str) else ""


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
    return {_cell(r, "id"): _cell(r, column) for r in rows}


def list_hcd(input: str, *, groups=None) -> Listing:
    """Kaggle Histopathologic Cancer Detection: train_labels.csv + train/<id>.tif, test/ in submission order.

    A train/*.tif without a row in train_labels.csv is rejected ("no label row"); without
    sample_submission.csv the test images are listed in sorted id order, with a warning saying so."""
    out, group_of = _Collector(), _group_map(groups, input)
    train_dir, test_dir = os.path.join(input, "train"), os.path.join(input, "test")
    train_sizes = _dir_sizes(train_dir)
    labels_csv = os.path.join(input, "train_labels.csv")
    root, entries, named = _Root(train_dir), [], set()
    for line, row in enumerate(_read_csv(labels_csv, required=("id", "label")), start=2):
        id = _cell(row, "id")
        named.add(id)
        if not id:
            out.reject("", f"{labels_csv} line {line}", "empty id")
            continue
        path = root.join(id + ".tif", where=f"{labels_csv} line {line}")
        label = _int_label(_cell(row, "label"), 2)
        entries.append({"id": id, "path": path, "label": label if label is not None else _cell(row, "label"),
                        "where": f"line {line}", "valid": label})
    for e in _unique_labels(out, entries, file=labels_csv):
        if e["valid"] is None:
            out.reject(e["id"], e["path"], "invalid label")
            continue
        out.add_file(Item(e["id"], e["valid"], group_of.get(e["id"], ""), ("file", e["path"]), "train", e["path"]),
                     train_sizes.get(e["id"]))
    for id in sorted(set(train_sizes) - named):
        out.reject(id, os.path.join(train_dir, id + ".tif"), "no label row")
    submission = os.path.join(input, "sample_submission.csv")
    has_submission = os.path.isfile(submission)
    _list_hcd_test(out, test_dir, submission if has_submission else None)
    if not has_submission:
        out.warnings.append(f"no sample_submission.csv in {input}: the {len(out.test)} test images of {test_dir} "
                            "are written (and predicted) in sorted id order; put the competition's "
                            "sample_submission.csv there to get its order")
    return out.listing(["0", "1"], sample_submission=submission if has_submission else None,
                       meta={"test_labeled": False, "groups": bool(group_of), "mpp": PCAM_MPP,
                             "test_order": "sample_submission.csv" if has_submission else "sorted ids"})


def _dir_sizes(directory: str, ext: str = ".tif") -> dict[str, int | str]:
    """{stem: size in bytes, or why it cannot be read} of the `ext` entries directly in `directory` (one
    scandir, no per-id stat for plain files; a broken symlink or a symlink loop gets its reason)."""
    if not os.path.isdir(directory):
        return {}
    sizes = {}
    with os.scandir(directory) as entries:
        for e in entries:
            if not e.name.endswith(ext):
                continue
            kind = _entry_kind(e)
            if kind == "file":
                sizes[e.name[: -len(ext)]] = e.stat().st_size
            elif kind != "dir":
                sizes[e.name[: -len(ext)]] = "not a regular file" if kind == "other" else kind
    return sizes


def _list_hcd_test(out: _Collector, test_dir: str, submission: str | None) -> None:
    """Test items in sample_submission order; files it does not name are rejected so counts add up."""
    sizes = _dir_sizes(test_dir)
    order = ([_cell(r, "id") for r in _read_csv(submission, required=("id",))] if submission
             else sorted(sizes))
    root = _Root(test_dir)
    for line, id in enumerate(order, start=2):
        if not id:
            out.reject("", f"{submission} line {line}", "empty id")
            continue
        path = root.join(id + ".tif", where=f"{submission or test_dir} line {line}")
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
    return [_cell(r, "wsi") for r in rows]


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

@dataclass
class _Tree:
    """What a walk of an image tree found."""

    files: list = field(default_factory=list)     # (rel, abs, size, class or None), depth-first in name order
    skipped: dict = field(default_factory=dict)   # entries left out on purpose, by kind
    problems: list = field(default_factory=list)  # {"id", "path", "reason"}: symlink loops, broken links, ...
    empty: list = field(default_factory=list)     # relative paths of the top-most folders holding no image


def _walk(root: str, *, exclude: str | None, tree: _Tree):
    """Yield (relative posix path, absolute path, size) of image files under root, sorted, recursively.

    Hidden entries (".DS_Store", "__MACOSX"-style "._x.png") and non-image files are counted in
    `tree.skipped`; `exclude` (an absolute dir) is not entered. Symlinks are followed (class folders of
    links into a pool of images are a common layout), except a directory link back to a folder above it:
    that loop, a broken link and an entry that cannot be read go to `tree.problems` (rejects, never an
    OSError). Afterwards `tree.empty` lists the top-most folders with no image anywhere below them.
    """
    stack = [(root, (os.path.realpath(root),))]   # (directory, real paths of it and the folders above it)
    images, parent, order = {}, {}, []            # images directly in a dir; its parent; dirs in walk order
    while stack:
        directory, chain = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            tree.problems.append(_problem(root, directory, _os_reason(e)))
            continue
        images[directory] = 0
        order.append(directory)
        subdirs = []
        for e in entries:
            kind = _entry_kind(e)
            if e.name.startswith(".") or e.name == "__MACOSX":
                tree.skipped["hidden"] = tree.skipped.get("hidden", 0) + 1
            elif kind == "dir":
                if exclude and os.path.abspath(e.path) == exclude:
                    images[directory] += 1  # it holds the test tree: not an empty folder
                    continue
                real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(chain[-1], e.name)
                if real in chain:
                    tree.problems.append(_problem(root, e.path, f"symlink loop (-> {real})"))
                else:
                    parent[e.path] = directory
                    subdirs.append((e.path, chain + (real,)))
            elif kind not in ("file", "other"):  # a reason: symlink loop, broken symlink, unreadable
                tree.problems.append(_problem(root, e.path, kind))
            elif os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
                tree.skipped["non_image"] = tree.skipped.get("non_image", 0) + 1
            elif kind == "other":  # a FIFO or device named like an image: reading it could hang
                tree.problems.append(_problem(root, e.path, "not a regular file"))
            else:
                try:
                    size = e.stat().st_size
                except OSError as err:
                    tree.problems.append(_problem(root, e.path, _os_reason(err)))
                    continue
                images[directory] += 1
                yield os.path.relpath(e.path, root).replace(os.sep, "/"), e.path, size
        stack.extend(reversed(subdirs))  # depth-first in name order
    tree.empty.extend(_empty_folders(root, images, parent, order))


def _entry_kind(entry: os.DirEntry) -> str:
    """"dir", "file" (symlinks followed), "other" (FIFO, socket, device), or why it cannot be followed."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as e:  # DirEntry.is_dir raises on ELOOP
        return _os_reason(e)
    if entry.is_symlink():
        return _file_size(entry.path) or "broken symlink"
    return "other"


def _problem(root: str, path: str, reason: str) -> dict:
    """A reject row for an entry of a tree that cannot be listed."""
    return {"id": _stem_id(os.path.relpath(path, root)), "path": path, "reason": reason}


def _empty_folders(root: str, images: dict, parent: dict, order: list) -> list[str]:
    """Relative paths of the folders with no image below them whose parent does hold some (or is root)."""
    total = dict(images)
    for d in reversed(order):  # children come after their parents in walk order
        if d in parent and parent[d] in total:
            total[parent[d]] += total[d]
    return [os.path.relpath(d, root).replace(os.sep, "/") for d in order
            if d != root and total[d] == 0 and (parent[d] == root or total.get(parent[d], 0) > 0)]


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


def _scan_tree(root: str, *, depth: int, include, exclude=None) -> _Tree:
    """A tree's images with their class (None when too shallow), what was skipped, problems, empty folders."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory; pass the folder that holds the class folders")
    tree = _Tree()
    for rel, path, size in _walk(root, exclude=exclude, tree=tree):
        if include is not None and not include.search(rel):
            tree.skipped["excluded"] = tree.skipped.get("excluded", 0) + 1
            continue
        tree.files.append((rel, path, size, _class_of(rel, depth)))
    return tree


def _empty_warning(tree: _Tree, root: str, what: str) -> str | None:
    """The warning line for a tree's empty folders (None when there are none)."""
    if not tree.empty:
        return None
    shown = ", ".join(tree.empty[:10]) + (f", ... ({len(tree.empty) - 10} more)" if len(tree.empty) > 10 else "")
    return (f"{len(tree.empty)} empty folder(s) in {what} {root} hold no image and are not classes: {shown}; "
            "fill or remove them")


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
    A folder with no image is no class: it is named in a warning (meta["warnings"], meta["empty_folders"]).
    """
    depth = int(class_depth)
    if depth < 1:
        raise UsageError(f"--class_depth={class_depth}; use 1 for the parent folder, 2 for the grandparent, ...")
    group_re = re.compile(group_regex) if group_regex else None
    include_re = re.compile(include) if include else None
    test_root = os.path.abspath(_resolve(test_input, input)) if test_input else None
    tree = _scan_tree(input, depth=depth, include=include_re, exclude=test_root)
    skipped = tree.skipped
    if not tree.files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {input} (skipped: {skipped}"
                        + (f"; {tree.problems[0]['path']}: {tree.problems[0]['reason']}" if tree.problems else "")
                        + ")")
    names = _pick_classes({c for *_, c in tree.files if c is not None}, classes)
    index = {c: i for i, c in enumerate(names)}
    out = _Collector()
    for p in tree.problems:
        out.reject(p["id"], p["path"], p["reason"])
    for rel, path, size, cls in tree.files:
        if cls is not None and cls not in index:
            skipped["other_class"] = skipped.get("other_class", 0) + 1
        elif cls is None:
            out.reject(_stem_id(rel), path, f"not in a class folder (class_depth={depth})")
        else:
            group = _group_of(rel, group_re, root=input, required=True) if size else ""
            out.add_file(Item(_stem_id(rel), index[cls], group, ("file", path), "train", path), size)
    empty = {"input": tree.empty}
    out.warnings.append(_empty_warning(tree, input, "--input"))
    test_labeled = None
    if test_root:
        test_tree = _scan_tree(test_root, depth=depth, include=include_re)
        test_labeled = _list_folder_test(out, test_root, test_tree, depth=depth, index=index, skipped=skipped,
                                         group_re=group_re)
        empty["test_input"] = test_tree.empty
        out.warnings.append(_empty_warning(test_tree, test_root, "--test_input"))
    out.warnings = [w for w in out.warnings if w]
    return out.listing(names, meta={"skipped": skipped, "class_depth": depth, "test_labeled": bool(test_labeled),
                                    "empty_folders": {k: v for k, v in empty.items() if v}})


def _list_folder_test(out: _Collector, root: str, tree: _Tree, *, depth, index, skipped, group_re) -> bool:
    """Test items from a second tree: labeled in class folders, unlabeled (-1) directly in `root`."""
    for k, v in tree.skipped.items():
        skipped[f"test_{k}"] = skipped.get(f"test_{k}", 0) + v
    for p in tree.problems:
        out.reject("test/" + p["id"], p["path"], p["reason"])
    labeled = False
    for rel, path, size, cls in tree.files:
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
    """The JSON list of {"name", "label"} entries; DataError naming the file when malformed."""
    try:
        entries = json.loads(_read_text(path))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit number, [[[[...]]]]
        raise DataError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path} must hold a JSON list of {{\"name\": ..., \"label\": ...}} entries")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise DataError(f"{path} entry {i} ({json.dumps(e)[:80]}) has no string \"name\"")  # escaped: one line
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
    out, root = _Collector(), _Root(input)
    for split, json_path in (("train", train_json), ("test", os.path.join(input, "test.json"))):
        if split == "test" and not os.path.isfile(json_path):
            continue
        entries = []
        for i, entry in enumerate(_chaoyang_entries(json_path)):
            path = root.join(entry["name"], where=f"{json_path} entry {i}")
            label = _json_label(entry.get("label"), len(CHAOYANG_CLASSES))
            entries.append({"id": _stem_id(os.path.relpath(path, root.path)), "path": path, "valid": label,
                            "label": label if label is not None else json.dumps(entry.get("label")),
                            "where": f"entry {i}"})
        for e in _unique_labels(out, entries, file=json_path):
            if e["valid"] is None:
                out.reject(e["id"], e["path"], "invalid label")
                continue
            out.add_file(Item(e["id"], e["valid"], "", ("file", e["path"]), split, e["path"]), _file_size(e["path"]))
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
    names = _as_list(classes) or _csv_class_names([_cell(r, label_col) for r in rows])
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
    base, entries = _Root(root), []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        rel, where = _cell(row, cols["path"]), f"{csv_path} line {line}"
        if not rel.strip() or (cols["id"] and not _cell(row, cols["id"])):
            out.reject(_cell(row, cols["id"]), where, "empty path" if not rel.strip() else "empty id")
            continue
        path = base.join(rel, where=where)
        id = _cell(row, cols["id"]) if cols["id"] else _stem_id(os.path.relpath(path, base.path))
        raw = _cell(row, cols["label"]).strip()
        label = -1 if split == "test" and not raw else index.get(raw)
        entries.append({"id": id, "path": path, "label": raw, "valid": label, "where": f"line {line}",
                        "group": _cell(row, cols["group"])})
    for e in _unique_labels(out, entries, file=csv_path):
        if e["valid"] is None:
            out.reject(e["id"], e["path"], "invalid label")
            continue
        out.add_file(Item(e["id"], e["valid"], e["group"], ("file", e["path"]), split, e["path"]),
                     _file_size(e["path"]))


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
