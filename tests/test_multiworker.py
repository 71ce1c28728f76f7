"""Training past one machine: two worker processes on localhost with TF_CONFIG (MultiWorkerMirroredStrategy on
CPU) train `tiny`; both finish, the chief alone writes the run directory, the weights are equal; and the
input is split over workers by file when there are enough shards, else by record."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import prepare_tfrecords
from histofold import data
from histofold.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
MARK = "WORKER-SUMMARY "
WORKER = f"""
import json, sys
import train
summary = train.main(fold="0", arch="tiny", epochs=2, batch_size=8, steps_per_epoch=3, name="mw",
                     tfrecords="tfrecords", runs_dir="runs", augment="none", log_level="info")
print({MARK!r} + json.dumps(summary[0], default=str))
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_tfrecords.main(source="synthetic", count=64, test_count=0, image_size=32, folds=2, shard_mb=0.01,
                           log_level="warning")
    return tmp_path


def test_worker_part_by_file_with_enough_shards_else_by_record(prepared):
    manifest = Manifest.load("tfrecords")
    files = manifest.files("train", [1])
    assert len(files) >= 2 * data.MIN_FILES_PER_WORKER
    parts = [data.worker_part(manifest, "train", [1], shard=(2, i)) for i in range(2)]
    assert [p[0] for p in parts] == ["file", "file"]
    assert sorted(parts[0][1] + parts[1][1]) == sorted(files) and not set(parts[0][1]) & set(parts[1][1])
    assert parts[0][2] + parts[1][2] == manifest.count("train", [1])
    few = len(files)  # as many workers as shards: fewer than MIN_FILES_PER_WORKER each -> by record
    kinds = {data.worker_part(manifest, "train", [1], shard=(few, i))[0] for i in range(few)}
    assert kinds == {"data"}
    assert data.worker_part(manifest, "train", [1], shard=None) == ("all", files, manifest.count("train", [1]))


@pytest.mark.parametrize("workers", [2, 100])  # 2: by file; 100 (> shards / 2): by record
def test_sharded_datasets_split_the_records_exactly(prepared, workers):
    manifest = Manifest.load("tfrecords")
    seen = []
    for i in range(min(workers, 3)):
        ds = data.make_dataset(manifest, split="train", folds=[1], batch_size=4, with_ids=True, label_mode="int",
                               shard=(workers, i))
        ids = [x.decode() for _, _, batch in ds for x in batch.numpy()]
        assert len(ids) == data.worker_part(manifest, "train", [1], shard=(workers, i))[2]
        seen.extend(ids)
    assert len(seen) == len(set(seen))  # no record read by two workers
    if workers == 2:
        assert len(seen) == manifest.count("train", [1])  # and none left out


def test_two_workers_on_localhost_chief_writes_equal_weights(prepared, tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, scratch = [], []
    for index in range(2):
        tmp = tmp_path / f"tmp{index}"
        tmp.mkdir()
        scratch.append(tmp)
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=prepared, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for index, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {index} failed:\n{out[-4000:]}"
        assert "MultiWorkerMirroredStrategy (2 workers, 2 replicas)" in out
        assert f"input sharding over 2 workers: FILE (worker {index} reads" in out
    summaries = [json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])
                 for out in outputs]

    # the chief (worker 0) alone wrote the run directory; worker 1's scratch copy is gone
    written = sorted(str(p.relative_to(prepared / "runs")) for p in (prepared / "runs").rglob("*"))
    fold = prepared / "runs" / "mw" / "fold0"
    assert written == sorted(["mw", "mw/fold0"] + [f"mw/fold0/{f.name}" for f in fold.iterdir()])
    assert (fold / "complete.json").exists() and (fold / "oof.csv").exists()
    assert not any(scratch[1].iterdir()), list(scratch[1].iterdir())
    assert summaries[0]["run_dir"] == summaries[1]["run_dir"] == os.path.join("runs", "mw", "fold0")

    # equal weights on both workers, and they are the chief's saved file
    assert summaries[0]["weights_digest"] == summaries[1]["weights_digest"]
    from histofold.loop import weights_digest
    from histofold.runs import RunDir

    assert weights_digest(RunDir(str(fold)).build_model()) == summaries[0]["weights_digest"]
    history = (fold / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs, written once
