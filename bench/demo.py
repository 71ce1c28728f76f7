"""`make demo`: the whole chain on the embedded synthetic dataset, through the same scripts users run.

prepare (5 folds) -> train every fold -> predict with 8-way TTA -> evaluate; prints the submission and
report paths and the CV score. The flags of each step are the `demo` recipe in histofold/presets.py.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.environ.get("HISTOFOLD_DEMO_DIR", os.path.join(ROOT, "demo"))


def step(script: str, args: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    print(f"\n$ {' '.join(['python', script, *args])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=WORK, check=True)
    print(f"[{script}: {time.time() - t0:.0f} s]", flush=True)


def main() -> None:
    sys.path.insert(0, ROOT)
    from histofold.presets import as_flags, get_recipe

    recipe = get_recipe("demo")
    os.makedirs(WORK, exist_ok=True)
    t0 = time.time()
    step("prepare_tfrecords.py", as_flags(recipe["prepare"]) + ["--overwrite"])
    step("train.py", as_flags(recipe["train"]) + ["--name=demo", "--overwrite"])
    step("predict.py", as_flags(recipe["predict"]) + ["--runs=runs/demo", "--name=demo"])
    step("evaluate.py", ["--runs=runs/demo", "--name=demo", "--oof_file=oof_tta8.csv"])
    with open(os.path.join(WORK, "reports", "demo", "metrics.json")) as f:
        metrics = json.load(f)
    cv = metrics.get("overall", {}).get("auc")
    print("\n=== histofold demo finished in %.0f s ===" % (time.time() - t0))
    print(f"submission: {os.path.join(WORK, 'submissions', 'demo.csv')}")
    print(f"report:     {os.path.join(WORK, 'reports', 'demo', 'report.html')}")
    print(f"CV ROC AUC (out-of-fold, 5 folds, 8-way TTA): pooled {cv:.4f}", end="")
    folds = metrics.get("pooled_vs_folds") or {}
    if folds.get("mean") is not None:
        print(f", mean fold {folds['mean']:.4f} +- {folds['sd']:.4f}" + (f" ({folds['note']})" if folds.get("diverge") else ""))
    else:
        print()


if __name__ == "__main__":
    main()
