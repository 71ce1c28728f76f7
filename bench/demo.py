"""`make demo`: the whole chain on the embedded synthetic dataset, through the same scripts users run.

prepare (5 folds) -> train every fold -> predict with 8-way TTA -> evaluate; prints the submission and
report paths and the CV score. Flags of each step are the `DEMO` preset below.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.environ.get("HISTOFOLD_DEMO_DIR", os.path.join(ROOT, "demo"))

# The preset: small enough for 2 CPU cores in a few minutes, the same flags a user would type.
DEMO = {
    "prepare": ["--source=synthetic", "--count=1500", "--test_count=500", "--image_size=64",
                "--folds=5", "--overwrite"],
    "train": ["--fold=all", "--arch=histo_cnn", "--width=16", "--epochs=6", "--batch_size=64", "--lr=3e-3",
              "--augment=light", "--name=demo"],
    "predict": ["--tta=8", "--oof"],
    "evaluate": [],
}


def step(script: str, args: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    print(f"\n$ {' '.join(['python', script, *args])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=WORK, check=True)
    print(f"[{script}: {time.time() - t0:.0f} s]", flush=True)


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    t0 = time.time()
    step("prepare_tfrecords.py", DEMO["prepare"])
    step("train.py", DEMO["train"])
    step("predict.py", DEMO["predict"] + ["--runs=runs/demo", "--name=demo"])
    step("evaluate.py", DEMO["evaluate"] + ["--runs=runs/demo", "--name=demo"])
    with open(os.path.join(WORK, "reports", "demo", "metrics.json")) as f:
        metrics = json.load(f)
    cv = metrics.get("overall", {}).get("roc_auc")
    print("\n=== histofold demo finished in %.0f s ===" % (time.time() - t0))
    print(f"submission: {os.path.join(WORK, 'submissions', 'demo.csv')}")
    print(f"report:     {os.path.join(WORK, 'reports', 'demo', 'report.html')}")
    print(f"CV ROC AUC (out-of-fold, 5 folds): {cv}")


if __name__ == "__main__":
    main()
