"""Typed configuration, all in one place.

Every config is a frozen dataclass that round-trips through a plain dict (`to_dict` / `from_dict`), so the
exact configuration is saved beside every checkpoint and logged with every MLflow run. Every field states its
type and, where it has one, its allowed range (`within="[0, 1)"`) or choices; both are checked when a config
is built (directly, through `from_dict`, `dataclasses.replace`, the CLI or a flow), and a value that does not
fit raises `ConfigError` naming the field, the value and what is allowed. Nothing here imports anything
heavier than the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from brainlm.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a JSON/YAML-friendly dict (nested dataclasses become dicts, paths become strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build `cls` from a dict (e.g. `to_dict`'s), refusing unknown keys so a typo never passes silently.

    Values are checked (and lists, strings for paths, dicts for nested configs converted) by the config itself.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


def with_options(cfg: T, **options: Any) -> T:
    """`cfg` with the options given; an option that is None keeps `cfg`'s value (a CLI option or flow parameter
    left unset). Built through the same checks as any config: a bad value or unknown name raises ConfigError."""
    given = {k: v for k, v in options.items() if v is not None}
    return from_dict(type(cfg), {**to_dict(cfg), **given})


# ------------------------------------------------------------------------------------- checked fields


def param(default: Any = dataclasses.MISSING, *, within: str | None = None, choices: tuple | None = None,
          help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with what it allows and what it means (the help of its CLI option).

    `within` is an interval as written in maths, e.g. "[0, 1)" or "(0, inf)"; for a tuple it bounds each
    item. `choices` lists the allowed values.
    """
    if within is not None:
        _interval(within)  # a malformed interval fails at import, not at the first check
    return field(default=default, default_factory=default_factory,
                 metadata={"within": within, "choices": choices, "help": help})


class Config:
    """Base of every config dataclass: each field is checked on construction, then `validate` runs.

    Values are normalised where the JSON form differs from the typed one: an int given for a float becomes a
    float, a list for a tuple a tuple, a string for a path a Path, a dict for a nested config that config.
    """

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _checked(type(self).__name__, f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: normalising is still construction
        self.validate()

    def validate(self) -> None:
        """Rules that involve several fields (override; raise `self.error(...)`)."""

    def error(self, name: str, rule: str) -> ConfigError:
        """The ConfigError for field `name` of this config breaking `rule` (e.g. "must be in [0, 1)")."""
        return field_error(type(self).__name__, name, getattr(self, name), rule)


def field_error(config: str, name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{config}.{name} = {value!r}: {rule}", field=name, value=value, rule=rule)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(config: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """`value` normalised to the field's type, or ConfigError saying what the field allows."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # tuple[float, float]: that many values; tuple[int, ...]: one or more
        items = typing.get_args(hint)
        if items[-1] is Ellipsis:
            if not isinstance(value, list | tuple) or not value:
                raise field_error(config, f.name, value, f"must be one or more values, each {_type_name(items[0])}")
            items = (items[0],) * len(value)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise field_error(config, f.name, value, f"must be {len(items)} values, each {_type_name(items[0])}")
        try:
            return tuple(_checked(config, f, item, v) for item, v in zip(items, value, strict=True))
        except ConfigError as e:
            raise field_error(config, f.name, value, f"each {e.rule}") from None
    value = _typed(config, f.name, hint, value)
    choices, within = f.metadata.get("choices"), f.metadata.get("within")
    if choices is not None and value not in choices:
        raise field_error(config, f.name, value, f"must be one of {', '.join(map(repr, choices))}")
    if within is not None and not _in_interval(value, within):
        raise field_error(config, f.name, value, f"must be in {within}")
    return value


def _typed(config: str, name: str, hint: Any, value: Any) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is Path:
        ok = isinstance(value, str | os.PathLike)
        value = Path(value) if ok else value
    elif typing.get_origin(hint) is dict:  # e.g. a deployment's default flow parameters (checked by the flow)
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            value = from_dict(hint, value)
        ok = isinstance(value, hint)
    else:
        raise TypeError(f"{config}.{name}: no check for fields of type {hint}")
    if not ok:
        raise field_error(config, name, value, f"must be {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is dict:
        return "a mapping of names to values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


@functools.cache
def _interval(text: str) -> tuple[bool, float, float, bool]:
    match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
    if not match:
        raise ValueError(f"malformed interval {text!r}; write e.g. '[0, 1)' or '(0, inf)'")
    left, lo, hi, right = match.groups()
    return left == "[", float(lo), float(hi), right == "]"


def _in_interval(value: float, text: str) -> bool:
    closed_lo, lo, hi, closed_hi = _interval(text)
    if isinstance(value, float) and math.isnan(value):
        return False
    above = value >= lo if closed_lo else value > lo
    below = value <= hi if closed_hi else value < hi
    return above and below


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig(Config):
    """BrainLM architecture. Any parcel count works; the window must be a multiple of the patch size."""

    window: int = param(200, within="[1, inf)", help="timepoints (TRs) per training window")
    patch_size: int = param(20, within="[1, inf)",
                            help="TRs per patch: each parcel's window is cut into window // patch_size tokens")
    hidden: int = param(768, within="[1, inf)", help="encoder width")
    layers: int = param(12, within="[1, inf)", help="encoder blocks")
    heads: int = param(12, within="[1, inf)", help="encoder attention heads")
    decoder_hidden: int = param(512, within="[1, inf)", help="decoder width")
    decoder_layers: int = param(8, within="[0, inf)", help="decoder blocks")
    decoder_heads: int = param(16, within="[1, inf)", help="decoder attention heads")
    mlp_ratio: float = param(4.0, within="(0, inf)", help="MLP width / block width")
    mask_ratio: float = param(0.75, within="[0, 1)", help="share of tokens hidden from the encoder (paper: 0.2, "
                                                          "0.5, 0.75)")
    dropout: float = param(0.0, within="[0, 1)", help="dropout in attention and MLPs")
    coord_scale: float = param(100.0, within="(0, inf)",
                               help="\"mlp\" spatial embedding: MNI mm are divided by this (inputs ~[-1, 1])")
    activation_checkpointing: bool = param(False, help="recompute blocks in backward: memory for compute (650M)")
    # How position reaches attention (bench/README.md "Pretraining quality" has the curves behind the defaults).
    # Defaults: parcels told apart by Fourier features of XYZ, and same-patch tokens easy to attend to from the
    # first step; "mlp" + False is the paper's embedding and attention, which sit on the zero baseline for
    # hundreds of steps and level off far above the spatial reference.
    spatial_embedding: str = param("fourier", choices=("fourier", "mlp"),
                                   help="fourier: random Fourier features of XYZ; mlp: the paper's MLP on XYZ")
    fourier_mm: float = param(20.0, within="(0, inf)",
                              help="fourier: shortest wavelength in mm (the longest is 200 mm, about a brain)")
    time_bias: bool = param(True, help="learned relative-time attention bias, starting out favouring same-patch "
                                       "tokens")

    def validate(self) -> None:
        if self.window % self.patch_size:
            raise self.error("window", f"must be a multiple of patch_size ({self.patch_size})")
        if self.hidden % self.heads:
            raise self.error("hidden", f"must be divisible by heads ({self.heads})")
        if self.decoder_hidden % self.decoder_heads:
            raise self.error("decoder_hidden", f"must be divisible by decoder_heads ({self.decoder_heads})")

    @property
    def patches_per_parcel(self) -> int:
        return self.window // self.patch_size


# Presets keep the paper's choices; `tiny` is for CPU tests (its decoder has 2 heads of 16 channels: faster to
# learn and to step on a CPU than 4 of 8). Each named size is within 10 % of its name
# (tests/model/test_model_behaviour.py counts the parameters on the meta device).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden=64, layers=2, heads=4, decoder_hidden=32, decoder_layers=1, decoder_heads=2),
    "13M": ModelConfig(hidden=512, layers=4, heads=8, decoder_hidden=256, decoder_layers=1, decoder_heads=8),
    "111M": ModelConfig(hidden=768, layers=12, heads=12, decoder_hidden=512, decoder_layers=8, decoder_heads=16),
    "650M": ModelConfig(hidden=1280, layers=32, heads=16, decoder_hidden=512, decoder_layers=8, decoder_heads=16),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides (e.g. `preset("tiny", mask_ratio=0.5)`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return from_dict(ModelConfig, {**to_dict(PRESETS[name]), **overrides})


# ------------------------------------------------------------------------------------------ training


def check_leaves_training(config: Config) -> None:
    """A participant split (`val_fraction`, `test_fraction`) must leave participants for training."""
    if config.val_fraction + config.test_fraction >= 1:
        raise config.error("test_fraction", f"must leave participants for training: val_fraction "
                                            f"({config.val_fraction}) + test_fraction must be below 1")


DEFAULT_LR, DEFAULT_LR_WIDTH = 3e-3, 64  # TrainConfig.with_lr_for: the peak rate at this encoder width


@dataclass(frozen=True)
class TrainConfig(Config):
    """Pretraining: how long (optimiser steps), the optimiser and schedule, data sampling, Ray Train scaling.

    Training is counted in optimiser steps, not passes over the data: every step draws `batch_size` random
    windows per worker from the training recordings, so any cohort size trains for the steps asked for.
    Every `eval_every` steps (and after the last) the run is evaluated, checkpointed and logged.
    """

    steps: int = param(1000, within="[1, inf)", help="optimiser steps in all (each: batch_size windows per worker)")
    eval_every: int = param(100, within="[1, inf)",
                            help="evaluate, checkpoint and log every this many steps (and after the last)")
    batch_size: int = param(16, within="[1, inf)", help="windows per step per worker")
    lr: float | None = param(None, within="(0, inf)",
                             help="peak learning rate, reached at the end of warmup; unset: 3e-3 × √(64 / hidden) "
                                  "(tiny 3e-3, 13M 1.1e-3, 111M 8.7e-4, 650M 6.7e-4)")
    min_lr_ratio: float = param(0.1, within="[0, 1]", help="the cosine decays to lr × this by the last step")
    warmup_steps: int = param(50, within="[0, inf)", help="steps of linear warmup from lr/warmup_steps to lr")
    weight_decay: float = param(0.05, within="[0, inf)", help="AdamW weight decay (weight matrices only)")
    betas: tuple[float, float] = param((0.9, 0.95), within="[0, 1)", help="AdamW betas")
    grad_clip: float = param(1.0, within="(0, inf)", help="clip the gradient norm to this")
    eval_crops: int = param(4, within="[1, inf)",
                            help="fixed windows per validation recording (and per training recording probed)")
    val_fraction: float = param(0.1, within="(0, 1)", help="share of participants held out for validation")
    test_fraction: float = param(0.1, within="[0, 1)", help="share of participants held out for testing")
    num_workers: int = param(1, within="[1, inf)", help="Ray Train workers (each runs DDP on its shard)")
    use_gpu: bool = param(False, help="one GPU per worker, bf16 autocast, fused AdamW")
    cpus_per_worker: int = param(1, within="[1, inf)", help="CPUs Ray reserves per worker")
    loader_workers: int = param(0, within="[0, inf)", help="DataLoader worker processes per Ray worker")
    compile: bool = param(False, help="torch.compile the model (GPU; helps little on the CPU)")
    seed: int = param(0, within="[0, inf)", help="seeds the split, the crops, the masks and the initial weights")
    max_failures: int = param(1, within="[0, inf)",
                              help="Ray Train restarts the workers from the latest checkpoint this many times")

    def with_lr_for(self, model: ModelConfig) -> TrainConfig:
        """This config with `lr` set: its own, or the default for the model's width.

        The default, 3e-3 × √(64 / hidden), is the peak rate that learned fastest on the synthetic cohort for
        the tiny preset (64 wide: 3e-3) and 13M (512 wide: 1e-3); wider models take smaller steps
        (bench/README.md, "Pretraining quality").
        """
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=DEFAULT_LR * math.sqrt(DEFAULT_LR_WIDTH / model.hidden))

    def validate(self) -> None:
        check_leaves_training(self)


# ------------------------------------------------------------------------------------ a run's options


# The ModelConfig fields one pretraining run may change; the rest is the preset's architecture.
RUN_MODEL_OPTIONS = ("mask_ratio", "window", "time_bias")


def run_options() -> dict[str, dataclasses.Field]:
    """Every option of a pretraining run, by name: `RUN_MODEL_OPTIONS` of ModelConfig, then all of TrainConfig.

    The CLI's `brainlm pretrain` options and the `pretrain` flow's parameters are exactly these.
    """
    model = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name in RUN_MODEL_OPTIONS}
    return model | {f.name: f for f in dataclasses.fields(TrainConfig)}


def run_configs(preset_name: str = "tiny", **options: Any) -> tuple[ModelConfig, TrainConfig]:
    """The configs of one run: the preset with the model options given, `TrainConfig()` with its fields given.

    Options that are None keep the preset's / TrainConfig's value, so the CLI and the flow, which pass every
    option they offer, hold no copies of the defaults. An unknown option or a bad value raises ConfigError.
    """
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(run_options())
    if unknown:
        raise ConfigError(f"unknown run options {sorted(unknown)}; known: {sorted(run_options())}")
    model_cfg = preset(preset_name, **{k: v for k, v in given.items() if k in RUN_MODEL_OPTIONS})
    return model_cfg, from_dict(TrainConfig, {k: v for k, v in given.items() if k not in RUN_MODEL_OPTIONS})


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SynthConfig(Config):
    """The synthetic cohort: ground truth known by construction (see brainlm/data/synthetic.py)."""

    subjects: int = param(40, within="[1, inf)")
    timepoints: int = param(300, within="[1, inf)")
    tr: float = param(0.72, within="(0, inf)", help="seconds (HCP-like); drives the haemodynamic response")
    parcels_from: str = param("A424", help='"A424" or a path to an atlas TSV')
    max_parcels: int | None = param(None, within="[1, inf)",
                                    help="keep a network-balanced subset of the atlas (small CPU tests)")
    task_fraction: float = param(0.5, within="[0, 1]", help='share of recordings that are "task" (block design)')
    recordings_per_subject: int = param(2, within="[1, inf)")
    noise: float = param(0.5, within="[0, inf)", help="std of parcel-level noise relative to the network signal")
    seed: int = param(0, within="[0, inf)")


@dataclass(frozen=True)
class IngestConfig(Config):
    """How a lab's folder becomes a stored cohort."""

    min_timepoints: int = param(200, within="[2, inf)", help="shorter recordings are refused")
    skip_invalid: bool = param(False, help="ingest the valid files and report the rest")
    workers: int = param(0, within="[0, inf)", help="parallel parcellation processes; 0 = one per core")
    push: bool = param(True, help="dvc push after a successful ingest")
    executor: str = param("process", choices=("process", "ray"),
                          help='"process" (local pool) or "ray" (tasks on $RAY_ADDRESS\'s cluster, else local)')


# ------------------------------------------------------------------------------------ downstream tasks


TASKS = ("forecast", "clinical")
FORECAST_MODELS = ("brainlm", "scratch", "lstm", "ode", "var", "ar1", "persistence")
CLINICAL_MODELS = ("brainlm", "ridge_embedding", "svr_embedding", "svr_fc", "ridge_fc")
# Each target's phenotype column and transform are in brainlm/tasks/clinical.py (TARGETS).
CLINICAL_TARGETS = ("age", "neuroticism", "pcl", "gad7", "phq9", "phq9_binary", "sex")
POOLINGS = ("cls", "mean", "connectivity")  # how a clinical head reads the encoder (brainlm.tasks.common.pool)


@dataclass(frozen=True)
class ForecastConfig(Config):
    """Forecasting: the last patch of each model window from the TRs before it, on held-out subjects.

    The window and the horizon (one patch: the last patch of every parcel is masked) are the pretrained
    model's. Every model gets the same subject-level split, and every neural model the same random training
    crops and the same number of optimiser steps (warmup, then cosine, as in pretraining).
    """

    steps: int = param(300, within="[1, inf)", help="optimiser steps of each neural model (brainlm, scratch, lstm, ode)")
    batch_size: int = param(16, within="[1, inf)", help="training windows per step")
    lr: float = param(1e-3, within="(0, inf)", help="peak learning rate (new and randomly initialised parts, baselines)")
    encoder_lr_scale: float = param(1.0, within="[0, inf)",
                                    help="the pretrained encoder's learning rate / lr (brainlm only); 0 freezes it")
    weight_decay: float = param(0.01, within="[0, inf)", help="AdamW weight decay (weight matrices only)")
    warmup_steps: int = param(15, within="[0, inf)", help="steps of linear warmup (at most `steps`)")
    grad_clip: float = param(1.0, within="(0, inf)", help="clip the gradient norm to this")
    eval_stride: int = param(100, within="[1, inf)", help="test windows start every this many TRs of a recording")
    val_fraction: float = param(0.15, within="(0, 1)",
                                help="share of participants that choose the VAR's lag and ridge (never tested on)")
    test_fraction: float = param(0.2, within="(0, 1)", help="share of participants held out for testing")
    lstm_hidden: int = param(128, within="[1, inf)", help="LSTM state size")
    ode_latent: int = param(32, within="[1, inf)", help="neural ODE latent state size")
    ode_hidden: int = param(64, within="[1, inf)", help="neural ODE encoder and vector-field width")
    var_lags: tuple[int, ...] = param((1, 2, 3, 4), within="[1, inf)", help="VAR lags to choose from")
    var_alphas: tuple[float, ...] = param((1e-4, 1e-3, 1e-2, 0.1, 1.0), within="[0, inf)",
                                          help="VAR ridge strengths (per training TR) to choose from")
    models: tuple[str, ...] = param(FORECAST_MODELS, choices=FORECAST_MODELS, help="the models compared")
    device: str = param("cpu", help='torch device of the neural models ("cpu", "cuda")')
    seed: int = param(0, within="[0, inf)", help="seeds the split, the crops and the initial weights")

    def validate(self) -> None:
        check_leaves_training(self)


@dataclass(frozen=True)
class ClinicalConfig(Config):
    """Clinical prediction of one phenotype with subject-level K-fold cross-validation.

    Target transforms are fitted on each fold's training subjects only. The BrainLM head reads each window's
    encoder output pooled as `pooling` says: the CLS embedding (`"cls"`), the mean token (`"mean"`), or the
    similarity of every pair of parcels' token embeddings (`"connectivity"`, second-order); a subject's
    prediction is the mean over its windows.
    """

    target: str = param("age", choices=CLINICAL_TARGETS, help="the phenotype predicted")
    folds: int = param(5, within="[2, inf)", help="cross-validation folds (by subject)")
    pooling: str = param("connectivity", choices=POOLINGS, help="how the head reads the encoder's tokens")
    head_hidden: int = param(64, within="[1, inf)", help="width of the MLP head")
    steps: int = param(200, within="[1, inf)", help="optimiser steps of the fine-tuned head (+ encoder) per fold")
    batch_size: int = param(16, within="[1, inf)", help="training windows per step")
    lr: float = param(1e-3, within="(0, inf)", help="the head's peak learning rate")
    encoder_lr_scale: float = param(0.1, within="[0, inf)",
                                    help="the pretrained encoder's learning rate / lr; 0 freezes it")
    weight_decay: float = param(0.01, within="[0, inf)", help="AdamW weight decay (weight matrices only)")
    warmup_steps: int = param(10, within="[0, inf)", help="steps of linear warmup (at most `steps`)")
    grad_clip: float = param(1.0, within="(0, inf)", help="clip the gradient norm to this")
    windows_per_recording: int = param(4, within="[1, inf)",
                                       help="evenly spaced windows per recording for embeddings and evaluation")
    svr_c: tuple[float, ...] = param((0.1, 1.0, 10.0, 100.0), within="(0, inf)",
                                     help="SVR C values, chosen by inner cross-validation on the training folds")
    ridge_alphas: tuple[float, ...] = param((1.0, 10.0, 100.0, 1000.0), within="(0, inf)",
                                            help="ridge strengths, chosen the same way")
    models: tuple[str, ...] = param(CLINICAL_MODELS, choices=CLINICAL_MODELS, help="the models compared")
    refit: bool = param(True, help="refit every model on all subjects after cross-validation (what is registered)")
    device: str = param("cpu", help='torch device of the fine-tuning ("cpu", "cuda")')
    seed: int = param(0, within="[0, inf)", help="seeds the folds, the crops and the head's initial weights")


# ---------------------------------------------------------------------------------------- interpretation


ATTENTION_SOURCES = ("decoder", "encoder")  # whose parcel-to-parcel attention a network feature is
RESOLUTIONS = ("recording", "time")  # CLS-attention contrasts: per parcel, or per parcel and moment
PERTURB_MODES = ("parcel_time", "parcel")
REPRESENTATIONS = ("reconstruction", "forecast", "cls")  # what a perturbation is matched on


@dataclass(frozen=True)
class NetworksConfig(Config):
    """Functional networks from attention: kNN of parcels into an atlas partition (brainlm/tasks/networks.py)."""

    labels: str | None = param(None, help='the atlas network column to predict (default: "yeo7" if the atlas has '
                                          'it, else its first)')
    source: str = param("decoder", choices=ATTENTION_SOURCES,
                        help="decoder: masked tokens' attention to the visible ones; encoder: nothing masked")
    layer: int | None = param(None, help="block index, negative from the end (default: the mean over blocks)")
    same_time: bool = param(True, help="only attention between tokens of the same patch (time) index")
    neighbours: int = param(5, within="[1, inf)", help="k of the kNN classifier")
    folds: int = param(5, within="[2, inf)",
                       help="stratified cross-validation folds over parcels (fewer if a network is smaller)")
    max_recordings: int | None = param(None, within="[1, inf)",
                                       help="a seeded sample of the cohort's recordings (default: all)")
    max_windows: int | None = param(None, within="[1, inf)",
                                    help="back-to-back windows per recording, from its start (default: all)")
    mask_draws: int = param(4, within="[1, inf)",
                            help="decoder source: random masks per window, at the model's own mask ratio")
    seed: int = param(0, within="[0, inf)", help="seeds the sample of recordings, the masks and the folds")


@dataclass(frozen=True)
class AttentionConfig(Config):
    """CLS-attention maps and their group contrasts (brainlm/tasks/attention.py)."""

    layer: int | None = param(None, help="block whose CLS attention is read, negative from the end (default: "
                                         "the mean over blocks)")
    resolution: str = param("recording", choices=RESOLUTIONS,
                            help="recording: attention mass per parcel; time: per parcel and time point (designs "
                                 "locked to the recording start, e.g. a block task)")
    max_windows: int | None = param(None, within="[1, inf)",
                                    help="back-to-back windows per recording, from its start (default: all)")
    permutations: int = param(5000, within="[1, inf)", help="permutations of the participants' group labels")
    alpha: float = param(0.05, within="(0, 1)", help="significance level of the corrected p-values")
    networks: str | None = param(None, help='atlas column grouping parcels for network tests (default: "yeo7" '
                                            'or the first; "" for none)')
    seed: int = param(0, within="[0, inf)", help="seeds the permutations")


@dataclass(frozen=True)
class PerturbConfig(Config):
    """Zero-shot in-silico perturbation with the model frozen (brainlm/tasks/perturb.py)."""

    mode: str = param("parcel_time", choices=PERTURB_MODES,
                      help="parcel_time: a series per parcel; parcel: one offset per parcel")
    representation: str = param("reconstruction", choices=REPRESENTATIONS,
                                help="what is matched: masked-patch predictions under fixed masks, the forecast "
                                     "of the last patches, or the CLS embedding")
    sparsity: float = param(1.0, within="[0, inf)", help="weight of the group-lasso penalty (per parcel)")
    steps: int = param(300, within="[1, inf)", help="proximal gradient steps")
    lr: float = param(0.05, within="(0, inf)", help="step size (on gradients normalised to unit RMS)")
    horizon: int = param(1, within="[1, inf)", help="patches forecast at the end of each window (forecast, drive)")
    max_recordings: int | None = param(None, within="[1, inf)",
                                       help="a seeded sample of recordings per group (drive: in all; default: all)")
    max_windows: int | None = param(1, within="[1, inf)",
                                    help="back-to-back windows per recording, from its start (aligned across "
                                         "recordings)")
    networks: str | None = param(None, help='atlas column grouping parcels to rank networks (default: "yeo7" or '
                                            'the first; "" for none)')
    seed: int = param(0, within="[0, inf)", help="seeds the samples of recordings and the reconstruction masks")


# --------------------------------------------------------------------------------------------- promotion


PROMOTION_SPLITS = ("val", "test")


@dataclass(frozen=True)
class PromotionConfig(Config):
    """Gated promotion (brainlm/promotion.py): the held-out evaluation a challenger must win to become champion.

    Challenger and champion are scored on the same windows of the same held-out participants with the same
    masks, beside the reference predictors on those masked patches. The split's defaults are TrainConfig's, so
    the held-out participants are the ones a model pretrained on the cohort with the default split never saw.
    """

    margin: float = param(0.01, within="[0, 1)",
                          help="the challenger's held-out masked MSE must be at least this fraction below the "
                               "champion's and below every reference predictor's")
    split: str = param("test", choices=PROMOTION_SPLITS, help="which held-out participants score the models")
    val_fraction: float = param(TrainConfig.val_fraction, within="(0, 1)",
                                help="share of participants in the validation split (as in pretraining)")
    test_fraction: float = param(TrainConfig.test_fraction, within="[0, 1)",
                                 help="share of participants in the test split (as in pretraining)")
    seed: int = param(TrainConfig.seed, within="[0, inf)", help="seeds the split, the windows and the masks")
    eval_crops: int = param(TrainConfig.eval_crops, within="[1, inf)", help="fixed windows per held-out recording")
    mask_ratio: float | None = param(None, within="[0, 1)",
                                     help="share of patches masked; unset: the challenger's own training ratio")
    batch_size: int = param(16, within="[1, inf)", help="windows per forward pass")
    device: str = param("cpu", help='torch device ("cpu", "cuda")')

    def validate(self) -> None:
        check_leaves_training(self)
        if self.split == "test" and self.test_fraction == 0:
            raise self.error("test_fraction", "must be above 0 when the gate scores the test split")


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MlflowSettings(Config):
    """mlflow.yaml: where runs and models live. Relative paths are relative to the brainlm home."""

    tracking_uri: str = "sqlite:///.brainlm/mlflow.db"
    artifact_root: str = ".brainlm/mlartifacts"
    pretrain_experiment: str = "brainlm-pretrain"
    tasks_experiment: str = "brainlm-tasks"
    pretrained_model: str = "brainlm-pretrained"
    new_alias: str = "challenger"
    production_alias: str = "champion"


@dataclass(frozen=True)
class Settings(Config):
    """Where everything lives on this machine. `BRAINLM_HOME` (default: the current directory) is the root.

    Self-contained once built: nothing here reads the environment, so a Settings handed to another process
    (e.g. a Ray worker, as `to_dict`) means the same stores there. `load_settings` applies the environment.
    """

    home: Path = param(default_factory=Path.cwd)
    mlflow: MlflowSettings = param(default_factory=MlflowSettings)

    @property
    def data_dir(self) -> Path:  # tracked by data.dvc
        return self.home / "data"

    @property
    def cohorts_dir(self) -> Path:
        return self.data_dir / "cohorts"

    @property
    def state_dir(self) -> Path:  # local MLflow DB + artifacts, Ray results, Prefect home
        return self.home / ".brainlm"

    @property
    def ray_results_dir(self) -> Path:
        return self.state_dir / "ray_results"

    def tracking_uri(self) -> str:
        """The tracking store; a relative sqlite path (as in mlflow.yaml) is made absolute under home."""
        uri = self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            uri = prefix + str((self.home / uri[len(prefix):]).resolve())
        return uri

    def artifact_root(self) -> str:
        """Where new experiments keep artifacts: a URI as written (`s3://...`, or `mlflow-artifacts:/...`, which a
        tracking server that proxies artifacts maps into its own store), else a path under home as a file URI."""
        root = self.mlflow.artifact_root
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", root):
            return root
        return (self.home / root).resolve().as_uri()


def load_settings(home: str | os.PathLike | None = None) -> Settings:
    """Settings for `home` (default `$BRAINLM_HOME` or cwd), reading `mlflow.yaml` there if present.

    `BRAINLM_MLFLOW_CONFIG` points at another mlflow.yaml; `MLFLOW_TRACKING_URI` overrides its tracking URI
    (e.g. a server). Without a file, the defaults above apply; they are the values the repository's
    mlflow.yaml ships with. The environment is read here once: the Settings returned carry the result.
    """
    import yaml

    root = Path(home or os.environ.get("BRAINLM_HOME") or Path.cwd()).resolve()
    cfg_path = Path(os.environ.get("BRAINLM_MLFLOW_CONFIG") or root / "mlflow.yaml")
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path}: expected a mapping of MLflow settings, got {type(raw).__name__}")
    elif "BRAINLM_MLFLOW_CONFIG" in os.environ:
        raise ConfigError(f"BRAINLM_MLFLOW_CONFIG={cfg_path} does not exist")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raw = {**raw, "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}
    try:
        mlflow_cfg = from_dict(MlflowSettings, raw)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}", field=e.field, value=e.value, rule=e.rule) from e
    return Settings(home=root, mlflow=mlflow_cfg)


# ------------------------------------------------------------------------------------------ deployments


@dataclass(frozen=True)
class DeploymentConfig(Config):
    """One deployment that `make serve` serves (flows/serve.py): default parameters and an optional schedule."""

    parameters: dict[str, Any] = param(default_factory=dict,
                                       help="the flow's default parameters (a run's `-p NAME=VALUE` overrides them)")
    cron: str | None = param(None, help='a cron schedule, e.g. "0 3 * * *" (every night at 03:00)')
    timezone: str = param("UTC", help="the schedule's IANA time zone")
    active: bool = param(False, help="whether the schedule starts runs (false: defined, but paused)")


@dataclass(frozen=True)
class ServeConfig(Config):
    """What `make serve` serves, beyond flows/serve.py's own defaults.

    `BRAINLM_SERVE_CONFIG` names a YAML file of the same shape; what it sets replaces these values (a
    deployment's `parameters` are merged over the defaults), e.g.

        evaluate:
          parameters: {targets: [age], steps: 100}
          active: true        # the nightly evaluation of the champion runs
    """

    ingest: DeploymentConfig = param(default_factory=DeploymentConfig)
    pretrain: DeploymentConfig = param(default_factory=DeploymentConfig)
    evaluate: DeploymentConfig = param(default_factory=lambda: DeploymentConfig(cron="0 3 * * *"))
    promote: DeploymentConfig = param(default_factory=DeploymentConfig)
    reevaluate: bool = param(True, help="evaluate the champion on every new cohort version (Prefect automation)")


SERVE_CONFIG_ENV = "BRAINLM_SERVE_CONFIG"


def load_serve_config(path: str | os.PathLike | None = None) -> ServeConfig:
    """ServeConfig from `path` (default `$BRAINLM_SERVE_CONFIG`; neither: the defaults), merged over the defaults."""
    import yaml

    path = path or os.environ.get(SERVE_CONFIG_ENV)
    if not path:
        return ServeConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{SERVE_CONFIG_ENV}={path}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of deployments, got {type(raw).__name__}")
    merged = to_dict(ServeConfig())
    try:
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                parameters = {**merged[key]["parameters"], **(value.get("parameters") or {})}
                merged[key] = {**merged[key], **value, "parameters": parameters}
            else:
                merged[key] = value
        return from_dict(ServeConfig, merged)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", field=e.field, value=e.value, rule=e.rule) from e
