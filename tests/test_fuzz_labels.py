"""Property tests of every label-file parser in histofold/sources.py (Kaggle HCD train_labels.csv,
Chaoyang train.json, the generic csv source): whatever the bytes, encoding, BOM, columns, NaN labels or
repeated ids, the listing either accounts for every row (each id is an item or a reject, the items are
exactly the rows with one valid label and a file) or fails with a one-line UsageError naming the file;
never another exception."""
import csv
import io
import json
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from histofold import sources
from histofold.errors import UsageError

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ids: a small pool (so repeats are common) and odd text (quotes, commas, newlines, escapes, NUL)
SAFE_IDS = ["a", "b", "c", "d", "e0"]
ODD_IDS = st.text(st.sampled_from(list("ab,\"' \n\r\t./\\é\x00-")), max_size=6)
ids = st.sampled_from(SAFE_IDS) | st.sampled_from(SAFE_IDS) | st.sampled_from(SAFE_IDS) | ODD_IDS  # 1 in 4 odd
LABELS = st.sampled_from(["0", "1", "2", "3", "-1", "1.0", " 1", "nan", "NaN", "", "inf", "1e400", "0x1", "abc",
                          "tumor", "normal"])
files = st.just(frozenset(SAFE_IDS)) | st.sets(st.sampled_from(SAFE_IDS))  # which ids have an image file
label_texts = LABELS | LABELS | LABELS | st.text(max_size=4)
encodings = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"])
newlines = st.sampled_from(["\n", "\r\n"])
# header lines built from the columns' letters and CSV's special characters (quoted newlines, NUL, ...)
headers = st.text(st.sampled_from(list("idlabpth,\"\n\r\x00 é")), max_size=16).map(lambda t: (t + "\n").encode())
BOMS = [b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"]


def int_label(text, num_classes):
    """The spec of a valid class index written as text: an integer value in 0..num_classes-1."""
    try:
        f = float(str(text).strip())
    except ValueError:
        return None
    return int(f) if f.is_integer() and 0 <= f < num_classes else None


def csv_bytes(header, rows, *, encoding, newline) -> bytes | None:
    """The CSV file as `encoding` bytes; None when the text cannot be encoded that way."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline, quoting=csv.QUOTE_ALL)  # 3.11 leaves a lone \r unquoted
    writer.writerow(header)
    writer.writerows(rows)
    try:
        return buffer.getvalue().encode(encoding)
    except UnicodeEncodeError:
        return None


def same_text(data: bytes, encoding: str) -> bool:
    """Whether the parser reads back the text that was encoded. A latin-1/cp1252 file with non-ASCII bytes
    must be a DataError, unless its bytes happen to be valid UTF-8 (then it reads as other text)."""
    if encoding.startswith("utf") or data.isascii():
        return True
    data.decode("utf-8")  # raises unless the bytes are valid UTF-8: the parse should have failed
    return False


def assert_one_line_error(error: UsageError, file: str) -> None:
    if currently_in_test_context():
        event("refused")  # --hypothesis-show-statistics: how many examples took each branch
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert os.path.basename(file) in message, message


def assert_listing_accounts(listing) -> None:
    """Invariants of every listing: inputs add up, ids unique, labels valid."""
    if currently_in_test_context():
        event("parsed")
    assert listing.meta["inputs"] == len(listing.train) + len(listing.test) + len(listing.rejects)
    items = listing.train + listing.test
    assert len({it.id for it in items}) == len(items)
    assert all(0 <= it.label < len(listing.classes) for it in listing.train)


def stem(rel: str) -> str:
    """The id of a label file's path: normalized, without its extension."""
    return os.path.splitext(os.path.normpath(rel))[0]


def expected_items(rows, *, num_classes, has_file):
    """(id -> label of the rows that must become items: one distinct valid label (an invalid text is a
    reject) per id and a non-empty file; the ids whose rows disagree (every copy a reject); the number of
    repeated rows that agree with their id's first row (counted once, so not inputs))."""
    labels = {}
    for id, text in rows:
        canonical = int_label(text, num_classes)
        labels.setdefault(id, []).append(canonical if canonical is not None else text)
    conflicting = {i for i, ls in labels.items() if len({str(v) for v in ls}) > 1}
    items = {i: ls[0] for i, ls in labels.items() if i not in conflicting and isinstance(ls[0], int) and has_file(i)}
    repeats = sum(len(ls) - 1 for i, ls in labels.items() if i not in conflicting)
    return items, conflicting, repeats


# ---------------------------------------------------------------- Kaggle HCD: train_labels.csv

def write_hcd(root, data: bytes, *, files, orphans=()):
    os.makedirs(os.path.join(root, "train"))
    with open(os.path.join(root, "train_labels.csv"), "wb") as f:
        f.write(data)
    for name in list(files) + list(orphans):
        with open(os.path.join(root, "train", name + ".tif"), "wb") as f:
            f.write(b"II*\0 not really a tiff")  # the listing reads no pixels; a non-empty file is enough


@SETTINGS
@given(rows=st.lists(st.tuples(ids, label_texts), max_size=12), extra=st.booleans(), encoding=encodings,
       newline=newlines, with_files=files, orphan=st.booleans())
def test_hcd_rows_are_items_or_rejects(rows, extra, encoding, newline, with_files, orphan):
    header = ["id", "label"] + (["note"] if extra else [])
    data = csv_bytes(header, [[i, t] + (["x,y"] if extra else []) for i, t in rows], encoding=encoding,
                     newline=newline)
    if data is None:
        return
    with tempfile.TemporaryDirectory() as root:
        orphans = ["orphan"] if orphan else []
        write_hcd(root, data, files=with_files, orphans=orphans)
        labels_csv = os.path.join(root, "train_labels.csv")
        try:
            listing = sources.list_hcd(root)
        except UsageError as e:
            assert_one_line_error(e, labels_csv)
            return
    assert_listing_accounts(listing)
    if not same_text(data, encoding):
        return
    items, conflicting, repeats = expected_items([r for r in rows if r[0]], num_classes=2, has_file=with_files.__contains__)
    assert {it.id: it.label for it in listing.train} == items
    rejected = {r["id"] for r in listing.rejects}
    assert {i for i, _ in rows if i} <= set(items) | rejected  # no row lost
    assert conflicting <= {r["id"] for r in listing.rejects if r["reason"] == "conflicting labels"}
    unnamed = set(orphans) | (set(with_files) - {i for i, _ in rows})  # image files without a label row
    assert unnamed == {r["id"] for r in listing.rejects if r["reason"] == "no label row"}
    assert listing.meta["inputs"] == len(rows) - repeats + len(unnamed)  # every row and file counted once
    stats = listing.meta["label_files"][labels_csv]
    assert stats["rows"] == len([r for r in rows if r[0]])


@SETTINGS
@given(bom=st.sampled_from(BOMS), header=st.sampled_from([b"", b"id,label\n", b"label,id\r\n", b"id\n", b"ID,Label\n"])
       | headers, body=st.binary(max_size=80))
def test_hcd_arbitrary_bytes_parse_or_fail_in_one_line(bom, header, body):
    with tempfile.TemporaryDirectory() as root:
        write_hcd(root, bom + header + body, files=SAFE_IDS)
        try:
            listing = sources.list_hcd(root)
        except UsageError as e:
            assert_one_line_error(e, "train_labels.csv")
            return
    assert_listing_accounts(listing)


# ---------------------------------------------------------------- Chaoyang: train.json / test.json

json_labels = st.one_of(st.integers(-2, 5), st.sampled_from(["1", "0", "x", "", None, True, False, 1.0, 2.5,
                                                             math.nan, math.inf, 10 ** 30]),
                        st.floats(allow_nan=True), st.text(max_size=3))


def write_chaoyang(root, train: bytes, *, files, test: bytes | None = None):
    os.makedirs(os.path.join(root, "train"))
    with open(os.path.join(root, "train.json"), "wb") as f:
        f.write(train)
    if test is not None:
        with open(os.path.join(root, "test.json"), "wb") as f:
            f.write(test)
    for name in files:
        with open(os.path.join(root, "train", name + ".JPG"), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")


@SETTINGS
@given(entries=st.lists(st.tuples(ids, json_labels, st.booleans()), max_size=12),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]), with_files=files)
def test_chaoyang_entries_are_items_or_rejects(entries, encoding, with_files):
    # the boolean drops the "label" key from the entry (a missing label is an invalid one)
    doc = [{"name": f"train/{i}.JPG", **({"label": v} if keep else {}), "extra": [1]} for i, v, keep in entries]
    data = json.dumps(doc, ensure_ascii=encoding == "utf-8").encode(encoding)
    with tempfile.TemporaryDirectory() as root:
        write_chaoyang(root, data, files=with_files)
        try:
            listing = sources.list_chaoyang(root)
        except UsageError as e:
            assert_one_line_error(e, "train.json")
            return
    assert_listing_accounts(listing)

    def spec(value):  # a JSON int or digit string; never a bool, float or null
        return int_label(value, 4) if isinstance(value, (int, str)) and not isinstance(value, bool) else None

    rows = [(stem(f"train/{i}.JPG"), spec(v) if keep else None, json.dumps(v if keep else None)) for i, v, keep in entries]
    items, conflicting, repeats = expected_items([(i, s if s is not None else "invalid:" + raw) for i, s, raw in rows], num_classes=4,
                                        has_file={f"train/{n}" for n in with_files}.__contains__)
    assert {it.id: it.label for it in listing.train} == items
    assert {i for i, _, _ in rows} <= set(items) | {r["id"] for r in listing.rejects}
    assert listing.meta["inputs"] == len(rows) - repeats
    assert conflicting <= {r["id"] for r in listing.rejects if r["reason"] == "conflicting labels"}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.sampled_from(["name", "label", "x"]), inner, max_size=3), max_leaves=12)


@SETTINGS
@given(doc=json_values, bom=st.sampled_from(BOMS), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_chaoyang_arbitrary_json_or_bytes_parse_or_fail_in_one_line(doc, bom, raw, use_raw):
    data = bom + (raw if use_raw else json.dumps(doc).encode())
    with tempfile.TemporaryDirectory() as root:
        write_chaoyang(root, b'[{"name": "train/a.JPG", "label": 1}]', files=SAFE_IDS, test=data)
        try:
            listing = sources.list_chaoyang(root)
        except UsageError as e:
            assert_one_line_error(e, "test.json")
            return
    assert_listing_accounts(listing)


# ---------------------------------------------------------------- the generic csv source

@SETTINGS
@given(rows=st.lists(st.tuples(ids, label_texts), max_size=12), encoding=encodings, newline=newlines,
       order=st.permutations(["path", "label", "group"]), with_files=files)
def test_csv_rows_are_items_or_rejects(rows, encoding, newline, order, with_files):
    cells = [{"path": f"{i}.png", "label": t, "group": "g"} for i, t in rows]
    data = csv_bytes(order, [[c[k] for k in order] for c in cells], encoding=encoding, newline=newline)
    if data is None:
        return
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "labels.csv"), "wb") as f:
            f.write(data)
        for name in with_files:
            with open(os.path.join(root, name + ".png"), "wb") as f:
                f.write(b"\x89PNG not really")
        try:
            listing = sources.list_csv(root, group_col="group")
        except UsageError as e:
            assert_one_line_error(e, "labels.csv")
            return
    assert_listing_accounts(listing)
    if not same_text(data, encoding):
        return
    # classes are the distinct non-empty label texts; a row's label must be one of them exactly as written
    index = {c: k for k, c in enumerate(listing.classes)}
    assert set(listing.classes) == {t.strip() for _, t in rows if t.strip()}
    # a row's id is its path, normalized, without the extension
    kept = [(stem(i + ".png"), str(index[t.strip()]) if t.strip() in index else t.strip()) for i, t in rows]
    items, conflicting, repeats = expected_items(kept, num_classes=len(index), has_file=with_files.__contains__)
    assert {it.id: it.label for it in listing.train} == items
    assert {i for i, _ in kept} <= set(items) | {r["id"] for r in listing.rejects}
    assert listing.meta["inputs"] == len(rows) - repeats
    assert conflicting <= {r["id"] for r in listing.rejects if r["reason"] == "conflicting labels"}


@SETTINGS
@given(bom=st.sampled_from(BOMS), header=st.sampled_from([b"", b"path,label\n", b"label\n", b"path,label,x\r\n"])
       | headers, body=st.binary(max_size=80))
def test_csv_arbitrary_bytes_parse_or_fail_in_one_line(bom, header, body):
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "labels.csv"), "wb") as f:
            f.write(bom + header + body)
        for name in SAFE_IDS:
            with open(os.path.join(root, name + ".png"), "wb") as f:
                f.write(b"\x89PNG not really")
        try:
            listing = sources.list_csv(root)
        except UsageError as e:
            assert_one_line_error(e, "labels.csv")
            return
    assert_listing_accounts(listing)


def test_a_newline_inside_a_quoted_header_cell_gives_a_one_line_error(tmp_path):
    """Found by the fuzz tests: the 'has no column' message listed the columns as written, so a quoted
    header cell holding a newline split the `error: ...` line in two."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train_labels.csv").write_text('"id\nx",label\na,1\n')
    with pytest.raises(UsageError, match="has no column id") as e:
        sources.list_hcd(str(tmp_path))
    assert_one_line_error(e.value, "train_labels.csv")
    assert "'id\\nx'" in str(e.value)  # the cell is shown escaped


def test_a_newline_inside_a_quoted_id_is_a_reject_not_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train_labels.csv").write_text('id,label\n"a\nb",1\n')
    listing = sources.list_hcd(str(tmp_path))
    assert listing.rejects == [{"id": "a\nb", "path": str(tmp_path / "train" / "a\nb.tif"), "reason": "missing file"}]


def test_a_chaoyang_entry_holding_a_newline_gives_a_one_line_error(tmp_path):
    """Found by the fuzz tests: the bad entry was quoted with str(), so "\r" or "\n" in it split the line."""
    write_chaoyang(str(tmp_path), b'["a\\nb"]', files=())
    with pytest.raises(UsageError, match='entry 0 .* has no string "name"') as e:
        sources.list_chaoyang(str(tmp_path))
    assert_one_line_error(e.value, "train.json")
