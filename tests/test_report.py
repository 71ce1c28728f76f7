"""report.py on fabricated run directories: files, numbers equal metrics.py, embedded figures, compare mode."""
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from histofold import metrics, report

CLASSES7 = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "TUM"]
N_BOOT = 200


def _fake_run(root, name, *, classes, n_per_fold=60, folds=3, signal=2.0, seed=0, history=True):
    """runs/<name>/fold{k}/ with config.json, history.csv and an oof.csv of realistic probabilities."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    data_rng = np.random.default_rng(123)  # same ids and labels for every run, so compare can join on id
    for f in range(folds):
        d = root / "runs" / name / f"fold{f}"
        d.mkdir(parents=True)
        y = data_rng.integers(0, k, n_per_fold)
        logits = rng.normal(size=(n_per_fold, k)) + signal * np.eye(k)[y]
        P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        oof = pd.DataFrame({"id": [f"img_{f}_{i:03d}" for i in range(n_per_fold)], "label": y, "fold": f})
        for j, c in enumerate(classes):
            oof[f"p_{c}"] = P[:, j]
        oof.to_csv(d / "oof.csv", index=False)
        monitor = "val_auc" if k == 2 else "val_macro_f1"
        cfg = {"classes": classes, "num_classes": k, "arch": "tiny_test", "image_size": [16, 16], "fold": f,
               "tfrecords": "tfrecords", "monitor": monitor}
        (d / "config.json").write_text(json.dumps(cfg))
        if history:
            e = np.arange(6)
            m = monitor[4:]
            pd.DataFrame({"epoch": e, "loss": 0.7 * 0.8 ** e, "val_loss": 0.75 * 0.85 ** e + 0.01 * f,
                          m: 0.6 + 0.06 * e, f"val_{m}": 0.58 + 0.05 * e - 0.01 * f,
                          "lr": 1e-3 * 0.5 ** e}).to_csv(d / "history.csv", index=False)
    return str(root / "runs" / name)


def _callbacks():
    """load_model: a small random CNN (one per fold dir); load_images: images seeded by id."""
    import keras

    def load_model(fold_dir):
        keras.utils.set_random_seed(int(fold_dir[-1]))
        inp = keras.Input((16, 16, 3))
        h = keras.layers.Rescaling(1 / 255.0)(inp)
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(h)
        h = keras.layers.GlobalAveragePooling2D(name="head_pool")(h)
        logits = keras.layers.Dense(1, name="head_logits")(h)
        return keras.Model(inp, keras.layers.Activation("sigmoid", name="head_probs")(logits))

    def load_images(ids):
        return np.stack([np.random.default_rng(abs(hash(i)) % 2**32).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                         for i in ids])

    return load_model, load_images


def _embedded_alts(html_text):
    return set(re.findall(r"<img alt='(\w+)' src='data:image/png;base64,[A-Za-z0-9+/=]{200,}'>", html_text))


def test_binary_report(tmp_path):
    run = _fake_run(tmp_path, "cnn", classes=["0", "1"], seed=0)
    load_model, load_images = _callbacks()
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="cnn", n_boot=N_BOOT,
                              load_model=load_model, load_images=load_images, n_gradcam=3)
    rdir = tmp_path / "reports" / "cnn"
    for f in ["metrics.json", "report.md", "report.html"] + [f"figures/{k}.png" for k in
                                                            ("roc", "pr", "confusion", "reliability", "training",
                                                             "class_balance", "gradcam")]:
        assert (rdir / f).is_file() and (rdir / f).stat().st_size > 1000, f
    saved = json.loads((rdir / "metrics.json").read_text())
    oof = pd.concat([pd.read_csv(f"{run}/fold{f}/oof.csv", dtype={"id": str}) for f in range(3)])
    ref = metrics.binary_report(oof["label"], oof["p_1"], n_boot=N_BOOT, seed=0)
    assert saved["overall"]["auc"] == pytest.approx(ref["auc"])
    assert saved["overall"]["auc_ci"] == pytest.approx(ref["auc_ci"])
    assert saved["overall"]["at_youden"]["f1"] == pytest.approx(ref["at_youden"]["f1"])
    assert saved["overall"]["at_0.5"]["specificity"] == pytest.approx(ref["at_0.5"]["specificity"])
    fold_aucs = [metrics.fast_auc(oof.loc[oof.fold == f, "label"], oof.loc[oof.fold == f, "p_1"]) for f in range(3)]
    assert [m["auc"] for m in saved["folds"]] == pytest.approx(fold_aucs)
    assert saved["summary"]["auc"]["mean"] == pytest.approx(np.mean(fold_aucs))
    assert saved["summary"]["auc"]["std"] == pytest.approx(np.std(fold_aucs, ddof=1))
    assert saved["calibration"]["ece"] == pytest.approx(metrics.expected_calibration_error(oof["label"], oof["p_1"]))
    assert out["auc"] == pytest.approx(ref["auc"])
    assert set(saved["gradcam"]["categories"]) == {"TP", "FP", "FN", "TN"}
    assert all(len(v) <= 3 for v in saved["gradcam"]["categories"].values())
    html_text = (rdir / "report.html").read_text()
    expected = {"roc", "pr", "confusion", "reliability", "training", "class_balance", "gradcam"}
    assert expected <= _embedded_alts(html_text)
    assert "figures/roc.png" in (rdir / "report.md").read_text()


def test_gallery_picks_most_confident_per_outcome(tmp_path):
    run = report.load_run([_fake_run(tmp_path, "cnn", classes=["0", "1"], seed=1)], name="cnn")
    picks = report.gallery_picks(run, 2)
    p = run.oof.set_index("id")["p_1"]
    y = run.oof.set_index("id")["label"]
    tp = run.oof[(run.oof.label == 1) & (run.oof.p_1 >= 0.5)].nlargest(2, "p_1")["id"].tolist()
    assert picks["TP"]["id"].tolist() == tp
    assert all(y[i] == 0 and p[i] < 0.5 for i in picks["TN"]["id"])
    assert all(y[i] == 1 and p[i] < 0.5 for i in picks["FN"]["id"])


def test_multiclass_report_without_callbacks(tmp_path):
    run = _fake_run(tmp_path, "histo7", classes=CLASSES7, n_per_fold=70, seed=2)
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="histo7", n_boot=N_BOOT)
    rdir = tmp_path / "reports" / "histo7"
    saved = json.loads((rdir / "metrics.json").read_text())
    oof = pd.concat([pd.read_csv(f"{run}/fold{f}/oof.csv", dtype={"id": str}) for f in range(3)])
    ref = metrics.multiclass_metrics(oof["label"], oof[[f"p_{c}" for c in CLASSES7]].to_numpy(), class_names=CLASSES7)
    for k in ("accuracy", "macro_f1", "weighted_f1", "macro_auc", "cohen_kappa", "quadratic_kappa"):
        assert saved["overall"][k] == pytest.approx(ref[k]), k
    assert saved["overall"]["confusion_matrix"] == ref["confusion_matrix"]
    assert out["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert "skipped" in saved["gradcam"] and not (rdir / "figures" / "gradcam.png").exists()
    html_text = (rdir / "report.html").read_text()
    assert {"roc", "confusion", "training", "reliability"} <= _embedded_alts(html_text)
    assert all(c in html_text for c in CLASSES7) and "Grad-CAM gallery" in html_text


def test_compare_mode_gives_paired_diff_ci(tmp_path):
    good = _fake_run(tmp_path, "good", classes=["0", "1"], signal=3.0, seed=3)
    weak = _fake_run(tmp_path, "weak", classes=["0", "1"], signal=0.7, seed=4, history=False)
    report.build_report([good], out_dir=str(tmp_path / "reports"), name="good", compare=[weak], gradcam=False,
                        n_boot=N_BOOT)
    rdir = tmp_path / "reports" / "good"
    comp = json.loads((rdir / "metrics.json").read_text())["compare"][0]
    a = pd.concat([pd.read_csv(f"{good}/fold{f}/oof.csv", dtype={"id": str}) for f in range(3)])
    b = pd.concat([pd.read_csv(f"{weak}/fold{f}/oof.csv", dtype={"id": str}) for f in range(3)])
    j = a.merge(b, on="id", suffixes=("", "_b"))
    ref = metrics.bootstrap_auc_diff(j["label"], j["p_1"], j["p_1_b"], n_boot=N_BOOT, seed=0)
    assert comp["name"] == "weak" and comp["n_shared"] == 180
    assert comp["auc_diff"]["diff"] == pytest.approx(ref["diff"]) and comp["auc_diff"]["ci"] == pytest.approx(ref["ci"])
    assert comp["auc_diff"]["ci"][0] > 0  # the stronger model wins with a CI above zero
    assert "compare_roc" in _embedded_alts((rdir / "report.html").read_text())


def test_mismatched_classes_and_missing_oof_raise(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=2)
    os.remove(f"{run}/fold1/oof.csv")
    with pytest.raises(FileNotFoundError, match="fold1/oof.csv is missing"):
        report.build_report([run], out_dir=str(tmp_path / "r"), name="a", gradcam=False, n_boot=10)
