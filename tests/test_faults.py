"""Fault injection through the real scripts, run as a user runs them (subprocesses): damaged shards,
weights and OOF files, a truncated image, bad flags, `kill -9` in the middle of prepare and of train.

Every probe checks the exit status, that no traceback reaches the user, and that the message names the
file or flag at fault. One small prepared + trained directory (module fixture) is copied per probe.
"""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# 48 + 12 synthetic 16 px patches, 2 folds, ~5 records per shard: many small shards, seconds to write
PREPARE = ["--source=synthetic", "--count=48", "--test_count=12", "--image_size=16", "--folds=2", "--shard_mb=0.005"]
TRAIN = ["--fold=all", "--arch=tiny", "--epochs=1", "--batch_size=16"]


def script(name: str, *args, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HISTOFOLD_TRACEBACK": "", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout


def assert_refused(out: subprocess.CompletedProcess, *named: str) -> str:
    """Exit status 2, one `error: ...` line naming every string of `named`, no traceback; the line."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    for name in named:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def summary_of(stdout: str) -> dict:
    """The `key: value` summary a script prints last."""
    return dict(re.findall(r"^(\w+): (.*)$", stdout, re.M))


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_digests(directory) -> dict:
    return {p.name: sha256_of(p) for p in Path(directory).glob("*.tfrec")}


def flip_middle_byte(path) -> None:
    """Same size, different content."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tfrecords/, folds/ and runs/tiny/fold{0,1}/ made by the scripts (run once for the module)."""
    root = tmp_path_factory.mktemp("faults")
    assert_ok(script("prepare_tfrecords.py", *PREPARE, cwd=root))
    assert_ok(script("train.py", *TRAIN, cwd=root))
    return root


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained directory (the probes damage it)."""
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    return work


# ---------------------------------------------------------------- damaged files the suite wrote

def test_flipped_bytes_in_a_train_shard_stop_train_naming_the_shard(copy):
    shard = sorted((copy / "tfrecords").glob("fold1-*.tfrec"))[0]
    flip_middle_byte(shard)
    out = script("train.py", *TRAIN, "--name=again", cwd=copy)
    assert_refused(out, shard.name)
    assert not (copy / "runs" / "again" / "fold0" / "complete.json").exists()  # no run was published


def test_flipped_bytes_in_a_test_shard_stop_predict_naming_the_shard(copy):
    shard = sorted((copy / "tfrecords").glob("test-*.tfrec"))[0]
    flip_middle_byte(shard)
    out = script("predict.py", "--tta=1", "--tfrecords=tfrecords", cwd=copy)
    assert_refused(out, shard.name, "sha256")
    assert not (copy / "submissions").exists() or not list((copy / "submissions").iterdir())


def test_a_deleted_shard_stops_train_naming_it(copy):
    shard = sorted((copy / "tfrecords").glob("fold0-*.tfrec"))[-1]
    shard.unlink()
    out = script("train.py", *TRAIN, "--name=again", cwd=copy)
    assert_refused(out, shard.name, "missing")


def test_flipped_bytes_in_weights_stop_predict_naming_the_file(copy):
    weights = copy / "runs" / "tiny" / "fold1" / "model.weights.h5"
    flip_middle_byte(weights)
    out = script("predict.py", "--tta=1", "--tfrecords=tfrecords", cwd=copy)
    line = assert_refused(out, "fold1/model.weights.h5", "sha256")
    assert "train.py --fold=1" in line  # says how to regenerate it
    assert not (copy / "submissions").exists() or not list((copy / "submissions").iterdir())


def test_flipped_bytes_in_oof_stop_evaluate_naming_the_file(copy):
    oof = copy / "runs" / "tiny" / "fold0" / "oof.csv"
    text = oof.read_text()
    k = text.index("0.", len(text) // 2)  # a digit of a probability: the CSV still parses
    oof.write_text(text[:k] + ("1" if text[k] != "1" else "2") + text[k + 1:])
    assert oof.stat().st_size == len(text)
    out = script("evaluate.py", "--n_boot=10", "--gradcam=False", cwd=copy)
    assert_refused(out, "fold0/oof.csv", "sha256")
    assert not (copy / "reports").exists() or not list((copy / "reports").rglob("metrics.json"))


# ---------------------------------------------------------------- bad inputs and flags

def test_a_truncated_image_is_a_reject_row_and_the_inputs_add_up(tmp_path):
    from histofold import synthetic

    for label, name in enumerate(["normal", "tumor"]):
        (tmp_path / "in" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(synthetic.render(3, 10 * label + i, 16, label, 2)).save(tmp_path / "in" / name / f"{i}.png")
    victim = tmp_path / "in" / "tumor" / "3.png"
    victim.write_bytes(victim.read_bytes()[:60])  # header survives, pixel data cut
    out = script("prepare_tfrecords.py", "--source=folder", "--input=in", "--folds=2", cwd=tmp_path)
    assert_ok(out)
    s = summary_of(out.stdout)
    assert (int(s["inputs"]), int(s["written"]), int(s["rejected"])) == (12, 11, 1)
    rejects = pd.read_csv(tmp_path / "folds" / "rejects.csv")
    assert len(rejects) == 1 and rejects["path"].iloc[0].endswith("tumor/3.png")
    assert "truncated" in rejects["reason"].iloc[0]


@pytest.mark.parametrize("script_name, args, flag", [
    ("train.py", ["--batch_size=0"], "--batch_size"),
    ("predict.py", ["--batch_size=0"], "--batch_size"),
    ("train.py", ["--lr=abc"], "--lr"),
    ("finetune.py", ["--run=runs/x", "--lr=abc"], "--lr"),
    ("train.py", ["--fold=all", "--epoch=3"], "did you mean --epochs?"),
])
def test_bad_flags_are_refused_before_any_work(script_name, args, flag, tmp_path):
    out = script(script_name, *args, cwd=tmp_path)
    assert_refused(out, flag)
    assert os.listdir(tmp_path) == []  # refused before anything was written


# ---------------------------------------------------------------- determinism and kill -9

def test_two_identical_prepares_write_byte_identical_shards(trained, tmp_path):
    assert_ok(script("prepare_tfrecords.py", *PREPARE, cwd=tmp_path))
    first, second = shard_digests(trained / "tfrecords"), shard_digests(tmp_path / "tfrecords")
    assert len(first) > 5 and first == second
    assert (trained / "folds" / "folds.csv").read_bytes() == (tmp_path / "folds" / "folds.csv").read_bytes()


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def start(name: str, *args, cwd) -> subprocess.Popen:
    env = {**os.environ, "HISTOFOLD_TRACEBACK": "", "CUDA_VISIBLE_DEVICES": ""}
    log = open(Path(cwd) / f".{name}.log", "w")
    return subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def kill_9_when(name: str, *args, cwd, ready, timeout: float, what: str) -> list[int]:
    """Start script `name`, SIGKILL it as soon as `ready()` holds; the children it had just before the kill."""
    proc = start(name, *args, cwd=cwd)
    try:
        wait_for(ready, timeout=timeout, what=what)
        children = children_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return children


# ~720 shards of 6 records (32 px raw): pass 2 takes seconds, long enough to be killed inside
BIG_PREPARE = ["--source=synthetic", "--count=4000", "--test_count=300", "--image_size=32", "--folds=3",
               "--shard_mb=0.02", "--workers=2"]


@pytest.mark.slow
def test_kill_9_mid_prepare_then_rerun_gives_the_same_folds_and_shards(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    assert_ok(script("prepare_tfrecords.py", *BIG_PREPARE, cwd=clean))
    workers = kill_9_when("prepare_tfrecords.py", *BIG_PREPARE, cwd=killed, timeout=120, what="the first shard",
                          ready=lambda: any((killed / "tfrecords").glob("*.tfrec")))
    assert len(workers) == 2  # the pool was running when the parent was killed
    wait_for(lambda: not any(alive(w) for w in workers), timeout=10, what="the pool workers to die")
    assert not (killed / "tfrecords" / "manifest.json").exists()  # killed mid-way, not after the end
    left = len(list((killed / "tfrecords").glob("*.tfrec")))
    total = len(list((clean / "tfrecords").glob("*.tfrec")))
    assert 0 < left < total
    out = script("prepare_tfrecords.py", *BIG_PREPARE, cwd=killed)
    assert_ok(out)
    assert int(summary_of(out.stdout)["shards_written"]) <= total - left + 1  # resumed, not redone
    assert (killed / "folds" / "folds.csv").read_bytes() == (clean / "folds" / "folds.csv").read_bytes()
    assert shard_digests(killed / "tfrecords") == shard_digests(clean / "tfrecords")
    assert not list((killed / "tfrecords").glob(".*.tmp"))


@pytest.mark.slow
def test_kill_9_mid_train_then_rerun_completes_the_run(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained / "tfrecords", work / "tfrecords")
    shutil.copytree(trained / "folds", work / "folds")
    args = ["--fold=all", "--arch=tiny", "--epochs=40", "--batch_size=8", "--name=k", "--tfrecords=tfrecords"]
    history = work / "runs" / "k" / "fold0" / "history.csv"
    kill_9_when("train.py", *args, cwd=work, timeout=180, what="two finished epochs of fold 0",
                ready=lambda: history.exists() and len(history.read_text().splitlines()) >= 3)
    fold_dirs = [work / "runs" / "k" / f"fold{k}" for k in (0, 1)]
    assert not all((d / "complete.json").exists() for d in fold_dirs)  # killed before the run finished
    refused = script("predict.py", "--runs=runs/k", "--tta=1", cwd=work)
    assert_refused(refused, "did not finish")  # the half run is invisible to predict
    out = script("train.py", *args, cwd=work)
    assert_ok(out)
    for d in fold_dirs:
        assert (d / "complete.json").exists()
        epochs = pd.read_csv(d / "history.csv")["epoch"].tolist()
        assert epochs == sorted(set(epochs)) and len(epochs) == 40  # resumed: no epoch run twice or lost
    assert_ok(script("predict.py", "--runs=runs/k", "--tta=1", cwd=work))
