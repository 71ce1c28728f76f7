"""Run directories: the one place that knows their layout, when they are complete, and how to load them.

    runs/<name>/fold<k>/   (or runs/<name>/full/ for --fold=full: all training data, no validation fold)
        config.json        the TrainConfig (TrainConfig.to_json) + "resolved": facts derived at run time
        model.weights.h5   the kept weights (best by --monitor after warm-up, or the final/EMA weights)
        history.csv        one row per epoch
        oof.csv            the fold's out-of-fold predictions (id, label, fold, p_<class>...); not for full
        metrics.json       the OOF metrics summary
        train.log          everything the run logged
        complete.json      written last: sha256 and size of every file above

A fold directory is visible to predict/evaluate only when complete.json exists, and every file is
checked against it before use: a corrupted, truncated or swapped file is refused with one line naming
it and the command that regenerates it, never loaded into a garbage submission. A run (runs/<name>)
is complete when all of its fold directories are.
"""
from __future__ import annotations

import logging
import re
import time

from histofold import io
from histofold.errors import DataError, IntegrityError

log = logging.getLogger("histofold")

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"
HISTORY = "history.csv"
OOF = "oof.csv"
METRICS = "metrics.json"
LOG = "train.log"
COMPLETE = "complete.json"
FOLD_DIR_RE = re.compile(r"^(fold(\d+)|full)$")
CHECKED = (CONFIG, WEIGHTS, HISTORY, OOF, METRICS)  # what complete.json records (when present)


class RunDir:
    """One fold's run directory (runs/<name>/fold<k> or runs/<name>/full)."""

    def __init__(self, path: str):
        self.path = io.normpath(str(path))

    @classmethod
    def of(cls, runs_dir: str, name: str, fold) -> "RunDir":
        return cls(io.join(runs_dir, name, "full" if fold == "full" else f"fold{int(fold)}"))

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def file(self, name: str) -> str:
        return io.join(self.path, name)

    @property
    def fold_name(self) -> str:
        return io.basename(self.path)

    @property
    def fold(self):
        """The fold index, or "full"."""
        name = self.fold_name
        return "full" if name == "full" else int(name[4:])

    @property
    def run_path(self) -> str:
        return io.dirname(self.path)

    @property
    def run_name(self) -> str:
        return io.basename(self.run_path)

    # ------------------------------------------------------------ state

    def exists(self) -> bool:
        return io.exists(self.file(CONFIG))

    def is_complete(self) -> bool:
        return io.exists(self.file(COMPLETE))

    def has(self, name: str) -> bool:
        return io.exists(self.file(name))

    def start(self, *, overwrite: bool) -> None:
        """Make the directory; `overwrite` removes an earlier run first. A resumed run keeps its files
        but loses complete.json until it finishes again."""
        if overwrite and io.exists(self.path):
            io.rmtree(self.path)
        io.makedirs(self.path)
        if self.is_complete():
            io.remove(self.file(COMPLETE))

    def mark_complete(self) -> dict:
        """Record sha256 and size of every run file, last: from now on readers see this directory."""
        files = {name: {"sha256": io.sha256(self.file(name)), "bytes": io.size(self.file(name))}
                 for name in CHECKED if self.has(name)}
        record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        io.write_json(self.file(COMPLETE), record)
        return record

    def retrain_hint(self) -> str:
        fold = "full" if self.fold == "full" else self.fold
        return (f"retrain it: python train.py --fold={fold} --name={self.run_name} "
                f"--runs_dir={io.dirname(self.run_path) or '.'} --overwrite (with the run's other flags)")

    def require_complete(self) -> None:
        if not self.exists():
            raise DataError(f"{self.path} is not a run directory (no {CONFIG}); pass a directory written by "
                            f"train.py, e.g. runs/<name> or runs/<name>/fold0")
        if not self.is_complete():
            raise DataError(f"{self.path} did not finish (no {COMPLETE}); rerun train.py with the same flags "
                            f"to resume it")

    def checked(self, name: str) -> str:
        """Path of a run file after checking it against complete.json (IntegrityError otherwise)."""
        self.require_complete()
        record = io.read_json(self.file(COMPLETE)).get("files", {})
        path = self.file(name)
        if name not in record:
            raise IntegrityError(f"{path} is not recorded in {self.file(COMPLETE)}; {self.retrain_hint()}")
        if not io.exists(path):
            raise IntegrityError(f"{path} is missing; {self.retrain_hint()}")
        want = record[name]
        if io.size(path) != want["bytes"] or io.sha256(path) != want["sha256"]:
            raise IntegrityError(f"{path} does not match its sha256 in {COMPLETE}: the file is corrupted or "
                                 f"was replaced; {self.retrain_hint()}")
        return path

    # ------------------------------------------------------------ contents

    def write_config(self, config, resolved: dict) -> None:
        io.write_json(self.file(CONFIG), {**config.to_json(), "resolved": resolved})

    def raw_config(self) -> dict:
        path = self.checked(CONFIG) if self.is_complete() else self.file(CONFIG)
        return io.read_json(path)

    def config(self):
        """The TrainConfig this run was trained with."""
        from histofold.config import TrainConfig

        return TrainConfig.from_json(self.raw_config())

    def resolved(self) -> dict:
        """Facts derived at run time: classes, image_size, tfrecords, manifest_sha256, lr_scaled, ..."""
        return self.raw_config().get("resolved", {})

    def build_model(self, *, weights: bool = True):
        """The run's model rebuilt from config.json alone (arch, width, size, classes), with its weights."""
        from histofold.models import build_model

        config, resolved = self.config(), self.resolved()
        model = build_model(config.arch, num_classes=len(resolved["classes"]),
                            image_size=tuple(resolved["image_size"]), weights=None, dropout=config.dropout,
                            **config.arch_kwargs)
        if weights:
            path = self.checked(WEIGHTS)
            try:
                model.load_weights(path)
            except (OSError, ValueError) as e:  # passed the checksum but does not fit the model
                raise IntegrityError(f"{path} does not load into {config.arch} ({str(e).splitlines()[0][:120]}); "
                                     f"{self.retrain_hint()}") from None
        return model

    def oof(self, name: str = OOF):
        """The fold's OOF predictions (oof.csv, checked; or another file such as oof_tta8.csv)."""
        path = self.checked(name) if name in CHECKED else self.file(name)
        if not io.exists(path):
            raise DataError(f"{path} is missing" + ("; run predict.py --oof first" if name != OOF else ""))
        return io.read_csv(path, dtype={"id": str})

    def history(self):
        return io.read_csv(self.file(HISTORY)) if self.has(HISTORY) else None

    def metrics(self) -> dict:
        return io.read_json(self.file(METRICS))


# ---------------------------------------------------------------- runs (runs/<name>)

def fold_dirs(run: str, *, complete: bool = True) -> list[RunDir]:
    """A run (runs/<name>) -> its fold directories in fold order (full last); a fold dir -> [it].

    complete=True (what predict/evaluate use): every fold must have finished, else DataError naming
    the unfinished one."""
    run = io.normpath(str(run))
    if FOLD_DIR_RE.match(io.basename(run)) and io.exists(io.join(run, CONFIG)):
        dirs = [RunDir(run)]
    else:
        if not io.isdir(run):
            raise DataError(f"run directory {run} does not exist; train one with train.py first")
        names = [n for n in io.listdir(run) if FOLD_DIR_RE.match(n) and io.exists(io.join(run, n, CONFIG))]
        if not names:
            raise DataError(f"{run} holds no fold<k>/{CONFIG}; train with train.py --fold=all first")
        names.sort(key=lambda n: (n == "full", int(n[4:]) if n != "full" else 0))
        dirs = [RunDir(io.join(run, n)) for n in names]
    if complete:
        for d in dirs:
            d.require_complete()
    return dirs


def is_complete_run(run: str) -> bool:
    try:
        fold_dirs(run, complete=True)
        return True
    except DataError:
        return False


def latest_run(runs_dir: str = "runs") -> str:
    """The complete run (runs/<name>) finished most recently; unfinished runs are skipped (and said so)."""
    if not io.isdir(runs_dir):
        raise DataError(f"no {runs_dir}/ directory: train a model with train.py first, or pass --runs=")
    best, best_t, skipped = None, -1, []
    for name in io.listdir(runs_dir):
        run = io.join(runs_dir, name)
        if not io.isdir(run):
            continue
        try:
            dirs = fold_dirs(run, complete=True)
        except DataError:
            skipped.append(name)
            continue
        t = max(io.mtime_ns(d.file(COMPLETE)) for d in dirs)
        if t > best_t:
            best, best_t = run, t
    if skipped:
        log.info("latest run: skipping unfinished runs %s", ", ".join(skipped))
    if best is None:
        raise DataError(f"no finished runs under {runs_dir}/"
                        + (f" ({', '.join(skipped)} did not finish: rerun train.py to resume)" if skipped else
                           ": train a model with train.py first"))
    return best


def run_name(path: str) -> str:
    """runs/<name>/fold3 -> <name>; runs/<name>/ -> <name>."""
    path = io.normpath(str(path))
    base = io.basename(path)
    return io.basename(io.dirname(path)) if FOLD_DIR_RE.match(base) else base
