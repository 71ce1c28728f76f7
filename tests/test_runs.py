"""runs.py: a run directory is visible only when complete, and every file is checked before use."""
import os

import pytest

from helpers_records import write_fake_tfrecords
from histofold import loop, runs
from histofold.config import TrainConfig
from histofold.errors import DataError, IntegrityError, UsageError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_test")
    tfrec = str(root / "tfrecords")
    write_fake_tfrecords(tfrec, n_per_fold=16, folds=2, n_test=6, size=16)
    cfg = TrainConfig.from_flags(tfrecords=tfrec, fold="all", arch="tiny", runs_dir=str(root / "runs"), epochs=1,
                                 batch_size=8, weights="none", name="r")
    loop.train(cfg)
    return root


def _copy(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "r"


def test_complete_run_loads_and_builds(trained):
    [d0, d1] = runs.fold_dirs(str(trained / "runs" / "r"))
    assert (d0.fold, d1.fold) == (0, 1) and d0.run_name == "r"
    model = d0.build_model()
    assert model.input_shape[1:] == (16, 16, 3)
    assert runs.latest_run(str(trained / "runs")) == str(trained / "runs" / "r")
    assert runs.run_name(str(trained / "runs" / "r") + "/") == "r"  # a trailing slash is no problem


def test_flipped_bytes_in_weights_are_refused_naming_the_file(trained, tmp_path):
    run = _copy(trained, tmp_path)
    path = run / "fold0" / runs.WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        runs.RunDir(str(run / "fold0")).build_model()
    assert str(path) in str(e.value) and "sha256" in str(e.value) and "train.py" in str(e.value)


def test_truncated_weights_and_oof_are_refused(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "fold1" / runs.WEIGHTS).write_bytes((run / "fold1" / runs.WEIGHTS).read_bytes()[:100])
    with pytest.raises(IntegrityError, match="model.weights.h5"):
        runs.RunDir(str(run / "fold1")).build_model()
    with open(run / "fold0" / runs.OOF, "a") as f:
        f.write("extra,0,0,0.5,0.5\n")
    with pytest.raises(IntegrityError, match="oof.csv"):
        runs.RunDir(str(run / "fold0")).oof()


def test_unfinished_fold_hides_the_run(trained, tmp_path):
    run = _copy(trained, tmp_path)
    os.remove(run / "fold1" / runs.COMPLETE)
    with pytest.raises(DataError, match="fold1 did not finish"):
        runs.fold_dirs(str(run))
    with pytest.raises(DataError, match="r did not finish"):
        runs.latest_run(str(tmp_path / "runs"))
    assert [d.fold for d in runs.fold_dirs(str(run), complete=False)] == [0, 1]


def test_failed_train_leaves_no_visible_run(tmp_path):
    tfrec = str(tmp_path / "tfrecords")
    write_fake_tfrecords(tfrec, n_per_fold=8, folds=2, n_test=2, size=16)
    cfg = TrainConfig.from_flags(tfrecords=tfrec, fold="0", arch="tiny", runs_dir=str(tmp_path / "runs"), epochs=1,
                                 batch_size=4, weights="none", lr=1e30, name="bad")
    with pytest.raises(UsageError, match="loss became"):
        loop.train(cfg)
    assert (tmp_path / "runs" / "bad" / "fold0" / runs.CONFIG).exists()
    with pytest.raises(DataError, match="no finished runs"):
        runs.latest_run(str(tmp_path / "runs"))
