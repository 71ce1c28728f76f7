"""The scripts as a user runs them: typo flags refused before any work, --help is the whole docstring,
user errors are one line with exit status 2 and no traceback."""
import inspect
import os
import re
import subprocess
import sys
import time

import pytest

import evaluate
import export
import finetune
import predict
import prepare_tfrecords
import train
from histofold import cli
from histofold.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"prepare_tfrecords.py": prepare_tfrecords, "train.py": train, "finetune.py": finetune,
           "predict.py": predict, "evaluate.py": evaluate, "export.py": export}


def _run(script, *args, cwd):
    env = {**os.environ, "HISTOFOLD_TRACEBACK": ""}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script, module", SCRIPTS.items())
def test_help_holds_every_flag_and_example(script, module, tmp_path):
    out = _run(script, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = inspect.getdoc(module.main)
    names, _, _ = cli.flags_of(module.main)
    for name in names:
        assert re.search(rf"^\s+{name}:", out.stdout, re.M), f"{script} --help lacks {name}"
    examples = doc.split("Examples:" if "Examples:" in doc else "Example:")[1].split("Args:")[0]
    for line in filter(None, (line.strip() for line in examples.splitlines())):
        assert line in out.stdout, f"{script} --help lost the example line {line!r}"
    assert doc in out.stdout  # verbatim: nothing cut or rewrapped
    assert _run(script, "-h", cwd=tmp_path).stdout == out.stdout  # -h is help, not a flag's short name


@pytest.mark.parametrize("script, args, hint", [
    ("train.py", ["--fold=all", "--epoch=3"], "did you mean --epochs?"),
    ("predict.py", ["--ensmble=rank"], "did you mean --ensemble?"),
    ("prepare_tfrecords.py", ["--source=synthetic", "--cuont=5"], "did you mean --count?"),
    ("evaluate.py", ["--n_bot=10"], "did you mean --n_boot?"),
    ("finetune.py", ["--run=x", "--unfreze=all"], "did you mean --unfreeze?"),
    ("export.py", ["--folds=all"], "did you mean --fold?"),
    ("train.py", ["all"], "unexpected argument"),
])
def test_typo_flags_are_refused_before_any_work(script, args, hint, tmp_path):
    t0 = time.time()
    out = _run(script, *args, cwd=tmp_path)
    assert out.returncode == 2 and hint in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # nothing was written: no tfrecords/, runs/, submissions/
    assert time.time() - t0 < 60


@pytest.mark.parametrize("script, args, flag", [
    ("train.py", ["--lr=abc"], "--lr"),
    ("train.py", ["--batch_size=0"], "--batch_size"),
    ("predict.py", ["--tta=3"], "--tta"),
    ("prepare_tfrecords.py", ["--folds=1"], "--folds"),
    ("evaluate.py", ["--runs=a,b"], "--runs"),
    ("export.py", ["--tta=3"], "--tta"),
    ("export.py", ["--fold=first"], "--fold"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(script, args, flag, tmp_path):
    out = _run(script, *args, cwd=tmp_path)
    assert out.returncode == 2 and flag in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_check_argv_accepts_fire_forms():
    def main(*, oof=False, tta=8, runs=""):
        """doc"""
    cli.check_argv(main, ["--oof", "--tta", "4", "--runs=a,b", "--nooof", "--tta=2"])
    with pytest.raises(UsageError, match="did you mean --tta"):
        cli.check_argv(main, ["--tt=4"])


def test_summary_is_printed_once_compactly():
    text = cli.format_summary({"auc": 0.912345678901, "paths": ["a"] * 20, "n": 3})
    assert text == "auc: 0.9123\npaths: [20 items]\nn: 3"


def test_native_absl_noise_is_filtered_and_everything_else_kept(capfd):
    noise = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"I0000 00:00:1796472217.674360    7068 port.cc:153] oneDNN custom operations are on.\n")
    with cli.native_stderr_filtered():
        os.write(2, noise + b"E0000 a real native error\n")
        print("a python warning", file=sys.stderr)
    err = capfd.readouterr().err
    assert "absl::InitializeLog" not in err and "oneDNN" not in err
    assert "E0000 a real native error" in err and "a python warning" in err


def test_scripts_print_no_tensorflow_import_noise(tmp_path):
    """TF 2.21 ignores TF_CPP_MIN_LOG_LEVEL for its import-time absl lines; a script must not show them."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_tfrecords.py"), "--count=40", "--test_count=8",
                          "--image_size=16", "--folds=2"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tfrecords" / "manifest.json").exists()  # shards were written: TensorFlow was imported
    assert "oneDNN" not in out.stderr and "absl::InitializeLog" not in out.stderr, out.stderr
