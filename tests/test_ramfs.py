"""The whole chain on an in-memory file system: prepare -> train -> predict -> evaluate with every path on
`ram://` (tf.io.gfile's, per process, so the scripts' main() run in-process). Any bare `open`/`os.path`
on a data path either fails here or leaves a stray local file (a `ram:` folder) in the empty working
directory: both are caught. The same code path serves `gs://`."""
import json
import uuid

import pytest

import evaluate
import predict
import prepare_tfrecords
import train
from histofold import io


@pytest.fixture
def ram(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = f"ram://histofold-{uuid.uuid4().hex[:8]}"
    yield root
    io.rmtree(root)


def test_prepare_train_predict_evaluate_on_ram(ram, tmp_path):
    tf_dir, folds_dir, runs_dir = f"{ram}/tfrecords", f"{ram}/folds", f"{ram}/runs"
    summary = prepare_tfrecords.main(source="synthetic", count=48, test_count=12, image_size=32, folds=2,
                                     out=tf_dir, folds_dir=folds_dir, shard_mb=0.02, verify=True, log_level="warning")
    assert summary["verify"] and summary["written"] == 60
    assert io.exists(f"{tf_dir}/manifest.json") and io.exists(f"{folds_dir}/folds.csv")

    folds = train.main(fold="all", arch="tiny", epochs=1, batch_size=16, tfrecords=tf_dir, runs_dir=runs_dir,
                       name="ram", log_level="warning")
    assert [f["fold"] for f in folds] == [0, 1]
    assert all(io.exists(f"{runs_dir}/ram/fold{k}/complete.json") for k in range(2))

    out = predict.main(runs=f"{runs_dir}/ram", tta=2, oof=True, out_dir=f"{ram}/submissions", name="sub",
                       log_level="warning")
    assert out["submission"].startswith(ram) and io.exists(out["submission"])
    sub = io.read_csv(out["submission"], dtype={"id": str})
    test_ids = io.read_csv(f"{tf_dir}/test_ids.csv", dtype={"id": str})["id"]
    assert list(sub["id"]) == list(test_ids)

    rep = evaluate.main(runs=f"{runs_dir}/ram", out_dir=f"{ram}/reports", n_boot=20, n_gradcam=2,
                        log_level="warning")
    assert rep["metrics_json"].startswith(ram) and rep["report_html"].startswith(ram)
    metrics = json.loads(io.read_text(rep["metrics_json"]))
    assert metrics["overall"]["n"] == 48 and "data:image/png;base64" in io.read_text(rep["report_html"])

    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing landed on the local disk
