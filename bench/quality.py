"""Quality bar: run a recipe end to end through the real scripts, score its test AUC, beside the seed baseline.

    python bench/quality.py                               # pcam_jpeg: train/ -> folds, valid/ -> test
    python bench/quality.py --source=hcd --input=DIR --solution=solution.csv   # Kaggle layout

Prints the suite's test ROC AUC (after TTA and fold ensembling) and wall time, the seed-style
baseline's (plain seed-001 CNN, PIL arrays, random 80/20 split, no augmentation/TTA/folds) on the same
data, and the submission's path on a line of its own as `submission: PATH`. With --solution the score
is Kaggle's: ROC AUC of the submission's `label` column against the solution's, joined on id.
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
DEFAULT_PCAM = os.path.join(os.path.dirname(ROOT), "shared", "data", "pcam_jpeg")


def run_script(script: str, flags: list[str], *, cwd: str) -> None:
    print(f"$ python {script} {' '.join(flags)}", file=sys.stderr, flush=True)
    # the scripts' own output goes to stderr: stdout keeps only the result table and the one
    # `submission: PATH` line (predict.py prints a relative `submission:` of its own)
    subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, check=True,
                   stdout=sys.stderr)


def run_suite(*, recipe: str, source: str, input: str, test_input: str, workdir: str) -> dict:
    """prepare -> train (all folds) -> predict through the scripts; returns submission path and timings."""
    from histofold.presets import as_flags, get_recipe

    steps = get_recipe(recipe)
    data_flags = [f"--source={source}", f"--input={input}"] + ([f"--test_input={test_input}"] if test_input else [])
    t0 = time.time()
    run_script("prepare_tfrecords.py", data_flags + as_flags(steps["prepare"]) + ["--overwrite"], cwd=workdir)
    run_script("train.py", as_flags(steps["train"]) + ["--name=quality", "--overwrite"], cwd=workdir)
    run_script("predict.py", as_flags(steps["predict"]) + ["--runs=runs/quality", "--name=quality"], cwd=workdir)
    return {"submission": os.path.join(workdir, "submissions", "quality.csv"),
            "probs": os.path.join(workdir, "submissions", "quality_probs.csv"),
            "seconds": time.time() - t0}


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


def run_seed_baseline(*, source: str, input: str, test_input: str, solution: str | None, epochs: int) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from baseline_seed import run_baseline

    if source == "hcd":
        return run_baseline(train_dir=os.path.join(input, "train"),
                            train_labels=os.path.join(input, "train_labels.csv"),
                            test_dir=os.path.join(input, "test"), test_labels=solution, epochs=epochs)
    if source == "folder":
        return run_baseline(train_dir=input, test_dir=test_input or None, epochs=epochs)
    raise ValueError(f"the seed baseline reads folder or hcd layouts, not --source={source}")


def main(*, source="folder", input="", test_input="", solution="", recipe="pcam-cpu", workdir="",
         baseline=True, baseline_epochs=5):
    """Run `recipe` end to end and the seed-style baseline on the same data; print both AUCs and times.

    Args:
        source: folder (class-per-folder train tree + --test_input tree) or hcd (Kaggle layout).
        input: the dataset; default ../shared/data/pcam_jpeg/train with test_input .../valid.
        test_input: folder source: the labeled test tree.
        solution: hcd: an id,label CSV of the test images' labels (scored as Kaggle scores).
        recipe: a histofold.presets recipe name.
        workdir: where tfrecords/, runs/ and submissions/ go (default a temp dir, kept).
        baseline: also run the seed-style baseline.
        baseline_epochs: epochs of the baseline.
    """
    if not input:
        input, test_input = os.path.join(DEFAULT_PCAM, "train"), os.path.join(DEFAULT_PCAM, "valid")
    if source == "hcd" and not solution:
        raise ValueError("--source=hcd needs --solution=CSV (id,label of the test images) to score")
    workdir = workdir or tempfile.mkdtemp(prefix="histofold-quality-")
    os.makedirs(workdir, exist_ok=True)
    suite = run_suite(recipe=recipe, source=source, input=input, test_input=test_input, workdir=workdir)
    suite_auc = score(probs_csv=suite["probs"], submission_csv=suite["submission"], solution=solution or None)
    result = {"recipe": recipe, "suite_auc": round(suite_auc, 4), "suite_seconds": round(suite["seconds"], 1)}
    if baseline:
        base = run_seed_baseline(source=source, input=input, test_input=test_input, solution=solution or None,
                                 epochs=int(baseline_epochs))
        result.update(baseline_auc=base["auc"], baseline_seconds=base["seconds"])
    print("\n=== quality: " + json.dumps({"input": input, "test_input": test_input, "solution": solution}))
    print(f"{'':10s} {'test ROC AUC':>13s} {'wall s':>8s}")
    print(f"{'histofold':10s} {result['suite_auc']:13.4f} {result['suite_seconds']:8.0f}   (recipe {recipe}, "
          f"TTA + fold ensemble)")
    if baseline:
        b_auc = result["baseline_auc"]
        print(f"{'baseline':10s} {b_auc if b_auc is not None else float('nan'):13.4f} "
              f"{result['baseline_seconds']:8.0f}   (seed-001 CNN, PIL, random 80/20, no aug/TTA/folds)")
    print(f"submission: {suite['submission']}")
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main)
