"""prepare_tfrecords.py throughput: the local process pool vs Apache Beam's DirectRunner (multi-process), same input.

    .venv/bin/python bench/beam.py [--n=3000] [--workers=2] [--input=DIR]

Runs the same prepare twice, each in a fresh interpreter (as a user would: TensorFlow import and pool or
Beam start-up included in the figure):
    local   --runner=local --workers=N                 (fork pool: pass 1 load + QC, pass 2 encode)
    beam    --runner=beam --beam_args='--direct_num_workers=N --direct_running_mode=multi_processing'
on the first n JPEGs of ../shared/data/pcam_jpeg/train (96x96 PCam patches, folder source: class = folder),
or on --input. Prints records/s of each (inputs / the prepare's own seconds, and / wall-clock seconds), the
ratio, and whether the two wrote identical shards (sha256 per shard from the manifests). One run each; the
machine may be shared, so read the ratio, not the third digit. Not a test.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "pcam_jpeg" / "train"
RUN = """
import json, sys
import prepare_tfrecords
flags = json.loads(sys.argv[1])
print("SUMMARY " + json.dumps(prepare_tfrecords.main(**flags), default=str))
"""


def subset(source: Path, n: int, dest: Path) -> Path:
    """The first n images (sorted, over the class folders) linked into dest/<class>/."""
    files = sorted(p for p in source.rglob("*") if p.is_file())[:n]
    for f in files:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, target)
    return dest


def run(flags: dict) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.time()
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(flags)], cwd=ROOT, env=env, text=True,
                         capture_output=True)
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"prepare failed ({flags.get('runner')}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):]), wall


def main(n: int = 3000, workers: int = 2, input: str = ""):
    work = Path(tempfile.mkdtemp(prefix="bench-beam-"))
    try:
        data = Path(input) if input else subset(DEFAULT_SOURCE, n, work / "data")
        common = dict(source="folder", input=str(data), folds=5, workers=workers, log_level="warning")
        beam_args = f"--direct_num_workers={workers} --direct_running_mode=multi_processing"
        results = {}
        for runner, extra in (("local", {}), ("beam", {"beam_args": beam_args})):
            flags = dict(common, runner=runner, out=str(work / runner / "tfrecords"),
                         folds_dir=str(work / runner / "folds"), **extra)
            results[runner] = run(flags)
        shards = {r: [(s["file"], s["sha256"]) for s in json.loads((work / r / "tfrecords" / "manifest.json")
                                                                      .read_text())["shards"]] for r in results}
        print(f"prepare_tfrecords.py on {results['local'][0]['inputs']} images ({data}), {workers} workers, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{time.strftime('%Y-%m-%d')}")
        print(f"{'runner':<50} {'prepare s':>9} {'rec/s':>7} {'wall s':>7} {'rec/s wall':>10}")
        rate = {}
        for runner, (summary, wall) in results.items():
            label = f"local pool ({workers} processes)" if runner == "local" else \
                f"beam DirectRunner ({workers} processes, multi_processing)"
            rate[runner] = (summary["written"] / summary["seconds"], summary["written"] / wall)
            print(f"{label:<50} {summary['seconds']:>9.1f} {rate[runner][0]:>7.0f} {wall:>7.1f} {rate[runner][1]:>10.0f}")
        print(f"beam / local records/s: {rate['beam'][0] / rate['local'][0]:.2f} (prepare time), "
              f"{rate['beam'][1] / rate['local'][1]:.2f} (wall)")
        print(f"identical shards (names + sha256): {shards['beam'] == shards['local']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
