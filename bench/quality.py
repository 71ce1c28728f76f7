"""Quality bar: run a recipe end to end through the real scripts and score it on TWO held-out splits,
beside the seed-style baseline on the same splits.

    python bench/quality.py                    # pcam_jpeg/train -> folds; valid (test shards) + pcam_test_jpeg (--input)
    python bench/quality.py --seeds=0,1        # the recipe's spread over seeds
    python bench/quality.py --source=hcd --input=DIR --solution=solution.csv   # Kaggle layout, scored as Kaggle does

Every recipe decision is made on both columns (PCam's valid split, whose slides the old recipe was tuned
on, and PCam's test split, slides never used for tuning), never on one. The PCam test split goes
through `predict.py --input`, so the new-image path (PixelFormat + the one resize) is what is scored.
Prints one line per set and the mean, the wall time and the load, and the submission's path on a line
of its own as `submission: PATH`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
DEFAULT_TRAIN = os.path.join(DATA, "pcam_jpeg", "train")
DEFAULT_VALID = os.path.join(DATA, "pcam_jpeg", "valid")
DEFAULT_TEST = os.path.join(DATA, "pcam_test_jpeg")


def run_script(script: str, flags: list[str], *, cwd: str) -> dict:
    """Run one script; its output goes to stderr. Returns the `key: value` summary it printed."""
    print(f"$ python {script} {' '.join(flags)}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, check=True,
                         stdout=subprocess.PIPE, text=True)
    sys.stderr.write(out.stdout)
    summary = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and " " not in key:
            summary[key] = value
    return summary


def run_suite(*, recipe: str, source: str, input: str, test_input: str, extra_test: str, workdir: str,
              seed: int, train_flags: dict | None = None) -> dict:
    """prepare -> train -> predict (test shards) [-> predict --input=extra_test] through the scripts."""
    from histofold.presets import as_flags, get_recipe

    steps = get_recipe(recipe)
    steps = {**steps, "train": {**steps["train"], **(train_flags or {})}}
    data_flags = [f"--source={source}", f"--input={input}"] + ([f"--test_input={test_input}"] if test_input else [])
    t0 = time.time()
    run_script("prepare_tfrecords.py", data_flags + as_flags(steps["prepare"]) + ["--overwrite"], cwd=workdir)
    run_script("train.py", as_flags(steps["train"]) + [f"--name=quality{seed}", f"--seed={seed}", "--overwrite"],
               cwd=workdir)
    predict_flags = as_flags(steps["predict"]) + [f"--runs=runs/quality{seed}", f"--name=quality{seed}"]
    test = run_script("predict.py", predict_flags, cwd=workdir)
    out = {"submission": os.path.join(workdir, "submissions", f"quality{seed}.csv"),
           "probs": os.path.join(workdir, "submissions", f"quality{seed}_probs.csv"), "test": test}
    if extra_test:
        extra = run_script("predict.py", predict_flags + [f"--input={extra_test}",
                                                          f"--predictions=extra{seed}.csv"], cwd=workdir)
        out["extra_auc"] = float(extra["input_auc"])
    out["seconds"] = time.time() - t0
    return out


def score(*, probs_csv: str, submission_csv: str, solution: str | None) -> float:
    """Kaggle-style ROC AUC: the submission against a solution CSV, or the labeled test records."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    if solution:
        sub = pd.read_csv(submission_csv, dtype={"id": str})
        sol = pd.read_csv(solution, dtype={"id": str})
        joined = sol.merge(sub, on="id", suffixes=("_true", ""), how="left")
        if joined["label"].isna().any():
            raise ValueError(f"{int(joined['label'].isna().sum())} solution ids are not in {submission_csv}")
        return float(roc_auc_score(joined["label_true"], joined["label"]))
    probs = pd.read_csv(probs_csv, dtype={"id": str})
    if (probs["label"] < 0).any():
        raise ValueError("the test records carry no labels: pass --solution=CSV (id,label) to score")
    return float(roc_auc_score(probs["label"], probs.filter(like="p_").iloc[:, -1]))


def run_seed_baseline(*, source: str, input: str, test_input: str, extra_test: str, solution: str | None,
                      epochs: int) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from baseline_seed import run_baseline

    extra = (extra_test,) if extra_test else ()
    if source == "hcd":
        return run_baseline(train_dir=os.path.join(input, "train"),
                            train_labels=os.path.join(input, "train_labels.csv"),
                            test_dir=os.path.join(input, "test"), test_labels=solution, epochs=epochs,
                            more_test_dirs=extra)
    if source == "folder":
        return run_baseline(train_dir=input, test_dir=test_input or None, epochs=epochs, more_test_dirs=extra)
    raise ValueError(f"the seed baseline reads folder or hcd layouts, not --source={source}")


def main(*, source="folder", input="", test_input="", extra_test="", solution="", recipe="pcam-cpu",
         workdir="", seeds="0", baseline=True, baseline_epochs=5, train_flags=""):
    """Run `recipe` end to end (per seed) and the seed-style baseline on the same sets; print AUCs and times.

    Args:
        source: folder (class-per-folder train tree + --test_input tree) or hcd (Kaggle layout).
        input: the training data; default ../shared/data/pcam_jpeg/train, with --test_input
            .../pcam_jpeg/valid and --extra_test ../shared/data/pcam_test_jpeg.
        test_input: folder source: the labeled tree written as test shards.
        extra_test: a second labeled class-per-folder test set, predicted with predict.py --input.
        solution: hcd: an id,label CSV of the test images' labels (scored as Kaggle scores).
        recipe: a histofold.presets recipe name.
        workdir: where tfrecords/, runs/ and submissions/ go (default a temp dir, kept).
        seeds: comma list of training seeds; with two or more the spread is printed.
        baseline: also run the seed-style baseline.
        baseline_epochs: epochs of the baseline.
        train_flags: train.py flags that override the recipe's, as `key=value,key=value`
            (e.g. `label_smoothing=0.1,epochs=25`), to measure one change on both splits.
    """
    if not input:
        input, test_input = DEFAULT_TRAIN, DEFAULT_VALID
        extra_test = extra_test or DEFAULT_TEST
    # the scripts run with cwd=workdir: relative paths are the caller's
    input, test_input, extra_test, solution = (os.path.abspath(p) if p else p
                                               for p in (input, test_input, extra_test, solution))
    if source == "hcd" and not solution:
        raise ValueError("--source=hcd needs --solution=CSV (id,label of the test images) to score")
    if isinstance(train_flags, (tuple, list)):  # fire splits a comma list into a tuple
        train_flags = ",".join(map(str, train_flags))
    overrides = dict(kv.split("=", 1) for kv in str(train_flags).split(",") if kv.strip()) if train_flags else {}
    seeds = [int(s) for s in str(seeds).replace("(", "").replace(")", "").split(",") if str(s).strip()]
    workdir = workdir or tempfile.mkdtemp(prefix="histofold-quality-")
    os.makedirs(workdir, exist_ok=True)
    names = [os.path.relpath(test_input or os.path.join(input, "test"), DATA)] + (
        [os.path.relpath(extra_test, DATA)] if extra_test else [])
    rows, load0 = [], os.getloadavg()[0]
    for seed in seeds:
        suite = run_suite(recipe=recipe, source=source, input=input, test_input=test_input, extra_test=extra_test,
                          workdir=workdir, seed=seed, train_flags=overrides)
        aucs = [score(probs_csv=suite["probs"], submission_csv=suite["submission"], solution=solution or None)]
        if extra_test:
            aucs.append(suite["extra_auc"])
        rows.append({"seed": seed, "aucs": aucs, "seconds": suite["seconds"], "submission": suite["submission"]})
    load = (load0 + os.getloadavg()[0]) / 2
    base = None
    if baseline:
        base = run_seed_baseline(source=source, input=input, test_input=test_input, extra_test=extra_test,
                                 solution=solution or None, epochs=int(baseline_epochs))
    print("\n=== quality: " + json.dumps({"recipe": recipe, "input": input, "seeds": seeds, "train_flags": overrides}))
    print(f"{'test set':34s} {'histofold':>10s} {'baseline':>9s}")
    base_aucs = [] if base is None else [base["auc"]] + [base["aucs"][extra_test]] * bool(extra_test)
    import numpy as np

    suite_means = [float(np.mean([r["aucs"][i] for r in rows])) for i in range(len(names))]
    for i, name in enumerate(names):
        per_seed = " ".join(f"{r['aucs'][i]:.4f}" for r in rows)
        b = f"{base_aucs[i]:9.4f}" if base_aucs else ""
        print(f"{name:34s} {suite_means[i]:10.4f} {b}" + (f"   (seeds: {per_seed})" if len(rows) > 1 else ""))
    mean_b = f"{float(np.mean(base_aucs)):9.4f}" if base_aucs else ""
    print(f"{'mean':34s} {float(np.mean(suite_means)):10.4f} {mean_b}")
    if len(rows) > 1:
        spread = [float(np.mean(r["aucs"])) for r in rows]
        print(f"seed spread of the mean AUC: {min(spread):.4f}..{max(spread):.4f} (sd {np.std(spread, ddof=1):.4f})")
    print(f"wall time per seed (prepare + train + predict): "
          + ", ".join(f"{r['seconds']:.0f} s" for r in rows) + f"; load avg {load:.1f}"
          + (f"; baseline {base['seconds']:.0f} s" if base else ""))
    print(f"submission: {rows[-1]['submission']}")
    return {"suite": suite_means, "baseline": base_aucs, "seconds": [r["seconds"] for r in rows]}


if __name__ == "__main__":
    import fire

    fire.Fire(main)
