"""report.py on fabricated complete run directories (config.json, history.csv, oof.csv, complete.json):
files, numbers equal metrics.py, embedded figures, compare mode, errors; and evaluate() on a real
trained run."""
import json
import os
import re
import zlib

import numpy as np
import pandas as pd
import pytest

from histofold import metrics, report, runs
from histofold.errors import DataError, IntegrityError

CLASSES7 = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "TUM"]
N_BOOT = 200


def _fake_run(root, name, *, classes, n_per_fold=60, folds=3, signal=2.0, seed=0, history=True, complete=True,
              shift=0.0, config=None):
    """runs/<name>/fold{k}/ with config.json, history.csv and an oof.csv of realistic probabilities,
    marked complete (runs.RunDir.mark_complete) as train.py does last."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    data_rng = np.random.default_rng(123)  # same ids and labels for every run, so compare can join on id
    for f in range(folds):
        d = root / "runs" / name / f"fold{f}"
        d.mkdir(parents=True)
        y = data_rng.integers(0, k, n_per_fold)
        logits = rng.normal(size=(n_per_fold, k)) + signal * np.eye(k)[y]
        logits[:, -1] += shift * f  # fold f's model scores the last class `shift * f` higher: its own scale
        P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        oof = pd.DataFrame({"id": [f"img_{f}_{i:03d}" for i in range(n_per_fold)], "label": y, "fold": f})
        for j, c in enumerate(classes):
            oof[f"p_{c}"] = P[:, j]
        oof.to_csv(d / "oof.csv", index=False)
        monitor = "val_auc" if k == 2 else "val_macro_f1"
        cfg = {"arch": "tiny_test", "fold": str(f), "tfrecords": "tfrecords", "monitor": monitor,
               "resolved": {"classes": classes, "image_size": [16, 16], "tfrecords": "tfrecords"}}
        cfg.update(config(f) if callable(config) else (config or {}))
        (d / "config.json").write_text(json.dumps(cfg))
        if history:
            e = np.arange(6)
            m = monitor[4:]
            pd.DataFrame({"epoch": e, "loss": 0.7 * 0.8 ** e, "val_loss": 0.75 * 0.85 ** e + 0.01 * f,
                          m: 0.6 + 0.06 * e, f"val_{m}": 0.58 + 0.05 * e - 0.01 * f,
                          "lr": 1e-3 * 0.5 ** e}).to_csv(d / "history.csv", index=False)
        if complete:
            runs.RunDir(str(d)).mark_complete()
    return str(root / "runs" / name)


def _stable_seed(image_id: str) -> int:
    """A seed from an id that does not change with PYTHONHASHSEED (hash() of a str does)."""
    return zlib.crc32(str(image_id).encode())


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
        return np.stack([np.random.default_rng(_stable_seed(i)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
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


def test_stable_seed_is_fixed():
    assert _stable_seed("img_0_000") == zlib.crc32(b"img_0_000") == _stable_seed("img_0_000")
    assert _stable_seed("img_0_000") != _stable_seed("img_0_001")


def test_load_run_reads_complete_folds_in_order(tmp_path):
    run_path = _fake_run(tmp_path, "cnn", classes=["0", "1"], folds=3, n_per_fold=10)
    run = report.load_run([run_path], name="cnn")
    assert [os.path.basename(d) for d in run.fold_dirs] == ["fold0", "fold1", "fold2"]
    assert run.classes == ["0", "1"] and run.binary and len(run.oof) == 30
    assert run.configs[0]["image_size"] == [16, 16]                  # resolved facts merged in
    assert run.probs().shape == (30, 2)
    by_folds = report.load_run([f"{run_path}/fold2", f"{run_path}/fold0"], name="cnn")
    assert [os.path.basename(d) for d in by_folds.fold_dirs] == ["fold2", "fold0"] and len(by_folds.oof) == 20


def test_missing_oof_is_an_integrity_error(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=2)
    os.remove(f"{run}/fold1/oof.csv")
    with pytest.raises(IntegrityError, match="fold1/oof.csv is missing"):
        report.build_report([run], out_dir=str(tmp_path / "r"), name="a", gradcam=False, n_boot=10)


def test_changed_oof_is_refused(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=2)
    with open(f"{run}/fold0/oof.csv", "a") as f:
        f.write("extra,0,0,0.5,0.5\n")
    with pytest.raises(IntegrityError, match="fold0/oof.csv does not match its sha256"):
        report.load_run([run], name="a")


def test_unfinished_fold_is_refused(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=2, complete=False)
    with pytest.raises(DataError, match="fold0 did not finish"):
        report.load_run([run], name="a")


def test_mismatched_classes_raise(tmp_path):
    a = _fake_run(tmp_path, "a", classes=["0", "1"], folds=1)
    b = _fake_run(tmp_path, "b", classes=["neg", "pos"], folds=1)
    with pytest.raises(DataError, match=r"has classes \['neg', 'pos'\] .* \['0', '1'\]"):
        report.load_run([a, b], name="ab")


def test_the_same_fold_twice_is_refused(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=1)
    with pytest.raises(DataError, match="more than one fold"):
        report.load_run([f"{run}/fold0", f"{run}/fold0"], name="a")


def test_oof_with_nan_or_missing_columns_is_refused(tmp_path):
    run = _fake_run(tmp_path, "a", classes=["0", "1"], folds=1, complete=False)
    oof = pd.read_csv(f"{run}/fold0/oof.csv", dtype={"id": str})
    oof.loc[3, "p_1"] = np.nan
    oof.to_csv(f"{run}/fold0/oof.csv", index=False)
    runs.RunDir(f"{run}/fold0").mark_complete()
    with pytest.raises(DataError, match=r"1 rows have NaN probabilities .*id img_0_003"):
        report.load_run([run], name="a")
    oof.drop(columns=["p_1"]).to_csv(f"{run}/fold0/oof.csv", index=False)
    runs.RunDir(f"{run}/fold0").mark_complete()
    with pytest.raises(DataError, match=r"lacks columns \['p_1'\]"):
        report.load_run([run], name="a")


def test_evaluate_reports_a_trained_run_with_its_own_models_and_images(tmp_path):
    from helpers_records import write_fake_tfrecords
    from histofold import loop
    from histofold.config import EvaluateConfig, TrainConfig

    tfrec = str(tmp_path / "tfrecords")
    write_fake_tfrecords(tfrec, n_per_fold=16, folds=2, n_test=2, size=16)
    loop.train(TrainConfig.from_flags(tfrecords=tfrec, fold="all", arch="tiny", runs_dir=str(tmp_path / "runs"),
                                      epochs=1, batch_size=8, weights="none", name="ev"))
    out = report.evaluate(EvaluateConfig.from_flags(runs=str(tmp_path / "runs" / "ev"),
                                                    out_dir=str(tmp_path / "reports"), n_boot=20, n_gradcam=1))
    rdir = tmp_path / "reports" / "ev"
    saved = json.loads((rdir / "metrics.json").read_text())
    oof = pd.concat([pd.read_csv(tmp_path / "runs" / "ev" / f"fold{f}" / "oof.csv", dtype={"id": str})
                     for f in range(2)])
    assert len(oof) == 32 and saved["meta"]["n_oof"] == 32
    assert "slide" not in oof.columns and saved["slides"] == {}  # patches, not whole-slide tiles
    assert saved["overall"]["auc"] == pytest.approx(metrics.fast_auc(oof["label"], oof["p_1"]))
    assert out["report_dir"] == str(rdir)
    assert "skipped" not in saved["gradcam"] and (rdir / "figures" / "gradcam.png").stat().st_size > 1000
    shown = [i for ids in saved["gradcam"]["categories"].values() for i in ids]
    assert shown and set(shown) <= set(oof["id"])


# ------------------------------------------------------------------------------------------ issue 15 / 13

def _md(tmp_path, name):
    return (tmp_path / "reports" / name / "report.md").read_text()


def _saved(tmp_path, name):
    return json.loads((tmp_path / "reports" / name / "metrics.json").read_text())


def _fold_aucs(run, folds=3):
    oof = [pd.read_csv(f"{run}/fold{f}/oof.csv", dtype={"id": str}) for f in range(folds)]
    return [metrics.fast_auc(o["label"], o["p_1"]) for o in oof], pd.concat(oof)


def test_headline_gives_pooled_and_mean_fold_auc_and_notes_when_they_diverge(tmp_path):
    calm = _fake_run(tmp_path, "calm", classes=["0", "1"], seed=0, n_per_fold=200)
    skew = _fake_run(tmp_path, "skew", classes=["0", "1"], seed=0, n_per_fold=200, shift=3.0)
    outs = {n: report.build_report([r], out_dir=str(tmp_path / "reports"), name=n, n_boot=N_BOOT, gradcam=False)
            for n, r in (("calm", calm), ("skew", skew))}
    for name, run in (("calm", calm), ("skew", skew)):
        aucs, oof = _fold_aucs(run)
        out, saved = outs[name], _saved(tmp_path, name)
        assert out["auc"] == pytest.approx(metrics.fast_auc(oof["label"], oof["p_1"]))
        assert out["mean_fold_auc"] == pytest.approx(np.mean(aucs))
        assert out["fold_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert saved["pooled_vs_folds"]["gap"] == pytest.approx(out["auc"] - np.mean(aucs))
    # the shift keeps each fold's ranking (same fold AUCs) but puts the folds on different scales
    assert outs["skew"]["mean_fold_auc"] == pytest.approx(outs["calm"]["mean_fold_auc"])
    assert outs["calm"]["mean_fold_auc"] - outs["skew"]["auc"] > 0.02
    assert "auc_note" not in outs["calm"] and "They agree" in _md(tmp_path, "calm")
    assert "mixes fold calibrations" in outs["skew"]["auc_note"]
    md = _md(tmp_path, "skew")
    assert md.index("## Headline") < md.index("## Pooled OOF metrics") and "mixes fold calibrations" in md
    assert f"| ROC AUC | {outs['skew']['auc']:.4f} | {outs['skew']['mean_fold_auc']:.4f} ± " in md


def test_pooled_vs_folds_thresholds():
    assert not report.pooled_vs_folds(0.900, 0.905, 0.02)["diverge"]
    assert report.pooled_vs_folds(0.880, 0.895, 0.02)["diverge"]          # > 0.01
    assert report.pooled_vs_folds(0.900, 0.908, 0.004)["diverge"]         # > 1 sd
    assert not report.pooled_vs_folds(0.900, 0.905, float("nan"))["diverge"]  # one fold: no sd


def test_evaluate_prints_pooled_and_mean_fold_auc(tmp_path):
    from histofold.cli import format_summary

    run = _fake_run(tmp_path, "cnn", classes=["0", "1"], seed=0, shift=3.0)
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="cnn", n_boot=N_BOOT, gradcam=False)
    text = format_summary(out)
    assert re.search(r"^auc: 0\.\d{4}$", text, re.M) and re.search(r"^mean_fold_auc: 0\.\d{4}$", text, re.M)
    assert re.search(r"^fold_auc_sd: 0\.\d{4}$", text, re.M) and "auc_note: pooled OOF AUC mixes" in text


def test_settings_table_reads_config_json_and_shows_folds_that_differ(tmp_path):
    cfg = lambda f: {"epochs": 7, "lr": 0.002, "batch_size": 32, "augment": "strong", "seed": 5 + (f == 2),
                     "oof_tta": 1, "precision": "mixed_bfloat16", "global_batch": 32, "lr_scaled": 0.002,
                     "stain": {"method": "macenko", "params": {}}, "val_folds": [f],
                     "train_folds": [g for g in range(3) if g != f]}
    run = _fake_run(tmp_path, "cfg", classes=["0", "1"], config=cfg)
    report.build_report([run], out_dir=str(tmp_path / "reports"), name="cfg", n_boot=N_BOOT, gradcam=False)
    rows = {r["setting"]: r for r in _saved(tmp_path, "cfg")["settings"]}
    assert rows["epochs"]["value"] == "7" and rows["augmentation"]["value"] == "strong"
    assert rows["stain normalization"]["value"] == "macenko" and rows["precision"]["value"] == "mixed_bfloat16"
    assert rows["architecture"]["value"] == "tiny_test" and rows["OOF TTA"]["value"] == "1"
    assert rows["folds (validation / all)"]["value"] == "0 / 3, 1 / 3, 2 / 3"
    assert rows["seed"]["varies"] == "5 | 5 | 6" and rows["epochs"]["varies"] == ""
    md = _md(tmp_path, "cfg")
    assert "## Settings" in md and "| batch size (global) | 32 |" in md and "| seed | 5 | 5 | 5 | 6 |" in md


def _write_test_preds(run, *, n_test=40, sizes=(1, 8), labeled=True, slides=False, seed=7):
    """test_tta<n>.csv in every fold, as predict.py writes them; returns {n: fold-mean P(1)} and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_test)
    ids = [f"t{i:03d}" for i in range(n_test)]
    means = {}
    for n in sizes:
        ps = []
        for f in range(3):
            p = 1 / (1 + np.exp(-(rng.normal(size=n_test) + (1.0 + 0.1 * n) * (2 * y - 1))))
            frame = pd.DataFrame({"id": ids, "label": y if labeled else -1, "p_0": 1 - p, "p_1": p})
            if slides:
                frame["slide"] = [f"s{i % 8}" for i in range(n_test)]
            frame.sample(frac=1, random_state=f).to_csv(f"{run}/fold{f}/test_tta{n}.csv", index=False)  # any order
            ps.append(p)
        means[n] = np.mean(ps, axis=0)
    return means, y


def test_held_out_test_section_scores_the_fold_ensemble(tmp_path):
    run = _fake_run(tmp_path, "tst", classes=["0", "1"], config={"oof_tta": 1})
    means, y = _write_test_preds(run)
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="tst", n_boot=N_BOOT, gradcam=False)
    saved = _saved(tmp_path, "tst")
    assert saved["test"]["tta"] == 8 and saved["test"]["n"] == 40 and saved["test"]["sizes"] == [1, 8]
    assert out["test_auc"] == pytest.approx(metrics.fast_auc(y, means[8]))
    assert saved["test"]["overall"]["at_0.5"]["accuracy"] == pytest.approx(np.mean((means[8] >= 0.5) == y))
    assert [f["fold"] for f in saved["test"]["folds"]] == ["fold0", "fold1", "fold2"]
    assert "## Held-out test" in _md(tmp_path, "tst")
    # TTA: OOF (oof.csv, --oof_tta=1) and test (x1, x8) kept apart, each the number it claims
    assert saved["tta"]["oof"] == {"1": pytest.approx(out["auc"])}
    assert saved["tta"]["test"] == {"1": pytest.approx(metrics.fast_auc(y, means[1])),
                                    "8": pytest.approx(metrics.fast_auc(y, means[8]))}
    assert (tmp_path / "reports" / "tst" / "figures" / "tta.png").stat().st_size > 1000
    # --oof_file=oof_tta1.csv picks the test predictions of the same TTA
    for f in range(3):
        pd.read_csv(f"{run}/fold{f}/oof.csv").to_csv(f"{run}/fold{f}/oof_tta1.csv", index=False)
    out1 = report.build_report([run], out_dir=str(tmp_path / "reports"), name="tst1", n_boot=N_BOOT,
                               gradcam=False, oof_name="oof_tta1.csv")
    assert out1["test_auc"] == pytest.approx(metrics.fast_auc(y, means[1]))


def test_unlabeled_test_predictions_give_no_test_metrics(tmp_path):
    run = _fake_run(tmp_path, "unl", classes=["0", "1"])
    _write_test_preds(run, labeled=False)
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="unl", n_boot=N_BOOT, gradcam=False)
    assert "test_auc" not in out and "unlabeled" in _saved(tmp_path, "unl")["test"]["skipped"]
    assert "the test set is unlabeled" in _md(tmp_path, "unl")
    pd.DataFrame({"id": ["other"], "label": [1], "p_0": [0.5], "p_1": [0.5]}).to_csv(f"{run}/fold1/test_tta8.csv")
    report.build_report([run], out_dir=str(tmp_path / "reports"), name="unl", n_boot=N_BOOT, gradcam=False)
    assert "do not ensemble" in _saved(tmp_path, "unl")["test"]["skipped"]  # a stale file: a note, no crash


def test_tta_figure_says_oof_or_test_on_every_panel(tmp_path):
    run = _fake_run(tmp_path, "fig", classes=["0", "1"])
    loaded = report.load_run([run], name="fig")
    fig = plots_fig_tta(loaded, {"metric": "roc_auc", "oof": {1: 0.9, 8: 0.91}, "test": {8: 0.88},
                                 "n_oof": 180, "n_test": 40})
    oof_ax, test_ax = fig.axes
    assert "Out-of-fold" in oof_ax.get_title() and "n=180" in oof_ax.get_title()
    assert "Held-out test" in test_ax.get_title() and "n=40" in test_ax.get_title()
    assert [t.get_text() for t in oof_ax.get_xticklabels()] == ["OOF TTA x1", "OOF TTA x8"]
    assert [t.get_text() for t in test_ax.get_xticklabels()] == ["test TTA x8"]
    assert oof_ax.get_ylabel() == "OOF ROC AUC" and test_ax.get_ylabel() == "test ROC AUC"
    assert [b.get_height() for b in oof_ax.patches] == [0.9, 0.91]
    only_oof = plots_fig_tta(loaded, {"metric": "accuracy", "oof": {1: 0.7, 2: 0.72}, "test": {},
                                      "n_oof": 180, "n_test": 0})
    assert len(only_oof.axes) == 1 and "accuracy" in only_oof.axes[0].get_title()


def plots_fig_tta(run, tta):
    from histofold import plots

    return plots.fig_tta(run, tta)


def test_training_curves_have_whole_epoch_ticks(tmp_path):
    from histofold import plots

    run = report.load_run([_fake_run(tmp_path, "ep", classes=["0", "1"])], name="ep")
    run.histories = [h.iloc[:3] for h in run.histories]  # 3 epochs: a default locator would tick 1.25, 1.5, ...
    fig = plots.fig_training(run)
    for ax in fig.axes[:3]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_slide_metrics_use_the_slide_maps_top_k_score(tmp_path):
    from histofold import slides

    rng = np.random.default_rng(3)
    rows = []
    for s in range(6):
        positive = s % 2
        for t in range(30):
            label = int(positive and t < 5)  # a positive slide: 5 tumour tiles among 30
            rows.append({"id": f"s{s}_{t}", "slide": f"s{s}", "label": label,
                         "p_1": float(np.clip(rng.normal(0.8 if label else 0.2 + 0.05 * s, 0.1), 0, 1))})
    frame = pd.DataFrame(rows)
    frame["p_0"] = 1 - frame["p_1"]
    out = report.slide_metrics(frame, ["0", "1"])
    scores = {s: slides.slide_score(g["p_1"].to_numpy(), 10) for s, g in frame.groupby("slide")}
    truth = {s: int(g["label"].any()) for s, g in frame.groupby("slide")}
    assert {r["slide"]: r["score"] for r in out["table"]} == pytest.approx(scores)
    assert {r["slide"]: r["label"] for r in out["table"]} == truth
    assert out["roc_auc"] == pytest.approx(metrics.fast_auc(list(truth.values()), list(scores.values())))
    means = {s: g["p_1"].mean() for s, g in frame.groupby("slide")}
    assert means != pytest.approx(scores)  # top-10 of 30, not the mean: the aggregate matters
    assert report.slide_metrics(frame.drop(columns="slide"), ["0", "1"]) == {}
    neg = report.slide_metrics(frame.assign(label=0), ["0", "1"])
    assert "roc_auc" not in neg and "no slide AUC" in neg["note"]


def test_report_has_slide_level_metrics_when_oof_carries_slides(tmp_path):
    run = _fake_run(tmp_path, "sl", classes=["0", "1"], n_per_fold=40)
    for f in range(3):  # four slides per fold, each slide positive when it holds a class-1 tile
        oof = pd.read_csv(f"{run}/fold{f}/oof.csv", dtype={"id": str})
        oof["slide"] = [f"f{f}s{i % 4}" for i in range(len(oof))]
        oof.loc[oof["slide"].str.endswith(("s0", "s1")), "label"] = 0  # two negative slides per fold
        oof.loc[oof.index[oof["slide"].str.endswith("s2")][:2], "label"] = 1  # and two positive ones
        oof.loc[oof.index[oof["slide"].str.endswith("s3")][:2], "label"] = 1
        oof.to_csv(f"{run}/fold{f}/oof.csv", index=False)
        runs.RunDir(f"{run}/fold{f}").mark_complete()
    _write_test_preds(run, slides=True)
    out = report.build_report([run], out_dir=str(tmp_path / "reports"), name="sl", n_boot=N_BOOT, gradcam=False)
    saved = _saved(tmp_path, "sl")
    assert saved["slides"]["n_slides"] == 12 and saved["test"]["slides"]["n_slides"] == 8
    loaded = report.load_run([run], name="sl")
    assert saved["slides"] == report._jsonable(report.slide_metrics(loaded.oof, ["0", "1"]))
    md = _md(tmp_path, "sl")
    assert "## Slide-level metrics (out-of-fold)" in md and "## Slide-level metrics (held-out test)" in md
    assert saved["slides"]["n_pos"] == 6 and out["slide_auc"] == pytest.approx(saved["slides"]["roc_auc"])
    assert out["n_slides"] == 12
    ts = saved["test"]["slides"]
    assert ("test_slide_auc" in out) == (0 < ts["n_pos"] < ts["n_slides"]) == ("note" not in ts)
