"""Every script's settings as one frozen, validated dataclass: PrepareConfig, TrainConfig, FinetuneConfig,
PredictConfig, EvaluateConfig, ExportConfig.

A config is built from the command line's keyword arguments (`Config.from_flags(**kwargs)`), which
coerces each value to its field's type and checks its range and allowed values, failing with one
`UsageError` line that names the flag (`--lr='abc': expected a number`) before any data is read and,
for everything but the registry names (architectures, augmentations), before TensorFlow is imported.
The scripts' `main` signatures and these fields are the same set with the same defaults
(tests/test_config.py holds them together). A run's config.json is `TrainConfig.to_json()`; loading a
run gives the TrainConfig back (`TrainConfig.from_json`).

Renamed flags keep their old spelling as a deprecated alias (`ALIASES`): the script warns once and
uses the new name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass, field

from histofold.errors import UsageError

log = logging.getLogger("histofold")

# Allowed values, each taken from the module that owns the fact (none of these imports TensorFlow).
# Registries that do (architectures, augmentations, schedules, optimizers) are checked by
# TrainConfig.check_registries just before training.
from histofold.ensemble import METHODS as _ENSEMBLE_METHODS  # noqa: E402
from histofold.records import ENCODINGS as _RECORD_ENCODINGS  # noqa: E402
from histofold.stain import METHODS as STAIN_METHODS  # noqa: E402
from histofold.strategy import PRECISIONS, STRATEGIES  # noqa: E402
from histofold.submission import OUTPUTS as SUBMISSION_FORMATS  # noqa: E402

LOG_LEVELS = ("debug", "info", "warning", "error")
TTA_CHOICES = (1, 2, 4, 8)
ENCODINGS = ("auto",) + _RECORD_ENCODINGS
ENSEMBLES = tuple(_ENSEMBLE_METHODS)
RUNNERS = ("local", "beam")
OPTIMIZERS = ("adamw", "adam", "sgd")
MONITORS = ("", "val_loss", "val_auc", "val_accuracy", "val_macro_f1")
EXPORT_FORMATS = ("keras", "savedmodel", "onnx")
FOLD_WORDS = ("all", "full")  # every fold in turn | one model on all training data, no validation fold


# ---------------------------------------------------------------- value parsing (one line per bad flag)

def _bad(name: str, value, want: str) -> UsageError:
    return UsageError(f"--{name}={value!r}: expected {want}")


def as_int(name, value):
    if isinstance(value, bool):
        raise _bad(name, value, "a whole number")
    if isinstance(value, int):
        return value
    try:
        f = float(str(value).strip())
    except ValueError:
        raise _bad(name, value, "a whole number") from None
    if not f.is_integer():
        raise _bad(name, value, "a whole number")
    return int(f)


def as_float(name, value):
    if isinstance(value, bool):
        raise _bad(name, value, "a number")
    try:
        f = float(value if isinstance(value, (int, float)) else str(value).strip())
    except ValueError:
        raise _bad(name, value, "a number") from None
    if not math.isfinite(f):
        raise _bad(name, value, "a finite number")
    return f


def as_bool(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _bad(name, value, "true or false (or --name / --noname)")


def as_str(name, value):
    if isinstance(value, tuple):          # fire turns --x=a,b into a tuple
        return ",".join(str(v) for v in value)
    if isinstance(value, (list, dict)):   # and --x=[1,3] / --x={...} into a list / dict
        return json.dumps(value)
    return str(value)


def optional(parse):
    def inner(name, value):
        return None if value is None or value == "" else parse(name, value)
    inner.__name__ = f"optional_{parse.__name__}"
    return inner


def as_list(name, value) -> tuple:
    """`a,b` / ('a', 'b') / None -> ('a', 'b') / ()."""
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def opt(default, parse, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A config field: its default, its parser and its allowed values/range (checked in __post_init__)."""
    return field(default=default, metadata={"parse": parse, "choices": choices, "ge": ge, "gt": gt,
                                            "le": le, "lt": lt})


def _check_range(name, value, meta) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) if c != "" else "''" for c in choices)
        raise UsageError(f"--{name}={value!r}: choose one of {shown}")
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise UsageError(f"--{name}={value!r}: must be {word} {bound}")


class Config:
    """Shared machinery: coerce + validate every field in __post_init__, flags <-> JSON."""

    ALIASES: dict = {}    # old flag name -> new flag name (deprecated spellings)
    VAR_OPTIONS = ""      # name of a field that collects extra keyword flags (prepare's source options)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            meta = f.metadata
            if "parse" not in meta:
                continue
            value = meta["parse"](f.name, getattr(self, f.name))
            _check_range(f.name, value, meta)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve more than one field; subclasses override."""

    @classmethod
    def flag_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != cls.VAR_OPTIONS]

    @classmethod
    def from_flags(cls, **kwargs):
        """The config from a script's keyword arguments; deprecated aliases are renamed with a warning."""
        kwargs = dict(kwargs)
        for old, new in cls.ALIASES.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if new in kwargs and kwargs[new] != _default(cls, new):
                    raise UsageError(f"--{old} is the old name of --{new}; pass only --{new}")
                warnings.warn(f"--{old} is deprecated: use --{new}", FutureWarning, stacklevel=2)
                log.warning("--%s is deprecated: use --%s", old, new)
                kwargs[new] = value
        names = set(cls.flag_names())
        extra = {k: v for k, v in kwargs.items() if k not in names}
        if extra and not cls.VAR_OPTIONS:
            raise UsageError(unknown_flag_message(next(iter(extra)), names))
        known = {k: v for k, v in kwargs.items() if k in names}
        if cls.VAR_OPTIONS:
            known[cls.VAR_OPTIONS] = {**kwargs.get(cls.VAR_OPTIONS, {}), **extra}
        return cls(**known)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_json(cls, d: dict):
        """The config a to_json() wrote (keys that are not fields, such as "resolved", are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _default(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def unknown_flag_message(name: str, valid) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else "; see --help for the flags"
    return f"unknown flag --{name}{hint}"


def _near_dup(name, value) -> int:
    """--near_dup: a Hamming radius (of 64 bits), True = 4, False or -1 = exact duplicates only."""
    if value is True:
        return 4
    if value is False:
        return -1
    return as_int(name, value)


def _log_level():
    return opt("info", as_str, choices=LOG_LEVELS)


# ---------------------------------------------------------------- prepare

@dataclass(frozen=True)
class PrepareConfig(Config):
    """prepare_tfrecords.py: see its docstring for each flag."""

    source: str = opt("synthetic", as_str)
    input: str | None = opt(None, optional(as_str))
    out: str = opt("tfrecords", as_str)
    folds_dir: str = opt("folds", as_str)
    folds: int = opt(5, as_int, ge=2)
    seed: int = opt(42, as_int)
    encoding: str = opt("auto", as_str, choices=ENCODINGS)
    jpeg_quality: int = opt(95, as_int, ge=1, le=100)
    resize: int | None = opt(None, optional(as_int), ge=1)
    shard_mb: float = opt(100.0, as_float, gt=0)
    workers: int | None = opt(None, optional(as_int), ge=1)
    cache_mb: float = opt(2000.0, as_float, ge=0)
    groups: str | None = opt(None, optional(as_str))
    classes: tuple = opt((), as_list)
    group_regex: str | None = opt(None, optional(as_str))
    test_input: str | None = opt(None, optional(as_str))
    holdout: float = opt(0.0, as_float, ge=0, lt=1)
    drop_blank: bool = opt(False, as_bool)
    near_dup: int = opt(4, lambda n, v: _near_dup(n, v), ge=-1)
    dedupe: bool = opt(False, as_bool)
    strict_labels: bool = opt(False, as_bool)
    stain_norm: str = opt("none", as_str, choices=STAIN_METHODS)
    stain_ref: str | None = opt(None, optional(as_str))
    mpp: float | None = opt(None, optional(as_float), gt=0)
    verify: bool = opt(False, as_bool)
    overwrite: bool = opt(False, as_bool)
    runner: str = opt("local", as_str, choices=RUNNERS)
    beam_args: str = opt("", as_str)
    log_level: str = _log_level()
    source_options: dict = field(default_factory=dict)

    ALIASES = {"size": "resize"}
    VAR_OPTIONS = "source_options"

    def validate(self):
        from histofold import sources  # no TensorFlow: the registry of adapters and their options

        src = sources.get_source(self.source)
        adapter = self.adapter_options()
        unknown = [k for k in adapter if k not in src.options]
        if unknown:
            valid = sorted(set(self.flag_names()) | set(src.options))
            name = unknown[0]
            message = unknown_flag_message(name, valid)
            if name in {o for s in sources.SOURCES.values() for o in s.options}:
                message = (f"--{name} is not an option of --source={self.source} (its options: "
                           + (", ".join(f"--{o}" for o in src.options) or "none") + ")")
            raise UsageError(message)
        if self.stain_ref and self.stain_norm == "none":
            raise UsageError("--stain_ref needs --stain_norm=reinhard or macenko")
        if self.holdout and self.test_input:
            raise UsageError("--holdout makes a test set from the training images; drop it with --test_input")
        if self.beam_args and self.runner != "beam":
            raise UsageError("--beam_args is for --runner=beam; add --runner=beam or drop --beam_args")
        if self.runner == "beam":
            import shlex

            try:
                shlex.split(self.beam_args)
            except ValueError as e:
                raise UsageError(f"--beam_args={self.beam_args!r} does not parse as command-line flags ({e}); "
                                 "quote it as one string, e.g. --beam_args='--runner=DataflowRunner --project=P'")

    @property
    def near_bits(self) -> int | None:
        """Hamming radius for near duplicates (of 64 bits); None = exact duplicates only (--near_dup=-1)."""
        return None if self.near_dup < 0 else self.near_dup

    def adapter_options(self) -> dict:
        """The options handed to the source adapter: its named flags that were given, then the rest."""
        named = {"groups": self.groups, "group_regex": self.group_regex, "test_input": self.test_input,
                 "classes": ",".join(self.classes) if self.classes else None}
        if self.source == "slides":  # tiles are cut at --mpp as --resize squares
            named.update(patch_mpp=self.mpp, patch_px=self.resize)
        return {**{k: v for k, v in named.items() if v is not None}, **self.source_options}


# ---------------------------------------------------------------- train / finetune

@dataclass(frozen=True)
class TrainConfig(Config):
    """train.py (and finetune.py, which fills it from a finished run): see train.py's docstring."""

    fold: str = opt("0", as_str)
    arch: str = opt("resnet50", as_str)
    tfrecords: str = opt("tfrecords", as_str)
    name: str = opt("", as_str)
    runs_dir: str = opt("runs", as_str)
    image_size: int = opt(0, as_int, ge=0)
    weights: str = opt("auto", as_str)
    width: int = opt(0, as_int, ge=0)
    dropout: float | None = opt(None, optional(as_float), ge=0, lt=1)
    epochs: int = opt(10, as_int, ge=1)
    batch_size: int = opt(64, as_int, ge=1)
    lr: float = opt(1e-3, as_float, gt=0)
    optimizer: str = opt("adamw", as_str, choices=OPTIMIZERS)
    weight_decay: float = opt(1e-4, as_float, ge=0)
    schedule: str = opt("onecycle", as_str)
    warmup: float = opt(0.3, as_float, ge=0, lt=1)
    augment: str = opt("light", as_str)
    class_weight: str = opt("balanced", as_str)
    label_smoothing: float = opt(0.0, as_float, ge=0, lt=1)
    focal: bool = opt(False, as_bool)
    mixup: float = opt(0.0, as_float, ge=0)
    ema: float = opt(0.0, as_float, ge=0, lt=1)
    freeze_base_epochs: int = opt(0, as_int, ge=0)
    init_run: str = opt("", as_str)
    unfreeze: str = opt("", as_str)
    train_bn: bool = opt(True, as_bool)
    monitor: str = opt("", as_str, choices=MONITORS)
    patience: int = opt(0, as_int, ge=0)
    strategy: str = opt("auto", as_str, choices=STRATEGIES)
    precision: str = opt("auto", as_str, choices=PRECISIONS)
    seed: int = opt(42, as_int)
    cache: bool = opt(False, as_bool)
    steps_per_epoch: int = opt(0, as_int, ge=0)
    oof_tta: int = opt(1, as_int, choices=TTA_CHOICES)
    tensorboard: bool = opt(False, as_bool)
    overwrite: bool = opt(False, as_bool)
    log_level: str = _log_level()

    def validate(self):
        self.fold_spec()  # raises on a bad --fold
        self.class_weights_spec()
        if self.unfreeze and not (self.unfreeze == "all" or self.unfreeze.isdigit()):
            raise UsageError(f"--unfreeze={self.unfreeze!r}: pass all or a number of top backbone layers")
        if self.unfreeze and not self.init_run:
            raise UsageError("--unfreeze continues a trained run: pass --init_run=runs/<name>/fold<k> "
                             "(or use finetune.py --run=...)")
        if self.freeze_base_epochs > self.epochs:
            raise UsageError(f"--freeze_base_epochs={self.freeze_base_epochs} exceeds --epochs={self.epochs}")
        if self.fold == "full" and self.monitor and self.monitor != "":
            raise UsageError("--fold=full has no validation fold to --monitor; drop --monitor "
                             "(the final weights are kept)")
        if self.fold == "full" and self.patience:
            raise UsageError("--fold=full has no validation fold for --patience; drop --patience")

    def fold_spec(self) -> tuple:
        """('all',) | ('full',) | (k, ...) from --fold."""
        text = self.fold.strip()
        if text in FOLD_WORDS:
            return (text,)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise UsageError(f"--fold={self.fold!r}: pass a fold number, a comma list, all or full")
        return tuple(int(p) for p in parts)

    def folds_to_run(self, n_folds: int) -> list:
        """The fold runs this config asks for, given the dataset's fold count: ints and/or 'full'."""
        spec = self.fold_spec()
        if spec == ("all",):
            return list(range(n_folds))
        if spec == ("full",):
            return ["full"]
        bad = [k for k in spec if k >= n_folds]
        if bad:
            raise UsageError(f"--fold={bad[0]} is out of range: the dataset has folds 0..{n_folds - 1}")
        return list(spec)

    def class_weights_spec(self):
        """'balanced' | None | a list of floats | a {class: weight} dict, parsed once."""
        text = self.class_weight.strip()
        if text in ("balanced",):
            return "balanced"
        if text in ("none", "", "None", "False", "false"):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise UsageError(f"--class_weight={text!r}: pass balanced, none, a JSON list like [1,3] or "
                             "a JSON object like {\"tumor\": 3}") from None
        if isinstance(parsed, list) and all(isinstance(v, (int, float)) and v >= 0 for v in parsed):
            return [float(v) for v in parsed]
        if isinstance(parsed, dict) and all(isinstance(v, (int, float)) and v >= 0 for v in parsed.values()):
            return {str(k): float(v) for k, v in parsed.items()}
        raise UsageError(f"--class_weight={text!r}: weights must be non-negative numbers")

    @property
    def run_name(self) -> str:
        return self.name or self.arch

    @property
    def arch_kwargs(self) -> dict:
        return {"width": self.width} if self.width else {}

    def check_registries(self) -> None:
        """Architecture and augmentation names (their registries import TensorFlow)."""
        from histofold import augment, models, schedules

        models.get_arch(self.arch)
        augment.check_preset(self.augment)
        schedules.check_schedule(self.schedule)


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """finetune.py: the overrides applied to a finished run's TrainConfig."""

    run: str = opt("", as_str)
    unfreeze: str = opt("all", as_str)
    lr: float | None = opt(None, optional(as_float), gt=0)
    epochs: int = opt(5, as_int, ge=1)
    name: str = opt("", as_str)
    schedule: str = opt("cosine", as_str)
    warmup: float = opt(0.1, as_float, ge=0, lt=1)
    augment: str | None = opt(None, optional(as_str))
    batch_size: int | None = opt(None, optional(as_int), ge=1)
    patience: int = opt(0, as_int, ge=0)
    train_bn: bool = opt(False, as_bool)
    runs_dir: str | None = opt(None, optional(as_str))
    overwrite: bool = opt(False, as_bool)
    log_level: str = _log_level()

    def validate(self):
        if not self.run:
            raise UsageError("--run is required: a finished fold directory, e.g. --run=runs/resnet50/fold0")
        if not (self.unfreeze == "all" or self.unfreeze.isdigit()):
            raise UsageError(f"--unfreeze={self.unfreeze!r}: pass all or a number of top backbone layers")

    def train_config(self, source: TrainConfig) -> TrainConfig:
        """The TrainConfig of the fine-tuning run: the source run's settings with these overrides."""
        return source.replace(
            init_run=self.run, unfreeze=self.unfreeze, train_bn=self.train_bn, epochs=self.epochs,
            lr=self.lr if self.lr is not None else source.lr / 10, name=self.name or f"{source.run_name}_ft",
            schedule=self.schedule, warmup=self.warmup, freeze_base_epochs=0, patience=self.patience,
            overwrite=self.overwrite, weights="none", augment=self.augment or source.augment,
            batch_size=self.batch_size or source.batch_size, runs_dir=self.runs_dir or source.runs_dir,
            log_level=self.log_level, ema=0.0 if source.ema == 0 else source.ema)


# ---------------------------------------------------------------- predict / evaluate / export

@dataclass(frozen=True)
class PredictConfig(Config):
    """predict.py: see its docstring."""

    runs: tuple = opt((), as_list)
    runs_dir: str = opt("runs", as_str)
    tfrecords: str = opt("", as_str)
    tta: int = opt(8, as_int, choices=TTA_CHOICES)
    ensemble: str = opt("mean", as_str, choices=ENSEMBLES)
    run_weights: tuple = opt((), as_list)
    format: str = opt("label", as_str, choices=SUBMISSION_FORMATS)
    name: str = opt("", as_str)
    out_dir: str = opt("", as_str)
    oof: bool = opt(False, as_bool)
    batch_size: int = opt(256, as_int, ge=1)
    precision: str = opt("auto", as_str, choices=PRECISIONS)
    input: str = opt("", as_str)
    predictions: str = opt("predictions.csv", as_str)
    slides: str = opt("", as_str)
    mpp: float | None = opt(None, optional(as_float), gt=0)
    stride: int | None = opt(None, optional(as_int), ge=1)
    min_tissue: float = opt(0.25, as_float, ge=0, le=1)
    top_k: int = opt(10, as_int, ge=1)
    log_level: str = _log_level()

    ALIASES = {"weights": "run_weights", "output": "format", "out": "predictions"}

    def validate(self):
        weights = self.weights()
        if weights and len(self.runs) and len(weights) != len(self.runs):
            raise UsageError(f"--run_weights has {len(weights)} values for {len(self.runs)} --runs")
        if self.input and self.slides:
            raise UsageError("pass --input (images) or --slides (whole-slide images), not both")
        if (self.input or self.slides) and self.oof:
            raise UsageError("--oof recomputes the runs' own OOF predictions; drop it with --input/--slides")

    @property
    def output_dir(self) -> str:
        """--out_dir, else submissions/ (test shards) or slide_maps/ (--slides)."""
        return self.out_dir or ("slide_maps" if self.slides else "submissions")

    def weights(self) -> tuple:
        out = tuple(as_float("run_weights", w) for w in self.run_weights)
        if any(w < 0 for w in out) or (out and sum(out) <= 0):
            raise UsageError(f"--run_weights={','.join(self.run_weights)}: non-negative, with a positive sum")
        return out


@dataclass(frozen=True)
class EvaluateConfig(Config):
    """evaluate.py: see its docstring."""

    runs: tuple = opt((), as_list)
    runs_dir: str = opt("runs", as_str)
    compare: tuple = opt((), as_list)
    name: str = opt("", as_str)
    out_dir: str = opt("reports", as_str)
    oof_file: str = opt("oof.csv", as_str)
    gradcam: bool = opt(True, as_bool)
    n_gradcam: int = opt(4, as_int, ge=1)
    n_boot: int = opt(1000, as_int, ge=10)
    tfrecords: str = opt("", as_str)
    log_level: str = _log_level()

    ALIASES = {"oof": "oof_file"}

    def validate(self):
        if len(self.runs) > 1:
            raise UsageError("--runs takes one run; put the others in --compare=")


@dataclass(frozen=True)
class ExportConfig(Config):
    """export.py: see its docstring."""

    run: str = opt("", as_str)
    runs_dir: str = opt("runs", as_str)
    fold: str = opt("all", as_str)
    out: str = opt("", as_str)
    tta: int = opt(1, as_int, choices=TTA_CHOICES)
    formats: tuple = opt(EXPORT_FORMATS, as_list)
    log_level: str = _log_level()

    def validate(self):
        if not (self.fold in ("all", "ensemble", "full") or self.fold.isdigit()):
            raise UsageError(f"--fold={self.fold!r}: pass a fold number, all (the fold ensemble) or full")
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad or not self.formats:
            raise UsageError(f"--formats={','.join(self.formats)}: choose from {', '.join(EXPORT_FORMATS)}")
        if "keras" not in self.formats:
            raise UsageError("--formats must include keras: the SavedModel and ONNX files are made from it")


CONFIGS = {"prepare_tfrecords": PrepareConfig, "train": TrainConfig, "finetune": FinetuneConfig,
           "predict": PredictConfig, "evaluate": EvaluateConfig, "export": ExportConfig}
