"""The data stage: list a dataset, QC every image, decide folds once, write resumable k-fold TFRecord shards.

    listing -> stain reference (--stain_norm: fitted on training images or --stain_ref)
            -> pass 1 (worker pool: load, resize, SHA-1, d4-pHash, blank, shape; stain-normalize + encode)
            -> QC (rejects, duplicate clusters -> groups) -> folds/folds.csv (decided once, folds.decide)
            -> shard plan (deterministic) -> pass 2 (encode in workers, records.write_shard in the parent)
            -> tfrecords/manifest.json, test_ids.csv [, sample_submission.csv]

Every input ends up either written or in folds/rejects.csv (id, path, reason): inputs = written +
rejected always holds. Duplicates are kept and grouped (a cluster never straddles folds); `dedupe`
keeps one image per exact-duplicate cluster instead. Test images are never dropped, only reported.

Encoding "auto" (figures measured on 96x96 H&E patches, 1 CPU core):
    raw   27.6 KB/img, encode 0 ms, decode free     -> chosen for images <= 128 px (lossless, fastest;
                                                       Kaggle HCD 220k train: ~6.1 GB)
    png   24.5 KB/img (-11%), encode 0.27 ms/img     -> lossless (imageio.encode_png: Up filter +
                                                       Huffman-only deflate), a PNG decode every epoch
    jpeg   8.2 KB/img (q95, 4:4:4), encode 0.1 ms    -> chosen above 128 px (LC25000 768 px: raw would
                                                       be 1.7 MB/img; jpeg q95 keeps nuclei texture)
Pass 1 keeps the encoded bytes in memory when the estimate is under `cache_mb` (default 2000 MB), so
small and medium datasets are decoded once; larger ones are re-loaded in pass 2.

Resuming: the shard plan (which ids go into which shard) is fixed before writing; every shard is
written to `.<name>.tmp` and renamed when complete, and `.progress.json` records each finished
shard's facts. A rerun of the same command skips finished shards (whose bytes still match), so an
interrupted run completes with no record duplicated, and a rerun of a complete directory is a no-op.
Records serialize deterministically: two identical prepares write byte-identical shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from histofold import imageio, io, qc, records, sources
from histofold.config import PrepareConfig
from histofold.errors import DataError, ImageError, UsageError
from histofold.manifest import FILE as MANIFEST, SAMPLE_SUB, TEST_IDS, VERSION, Manifest

log = logging.getLogger("histofold")

AUTO_RAW_MAX = 128       # px: images up to this side are stored raw by encoding="auto"
RECORD_OVERHEAD = 160    # bytes of tf.train.Example framing per record beyond the image bytes
SAMPLE = 32              # images encoded in the parent to pick the encoding and estimate sizes
STAIN_SAMPLE = 256       # training images the stain reference is fitted on (evenly spaced)
CHUNK = 64               # images per worker task: amortises IPC over many images
PROGRESS = ".progress.json"


# ---------------------------------------------------------------- listing

def list_source(config: PrepareConfig) -> sources.Listing:
    """The adapter's listing (PrepareConfig already checked its options)."""
    listing = sources.get_source(config.source).list(config.input, **config.adapter_options())
    conflicts = listing.label_conflicts
    if conflicts and config.strict_labels:
        raise DataError(f"{_conflict_text(conflicts[0])}" + (f" (and {len(conflicts) - 1} more ids)" if len(conflicts) > 1
                                                              else "") + "; fix the label file, or drop "
                        "--strict_labels to reject every copy of such an id")
    if conflicts:
        log.warning("warning: %d id(s) with conflicting labels rejected (every copy), e.g. %s; --strict_labels "
                    "makes this an error", len(conflicts), _conflict_text(conflicts[0]))
    for file, stats in listing.meta.get("label_files", {}).items():
        if stats["identical_duplicates"]:
            log.info("%s: %d repeated rows with the same label; kept one of each", file, stats["identical_duplicates"])
    for warning in listing.meta.get("warnings", []):
        log.warning("warning: %s", warning)
    if not listing.train:
        raise DataError(f"source {config.source!r} listed no training images under --input={config.input}")
    return listing


def _conflict_text(conflict: dict) -> str:
    """`file: id 'x' has conflicting labels 0, 1 (line 2, line 5)`."""
    return (f"{conflict['file']}: id {conflict['id']!r} has conflicting labels {', '.join(conflict['labels'])} "
            f"({', '.join(conflict['where'])})")


# ---------------------------------------------------------------- worker side (no TensorFlow)

def _load(ref, fmt: records.PixelFormat) -> np.ndarray:
    """An item's pixels at the stored size (before stain normalization)."""
    return fmt.resize(imageio.load_ref(ref))


def _scan_chunk(task: tuple) -> list[tuple]:
    """Worker: load, QC-scan and (when `keep`) normalize + encode each ref -> (scan | None, bytes | None, error)."""
    refs, fmt, encoding, quality, keep = task
    out, loaded = [], []
    for ref in refs:
        try:
            raw, mode = imageio.load_ref_mode(ref)
        except ImageError as e:
            out.append([None, None, str(e)])
            loaded.append(None)
            continue
        image = fmt.resize(raw)
        out.append([{**qc.scan_image(image), "source_shape": tuple(raw.shape[:2]), "source_mode": mode}, None, None])
        loaded.append(image)
    if keep:
        for row, image in zip(out, loaded):
            if image is not None:
                row[1] = records.encode_image(fmt.normalize(image), encoding, quality)
    return [tuple(r) for r in out]


def _encode_chunk(task: tuple) -> list[bytes]:
    """Worker: load, normalize and encode each ref (pass 2, when pass 1 did not keep the bytes)."""
    refs, fmt, encoding, quality = task
    return [records.encode_image(fmt.normalize(_load(ref, fmt)), encoding, quality) for ref in refs]


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
    return multiprocessing.get_context(_start_method()).Pool(workers, initializer=_init_worker)


def _start_method() -> str:
    """"fork" while TensorFlow is not imported (and the platform forks), else "spawn"."""
    fork_ok = "tensorflow" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    return "fork" if fork_ok else "spawn"


def _init_worker() -> None:
    """Pool initializer: die with the parent (a `kill -9` of prepare leaves no orphans), and import what
    the tasks use while the parent is still listing and sampling."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    import PIL.TiffImagePlugin  # noqa: F401  (non-plain TIFFs)


# ---------------------------------------------------------------- the pixel format: size and stain

def _sample(items: list, n: int) -> list:
    """n items evenly spaced over the list (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]


def pixel_format(config: PrepareConfig, listing: sources.Listing) -> records.PixelFormat:
    """The stored size and the stain normalizer fitted on training images (or on --stain_ref)."""
    size = (config.resize, config.resize) if config.resize else None
    if config.stain_norm == "none":
        return records.PixelFormat(size=size, stain=None)
    from histofold import stain

    plain = records.PixelFormat(size=size)
    if config.stain_ref:
        images = [plain.resize(imageio.read_image(config.stain_ref))]
        where = config.stain_ref
    else:
        images = []
        for item in _sample(listing.train, STAIN_SAMPLE):
            try:
                images.append(_load(item.ref, plain))
            except ImageError:
                continue
        where = f"{len(images)} training images"
    if not images:
        raise DataError(f"--stain_norm={config.stain_norm}: no readable image to fit the reference on")
    normalizer = stain.fit(images, config.stain_norm)
    log.info("stain normalization: %s, reference fitted on %s", config.stain_norm, where)
    return records.PixelFormat(size=size, stain=normalizer.to_json())


# ---------------------------------------------------------------- pass 1

def pick_encoding(config: PrepareConfig, items: list, fmt: records.PixelFormat) -> tuple[str, tuple, float]:
    """(encoding, sample image (H, W), estimated bytes/record) from the first loadable images.

    "auto": raw up to AUTO_RAW_MAX px, jpeg above (see the module docstring for the figures).
    """
    shape, sizes, encoding = None, [], config.encoding
    for item in items[: 4 * SAMPLE]:
        try:
            image = _load(item.ref, fmt)
        except ImageError:
            continue
        shape = shape or image.shape[:2]
        if config.encoding == "auto":
            encoding = "raw" if max(shape) <= AUTO_RAW_MAX else "jpeg"
        sizes.append(len(records.encode_image(image, encoding, config.jpeg_quality)))
        if len(sizes) >= SAMPLE:
            break
    if shape is None:
        raise DataError(f"none of the first {min(len(items), 4 * SAMPLE)} images of --input={config.input} "
                        "could be read; check the path and the --source")
    return encoding, tuple(int(s) for s in shape), float(np.mean(sizes)) + RECORD_OVERHEAD


def scan(items: list, *, config: PrepareConfig, fmt, encoding: str, keep: bool, pool) -> list:
    """Pass 1 over every item, in order: (scan dict | None, encoded bytes | None, error | None)."""
    from tqdm import tqdm

    tasks = [([it.ref for it in c], fmt, encoding, config.jpeg_quality, keep) for c in _chunks(items, CHUNK)]
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


def screen(listing: sources.Listing, items: list, results: list, *, config: PrepareConfig) -> Screened:
    """Apply the reject rules (unreadable, duplicate id, size, blank, dedupe) and cluster duplicates."""
    rejects = [dict(r) for r in listing.rejects]
    shapes = Counter(r[0]["shape"] for r in results if r[0] is not None)
    target = (config.resize, config.resize) if config.resize else (shapes.most_common(1)[0][0] if shapes else None)
    keep, seen = [], {}
    for k, (item, (facts, _, error)) in enumerate(zip(items, results)):
        reason = None
        if error is not None:
            reason = error
        elif item.id in seen:
            reason = f"duplicate id (first at {seen[item.id]})"
        elif tuple(facts["shape"]) != tuple(target):
            reason = (f"size {facts['shape'][0]}x{facts['shape'][1]} differs from dataset size "
                      f"{target[0]}x{target[1]}; pass --resize=N to resize")
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

    if any(it.split == "test" for it in screened.items):
        raise UsageError("--holdout: this dataset already has a test set; drop --holdout (or the test input)")
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
    """folds.csv frame (id, label, fold, group, source, class, blank), decided once (folds.decide)."""
    import pandas as pd

    from histofold import folds

    train = [it for it in screened.items if it.split == "train"]
    df = pd.DataFrame({"id": [it.id for it in train], "label": [int(it.label) for it in train],
                       "group": [screened.groups[it.id] for it in train]})
    bad = df[(df["label"] < 0) | (df["label"] >= len(listing.classes))]
    if len(bad):
        raise DataError(f"train item {bad['id'].iloc[0]} has label {bad['label'].iloc[0]} outside "
                        f"0..{len(listing.classes) - 1} ({listing.classes}); fix the source listing")
    df["source"] = [it.path for it in train]
    df["class"] = [listing.classes[k] for k in df["label"]]
    df["blank"] = [it.id in screened.blank_ids for it in train]
    frame, _ = folds.decide(df, folds_dir=config.folds_dir, n_folds=config.folds, seed=config.seed,
                            overwrite=config.overwrite)
    return frame[["id", "label", "fold", "group", "source", "class", "blank"]]


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


def _plan_key(plan: list[dict], *, encoding: str, config: PrepareConfig, shape: tuple, fmt) -> str:
    """Hash of everything that determines the shards' bytes: resume only when it matches."""
    blob = json.dumps({"plan": [(p["file"], p["ids"]) for p in plan], "encoding": encoding,
                       "quality": int(config.jpeg_quality), "resize": config.resize, "shape": list(shape),
                       "stain": fmt.stain, "source": config.source, "input": config.input,
                       "options": config.adapter_options()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _clear_stale(out: str, plan: list[dict], progress: dict | None, key: str, *, overwrite: bool) -> dict:
    """Drop temp files; keep finished shards of this same plan; other shards need --overwrite."""
    planned = {p["file"] for p in plan}
    names = io.listdir(out) if io.exists(out) else []
    same = progress is not None and progress.get("plan") == key
    for name in names:
        if name.endswith(".tmp") and name.startswith("."):
            io.remove(io.join(out, name))
    stale = [n for n in names if records.parse_shard_name(n) and not (same and n in planned)]
    if stale and not overwrite:
        raise UsageError(f"{out} holds shards from a different run ({stale[0]}, ... {len(stale)} files); "
                         "pass --overwrite to replace them or choose another --out")
    for name in stale:
        io.remove(io.join(out, name))
    return dict(progress.get("done", {})) if same else {}


def _still_good(out: str, name: str, facts) -> bool:
    """A finished shard of an earlier run of the same plan whose bytes are unchanged."""
    path = io.join(out, name)
    return (isinstance(facts, dict) and io.exists(path) and io.size(path) == facts.get("bytes")
            and io.sha256(path) == facts.get("sha256"))


def resume_state(plan: list[dict], *, config: PrepareConfig, fmt, encoding: str, shape: tuple) -> tuple:
    """(plan key, facts of the shards already finished, planned shards still to write): see Resuming."""
    key = _plan_key(plan, encoding=encoding, config=config, shape=shape, fmt=fmt)
    done = _clear_stale(config.out, plan, io.read_json(io.join(config.out, PROGRESS), None), key,
                        overwrite=config.overwrite)
    todo = [p for p in plan if not _still_good(config.out, p["file"], done.get(p["file"]))]
    return key, done, todo


def save_progress(out: str, key: str, done: dict) -> None:
    io.write_json(io.join(out, PROGRESS), {"plan": key, "done": done})


def shard_entries(plan: list[dict], done: dict) -> list[dict]:
    """The manifest's shard list: every planned shard with its count, size and sha256."""
    return [{"file": p["file"], "split": p["split"], "fold": p["fold"], "count": len(p["ids"]),
             "bytes": done[p["file"]]["bytes"], "sha256": done[p["file"]]["sha256"]} for p in plan]


def record_fields(folds_df):
    """item -> the record's fields besides the image: label, id, fold, group (folds.csv's), location."""
    fold_of = dict(zip(folds_df["id"], folds_df["fold"])) if len(folds_df) else {}
    group_of = dict(zip(folds_df["id"], folds_df["group"].astype(str))) if len(folds_df) else {}

    def fields(item) -> dict:
        return dict(label=int(item.label), id=item.id, fold=int(fold_of.get(item.id, -1)),
                    group=group_of.get(item.id, item.group or ""), **_location(item))
    return fields


def write_shards(plan: list[dict], *, screened: Screened, folds_df, config: PrepareConfig, fmt, encoding: str,
                 shape: tuple, pool, on_shard=None) -> tuple[list[dict], int]:
    """Pass 2: write every planned shard not already finished. Returns (manifest shard entries, written)."""
    from tqdm import tqdm

    key, done, todo = resume_state(plan, config=config, fmt=fmt, encoding=encoding, shape=shape)
    by_id = {it.id: k for k, it in enumerate(screened.items)}
    fields = record_fields(folds_df)
    encoded = _encoded_stream(todo, screened=screened, by_id=by_id, config=config, fmt=fmt, encoding=encoding,
                              pool=pool)
    with tqdm(total=sum(len(p["ids"]) for p in todo), desc="pass 2: write shards", unit="img",
              mininterval=2) as bar:
        for shard in todo:
            items = [screened.items[by_id[i]] for i in shard["ids"]]
            done[shard["file"]] = records.write_shard(io.join(config.out, shard["file"]), (
                records.serialize(image=next(encoded), encoding=encoding, height=shape[0], width=shape[1],
                                  **fields(it))
                for it in items))
            save_progress(config.out, key, done)
            bar.update(len(shard["ids"]))
            if on_shard is not None:
                on_shard(shard["file"])  # test hook (simulates a crash after N shards)
    return shard_entries(plan, done), len(todo)


def _location(item) -> dict:
    """Whole-slide tiles carry their level-0 position (records.loc_x/loc_y)."""
    ref = item.ref
    if ref and ref[0] == "slide":
        return {"loc_x": int(ref[2]), "loc_y": int(ref[3])}
    return {}


def _encoded_stream(todo: list[dict], *, screened: Screened, by_id: dict, config: PrepareConfig, fmt,
                    encoding: str, pool):
    """Encoded bytes of every record of `todo`, in plan order: from the pass-1 cache or the pool."""
    ids = [i for p in todo for i in p["ids"]]
    if all(screened.data[by_id[i]] is not None for i in ids):
        return (screened.data[by_id[i]] for i in ids)
    tasks = [([screened.items[by_id[i]].ref for i in c], fmt, encoding, config.jpeg_quality)
             for c in _chunks(ids, CHUNK)]
    return (data for chunk in _imap(pool, _encode_chunk, tasks) for data in chunk)


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

    io.makedirs(config.folds_dir)
    io.write_csv(io.join(config.folds_dir, "rejects.csv"),
                 pd.DataFrame(screened.rejects, columns=["id", "path", "reason"]))
    io.write_csv(io.join(config.folds_dir, "duplicates.csv"), screened.duplicates)


def stored_mpp(config: PrepareConfig, listing: sources.Listing, source_shape, shape) -> float | None:
    """Microns per pixel of the stored records: --mpp (or the source's native resolution) scaled by the
    resize (PCam 0.972 um/px at 96 px stored at 48 px -> 1.944)."""
    mpp = config.mpp if config.mpp is not None else listing.meta.get("mpp")
    if mpp is None:
        return None
    return float(mpp) * float(source_shape[0]) / float(shape[0])


def write_manifest(*, config: PrepareConfig, listing: sources.Listing, shards: list[dict], counts: dict,
                   encoding: str, shape: tuple, mpp, fmt, test_items: list) -> dict:
    """manifest.json (docs/design.md), test_ids.csv and the sample_submission.csv copy."""
    import pandas as pd

    out = config.out
    sub = SAMPLE_SUB if listing.sample_submission else None
    folds_csv = io.join(config.folds_dir, "folds.csv")
    manifest = {
        "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": config.source, "input": io.absolute(config.input) if config.input else None,
        "args": config.to_json(), "classes": list(listing.classes), "num_classes": len(listing.classes),
        "image_size": list(shape), "mpp": mpp, "encoding": encoding, "jpeg_quality": int(config.jpeg_quality),
        "stain": fmt.stain or {"method": "none"}, "folds": int(config.folds), "seed": int(config.seed),
        "shards": shards, "counts": counts, "test_labeled": any(it.label >= 0 for it in test_items),
        "sample_submission": sub, "folds_csv": io.absolute(folds_csv), "folds_csv_sha256": io.sha256(folds_csv),
    }
    if listing.meta:
        manifest["meta"] = json.loads(json.dumps(listing.meta, default=str))
    old = io.read_json(io.join(out, MANIFEST), None)
    side = [io.join(out, TEST_IDS)] + ([io.join(out, SAMPLE_SUB)] if sub else [])
    if (old is not None and {**old, "created": None} == {**json.loads(json.dumps(manifest)), "created": None}
            and all(io.exists(p) for p in side)):
        return old  # a rerun of a complete directory leaves it untouched
    io.write_csv(side[0], pd.DataFrame({"id": [it.id for it in test_items],
                                         "label": [int(it.label) for it in test_items]}))
    if sub:
        io.copy(listing.sample_submission, side[1])
    io.write_json(io.join(out, MANIFEST), manifest)
    return manifest


def _log_tables(folds_df, summary: dict, classes: list[str]) -> None:
    from histofold.folds import class_balance

    table = class_balance(folds_df, classes=classes)
    io.write_csv(summary["class_balance_csv"], table.reset_index())
    log.info("per-fold class balance:\n%s", table.to_string())
    log.info("%d inputs = %d written + %d rejected | duplicates: %d exact, %d near images, %d label "
             "conflicts | blank: %d", summary["inputs"], summary["written"], summary["rejected"],
             summary["duplicates_exact"], summary["duplicates_near"], summary["duplicate_conflicts"],
             summary["blank"])
    if summary["mode_conversions"]:
        log.warning("warning: converted to RGB (histofold/imageio.py says how): %s of the written images",
                    ", ".join(f"{n} {mode}" for mode, n in summary["mode_conversions"].items()))
    log.info("wrote %s, %s, %s, %s", summary["manifest"], summary["folds_csv"], summary["class_balance_csv"],
             summary["rejects_csv"])


# ---------------------------------------------------------------- the stage

def prepare(config: PrepareConfig, *, on_shard=None) -> dict:
    """Run the whole data stage (see the module docstring); returns the summary dict.

    `on_shard(file)` is called after each shard is finished (tests use it to simulate a crash).
    """
    if config.runner == "beam":
        from histofold import beam

        return beam.prepare(config)
    start = time.time()
    listing = list_source(config)
    items = list(listing.train) + list(listing.test)
    workers = int(config.workers or len(os.sched_getaffinity(0)))
    fmt = pixel_format(config, listing)
    pool = _make_pool(workers, len(items))  # spawn now: the workers start up while the parent samples
    try:
        encoding, shape, per_record = pick_encoding(config, items, fmt)
        keep = per_record * len(items) < config.cache_mb * 1e6
        log.info("%d images (%d train, %d test, %d rejected while listing); encoding %s, ~%.1f KB/record; "
                 "%d workers", len(items), len(listing.train), len(listing.test), len(listing.rejects),
                 encoding, per_record / 1e3, workers)
        results = scan(items, config=config, fmt=fmt, encoding=encoding, keep=keep, pool=pool)
        planned = plan(listing, items, results, config=config, per_record=per_record)
        del results
        io.makedirs(config.out)
        shards, n_written = write_shards(planned.shards, screened=planned.screened, folds_df=planned.folds_df,
                                         config=config, fmt=fmt, encoding=encoding, shape=planned.shape,
                                         pool=pool, on_shard=on_shard)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return finish(planned, listing=listing, items=items, shards=shards, shards_written=n_written, config=config,
                  fmt=fmt, encoding=encoding, seconds=time.time() - start)


@dataclass
class Plan:
    """Everything decided on the driver after pass 1: what is kept, the folds, the shards to write."""

    screened: Screened
    folds_df: object   # DataFrame: folds.csv
    test_items: list
    shards: list       # plan_shards' list
    shape: tuple       # (H, W) stored
    source_shape: tuple  # (H, W) of the inputs before --resize (the most common)


def plan(listing: sources.Listing, items: list, results: list, *, config: PrepareConfig,
         per_record: float) -> Plan:
    """QC (screen, holdout) -> reports and folds.csv (decided once) -> the deterministic shard plan."""
    screened = screen(listing, items, results, config=config)
    if config.holdout:
        hold_out(screened, config=config)
    if not screened.scans:
        raise DataError(f"every image was rejected; see {io.join(config.folds_dir, 'rejects.csv')} "
                        "for the reasons")
    shape = tuple(int(s) for s in screened.scans[0]["shape"])
    source_shape = Counter(r[0]["source_shape"] for r in results if r[0] is not None).most_common(1)[0][0]
    write_reports(screened, config=config)
    folds_df = decide_folds(screened, listing, config=config)
    test_items = [it for it in screened.items if it.split == "test"]
    per_shard = max(1, int(config.shard_mb * 1e6 // per_record))
    shards = plan_shards(folds_df, [it.id for it in test_items], n_folds=config.folds, per_shard=per_shard)
    return Plan(screened=screened, folds_df=folds_df, test_items=test_items, shards=shards, shape=shape,
                source_shape=tuple(source_shape))


def finish(planned: Plan, *, listing: sources.Listing, items: list, shards: list[dict], shards_written: int,
           config: PrepareConfig, fmt, encoding: str, seconds: float) -> dict:
    """Counts (inputs = written + rejected, checked), manifest.json, the class balance table, --verify."""
    screened, folds_df = planned.screened, planned.folds_df
    counts = _counts(folds_df, planned.test_items, inputs=len(items) + len(listing.rejects),
                     rejected=len(screened.rejects), classes=listing.classes)
    if counts["inputs"] != counts["written"] + counts["rejected"]:  # every input accounted for
        raise AssertionError(f"prepare lost track of inputs: {counts}")
    manifest = write_manifest(config=config, listing=listing, shards=shards, counts=counts, encoding=encoding,
                              shape=planned.shape, mpp=stored_mpp(config, listing, planned.source_shape,
                                                                  planned.shape),
                              fmt=fmt, test_items=planned.test_items)
    summary = _summary(manifest, screened, config=config, seconds=seconds, shards_written=shards_written)
    _log_tables(folds_df, summary, listing.classes)
    if config.verify:
        summary["verify"] = Manifest.load(config.out).verify()["ok"]
    return summary


def _summary(manifest: dict, screened: Screened, *, config: PrepareConfig, seconds: float,
             shards_written: int) -> dict:
    c, dups = manifest["counts"], screened.duplicates
    meta = manifest.get("meta", {})
    labels = list(meta.get("label_files", {}).values())
    modes = Counter(s.get("source_mode", "RGB") for s in screened.scans)
    return {"inputs": c["inputs"], "written": c["written"], "rejected": c["rejected"], "train": c["train"],
            "test": c["test"], "folds": manifest["folds"], "classes": manifest["classes"],
            "image_size": manifest["image_size"], "encoding": manifest["encoding"],
            "stain_norm": (manifest.get("stain") or {}).get("method", "none"), "mpp": manifest.get("mpp"),
            "duplicates_exact": int((dups["kind"] == "exact").sum()) if len(dups) else 0,
            "duplicates_near": int((dups["kind"] == "near").sum()) if len(dups) else 0,
            "duplicate_conflicts": int(dups.loc[dups["conflict"], "cluster"].nunique()) if len(dups) else 0,
            "blank": len(screened.blank_ids),
            "label_duplicates": sum(f["identical_duplicates"] for f in labels),  # repeated rows, one kept
            "label_conflicts": sum(f["conflicting_ids"] for f in labels),        # ids, every row rejected
            "label_conflict_rows": sum(f["conflicting_rows"] for f in labels),
            "mode_conversions": {m: n for m, n in sorted(modes.items()) if m != "RGB"},  # source mode -> images
            "warnings": list(meta.get("warnings", [])),
            "shards": len(manifest["shards"]), "shards_written": shards_written,
            "seconds": round(seconds, 2), "img_per_s": round(c["inputs"] / max(seconds, 1e-9), 1),
            "manifest": io.join(config.out, MANIFEST), "folds_csv": io.join(config.folds_dir, "folds.csv"),
            "rejects_csv": io.join(config.folds_dir, "rejects.csv"),
            "class_balance_csv": io.join(config.folds_dir, "class_balance.csv")}
