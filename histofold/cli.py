"""What the top-level scripts share: flags checked against `main` before any work, a --help that is the
whole docstring, one-line user errors, logging, a tidy printed summary.

`run_cli(main)` is each script's `if __name__ == "__main__"`: it refuses an unknown or mistyped flag
(`unknown flag --epoch; did you mean --epochs?`) before anything runs, answers `--help`/`-h` with
`main`'s docstring verbatim (fire's own help parser drops sections and wrapped lines), hands the flags
to `fire.Fire(main)` for value parsing, prints the returned summary once as `key: value` lines, and
turns a `UsageError` into `error: <message>` with exit status 2. Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import re
import sys
import tempfile

# TensorFlow reads this when it is imported; the scripts import this module first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from histofold.errors import UsageError  # noqa: E402

# absl's pre-InitializeLog lines, which TensorFlow 2.21 writes at import whatever TF_CPP_MIN_LOG_LEVEL says
# (abseil-cpp PR #1957, open): the warning itself and INFO lines such as "I0000 ... port.cc:153] oneDNN ...".
NATIVE_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                          rb"STDERR|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] )")


@contextlib.contextmanager
def native_stderr_filtered():
    """File descriptor 2 goes to a temporary file inside the block; afterwards every line but absl's INFO
    noise is written back to stderr (warnings and errors of the block are kept, in order)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            kept = b"".join(line for line in buffer if not NATIVE_NOISE.match(line))
            if kept:
                sys.stderr.buffer.write(kept) if hasattr(sys.stderr, "buffer") else sys.stderr.write(kept.decode())
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Wraps the first `import tensorflow` in `native_stderr_filtered`, wherever in the package it happens
    (TensorFlow stays a lazy import: prepare forks its workers before it)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec(module):
            with native_stderr_filtered():
                exec_module(module)

        spec.loader.exec_module = quiet_exec
        return spec


def quiet_tensorflow_import() -> None:
    """Filter absl's import-time INFO lines out of stderr (no-op once TensorFlow is imported)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


TABLE_KEYS = ("fold", "roc_auc", "accuracy", "macro_f1", "best_monitor", "epochs_run", "n_oof", "run_dir")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str = "info") -> logging.Logger:
    """Messages of the histofold logger to stderr at `level` (a run's train.log still gets INFO);
    TensorFlow's Python logger down to errors."""
    log = logging.getLogger("histofold")
    handler = next((h for h in log.handlers if type(h) is logging.StreamHandler), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    chosen = LEVELS.get(str(level).lower(), logging.INFO)
    handler.setLevel(chosen)
    log.setLevel(min(chosen, logging.INFO))
    log.propagate = False
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if chosen == logging.DEBUG:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    return log


def flags_of(main) -> tuple[list[str], dict, bool]:
    """(flag names in order, defaults, whether main takes **extra options) from main's signature."""
    params = inspect.signature(main).parameters.values()
    names = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    extra = any(p.kind is p.VAR_KEYWORD for p in params)
    return names, defaults, extra


def check_argv(main, argv: list[str], *, extra_flags=(), aliases=()) -> None:
    """UsageError for a positional argument or a flag that `main` does not take (with the closest name).

    `extra_flags`: further names main accepts through **options (prepare's source options);
    `aliases`: deprecated names that are still accepted.
    """
    from histofold.config import unknown_flag_message

    names, defaults, _ = flags_of(main)
    valid = set(names) | set(extra_flags) | set(aliases)
    bools = {n for n in names if isinstance(defaults[n], bool)}
    expect_value = False
    for token in argv:
        if token == "--":
            break
        if expect_value and not token.startswith("--"):
            expect_value = False  # the value of `--flag value`
            continue
        expect_value = False
        if not token.startswith("--"):
            raise UsageError(f"unexpected argument {token!r}: flags take the form --name=value (see --help)")
        name, has_value = token[2:].split("=", 1)[0].replace("-", "_"), "=" in token
        if name in valid:
            expect_value = not has_value and name not in bools
            continue
        if name.startswith("no") and name[2:] in bools:  # fire's --noflag
            continue
        raise UsageError(unknown_flag_message(name, valid))


def help_text(main, script: str) -> str:
    """`main`'s docstring, whole, under a usage line."""
    doc = inspect.getdoc(main) or ""
    return f"usage: python {script} [--flag=value ...]\n\n{doc}\n"


def format_summary(result) -> str:
    """A returned summary as `key: value` lines (floats to 4 decimals); a list of summaries as a table."""
    if result is None:
        return ""
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        import pandas as pd

        frame = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in result])
        shown = [k for k in TABLE_KEYS if k in frame] or list(frame.columns)
        frame = frame[shown]
        return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    if isinstance(result, dict):
        lines = []
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            elif isinstance(value, (list, tuple)) and len(value) > 8:
                value = f"[{len(value)} items]"
            lines.append(f"{key}: {value}")
        return "\n".join(lines)
    return str(result)


def run_cli(main, *, extra_flags=(), aliases=None, argv=None) -> None:
    """The scripts' entry point: check flags, --help, fire for values, one-line user errors (exit 2)."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.basename(sys.argv[0] or "script.py")
    if "-h" in argv or "--help" in argv:
        print(help_text(main, script))
        return
    if aliases is None:
        from histofold.config import CONFIGS

        config = CONFIGS.get(os.path.splitext(script)[0])
        aliases = tuple(config.ALIASES) if config is not None else ()
    if not any(a.replace("-", "_") in ("--log_level=debug", "--log_level=DEBUG") for a in argv):
        quiet_tensorflow_import()
    try:
        check_argv(main, argv, extra_flags=extra_flags, aliases=aliases)

        def entry(**kwargs):
            print(format_summary(main(**kwargs)))

        entry.__signature__ = inspect.signature(main)
        entry.__doc__ = main.__doc__
        fire.Fire(entry, command=argv, name=script)
    except UsageError as e:
        if os.environ.get("HISTOFOLD_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
