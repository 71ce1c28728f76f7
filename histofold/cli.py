"""Small helpers the top-level scripts share: flag parsing that fire leaves ambiguous, logging setup."""
from __future__ import annotations

import logging
import os


def to_list(value) -> list[str]:
    """fire turns `--x=a,b` into a tuple and `--x=a` into a str; both (and None) become a list of str."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def setup_logging() -> logging.Logger:
    """INFO to stderr for the histofold logger; TensorFlow's C++ chatter down to errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = logging.getLogger("histofold")
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


# Errors users cause (bad flags, missing files, wrong inputs) print as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError, FloatingPointError)


def run_cli(main, command=None) -> None:
    """fire.Fire(main), printing a user error as `error: <message>` and exiting 2.

    HISTOFOLD_TRACEBACK=1 shows the full traceback instead.
    """
    import sys

    import fire

    try:
        fire.Fire(main, command=command)
    except USER_ERRORS as e:
        if os.environ.get("HISTOFOLD_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
