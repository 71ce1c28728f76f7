"""The data stage on Apache Beam (`prepare_tfrecords.py --runner=beam`): the same listing, QC, folds and
shards as prepare.py, with its two passes over the pixels as Beam work items.

    driver      list_source -> pixel_format -> pick_encoding                  (prepare.py, as local)
    pipeline 1  Create(work items) -> Reshuffle -> Map(load + QC-scan one work item) -> a scratch file each
    driver      the scans, in listing order -> prepare.plan: screen, holdout, folds.csv decided once,
                the deterministic shard plan (same names, same ids per shard as local)
    pipeline 2  Create(shards to write) -> Reshuffle -> Map(load, encode, serialize, write one shard)
    driver      progress -> prepare.finish: counts, manifest.json (sha256 per shard), --verify

A work item of pass 1 is one whole slide for `--source=slides` (its tiles read through one open slide
handle) and prepare.CHUNK images otherwise; a work item of pass 2 is one planned shard, its records
streamed from the loader to the TFRecord writer. Records serialize deterministically, so the shards
are byte-identical to the local runner's. Pass 1 ships only the QC facts back (a few hundred bytes per
image), never the pixels: pass 2 loads each image again where it writes it.

Results come back through files under `<out>/.beam/` (a pickle per work item of pass 1, the facts of
each written shard), because a Beam runner returns no values to the driver; the folder is removed at
the end. Apache Beam is imported only here (pip install -r requirements-beam.txt).
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import shlex
import time

from histofold import io, prepare as local, records
from histofold.config import PrepareConfig
from histofold.errors import UsageError

log = logging.getLogger("histofold")

SCRATCH = ".beam"  # under --out: the workers' results for the driver


def _beam():
    try:
        import apache_beam
    except ImportError:
        raise UsageError("--runner=beam needs Apache Beam: pip install -r requirements-beam.txt "
                         "(or use the default --runner=local)") from None
    return apache_beam


def pipeline_options(beam_args: str):
    """PipelineOptions from --beam_args ('' = the DirectRunner on this machine)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(shlex.split(beam_args or ""))
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if runner in ("DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner"):
        _importable_by_local_workers()
    elif not any(flag in (beam_args or "") for flag in ("--setup_file", "--sdk_container_image",
                                                         "--environment_config", "--extra_package")):
        log.warning("warning: --beam_args runs on %s without --setup_file: its workers cannot import histofold "
                    "unless their image has it; add --setup_file=./setup.py (README, Scaling out)", runner)
    return options


def _importable_by_local_workers() -> None:
    """The DirectRunner's multi_processing workers are fresh interpreters that import the work items'
    functions: put histofold's folder on their PYTHONPATH (remote workers get it from --setup_file)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)


# ---------------------------------------------------------------- work items

def work_items(items: list) -> list[list[int]]:
    """Indices of pass 1's work items, in listing order: consecutive tiles of one slide form one item,
    other images go CHUNK at a time."""
    def key(pair):
        k, item = pair
        ref = item.ref
        return ("slide", ref[1]) if ref and ref[0] == "slide" else ("chunk", k // local.CHUNK)

    return [[k for k, _ in group] for _, group in itertools.groupby(enumerate(items), key=key)]


def _scan_item(task: tuple, *, scratch: str, fmt, encoding: str, quality: int) -> int:
    """Worker: QC-scan one work item (prepare._scan_chunk without keeping bytes) into its scratch file."""
    index, refs = task
    results = local._scan_chunk((refs, fmt, encoding, quality, False))
    io.write_bytes(io.join(scratch, f"scan-{index:06d}.pkl"), pickle.dumps(results))
    return index


def _write_item(task: tuple, *, out: str, scratch: str, fmt, encoding: str, quality: int, shape: tuple) -> str:
    """Worker: one planned shard, each record loaded, encoded and serialized as it is written."""
    name, refs, fields = task
    encoded = (records.encode_image(fmt.normalize(local._load(ref, fmt)), encoding, quality) for ref in refs)
    facts = records.write_shard(io.join(out, name), (
        records.serialize(image=data, encoding=encoding, height=shape[0], width=shape[1], **f)
        for data, f in zip(encoded, fields)))
    io.write_json(io.join(scratch, f"{name}.json"), facts)
    return name


def _run(label: str, tasks: list, fn, *, options, **kwargs) -> None:
    """One pipeline: Create(tasks) -> Reshuffle (spread them over workers) -> Map(fn)."""
    beam = _beam()
    start = time.time()
    with beam.Pipeline(options=options) as p:
        _ = (p | f"{label}: work items" >> beam.Create(tasks) | f"{label}: spread" >> beam.Reshuffle()
             | label >> beam.Map(fn, **kwargs))
    log.info("%s: %d work items in %.1f s", label, len(tasks), time.time() - start)


# ---------------------------------------------------------------- the two passes

def scan(items: list, *, config: PrepareConfig, fmt, encoding: str, scratch: str, options) -> list:
    """Pass 1 on Beam; returns what prepare.scan returns (keep=False): one tuple per item, in order."""
    groups = work_items(items)
    tasks = [(i, [items[k].ref for k in g]) for i, g in enumerate(groups)]
    _run("pass 1: load + QC", tasks, _scan_item, options=options, scratch=scratch, fmt=fmt, encoding=encoding,
         quality=int(config.jpeg_quality))
    results = []
    for i, group in enumerate(groups):
        chunk = pickle.loads(io.read_bytes(io.join(scratch, f"scan-{i:06d}.pkl")))
        if len(chunk) != len(group):
            raise AssertionError(f"beam pass 1: work item {i} returned {len(chunk)} results for {len(group)} images")
        results.extend(chunk)
    return results


def write_shards(planned: local.Plan, *, config: PrepareConfig, fmt, encoding: str, scratch: str,
                 options) -> tuple[list[dict], int]:
    """Pass 2 on Beam: every planned shard not already finished, one work item each (resumable as local)."""
    key, done, todo = local.resume_state(planned.shards, config=config, fmt=fmt, encoding=encoding,
                                         shape=planned.shape)
    local.save_progress(config.out, key, done)  # shards of an interrupted run belong to this plan
    if todo:
        screened = planned.screened
        by_id = {it.id: it for it in screened.items}
        fields = local.record_fields(planned.folds_df)
        tasks = [(p["file"], [by_id[i].ref for i in p["ids"]], [fields(by_id[i]) for i in p["ids"]])
                 for p in todo]
        _run("pass 2: write shards", tasks, _write_item, options=options, out=config.out, scratch=scratch,
             fmt=fmt, encoding=encoding, quality=int(config.jpeg_quality), shape=planned.shape)
        for p in todo:
            facts = io.read_json(io.join(scratch, f"{p['file']}.json"))
            if facts["count"] != len(p["ids"]):
                raise AssertionError(f"beam pass 2: {p['file']} has {facts['count']} records, planned {len(p['ids'])}")
            done[p["file"]] = facts
        local.save_progress(config.out, key, done)
    return local.shard_entries(planned.shards, done), len(todo)


# ---------------------------------------------------------------- the stage

def prepare(config: PrepareConfig) -> dict:
    """The data stage with both passes on Beam; the same summary and files as prepare.prepare."""
    _beam()
    options = pipeline_options(config.beam_args)
    start = time.time()
    listing = local.list_source(config)
    items = list(listing.train) + list(listing.test)
    fmt = local.pixel_format(config, listing)
    encoding, _, per_record = local.pick_encoding(config, items, fmt)
    log.info("%d images (%d train, %d test, %d rejected while listing); encoding %s, ~%.1f KB/record; "
             "Apache Beam %s", len(items), len(listing.train), len(listing.test), len(listing.rejects), encoding,
             per_record / 1e3, config.beam_args or "DirectRunner")
    io.makedirs(config.out)
    scratch = io.join(config.out, SCRATCH)
    io.rmtree(scratch)
    io.makedirs(scratch)
    results = scan(items, config=config, fmt=fmt, encoding=encoding, scratch=scratch, options=options)
    planned = local.plan(listing, items, results, config=config, per_record=per_record)
    del results
    shards, n_written = write_shards(planned, config=config, fmt=fmt, encoding=encoding, scratch=scratch,
                                     options=options)
    io.rmtree(scratch)
    summary = local.finish(planned, listing=listing, items=items, shards=shards, shards_written=n_written,
                           config=config, fmt=fmt, encoding=encoding, seconds=time.time() - start)
    return {**summary, "runner": "beam"}
