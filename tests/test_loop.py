"""Training loop: run directory contents, OOF coverage, resume after a kill, finetune, repeatability, errors."""
import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

from helpers_records import write_fake_tfrecords
from histofold import loop, runs
from histofold.config import TrainConfig
from histofold.errors import UsageError
from histofold.manifest import Manifest


@pytest.fixture(scope="module")
def tfrec(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tfrecords"
    write_fake_tfrecords(str(out), n_per_fold=24, folds=3, n_test=10, size=32, num_classes=2)
    return str(out)


def _cfg(tfrec, tmp_path, **kw):
    base = dict(tfrecords=tfrec, fold=1, arch="tiny", runs_dir=str(tmp_path / "runs"), epochs=1,
                batch_size=16, lr=3e-3, weights="none", augment="light", seed=3)
    base.update(kw)
    return TrainConfig.from_flags(**base)


def _train(cfg):
    """The one fold a config names (what train.py runs for --fold=k)."""
    return loop.train(cfg)[0]


def _ids_of_fold(tfrec, fold):
    folds = pd.read_csv(os.path.join(os.path.dirname(tfrec), "folds", "folds.csv"), dtype={"id": str})
    return set(folds.loc[folds["fold"] == fold, "id"])


def test_one_epoch_writes_every_run_file_and_oof_covers_fold(tfrec, tmp_path):
    summary = _train(_cfg(tfrec, tmp_path))
    run_dir = tmp_path / "runs" / "tiny" / "fold1"
    for name in (runs.CONFIG, runs.WEIGHTS, runs.HISTORY, runs.OOF, runs.METRICS, runs.LOG, runs.COMPLETE):
        assert (run_dir / name).is_file(), name
    complete = json.loads((run_dir / runs.COMPLETE).read_text())["files"]
    assert set(complete) == {runs.CONFIG, runs.WEIGHTS, runs.HISTORY, runs.OOF, runs.METRICS}
    oof = pd.read_csv(run_dir / runs.OOF, dtype={"id": str})
    assert set(oof["id"]) == _ids_of_fold(tfrec, 1) and oof["id"].is_unique
    assert (oof["fold"] == 1).all()
    assert np.allclose(oof[["p_0", "p_1"]].sum(axis=1), 1.0, atol=1e-5)
    config = json.loads((run_dir / runs.CONFIG).read_text())
    resolved = config["resolved"]
    assert resolved["classes"] == ["0", "1"] and config["arch"] == "tiny" and config["fold"] == "1"
    assert resolved["train_folds"] == [0, 2] and resolved["manifest_sha256"]
    # config.json is the TrainConfig serialized: loading the run gives the object back
    assert runs.RunDir(str(run_dir)).config() == _cfg(tfrec, tmp_path)
    hist = pd.read_csv(run_dir / runs.HISTORY)
    assert {"loss", "val_loss", "val_auc", "lr"} <= set(hist.columns) and len(hist) == 1
    assert summary["n_oof"] == len(oof)
    assert not (run_dir / "backup0").exists()  # backups go once the fold finished


def test_balanced_class_weights_from_manifest(tfrec, tmp_path):
    manifest = Manifest.load(tfrec)
    w = loop._class_weights(_cfg(tfrec, tmp_path), manifest, [0, 2])
    per = manifest.counts["per_fold_class"]
    counts = np.array([sum(per[str(f)][str(c)] for f in (0, 2)) for c in range(2)])
    assert w == pytest.approx(list(counts.sum() / (2 * counts)))
    assert loop._class_weights(_cfg(tfrec, tmp_path, class_weight="none"), manifest, [0]) is None
    assert loop._class_weights(_cfg(tfrec, tmp_path, class_weight='{"0": 2, "1": 1}'), manifest, [0]) == [2.0, 1.0]


class _Killer(keras.callbacks.Callback):
    """Simulates a killed process after `after` finished epochs (BackupAndRestore saved them)."""

    def __init__(self, after):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            raise KeyboardInterrupt("killed")


def test_killed_run_resumes_from_backup_with_same_epoch_count(tfrec, tmp_path, monkeypatch):
    cfg = _cfg(tfrec, tmp_path, epochs=3, name="resume")
    real = loop._callbacks
    monkeypatch.setattr(loop, "_callbacks", lambda *a, **k: real(*a, **k) + [_Killer(2)])
    with pytest.raises(KeyboardInterrupt):
        _train(cfg)
    run_dir = tmp_path / "runs" / "resume" / "fold1"
    assert len(pd.read_csv(run_dir / runs.HISTORY)) == 2
    assert not (run_dir / runs.METRICS).exists()
    # an unfinished run is invisible: latest_run skips it and predict refuses it by name
    with pytest.raises(runs.DataError, match="did not finish"):
        runs.fold_dirs(str(tmp_path / "runs" / "resume"))
    monkeypatch.setattr(loop, "_callbacks", real)
    summary = _train(cfg)
    hist = pd.read_csv(run_dir / runs.HISTORY)
    assert list(hist["epoch"]) == [0, 1, 2]  # resumed at epoch 3, not restarted
    assert summary["epochs_run"] == 3
    # The LR continues the one schedule: the resumed epoch's LR is below the first two (annealing).
    assert hist["lr"].iloc[2] < hist["lr"].iloc[1]


def test_finished_fold_is_skipped_unless_overwrite(tfrec, tmp_path):
    cfg = _cfg(tfrec, tmp_path, name="skip")
    _train(cfg)
    weights = tmp_path / "runs" / "skip" / "fold1" / runs.WEIGHTS
    mtime = weights.stat().st_mtime_ns
    _train(cfg)
    assert weights.stat().st_mtime_ns == mtime


def test_same_seed_repeats_on_cpu(tfrec, tmp_path):
    a = _train(_cfg(tfrec, tmp_path, name="a", epochs=2))
    b = _train(_cfg(tfrec, tmp_path, name="b", epochs=2))
    ha = pd.read_csv(tmp_path / "runs" / "a" / "fold1" / runs.HISTORY)
    hb = pd.read_csv(tmp_path / "runs" / "b" / "fold1" / runs.HISTORY)
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    assert a["roc_auc"] == pytest.approx(b["roc_auc"])


def test_two_stage_freeze_then_finetune_changes_trainable_count(tfrec, tmp_path):
    import finetune

    _train(_cfg(tfrec, tmp_path, name="frz", epochs=2, freeze_base_epochs=1))
    log_text = (tmp_path / "runs" / "frz" / "fold1" / runs.LOG).read_text()
    counts = [int(line.split(", ")[-1].split()[0]) for line in log_text.splitlines() if "trainable params" in line]
    assert len(counts) == 2 and counts[0] < counts[1]  # head only, then everything

    src = str(tmp_path / "runs" / "frz" / "fold1")
    summary = finetune.main(run=src, unfreeze=1, epochs=1)
    ft_dir = tmp_path / "runs" / "frz_ft" / "fold1"
    assert (ft_dir / runs.OOF).is_file() and summary["n_oof"] > 0
    ft_log = (ft_dir / runs.LOG).read_text()
    ft_count = int([l for l in ft_log.splitlines() if "trainable params" in l][0].split(", ")[-1].split()[0])
    assert counts[0] < ft_count < counts[1]  # top backbone layer + head
    ft_config = json.loads((ft_dir / runs.CONFIG).read_text())
    assert ft_config["init_run"] == src and ft_config["unfreeze"] == "1"
    assert ft_config["lr"] == pytest.approx(3e-4) and ft_config["train_bn"] is False


@pytest.mark.parametrize("kw, match", [
    (dict(arch="nope"), "--arch"),
    (dict(fold=7), "out of range"),
    (dict(arch="resnet50", image_size=50), "image_size"),
    (dict(tfrecords="/nonexistent/tfrecords"), "prepare_tfrecords"),
])
def test_bad_input_one_line_errors(tfrec, tmp_path, kw, match):
    with pytest.raises(UsageError) as e:
        _train(_cfg(tfrec, tmp_path, **kw))
    assert match in str(e.value) and "\n" not in str(e.value)


def test_run_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(runs.DataError, match="not a run directory"):
        runs.RunDir(str(tmp_path)).require_complete()


def test_fold_full_trains_on_every_fold_and_keeps_final_weights(tfrec, tmp_path):
    summary = _train(_cfg(tfrec, tmp_path, fold="full", name="full", ema=0.9, epochs=2))
    run = runs.RunDir(str(tmp_path / "runs" / "full" / "full"))
    assert run.is_complete() and not run.has(runs.OOF) and summary["monitor"] == "last"
    assert run.resolved()["train_folds"] == [0, 1, 2] and run.resolved()["val_folds"] == []
    assert run.fold == "full" and runs.fold_dirs(str(tmp_path / "runs" / "full")) == [run]


def test_best_epoch_is_never_inside_the_warmup(tfrec, tmp_path, monkeypatch):
    """With a 60% warm-up over 5 epochs, epochs 1-2 may score best but are not kept (issue: calibration)."""
    _train(_cfg(tfrec, tmp_path, name="warm", epochs=5, warmup=0.6))
    run = runs.RunDir(str(tmp_path / "runs" / "warm" / "fold1"))
    assert run.resolved()["first_eligible_epoch"] == 3
    hist = run.history()
    best = float(hist.loc[hist["epoch"] >= 2, "val_auc"].max())
    assert run.metrics()["best_monitor"] == pytest.approx(best)
