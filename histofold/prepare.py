"""The data stage: list a dataset, QC every image, decide folds once, write resumable k-fold TFRecord shards.

    listing  -> pass 1 (worker pool: load, SHA-1, d4-pHash, blank, shape, encode)
             -> QC (rejects, duplicate clusters -> groups) -> folds/folds.csv (decided once)
             -> shard plan (deterministic) -> pass 2 (encode in workers, write in the parent)
             -> tfrecords/manifest.json, test_ids.csv [, sample_submission.csv]

Every input ends up either written or in folds/rejects.csv (id, path, reason): inputs = written +
rejected always holds. Duplicates are kept and grouped (a cluster never straddles folds); `dedupe`
keeps one image per exact-duplicate cluster instead. Test images are never dropped, only reported.

Encoding "auto" (figures measured on 96x96 H&E patches, 1 CPU core):
    raw   27.6 KB/img, encode 0 ms, decode free     -> chosen for images <= 128 px (lossless, fastest;
                                                       Kaggle HCD 220k train: ~6.1 GB)
    png   24.5 KB/img (-11%), encode 0.27 ms/img     -> lossless, a PNG decode every epoch for 11% less
                                                       disk (FAST_PNG: Up filter + Huffman-only deflate;
                                                       Pillow's level 1: 22.6 KB but 1.1 ms/img)
    jpeg   8.2 KB/img (q95, 4:4:4), encode 0.1 ms    -> chosen above 128 px (LC25000 768 px: raw would
                                                       be 1.7 MB/img; jpeg q95 keeps nuclei texture)
Pass 1 keeps the encoded bytes in memory when the estimate is under `cache_mb` (default 2000 MB), so
small and medium datasets are decoded once; larger ones are re-loaded in pass 2.

Resuming: the shard plan (which ids go into which shard) is fixed before writing; every shard is
written to `.<name>.tmp` and renamed when complete, and `.progress.json` records each finished
shard's sha256. A rerun of the same command skips finished shards, so an interrupted run completes
with no record duplicated, and a rerun of a complete directory is a no-op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from histofold import imageio, qc, records, sources

log = logging.getLogger("histofold")

AUTO_RAW_MAX = 128       # px: images up to this side are stored raw by encoding="auto"
RECORD_OVERHEAD = 160    # bytes of tf.train.Example framing per record beyond the image bytes
SAMPLE = 32              # images encoded in the parent to pick the encoding and estimate sizes
CHUNK = 64               # images per worker task: amortises IPC over many images
NEAR_DUP_BITS = 4        # default Hamming radius of near duplicates (64-bit d4-pHash)
MANIFEST, PROGRESS, TEST_IDS, SAMPLE_SUB = "manifest.json", ".progress.json", "test_ids.csv", "sample_submission.csv"


@dataclass(frozen=True)
class PrepareConfig:
    """Every prepare setting; see prepare_tfrecords.py's docstring for each flag's meaning."""

    source: str = "synthetic"
    input: str | None = None
    out: str = "tfrecords"
    folds_dir: str = "folds"
    folds: int = 5
    seed: int = 42
    encoding: str = "auto"
    jpeg_quality: int = 95
    size: int | None = None
    shard_mb: float = 100.0
    workers: int | None = None
    drop_blank: bool = False
    near_dup: bool | int = True      # True: NEAR_DUP_BITS, int: Hamming radius, False: exact only
    dedupe: bool = False
    verify: bool = False
    overwrite: bool = False
    cache_mb: float = 2000.0         # keep pass-1 encodings in memory below this estimate
    holdout: float = 0.0             # fraction of labeled images held out as a labeled test set
    source_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.encoding not in ("auto",) + records.ENCODINGS:
            raise ValueError(f"--encoding={self.encoding!r}: choose auto, {', '.join(records.ENCODINGS)}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"--jpeg_quality={self.jpeg_quality}: must be 1..100")
        if self.size is not None and int(self.size) < 1:
            raise ValueError(f"--size={self.size}: must be a positive number of pixels")
        if not float(self.shard_mb) > 0:
            raise ValueError(f"--shard_mb={self.shard_mb}: must be > 0")
        if int(self.folds) < 2:
            raise ValueError(f"--folds={self.folds}: need at least 2 folds")
        if self.workers is not None and int(self.workers) < 1:
            raise ValueError(f"--workers={self.workers}: must be >= 1 (or omit it for all cores)")

    @property
    def near_bits(self) -> int | None:
        """Hamming radius for near duplicates, None when disabled."""
        if self.near_dup is True:
            return NEAR_DUP_BITS
        if self.near_dup is False or self.near_dup is None:
            return None
        return int(self.near_dup)

    def args(self) -> dict:
        """JSON-able record of every setting (manifest["args"])."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# ---------------------------------------------------------------- gfile helpers (gs:// or local)

def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _join(*parts: str) -> str:
    return posixpath.join(*parts) if str(parts[0]).startswith("gs://") else os.path.join(*parts)


def _write_bytes(path: str, data: bytes) -> None:
    """Write via a temp name then rename, so readers never see a half-written file."""
    d, name = os.path.split(path) if not path.startswith("gs://") else posixpath.split(path)
    tmp = _join(d, f".{name}.tmp")
    with _gfile().GFile(tmp, "wb") as f:
        f.write(data)
    _gfile().rename(tmp, path, overwrite=True)


def _write_csv(path: str, df) -> None:
    _write_bytes(path, df.to_csv(index=False).encode())


def _read_json(path: str) -> dict | None:
    if not _gfile().exists(path):
        return None
    with _gfile().GFile(path, "rb") as f:
        return json.loads(f.read())


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    # local files through open(): tf.io.gfile reads the page cache ~10x slower (0.55 s per 80 MB)
    with (_gfile().GFile(path, "rb") if path.startswith("gs://") else open(path, "rb")) as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- listing

def list_source(config: PrepareConfig) -> sources.Listing:
    """The adapter's listing; an option the adapter does not take is an error listing those it does."""
    source = sources.get_source(config.source)
    valid = list(getattr(source, "options", None) or [])
    unknown = [k for k in config.source_options if k not in valid]
    if unknown:
        raise ValueError(f"--{unknown[0]} is not an option of source {config.source!r}; its options: "
                         + (", ".join(f"--{n}" for n in valid) or "none"))
    return source.list(config.input, **config.source_options)


# ---------------------------------------------------------------- worker side (no TensorFlow)

FAST_PNG = True  # png records via imageio.encode_png (4x faster, ~8% larger than Pillow's; same pixels)


def encode(image: np.ndarray, encoding: str, quality: int) -> bytes:
    """The record bytes of one image (records.encode_image, except png: see FAST_PNG)."""
    if encoding == "png" and FAST_PNG:
        return imageio.encode_png(image)
    return records.encode_image(image, encoding, quality)


def _scan_chunk(task: tuple) -> list[tuple]:
    """Worker: load, QC-scan and (when `keep`) encode each ref -> (scan dict | None, bytes | None, error)."""
    refs, size, encoding, quality, keep = task
    out = []
    for ref in refs:
        try:
            image = imageio.load_ref(ref, size=size)
        except sources.ImageError as e:
            out.append((None, None, str(e)))
            continue
        data = encode(image, encoding, quality) if keep else None
        out.append((qc.scan_image(image), data, None))
    return out


def _encode_chunk(task: tuple) -> list[bytes]:
    """Worker: load and encode each ref (pass 2, when pass 1 did not keep the bytes)."""
    refs, size, encoding, quality = task
    return [encode(imageio.load_ref(ref, size=size), encoding, quality) for ref in refs]


def _chunks(seq: list, n: int) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def _imap(pool, fn, tasks):
    """pool.imap when there is a pool, else the same in-process (tiny datasets: no spawn cost)."""
    return pool.imap(fn, tasks) if pool is not None else map(fn, tasks)


def _make_pool(workers: int, n_items: int):
    """A worker pool, or None for 1 worker or a tiny dataset.

    Fork when the parent has not imported TensorFlow (the prepare_tfrecords.py command: TensorFlow is
    first imported after pass 1), so workers start in ~0.05 s with numpy/Pillow already loaded; spawn
    when it has (TensorFlow is not fork-safe), where each worker pays ~0.35 s of imports.
    """
    if workers <= 1 or n_items < 4 * CHUNK:
        return None
    return multiprocessing.get_context(_start_method()).Pool(workers, initializer=_warm_worker)


def _start_method() -> str:
    """"fork" while TensorFlow is not imported (and the platform forks), else "spawn"."""
    fork_ok = "tensorflow" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    return "fork" if fork_ok else "spawn"


def _warm_worker() -> None:
    """Pool initializer: import what the tasks use while the parent is still listing and sampling."""
    import PIL.PngImagePlugin  # noqa: F401  (png encoding)
    import PIL.TiffImagePlugin  # noqa: F401  (non-plain TIFFs)


# ---------------------------------------------------------------- pass 1

def pick_encoding(config: PrepareConfig, items: list[sources.Item]) -> tuple[str, tuple, float]:
    """(encoding, sample image (H, W), estimated bytes/record) from the first loadable images.

    "auto": raw up to AUTO_RAW_MAX px, jpeg above (see the module docstring for the figures).
    """
    shape, sizes = None, []
    for item in items[: 4 * SAMPLE]:
        try:
            image = imageio.load_ref(item.ref, size=config.size)
        except sources.ImageError:
            continue
        shape = shape or image.shape[:2]
        if config.encoding == "auto":
            encoding = "raw" if max(shape) <= AUTO_RAW_MAX else "jpeg"
        else:
            encoding = config.encoding
        sizes.append(len(encode(image, encoding, config.jpeg_quality)))
        if len(sizes) >= SAMPLE:
            break
    if shape is None:
        raise ValueError(f"none of the first {min(len(items), 4 * SAMPLE)} images of --input="
                         f"{config.input} could be read; check the path and the --source")
    return encoding, tuple(int(s) for s in shape), float(np.mean(sizes)) + RECORD_OVERHEAD


def scan(items: list[sources.Item], *, config: PrepareConfig, encoding: str, keep: bool, pool) -> list:
    """Pass 1 over every item, in order: (scan dict | None, encoded bytes | None, error | None)."""
    from tqdm import tqdm

    tasks = [([it.ref for it in c], config.size, encoding, config.jpeg_quality, keep)
             for c in _chunks(items, CHUNK)]
    results = []
    with tqdm(total=len(items), desc="pass 1: load + QC", unit="img", mininterval=2) as bar:
        for chunk in _imap(pool, _scan_chunk, tasks):
            results.extend(chunk)
            bar.update(len(chunk))
    return results


# ---------------------------------------------------------------- QC -> kept items, rejects, groups

@dataclass
class Screened:
    """The outcome of QC: items kept (train then test, listing order) with their facts, and rejects."""

    items: list
    scans: list
    data: list
    rejects: list
    duplicates: object  # DataFrame (qc.duplicates_table)
    groups: dict        # train id -> merged group name
    blank_ids: set


def screen(listing: sources.Listing, items: list, results: list, *, config: PrepareConfig,
           shape: tuple | None) -> Screened:
    """Apply the reject rules (unreadable, duplicate id, size, blank, dedupe) and cluster duplicates."""
    rejects = [dict(r) for r in listing.rejects]
    shapes = Counter(r[0]["shape"] for r in results if r[0] is not None)
    target = tuple(shape) if config.size is not None else (shapes.most_common(1)[0][0] if shapes else None)
    keep, seen = [], {}
    for k, (item, (facts, _, error)) in enumerate(zip(items, results)):
        reason = None
        if error is not None:
            reason = error
        elif item.id in seen:
            reason = f"duplicate id (first at {seen[item.id]})"
        elif facts["shape"] != target:
            reason = (f"size {facts['shape'][0]}x{facts['shape'][1]} differs from dataset size "
                      f"{target[0]}x{target[1]}; pass --size=N to resize")
        elif config.drop_blank and facts["blank"] and item.split == "train":
            reason = "blank patch"
        if reason is None:
            seen[item.id] = item.path or item.id
            keep.append(k)
        else:
            rejects.append({"id": item.id, "path": item.path, "reason": reason})
    if config.dedupe:
        keep = _dedupe(items, results, keep, rejects)
    kept = [items[k] for k in keep]
    scans = [results[k][0] for k in keep]
    cluster, exact = qc.duplicate_clusters(
        [s["sha1"] for s in scans], np.array([s["phash"] for s in scans], np.uint64),
        near_bits=config.near_bits, near_mask=~np.array([s["blank"] for s in scans], bool))
    dups = qc.duplicates_table(ids=[it.id for it in kept], labels=[it.label for it in kept],
                               splits=[it.split for it in kept], cluster=cluster, exact=exact)
    train = [k for k, it in enumerate(kept) if it.split == "train"]
    merged = qc.merge_groups([kept[k].group for k in train], cluster[train], [kept[k].id for k in train])
    return Screened(items=kept, scans=scans, data=[results[k][1] for k in keep], rejects=rejects,
                    duplicates=dups, groups={kept[k].id: g for k, g in zip(train, merged)},
                    blank_ids={it.id for it, s in zip(kept, scans) if s["blank"]})


def _dedupe(items: list, results: list, keep: list, rejects: list) -> list:
    """Keep the first train image of each exact-duplicate cluster; later copies become rejects."""
    first, out = {}, []
    for k in keep:
        item, sha = items[k], results[k][0]["sha1"]
        if item.split == "train" and sha in first:
            rejects.append({"id": item.id, "path": item.path, "reason": f"exact duplicate of {first[sha]}"})
            continue
        if item.split == "train":
            first[sha] = item.id
        out.append(k)
    return out


# ---------------------------------------------------------------- folds (decided once)

def hold_out(screened: Screened, *, config: PrepareConfig) -> None:
    """Move a stratified, grouped `holdout` fraction of the labeled images to a labeled test set.

    For datasets without a test set (CRC-VAL-HE-7K, seed 001's 80/20 and seed 003's 90/10 splits):
    the held-out part never shares a slide/patient/duplicate group with the folds.
    """
    from histofold.folds import assign_folds

    if not 0 < config.holdout < 1:
        raise ValueError(f"--holdout={config.holdout}: pass a fraction between 0 and 1, e.g. 0.2")
    if any(it.split == "test" for it in screened.items):
        raise ValueError("--holdout: this dataset already has a test set; drop --holdout (or the test input)")
    train = [k for k, it in enumerate(screened.items) if it.split == "train"]
    labels = np.array([screened.items[k].label for k in train])
    groups = np.array([screened.groups[screened.items[k].id] for k in train])
    parts = max(2, round(1 / config.holdout))  # the held-out part is one of `parts` grouped folds
    part = assign_folds(labels, groups, n_folds=parts, seed=config.seed + 1)
    for k, p in zip(train, part):
        if p == 0:
            screened.items[k] = dataclasses.replace(screened.items[k], split="test")
    log.info("holdout: %d of %d labeled images held out as the test set (grouped, stratified)",
             int((part == 0).sum()), len(train))


def decide_folds(screened: Screened, listing: sources.Listing, *, config: PrepareConfig):
    """folds.csv frame (id, label, fold, group, source, class, blank): reused when the same inputs,
    seed and fold count produced it before; a different one on disk needs --overwrite."""
    import pandas as pd

    from histofold.folds import assign_folds

    train = [it for it in screened.items if it.split == "train"]
    df = pd.DataFrame({"id": [it.id for it in train], "label": [int(it.label) for it in train],
                       "group": [screened.groups[it.id] for it in train]})
    bad = df[(df["label"] < 0) | (df["label"] >= len(listing.classes))]
    if len(bad):
        raise ValueError(f"train item {bad['id'].iloc[0]} has label {bad['label'].iloc[0]} outside "
                         f"0..{len(listing.classes) - 1} ({listing.classes}); fix the source listing")
    path, meta_path = _join(config.folds_dir, "folds.csv"), _join(config.folds_dir, "folds_meta.json")
    meta = {"seed": int(config.seed), "folds": int(config.folds), "n": len(df),
            "key": _frame_key(df[["id", "label", "group"]])}
    old = _read_json(meta_path)
    if old == meta and _gfile().exists(path):
        with _gfile().GFile(path, "rb") as f:
            prev = pd.read_csv(io.BytesIO(f.read()), dtype={"id": str, "group": str})
        log.info("folds: reusing %s (same ids, labels, groups, seed and fold count)", path)
        return prev, False
    if _gfile().exists(path) and not config.overwrite:
        raise ValueError(f"{path} exists but was made from different ids/labels/groups, seed or fold "
                         "count; pass --overwrite to decide the folds anew (and rewrite the shards)")
    df["fold"] = assign_folds(df["label"].to_numpy(), df["group"].to_numpy(), n_folds=config.folds,
                              seed=config.seed)
    df["source"] = [it.path for it in train]
    df["class"] = [listing.classes[k] for k in df["label"]]
    df["blank"] = [it.id in screened.blank_ids for it in train]
    df = df[["id", "label", "fold", "group", "source", "class", "blank"]]
    _gfile().makedirs(config.folds_dir)
    _write_csv(path, df)
    _write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    return df, True


def _frame_key(df) -> str:
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()


# ---------------------------------------------------------------- shard plan + pass 2

def plan_shards(folds_df, test_ids: list[str], *, n_folds: int, per_shard: int) -> list[dict]:
    """Deterministic shard list: each fold's ids in folds.csv order, then test ids in listing order.

    Returns [{"file", "split", "fold", "ids"}], `per_shard` records each (the last of a set holds the rest).
    """
    plan = []
    sets = [(f"fold{k}", "train", k, folds_df.loc[folds_df["fold"] == k, "id"].tolist()) for k in range(n_folds)]
    sets.append(("test", "test", -1, list(test_ids)))
    for prefix, split, fold, ids in sets:
        for i, part in enumerate(_chunks(ids, per_shard)):
            plan.append({"file": records.shard_name(prefix, i, len(part)), "split": split, "fold": fold,
                         "ids": part})
    return plan


def _plan_key(plan: list[dict], *, encoding: str, config: PrepareConfig, shape: tuple) -> str:
    """Hash of everything that determines the shards' bytes: resume only when it matches."""
    blob = json.dumps({"plan": [(p["file"], p["ids"]) for p in plan], "encoding": encoding,
                       "quality": int(config.jpeg_quality), "size": config.size, "shape": list(shape),
                       "source": config.source, "input": config.input, "options": config.args()["source_options"]})
    return hashlib.sha256(blob.encode()).hexdigest()


def _clear_stale(out: str, plan: list[dict], progress: dict | None, key: str, *, overwrite: bool) -> dict:
    """Drop temp files; keep finished shards of this same plan; other shards need --overwrite."""
    gf = _gfile()
    planned = {p["file"] for p in plan}
    names = gf.listdir(out) if gf.exists(out) else []
    same = progress is not None and progress.get("plan") == key
    for name in names:
        if name.endswith(".tmp") and name.startswith("."):
            gf.remove(_join(out, name))
    stale = [n for n in names if records.parse_shard_name(n) and not (same and n in planned)]
    if stale and not overwrite:
        raise ValueError(f"{out} holds shards from a different run ({stale[0]}, ... {len(stale)} files); "
                         "pass --overwrite to replace them or choose another --out")
    for name in stale:
        gf.remove(_join(out, name))
    return dict(progress.get("done", {})) if same else {}


def write_shards(plan: list[dict], *, screened: Screened, folds_df, config: PrepareConfig, encoding: str,
                 shape: tuple, pool, on_shard=None) -> tuple[list[dict], int]:
    """Pass 2: write every planned shard not already finished. Returns (manifest shard entries, written)."""
    from tqdm import tqdm

    out = config.out
    key = _plan_key(plan, encoding=encoding, config=config, shape=shape)
    progress_path = _join(out, PROGRESS)
    done = _clear_stale(out, plan, _read_json(progress_path), key, overwrite=config.overwrite)
    todo = [p for p in plan if not (p["file"] in done and _gfile().exists(_join(out, p["file"]))
                                    and _sha256_file(_join(out, p["file"])) == done[p["file"]])]
    by_id = {it.id: k for k, it in enumerate(screened.items)}
    fold_of = dict(zip(folds_df["id"], folds_df["fold"])) if len(folds_df) else {}
    group_of = dict(zip(folds_df["id"], folds_df["group"].astype(str))) if len(folds_df) else {}
    encoded = _encoded_stream(todo, screened=screened, by_id=by_id, config=config, encoding=encoding, pool=pool)
    with tqdm(total=sum(len(p["ids"]) for p in todo), desc="pass 2: write shards", unit="img",
              mininterval=2) as bar:
        for shard in todo:
            done[shard["file"]] = _write_one(shard, encoded, screened=screened, by_id=by_id, out=out,
                                             fold_of=fold_of, group_of=group_of, encoding=encoding, shape=shape)
            _write_bytes(progress_path, json.dumps({"plan": key, "done": done}).encode())
            bar.update(len(shard["ids"]))
            if on_shard is not None:
                on_shard(shard["file"])  # test hook (simulates a crash after N shards)
    entries = [{"file": p["file"], "split": p["split"], "fold": p["fold"], "count": len(p["ids"]),
                "sha256": done[p["file"]]} for p in plan]
    return entries, len(todo)


def _encoded_stream(todo: list[dict], *, screened: Screened, by_id: dict, config: PrepareConfig,
                    encoding: str, pool):
    """Encoded bytes of every record of `todo`, in plan order: from the pass-1 cache or the pool."""
    ids = [i for p in todo for i in p["ids"]]
    if all(screened.data[by_id[i]] is not None for i in ids):
        return (screened.data[by_id[i]] for i in ids)
    tasks = [([screened.items[by_id[i]].ref for i in c], config.size, encoding, config.jpeg_quality)
             for c in _chunks(ids, CHUNK)]
    return (data for chunk in _imap(pool, _encode_chunk, tasks) for data in chunk)


def _write_one(shard: dict, encoded, *, screened: Screened, by_id: dict, out: str, fold_of: dict,
               group_of: dict, encoding: str, shape: tuple) -> str:
    """Write one shard to `.<name>.tmp`, rename it to its final name; returns its sha256."""
    import tensorflow as tf

    final, tmp = _join(out, shard["file"]), _join(out, f".{shard['file']}.tmp")
    with tf.io.TFRecordWriter(tmp) as writer:
        for record_id in shard["ids"]:
            item = screened.items[by_id[record_id]]
            writer.write(records.serialize(
                image=next(encoded), encoding=encoding, height=shape[0], width=shape[1],
                label=int(item.label), id=item.id, fold=int(fold_of.get(item.id, -1)),
                group=group_of.get(item.id, "")))
    digest = _sha256_file(tmp)
    tf.io.gfile.rename(tmp, final, overwrite=True)
    return digest


# ---------------------------------------------------------------- manifest, reports, summary

def _counts(folds_df, test_ids: list, *, inputs: int, rejected: int, classes: list[str]) -> dict:
    per_fold = folds_df.groupby("fold").size()
    per_fold_class = {str(k): {classes[int(c)]: int(n) for c, n in g.groupby("label").size().items()}
                      for k, g in folds_df.groupby("fold")}
    written = len(folds_df) + len(test_ids)
    return {"inputs": inputs, "written": written, "rejected": rejected, "train": len(folds_df),
            "test": len(test_ids), "per_fold": {str(k): int(n) for k, n in per_fold.items()},
            "per_fold_class": per_fold_class}


def write_reports(screened: Screened, *, config: PrepareConfig) -> None:
    """rejects.csv (always, header when empty) and duplicates.csv in the folds dir."""
    import pandas as pd

    _gfile().makedirs(config.folds_dir)
    rejects = pd.DataFrame(screened.rejects, columns=["id", "path", "reason"])
    _write_csv(_join(config.folds_dir, "rejects.csv"), rejects)
    _write_csv(_join(config.folds_dir, "duplicates.csv"), screened.duplicates)


def _abs(path: str) -> str:
    return path if path.startswith("gs://") else os.path.abspath(path)


def write_manifest(*, config: PrepareConfig, listing: sources.Listing, shards: list[dict], counts: dict,
                   encoding: str, shape: tuple, test_items: list) -> dict:
    """manifest.json (docs/design.md), test_ids.csv and the sample_submission.csv copy."""
    import pandas as pd

    out = config.out
    sub = SAMPLE_SUB if listing.sample_submission else None
    folds_csv = _join(config.folds_dir, "folds.csv")
    manifest = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": config.source, "input": _abs(config.input) if config.input else None, "args": config.args(),
        "classes": list(listing.classes), "num_classes": len(listing.classes), "image_size": list(shape),
        "encoding": encoding, "jpeg_quality": int(config.jpeg_quality), "folds": int(config.folds),
        "seed": int(config.seed), "shards": shards, "counts": counts,
        "test_labeled": any(it.label >= 0 for it in test_items), "sample_submission": sub,
        "folds_csv": _abs(folds_csv), "folds_csv_sha256": _sha256_file(folds_csv),
    }
    if listing.meta:
        manifest["meta"] = json.loads(json.dumps(listing.meta, default=str))
    old = _read_json(_join(out, MANIFEST))
    side = [_join(out, TEST_IDS)] + ([_join(out, SAMPLE_SUB)] if sub else [])
    if (old is not None and {**old, "created": None} == {**manifest, "created": None}
            and all(_gfile().exists(p) for p in side)):
        return old  # a rerun of a complete directory leaves it untouched
    _write_csv(side[0], pd.DataFrame({"id": [it.id for it in test_items],
                                      "label": [int(it.label) for it in test_items]}))
    if sub:
        with _gfile().GFile(listing.sample_submission, "rb") as f:
            _write_bytes(side[1], f.read())
    _write_bytes(_join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _summarise(manifest: dict, screened_info: dict, *, config: PrepareConfig, seconds: float,
               shards_written: int) -> dict:
    c = manifest["counts"]
    return {"inputs": c["inputs"], "written": c["written"], "rejected": c["rejected"], "train": c["train"],
            "test": c["test"], "folds": manifest["folds"], "classes": manifest["classes"],
            "image_size": manifest["image_size"], "encoding": manifest["encoding"], **screened_info,
            "shards": len(manifest["shards"]), "shards_written": shards_written,
            "seconds": round(seconds, 2), "img_per_s": round(c["inputs"] / max(seconds, 1e-9), 1),
            "manifest": _join(config.out, MANIFEST), "folds_csv": _join(config.folds_dir, "folds.csv"),
            "rejects_csv": _join(config.folds_dir, "rejects.csv")}


def _log_tables(folds_df, summary: dict, classes: list[str]) -> None:
    from histofold.folds import class_balance

    table = class_balance(folds_df, classes=classes)
    _write_csv(summary["class_balance_csv"], table.reset_index())
    log.info("per-fold class balance:\n%s", table.to_string())
    log.info("%d inputs = %d written + %d rejected | duplicates: %d exact, %d near images, %d label "
             "conflicts | blank: %d", summary["inputs"], summary["written"], summary["rejected"],
             summary["duplicates_exact"], summary["duplicates_near"], summary["duplicate_conflicts"],
             summary["blank"])
    log.info("wrote %s, %s, %s, %s", summary["manifest"], summary["folds_csv"], summary["class_balance_csv"],
             summary["rejects_csv"])


# ---------------------------------------------------------------- the stage

def prepare(config: PrepareConfig, *, on_shard=None) -> dict:
    """Run the whole data stage (see the module docstring); returns the summary dict.

    `on_shard(file)` is called after each shard is finished (tests use it to simulate a crash).
    """
    start = time.time()
    listing = list_source(config)
    items = list(listing.train) + list(listing.test)
    if not listing.train:
        raise ValueError(f"source {config.source!r} listed no training images under --input={config.input}")
    workers = int(config.workers or len(os.sched_getaffinity(0)))
    pool = _make_pool(workers, len(items))  # spawn now: the workers start up while the parent samples
    try:
        encoding, shape, per_record = pick_encoding(config, items)
        keep = per_record * len(items) < config.cache_mb * 1e6
        log.info("%d images (%d train, %d test, %d rejected while listing); encoding %s, ~%.1f KB/record; "
                 "%d workers", len(items), len(listing.train), len(listing.test), len(listing.rejects),
                 encoding, per_record / 1e3, workers)
        results = scan(items, config=config, encoding=encoding, keep=keep, pool=pool)
        screened = screen(listing, items, results, config=config,
                          shape=(config.size, config.size) if config.size else None)
        del results
        if config.holdout:
            hold_out(screened, config=config)
        shape = (int(config.size), int(config.size)) if config.size else _kept_shape(screened)
        write_reports(screened, config=config)
        folds_df, _ = decide_folds(screened, listing, config=config)
        test_items = [it for it in screened.items if it.split == "test"]
        per_shard = max(1, int(config.shard_mb * 1e6 // per_record))
        plan = plan_shards(folds_df, [it.id for it in test_items], n_folds=config.folds, per_shard=per_shard)
        _gfile().makedirs(config.out)
        shards, n_written = write_shards(plan, screened=screened, folds_df=folds_df, config=config,
                                         encoding=encoding, shape=shape, pool=pool, on_shard=on_shard)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    counts = _counts(folds_df, test_items, inputs=len(items) + len(listing.rejects),
                     rejected=len(screened.rejects), classes=listing.classes)
    assert counts["inputs"] == counts["written"] + counts["rejected"], counts  # every input accounted for
    manifest = write_manifest(config=config, listing=listing, shards=shards, counts=counts, encoding=encoding,
                              shape=shape, test_items=test_items)
    dups = screened.duplicates
    info = {"duplicates_exact": int((dups["kind"] == "exact").sum()) if len(dups) else 0,
            "duplicates_near": int((dups["kind"] == "near").sum()) if len(dups) else 0,
            "duplicate_conflicts": int(dups.loc[dups["conflict"], "cluster"].nunique()) if len(dups) else 0,
            "blank": len(screened.blank_ids)}
    summary = _summarise(manifest, info, config=config, seconds=time.time() - start, shards_written=n_written)
    summary["class_balance_csv"] = _join(config.folds_dir, "class_balance.csv")
    _log_tables(folds_df, summary, listing.classes)
    if config.verify:
        summary["verify"] = verify_tfrecords(config.out)
    return summary


def _kept_shape(screened: Screened) -> tuple:
    if not screened.scans:
        raise ValueError("every image was rejected; see the rejects.csv in --folds_dir for the reasons")
    return tuple(int(s) for s in screened.scans[0]["shape"])


# ---------------------------------------------------------------- verify

def verify_tfrecords(out_dir: str) -> dict:
    """Re-read every shard of `out_dir`: sha256, counts (name, manifest, records), every folds.csv id
    exactly once in its fold, test ids in test_ids.csv order, every image decodes at the manifest size.

    Returns {"shards", "records", "ok": True}; raises ValueError naming every problem found.
    """
    import pandas as pd
    import tensorflow as tf

    manifest = _read_json(_join(out_dir, MANIFEST))
    if manifest is None:
        raise ValueError(f"{_join(out_dir, MANIFEST)} not found; run prepare_tfrecords.py first")
    problems, seen = [], {}
    for shard in manifest["shards"]:
        path = _join(out_dir, shard["file"])
        if not tf.io.gfile.exists(path):
            problems.append(f"{shard['file']}: missing")
            continue
        if _sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest")
        rows = _read_shard(path, manifest["encoding"])
        named = records.parse_shard_name(shard["file"])["count"]
        if not len(rows) == named == shard["count"]:
            problems.append(f"{shard['file']}: {len(rows)} records, name says {named}, manifest {shard['count']}")
        for rid, fold, h, w in rows:
            if (h, w) != tuple(manifest["image_size"]):
                problems.append(f"{shard['file']}: record {rid} decodes to {h}x{w}, manifest says "
                                f"{manifest['image_size']}")
            if fold != shard["fold"]:
                problems.append(f"{shard['file']}: record {rid} has fold {fold}, shard is fold {shard['fold']}")
            seen.setdefault(rid, []).append(shard["fold"])
    with tf.io.gfile.GFile(manifest["folds_csv"], "rb") as f:
        folds_df = pd.read_csv(io.BytesIO(f.read()), dtype={"id": str})
    with tf.io.gfile.GFile(_join(out_dir, TEST_IDS), "rb") as f:
        test_ids = pd.read_csv(io.BytesIO(f.read()), dtype={"id": str})["id"].tolist()
    expected = dict(zip(folds_df["id"], folds_df["fold"].astype(int)))
    expected.update({i: -1 for i in test_ids})
    for rid, folds in seen.items():
        if len(folds) > 1 or expected.get(rid) != folds[0]:
            problems.append(f"id {rid}: in folds {folds}, expected once in fold {expected.get(rid)}")
    missing = [i for i in expected if i not in seen]
    if missing:
        problems.append(f"{len(missing)} ids of folds.csv/test_ids.csv are in no shard (e.g. {missing[0]})")
    if problems:
        raise ValueError(f"verify {out_dir}: {len(problems)} problems:\n  " + "\n  ".join(problems[:20]))
    n = sum(len(v) for v in seen.values())
    log.info("verify %s: %d shards, %d records: ok", out_dir, len(manifest["shards"]), n)
    return {"shards": len(manifest["shards"]), "records": n, "ok": True}


def _read_shard(path: str, encoding: str) -> list[tuple]:
    """(id, fold, height, width) of every record of one shard, images decoded."""
    import tensorflow as tf

    def facts(serialized):
        f = records.parse(serialized)
        shape = tf.shape(records.decode(f, encoding))
        return f["id"], f["fold"], shape[0], shape[1]

    ds = tf.data.TFRecordDataset(path).map(facts).batch(1024)
    rows = []
    for ids, folds, hs, ws in ds.as_numpy_iterator():
        rows.extend((i.decode(), int(f), int(h), int(w)) for i, f, h, w in zip(ids, folds, hs, ws))
    return rows


def read_records(out_dir: str, *, split: str | None = None) -> list[dict]:
    """Every record of a prepared dir as dicts (id, label, fold, group, image uint8); for tests and checks."""
    import tensorflow as tf

    manifest = _read_json(_join(out_dir, MANIFEST))
    rows = []
    for shard in manifest["shards"]:
        if split is not None and shard["split"] != split:
            continue
        for serialized in tf.data.TFRecordDataset(_join(out_dir, shard["file"])):
            f = records.parse(serialized)
            rows.append({"id": f["id"].numpy().decode(), "label": int(f["label"]), "fold": int(f["fold"]),
                         "group": f["group"].numpy().decode(), "shard": shard["file"],
                         "image": records.decode(f, manifest["encoding"]).numpy()})
    return rows
