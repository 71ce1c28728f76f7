"""Every file read and write of histofold: local paths through the standard library, URLs (gs://, ram://,
s3://, hdfs://) through tf.io.gfile, with atomic writes and strict JSON.

Why two back ends: tf.io.gfile is what makes `gs://` (Kaggle TPU, Dataflow) and `ram://` (tests) work,
but it costs a TensorFlow import (~5 s) and reads the page cache ~10x slower than `open` (0.55 s per
80 MB shard hashed); local paths stay on the standard library, so prepare's worker processes and the
command-line validation never import TensorFlow. Nothing else in the package calls `open` on a data
path: a test runs the whole chain on `ram://` to keep it so.

Writes go to a temporary name in the same folder and are renamed into place, so a reader never sees
half a file (a killed process leaves at most a `.<name>.tmp` that the next writer replaces).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io as _io
import json
import math
import os
import posixpath
import shutil

CHUNK = 16 << 20  # bytes per read when hashing


def is_url(path) -> bool:
    """True for `scheme://...` paths (gs://, ram://, s3://): those go through tf.io.gfile."""
    return "://" in str(path)


def _gfile():
    import tensorflow as tf  # only for URLs

    return tf.io.gfile


def join(first, *parts) -> str:
    """os.path.join for local paths, '/'-joined for URLs."""
    first = os.fspath(first)
    return posixpath.join(first, *map(str, parts)) if is_url(first) else os.path.join(first, *map(str, parts))


def split(path) -> tuple[str, str]:
    path = os.fspath(path)
    return posixpath.split(path) if is_url(path) else os.path.split(path)


def basename(path) -> str:
    """Last component, ignoring a trailing slash (`runs/demo/` -> `demo`)."""
    return split(str(path).rstrip("/") or str(path))[1]


def dirname(path) -> str:
    return split(str(path).rstrip("/") or str(path))[0]


def normpath(path) -> str:
    """Trailing slashes and `.` components removed; URLs keep their scheme."""
    path = os.fspath(path)
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest) if rest else rest}"
    return os.path.normpath(path)


def absolute(path) -> str:
    """Absolute local path (URLs as they are): what run configs and manifests record."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


# ---------------------------------------------------------------- queries

def exists(path) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def listdir(path) -> list[str]:
    """Entry names (no trailing slashes), sorted."""
    names = _gfile().listdir(path) if is_url(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def glob(pattern) -> list[str]:
    """Paths matching a pattern whose wildcards are in the last component (sorted)."""
    if is_url(pattern):
        return sorted(_gfile().glob(pattern))
    folder, name = os.path.split(pattern)
    if not os.path.isdir(folder or "."):
        return []
    return sorted(os.path.join(folder, n) for n in fnmatch.filter(os.listdir(folder or "."), name))


def mtime_ns(path) -> int:
    return int(_gfile().stat(path).mtime_nsec) if is_url(path) else os.stat(path).st_mtime_ns


def size(path) -> int:
    return int(_gfile().stat(path).length) if is_url(path) else os.path.getsize(path)


# ---------------------------------------------------------------- changes

def makedirs(path) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path) -> None:
    _gfile().remove(path) if is_url(path) else os.remove(path)


def rmtree(path) -> None:
    if not exists(path):
        return
    _gfile().rmtree(path) if is_url(path) else shutil.rmtree(path)


def rename(src, dst, *, overwrite: bool = True) -> None:
    if is_url(src):
        _gfile().rename(src, dst, overwrite=overwrite)
    elif overwrite:
        os.replace(src, dst)
    else:
        if os.path.exists(dst):
            raise FileExistsError(dst)
        os.rename(src, dst)


def copy(src, dst) -> None:
    write_bytes(dst, read_bytes(src))


def open(path, mode: str = "rb"):  # noqa: A001 - the one place that opens data files
    """A file object for streaming (builtin `open` for local paths, GFile for URLs)."""
    if is_url(path):
        return _gfile().GFile(path, mode)
    import builtins

    return builtins.open(path, mode)


def tmp_name(path) -> str:
    """The temporary sibling a write goes to before its rename: `<dir>/.<name>.tmp`."""
    folder, name = split(path)
    return join(folder, f".{name}.tmp") if folder else f".{name}.tmp"


# ---------------------------------------------------------------- whole files

def read_bytes(path) -> bytes:
    """The whole file; a missing file is FileNotFoundError on every file system (gfile's NotFoundError
    is mapped, so callers handle one exception)."""
    if is_url(path):
        if not _gfile().exists(path):
            raise FileNotFoundError(f"No such file: {path}")
    with open(path, "rb") as f:
        return f.read()


def discard_tmp(path) -> str:
    """The temporary sibling of `path`, removed first if a killed writer left one (some file systems,
    ram:// among them, append to an existing file instead of truncating it)."""
    tmp = tmp_name(path)
    if exists(tmp):
        remove(tmp)
    return tmp


def write_bytes(path, data: bytes) -> None:
    """Write atomically: a temporary sibling, then a rename; creates the parent folder."""
    folder = split(path)[0]
    if folder:
        makedirs(folder)
    tmp = discard_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
    rename(tmp, path, overwrite=True)


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _strict(obj):
    """NaN/inf -> None and numpy scalars/arrays -> Python, so files are strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return _strict(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path, default=...):
    """Parsed JSON; `default` when the file does not exist (else FileNotFoundError)."""
    if default is not ... and not exists(path):
        return default
    return json.loads(read_bytes(path))


def write_json(path, obj, *, indent: int = 1) -> None:
    """Strict JSON (NaN/inf written as null), atomically."""
    write_text(path, json.dumps(_strict(obj), indent=indent, default=str, allow_nan=False) + "\n")


def read_csv(path, **kwargs):
    """A CSV as a DataFrame (read as bytes: pandas cannot parse a GFile handle)."""
    import pandas as pd

    return pd.read_csv(_io.BytesIO(read_bytes(path)), **kwargs)


def write_csv(path, frame, **kwargs) -> None:
    kwargs.setdefault("index", False)
    write_bytes(path, frame.to_csv(**kwargs).encode("utf-8"))


def sha256(path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
