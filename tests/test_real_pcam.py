"""A real signal on real patches: a short run of a small model on pcam_jpeg/train (3000 JPEGs)."""
import pandas as pd
import pytest

import prepare_tfrecords
import train
from conftest import shared
from histofold import metrics


@pytest.mark.slow
def test_short_run_on_pcam_train_reaches_auc_above_075(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_tfrecords.main(source="folder", input=str(shared("pcam_jpeg") / "train"), folds=5)
    [summary] = train.main(fold="0", arch="histo_cnn", width=16, image_size=48, epochs=3, lr=3e-3,
                         augment="light")
    oof = pd.read_csv("runs/histo_cnn/fold0/oof.csv")
    assert len(oof) == 600  # fold 0 of 3000, held out from training
    auc = metrics.binary_metrics(oof["label"].to_numpy(), oof["p_1"].to_numpy())["roc_auc"]
    assert auc == pytest.approx(summary["roc_auc"])
    assert auc > 0.75, auc
    assert oof["p_1"].std() > 0.05  # not a constant prediction
