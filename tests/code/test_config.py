"""Strict configuration: every field of every config checks its type and range, and the CLI and the flow
reach every training option, with one-line errors that name the option."""

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainlm import cli
from brainlm.config import (
    RUN_MODEL_OPTIONS,
    ClinicalConfig,
    ForecastConfig,
    IngestConfig,
    MlflowSettings,
    ModelConfig,
    Settings,
    SynthConfig,
    TrainConfig,
    from_dict,
    load_settings,
    preset,
    run_configs,
    run_options,
    to_dict,
    with_options,
)
from brainlm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ModelConfig, TrainConfig, SynthConfig, IngestConfig, MlflowSettings, Settings, ForecastConfig,
           ClinicalConfig]
FIELDS = [(cls, f) for cls in CONFIGS for f in dataclasses.fields(cls)]


def field_id(case) -> str:
    return f"{case[0].__name__}.{case[1].name}"


def outside(interval: str, integer: bool):
    """A value just outside `interval` ("[0, 1)" → -1 or 0 - 1 ...), on the finite side."""
    lo, hi = (float(x) for x in interval.strip("[]()").split(","))
    value = (lo - 1 if interval[0] == "[" else lo) if lo != float("-inf") else (hi + 1 if interval[-1] == "]" else hi)
    return int(value) if integer else value


@pytest.mark.parametrize("case", FIELDS, ids=field_id)
def test_every_field_refuses_a_value_of_the_wrong_type(case):
    cls, f = case
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{f.name} = <object object at .*>: must be ") as info:
        from_dict(cls, {f.name: object()})
    assert (info.value.field, info.value.rule.split()[0]) == (f.name, "must")


@pytest.mark.parametrize("case", [c for c in FIELDS if c[1].metadata.get("within")], ids=field_id)
def test_every_bounded_field_refuses_a_value_out_of_its_range(case):
    cls, f = case
    within = f.metadata["within"]
    integer = "int" in str(f.type)
    value = outside(within, integer)
    if "..." in str(f.type):  # any number of values: one out of range
        value, shown = [value], rf"\[{value}\]"
        rule = f"each must be in {within}"
    elif "tuple" in str(f.type):
        value, shown = [0.5, value], rf"\[0.5, {value}\]"
        rule = f"each must be in {within}"
    else:
        shown, rule = str(value), f"must be in {within}"
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{f.name} = {shown}: ") as info:
        from_dict(cls, {f.name: value})
    assert (info.value.field, info.value.rule) == (f.name, rule)


@pytest.mark.parametrize("cls, values, message", [
    (ModelConfig, {"dropout": "x"}, "ModelConfig.dropout = 'x': must be a number"),
    (ModelConfig, {"mask_ratio": 1}, "ModelConfig.mask_ratio = 1.0: must be in [0, 1)"),
    (ModelConfig, {"layers": 2.0}, "ModelConfig.layers = 2.0: must be an integer"),
    (ModelConfig, {"window": 150}, "ModelConfig.window = 150: must be a multiple of patch_size (20)"),
    (ModelConfig, {"hidden": 66, "heads": 4}, "ModelConfig.hidden = 66: must be divisible by heads (4)"),
    (ModelConfig, {"activation_checkpointing": 1}, "ModelConfig.activation_checkpointing = 1: must be true or false"),
    (TrainConfig, {"betas": [0.9]}, "TrainConfig.betas = [0.9]: must be 2 values, each a number"),
    (TrainConfig, {"lr": float("nan")}, "TrainConfig.lr = nan: must be in (0, inf)"),
    (TrainConfig, {"val_fraction": 0.5, "test_fraction": 0.5},
     "TrainConfig.test_fraction = 0.5: must leave participants for training"),
    (IngestConfig, {"executor": "threads"}, "IngestConfig.executor = 'threads': must be one of 'process', 'ray'"),
    (SynthConfig, {"max_parcels": 0}, "SynthConfig.max_parcels = 0: must be in [1, inf)"),
    (ForecastConfig, {"models": ["brainlm", "arima"]},
     "ForecastConfig.models = ['brainlm', 'arima']: each must be one of 'brainlm', 'scratch', "),
    (ForecastConfig, {"var_lags": []}, "ForecastConfig.var_lags = []: must be one or more values, each an integer"),
    (ForecastConfig, {"val_fraction": 0.5, "test_fraction": 0.5},
     "ForecastConfig.test_fraction = 0.5: must leave participants for training"),
    (ClinicalConfig, {"pooling": "max"}, "ClinicalConfig.pooling = 'max': must be one of 'cls', 'mean', 'connectivity'"),
    (ClinicalConfig, {"folds": 1}, "ClinicalConfig.folds = 1: must be in [2, inf)"),
    (Settings, {"mlflow": {"new_alias": 3}}, "MlflowSettings.new_alias = 3: must be a string"),
])
def test_bad_values_are_refused_naming_field_value_and_rule(cls, values, message):
    with pytest.raises(ConfigError) as info:
        from_dict(cls, values)
    assert str(info.value).startswith(message)


def test_values_are_normalised_and_round_trip():
    cfg = TrainConfig(lr=1, betas=[0.8, 0.9])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.8, 0.9)
    assert SynthConfig(max_parcels=None).max_parcels is None
    settings = from_dict(Settings, {"home": "/tmp/x", "mlflow": {"new_alias": "candidate"}})
    assert settings.home == Path("/tmp/x") and settings.mlflow.new_alias == "candidate"
    for cls in CONFIGS:
        cfg = cls()
        assert from_dict(cls, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="mask_ratio"):
        dataclasses.replace(preset("tiny"), mask_ratio=-0.1)  # replace builds through the same checks
    with pytest.raises(ConfigError, match="unknown config keys"):
        preset("tiny", hiden=3)


def test_with_options_changes_the_options_given_and_checks_them():
    cfg = with_options(ClinicalConfig(), steps=30, folds=None, models=["ridge_fc"])
    assert cfg == dataclasses.replace(ClinicalConfig(), steps=30, models=("ridge_fc",))
    with pytest.raises(ConfigError, match=r"ForecastConfig.var_alphas = \[-1.0\]: each must be in \[0, inf\)"):
        with_options(ForecastConfig(), var_alphas=[-1.0])
    with pytest.raises(ConfigError, match="unknown config keys"):
        with_options(ForecastConfig(), folds=3)


def test_load_settings_takes_the_tracking_uri_from_the_environment_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    settings = load_settings(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert settings.tracking_uri() == "http://mlflow.example:5000"  # carried by the settings, not re-read
    assert load_settings(tmp_path).tracking_uri() == f"sqlite:///{tmp_path.resolve()}/.brainlm/mlflow.db"
    (tmp_path / "mlflow.yaml").write_text("new_alias: [a, b]\n")
    with pytest.raises(ConfigError, match=r"mlflow.yaml: MlflowSettings.new_alias = \['a', 'b'\]: must be a string"):
        load_settings(tmp_path)


def test_run_configs_keep_the_configs_defaults_for_options_left_unset():
    model_cfg, train_cfg = run_configs("tiny", **dict.fromkeys(run_options()))
    assert (model_cfg, train_cfg) == (preset("tiny"), TrainConfig())
    model_cfg, train_cfg = run_configs("13M", mask_ratio=0.5, steps=30, use_gpu=True)
    assert model_cfg == preset("13M", mask_ratio=0.5)
    assert train_cfg == dataclasses.replace(TrainConfig(), steps=30, use_gpu=True)
    with pytest.raises(ConfigError, match="unknown run options"):
        run_configs("tiny", epochs=3)


def changed(value):
    """A valid value different from a field's default: doubled, halved, flipped or set."""
    if value is None:  # an unset float (the learning rate, derived from the model when unset)
        return 0.5
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 2 * value if value else 1
    if isinstance(value, tuple):
        return tuple(v / 2 for v in value)
    return value / 2


def test_every_train_field_is_an_option_of_the_cli_and_a_parameter_of_the_flow():
    from flows.pretrain import pretrain

    options = run_options()
    assert set(TrainConfig.__dataclass_fields__) <= set(options) and set(RUN_MODEL_OPTIONS) <= set(options)

    # The CLI: each option sets its field, and only that field.
    base_model, base_train = preset("tiny"), TrainConfig()
    parser = cli.build_parser()
    for name in options:
        default = getattr(base_model if name in RUN_MODEL_OPTIONS else base_train, name)
        value = changed(default)
        flag = "--" + name.replace("_", "-")
        argv = [f"--{'no-' if not value else ''}{flag[2:]}"] if isinstance(value, bool) else \
            [flag, *map(str, value if isinstance(value, tuple) else [value])]
        args = parser.parse_args(["pretrain", "--cohort", "c", *argv])
        model_cfg, train_cfg = run_configs(args.preset, **{k: getattr(args, k) for k in options})
        expected = (dataclasses.replace(base_model, **{name: value}), base_train) if name in RUN_MODEL_OPTIONS \
            else (base_model, dataclasses.replace(base_train, **{name: value}))
        assert (model_cfg, train_cfg) == expected, name

    # The flow: one parameter per option, typed like the field, None (= the config's value) by default;
    # the flow passes all of them to run_configs.
    params = inspect.signature(pretrain.fn).parameters
    assert list(params) == ["cohort", "preset", *options]
    for name, f in options.items():
        optional = f.type if f.type.endswith(" | None") else f"{f.type} | None"
        assert (params[name].default, params[name].annotation) == (None, optional), name


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "brainlm.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv, line", [
    (["pretrain", "--cohort", "c", "--mask-ratio", "1"], "brainlm pretrain: error: --mask-ratio 1.0: must be in [0, 1)"),
    (["pretrain", "--cohort", "c", "--betas", "0.9", "1.2"],
     "brainlm pretrain: error: --betas 0.9 1.2: each must be in [0, 1)"),
    (["pretrain", "--cohort", "c", "--workers", "0"], "brainlm pretrain: error: --workers 0: must be in [1, inf)"),
    (["pretrain", "--cohort", "c", "--lr", "fast"],
     "brainlm pretrain: error: argument --lr: invalid float value: 'fast' (see brainlm pretrain --help)"),
    (["synth", "out", "--subjects", "0"], "brainlm synth: error: --subjects 0: must be in [1, inf)"),
    (["evaluate", "--task", "clinical", "--cohort", "c", "--model", "m", "--folds", "1"],
     "brainlm evaluate: error: --folds 1: must be in [2, inf)"),
    (["evaluate", "--task", "forecast", "--cohort", "c", "--model", "m", "--models", "brainlm", "arima"],
     "brainlm evaluate: error: --models brainlm arima: each must be one of 'brainlm', 'scratch', 'lstm', 'ode', "
     "'var', 'ar1', 'persistence'"),
    (["evaluate", "--task", "forecast", "--cohort", "c", "--model", "m", "--target", "age"],
     "brainlm evaluate: error: --target: only for --task clinical"),
])
def test_the_cli_reports_a_bad_option_in_one_line_naming_it(argv, line):
    proc = run_cli(*argv)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [line]
