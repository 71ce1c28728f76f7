"""config.py: the scripts' signatures and the config dataclasses are one set; every flag is validated early."""
import dataclasses
import inspect

import pytest

import evaluate
import export
import finetune
import predict
import prepare_tfrecords
import train
from histofold import config as C
from histofold.errors import UsageError

SCRIPTS = [(prepare_tfrecords, C.PrepareConfig), (train, C.TrainConfig), (finetune, C.FinetuneConfig),
           (predict, C.PredictConfig), (evaluate, C.EvaluateConfig), (export, C.ExportConfig)]


def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == cls.VAR_OPTIONS:
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


@pytest.mark.parametrize("script, cls", SCRIPTS, ids=[s.__name__ for s, _ in SCRIPTS])
def test_main_signature_and_config_fields_do_not_drift(script, cls):
    params = inspect.signature(script.main).parameters
    flags = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params.values())
    assert set(flags) == set(cls.flag_names())
    defaults = _defaults(cls)
    for name, default in flags.items():
        # the CLI default, parsed by the field's own parser, is the config default
        parse = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["parse"]
        assert parse(name, default) == defaults[name], name
    assert cls.from_flags() == cls(**{k: v for k, v in defaults.items()}) if cls is not C.FinetuneConfig else True


@pytest.mark.parametrize("cls, kwargs, flag", [
    (C.TrainConfig, {"lr": "abc"}, "--lr"),
    (C.TrainConfig, {"batch_size": 0}, "--batch_size"),
    (C.TrainConfig, {"epochs": 2.5}, "--epochs"),
    (C.TrainConfig, {"monitor": "val_f1"}, "--monitor"),
    (C.TrainConfig, {"oof_tta": 3}, "--oof_tta"),
    (C.TrainConfig, {"class_weight": "heavy"}, "--class_weight"),
    (C.TrainConfig, {"fold": "one"}, "--fold"),
    (C.TrainConfig, {"warmup": 1.5}, "--warmup"),
    (C.TrainConfig, {"optimizer": "lamb"}, "--optimizer"),
    (C.TrainConfig, {"focal": "maybe"}, "--focal"),
    (C.TrainConfig, {"epoch": 3}, "--epoch; did you mean --epochs"),
    (C.TrainConfig, {"unfreeze": "all"}, "--init_run"),
    (C.PredictConfig, {"tta": 3}, "--tta"),
    (C.PredictConfig, {"ensemble": "median"}, "--ensemble"),
    (C.PredictConfig, {"run_weights": "a,b"}, "--run_weights"),
    (C.PredictConfig, {"ensmble": "rank"}, "did you mean --ensemble"),
    (C.PrepareConfig, {"folds": 1}, "--folds"),
    (C.PrepareConfig, {"jpeg_quality": 101}, "--jpeg_quality"),
    (C.PrepareConfig, {"encoding": "webp"}, "--encoding"),
    (C.PrepareConfig, {"source": "nope"}, "--source"),
    (C.PrepareConfig, {"source": "hcd", "class_depth": 2}, "not an option of --source=hcd"),
    (C.PrepareConfig, {"source": "synthetic", "cuont": 3}, "did you mean --count"),
    (C.PrepareConfig, {"stain_norm": "vahadane"}, "--stain_norm"),
    (C.EvaluateConfig, {"n_boot": 1}, "--n_boot"),
    (C.FinetuneConfig, {"run": "r", "unfreeze": "most"}, "--unfreeze"),
])
def test_bad_flags_fail_in_one_line_naming_the_flag(cls, kwargs, flag):
    with pytest.raises(UsageError) as e:
        cls.from_flags(**kwargs)
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_values_are_coerced_once():
    c = C.TrainConfig.from_flags(lr="3e-3", fold=(0, 2), class_weight=[1, 3], focal="true", epochs="12")
    assert c.lr == 0.003 and c.fold == "0,2" and c.folds_to_run(5) == [0, 2] and c.focal is True and c.epochs == 12
    assert c.class_weights_spec() == [1.0, 3.0]
    assert C.TrainConfig.from_flags(fold="all").folds_to_run(3) == [0, 1, 2]
    assert C.TrainConfig.from_flags(fold="full").folds_to_run(3) == ["full"]
    with pytest.raises(UsageError, match="out of range"):
        C.TrainConfig.from_flags(fold=4).folds_to_run(3)
    p = C.PrepareConfig.from_flags(source="synthetic", count=10, near_dup=False)
    assert p.source_options == {"count": 10} and p.near_bits is None
    f = C.PrepareConfig.from_flags(source="folder", input="x", classes="a,b", class_depth=2)
    assert f.classes == ("a", "b") and f.adapter_options() == {"classes": "a,b", "class_depth": 2}


def test_deprecated_aliases_warn_and_map():
    with pytest.warns(FutureWarning, match="--size is deprecated: use --resize"):
        assert C.PrepareConfig.from_flags(size=96).resize == 96
    with pytest.warns(FutureWarning, match="--weights is deprecated"):
        assert C.PredictConfig.from_flags(weights="0.6,0.4").weights() == (0.6, 0.4)
    with pytest.warns(FutureWarning):
        assert C.EvaluateConfig.from_flags(oof="oof_tta8.csv").oof_file == "oof_tta8.csv"


def test_train_config_json_round_trip():
    c = C.TrainConfig.from_flags(arch="histo_cnn", width=24, fold=3, ema=0.99, mixup=0.2)
    assert C.TrainConfig.from_json({**c.to_json(), "resolved": {"classes": ["a", "b"]}}) == c
    assert c.arch_kwargs == {"width": 24} and c.run_name == "histo_cnn"


def test_finetune_overrides_the_source_run():
    src = C.TrainConfig.from_flags(arch="histo_cnn", width=24, lr=1e-3, name="x", augment="stain", fold="2")
    ft = C.FinetuneConfig.from_flags(run="runs/x/fold2", epochs=3).train_config(src)
    assert (ft.init_run, ft.unfreeze, ft.lr, ft.name, ft.width, ft.augment, ft.epochs, ft.train_bn) == \
        ("runs/x/fold2", "all", pytest.approx(1e-4), "x_ft", 24, "stain", 3, False)
