"""The dataset manifest: one object per tfrecords directory, loaded once per process, owning every fact
about the prepared data (classes, stored image size, resolution, encoding, stain normalization, shards
with their counts, sizes and sha256s, the test order) and the checks of the files on disk against it.

Readers never glob for shards: they take the manifest's list, and `check()` fails with one line
naming the missing, truncated or changed shard (and how to fix it) before training or predicting on
less data than was prepared. The JSON layout is in docs/design.md.
"""
from __future__ import annotations

import logging

from histofold import io, records
from histofold.errors import DataError, IntegrityError

log = logging.getLogger("histofold")

FILE = "manifest.json"
TEST_IDS = "test_ids.csv"
SAMPLE_SUB = "sample_submission.csv"
VERSION = 2
SPLITS = ("train", "test")

_CACHE: dict = {}   # normalised dir -> (mtime_ns, size, Manifest)


def prepare_hint(directory: str) -> str:
    return f"run `python prepare_tfrecords.py --input=<dataset> --out={directory}`"


class Manifest:
    """A prepared tfrecords directory. Build with `Manifest.load(dir)`."""

    def __init__(self, directory: str, data: dict, *, sha256: str):
        self.directory = io.normpath(directory)
        self.data = data
        self.sha256 = sha256

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, directory: str) -> "Manifest":
        """The manifest of `directory`, parsed once per process (reparsed only when the file changes)."""
        directory = io.normpath(str(directory))
        path = io.join(directory, FILE)
        if not io.exists(path):
            raise DataError(f"{path} not found: {prepare_hint(directory)}")
        stamp = (io.mtime_ns(path), io.size(path))
        cached = _CACHE.get(directory)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        raw = io.read_bytes(path)
        try:
            import json

            data = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); {prepare_hint(directory)} again") from None
        for key in ("classes", "image_size", "encoding", "shards", "folds"):
            if key not in data:
                raise DataError(f"{path} has no {key!r}: it was not written by this prepare_tfrecords.py; "
                                f"{prepare_hint(directory)} again")
        manifest = cls(directory, data, sha256=io.sha256_bytes(raw))
        _CACHE[directory] = (stamp, manifest)
        return manifest

    @property
    def path(self) -> str:
        return io.join(self.directory, FILE)

    # ------------------------------------------------------------ facts

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.data["classes"]]

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every stored record."""
        h, w = self.data["image_size"]
        return int(h), int(w)

    @property
    def encoding(self) -> str:
        enc = self.data["encoding"]
        if enc not in records.ENCODINGS:
            raise DataError(f"{self.path} has unknown encoding {enc!r}; {prepare_hint(self.directory)} again")
        return enc

    @property
    def n_folds(self) -> int:
        return int(self.data["folds"])

    @property
    def mpp(self) -> float | None:
        """Microns per pixel of the stored patches (PCam/Kaggle HCD: ~0.972), when known."""
        v = self.data.get("mpp")
        return None if v is None else float(v)

    @property
    def stain(self) -> dict | None:
        """The stain normalization every record went through ({"method", "params"}), or None."""
        s = self.data.get("stain")
        return None if not s or s.get("method", "none") == "none" else s

    @property
    def pixel_format(self) -> records.PixelFormat:
        """What a new image must go through to look like a record: resize to the stored size, stain."""
        return records.PixelFormat(size=self.image_size, stain=self.stain)

    @property
    def resized(self) -> bool:
        """True when prepare resized the images (so new inputs are resized to the stored size too)."""
        return bool((self.data.get("args") or {}).get("resize"))

    @property
    def test_labeled(self) -> bool:
        return bool(self.data.get("test_labeled"))

    @property
    def counts(self) -> dict:
        return self.data.get("counts", {})

    def class_counts(self, folds) -> list[int]:
        """Records per class (class index order) over the given training folds."""
        per_fold = self.counts.get("per_fold_class", {})
        out = []
        for c, name in enumerate(self.classes):
            out.append(sum(int(per_fold.get(str(f), {}).get(name, per_fold.get(str(f), {}).get(str(c), 0)))
                           for f in folds))
        return out

    # ------------------------------------------------------------ shards

    def shards(self, split: str = "train", folds=None) -> list[dict]:
        """Manifest entries of the split's shards (train: all folds, or only `folds`), in file order."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {', '.join(SPLITS)}")
        entries = [s for s in self.data["shards"] if s["split"] == split]
        if split == "test":
            return entries
        available = sorted({int(s["fold"]) for s in entries})
        wanted = set(available) if folds is None else {int(f) for f in folds}
        missing = sorted(wanted - set(available))
        if missing or not wanted:
            raise DataError(f"folds {missing or '[]'} have no shards in {self.path}; available folds: {available}")
        return [s for s in entries if int(s["fold"]) in wanted]

    def files(self, split: str = "train", folds=None) -> list[str]:
        return [io.join(self.directory, s["file"]) for s in self.shards(split, folds)]

    def count(self, split: str = "train", folds=None) -> int:
        return sum(int(s["count"]) for s in self.shards(split, folds))

    def check(self, split: str = "train", folds=None, *, hashes: bool = False) -> None:
        """Every listed shard is on disk with the name, count and size the manifest gives (and, with
        `hashes`, the same sha256): else IntegrityError naming the first bad shard and the fix."""
        fix = f"run `python prepare_tfrecords.py ... --out={self.directory}` again (it rewrites only bad shards)"
        for s in self.shards(split, folds):
            path = io.join(self.directory, s["file"])
            named = records.parse_shard_name(s["file"])
            if named is None or named["count"] != int(s["count"]):
                raise IntegrityError(f"{self.path} lists shard {s['file']} with count {s['count']}, which its "
                                     f"name contradicts; {fix}")
            if not io.exists(path):
                raise IntegrityError(f"shard {path} is missing ({s['count']} records of the {split} split); {fix}")
            if "bytes" in s and io.size(path) != int(s["bytes"]):
                raise IntegrityError(f"shard {path} has {io.size(path)} bytes, the manifest says {s['bytes']}: "
                                     f"truncated or replaced; {fix}")
            if hashes and io.sha256(path) != s["sha256"]:
                raise IntegrityError(f"shard {path} does not match its sha256 in the manifest: corrupted; {fix}")

    def test_ids(self) -> list[str]:
        """Ids of the test records in test-shard order (test_ids.csv)."""
        path = io.join(self.directory, TEST_IDS)
        if not io.exists(path):
            raise IntegrityError(f"{path} is missing: {prepare_hint(self.directory)} again")
        return io.read_csv(path, dtype={"id": str})["id"].tolist()

    def with_slides(self, frame, split: str = "train", folds=None):
        """`frame` (id-keyed predictions) with a `slide` column after `label` when this dataset's records
        are whole-slide tiles (--source=slides: a tile's group is its slide); unchanged otherwise."""
        if self.data.get("source") != "slides" or "slide" in frame:
            return frame
        slide_of = records.read_tile_slides(self.files(split, folds))
        frame = frame.copy()
        frame.insert(list(frame.columns).index("label") + 1, "slide", frame["id"].astype(str).map(slide_of))
        return frame

    def sample_submission(self) -> str | None:
        """Path of the dataset's sample_submission.csv copy, or None."""
        name = self.data.get("sample_submission")
        return io.join(self.directory, name) if name else None

    def verify(self) -> dict:
        """Deep check (prepare --verify): sha256, counts (name, manifest, records), every folds.csv id exactly
        once in its fold, test ids in test_ids.csv order, every image decodes at the stored size.

        Returns {"shards", "records", "ok": True}; raises IntegrityError naming every problem found."""
        problems, seen, test_order = [], {}, []
        for shard in self.data["shards"]:
            path = io.join(self.directory, shard["file"])
            if not io.exists(path):
                problems.append(f"{shard['file']}: missing")
                continue
            if io.sha256(path) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 differs from the manifest")
            try:
                rows = records.read_shard(path, self.encoding)
            except Exception as e:  # noqa: BLE001 - any TF read/decode error is a problem to report
                problems.append(f"{shard['file']}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            named = records.parse_shard_name(shard["file"])["count"]
            if not len(rows) == named == int(shard["count"]):
                problems.append(f"{shard['file']}: {len(rows)} records, name says {named}, manifest {shard['count']}")
            for r in rows:
                if (r["height"], r["width"]) != self.image_size:
                    problems.append(f"{shard['file']}: record {r['id']} decodes to {r['height']}x{r['width']}, "
                                    f"manifest says {list(self.image_size)}")
                if r["fold"] != int(shard["fold"]):
                    problems.append(f"{shard['file']}: record {r['id']} has fold {r['fold']}, shard is fold {shard['fold']}")
                seen.setdefault(r["id"], []).append(int(shard["fold"]))
                if shard["split"] == "test":
                    test_order.append(r["id"])
        folds_df = io.read_csv(self.data["folds_csv"], dtype={"id": str}) if self.data.get("folds_csv") else None
        test_ids = self.test_ids()
        expected = {} if folds_df is None else dict(zip(folds_df["id"], folds_df["fold"].astype(int)))
        expected.update({i: -1 for i in test_ids})
        for rid, folds in seen.items():
            if len(folds) > 1 or expected.get(rid) != folds[0]:
                problems.append(f"id {rid}: in folds {folds}, expected once in fold {expected.get(rid)}")
        missing = [i for i in expected if i not in seen]
        if missing:
            problems.append(f"{len(missing)} ids of folds.csv/test_ids.csv are in no shard (e.g. {missing[0]})")
        if test_order and test_order != test_ids:
            problems.append(f"test records are not in {TEST_IDS} order")
        if problems:
            raise IntegrityError(f"verify {self.directory}: {len(problems)} problems:\n  " + "\n  ".join(problems[:20]))
        n = sum(len(v) for v in seen.values())
        log.info("verify %s: %d shards, %d records: ok", self.directory, len(self.data["shards"]), n)
        return {"shards": len(self.data["shards"]), "records": n, "ok": True}

    def read_records(self, *, split: str | None = None) -> list[dict]:
        """Every record (with its uint8 image) of the directory, shard by shard; for tests and checks."""
        rows = []
        for shard in self.data["shards"]:
            if split is not None and shard["split"] != split:
                continue
            for r in records.read_shard(io.join(self.directory, shard["file"]), self.encoding, images=True):
                rows.append({**r, "shard": shard["file"]})
        return rows
