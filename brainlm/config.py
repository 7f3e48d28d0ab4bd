"""Typed configuration, all in one place.

Every config is a frozen dataclass that round-trips through a plain dict (`to_dict` / `from_dict`), so the
exact configuration is saved beside every checkpoint and logged with every MLflow run. Nothing here imports
anything heavier than the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import os
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
    """Build `cls` from a dict, refusing unknown keys so a typo in a config never passes silently."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        ftype = names[k].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """BrainLM architecture. Any parcel count works; the window must be a multiple of the patch size."""

    window: int = 200  # timepoints (TRs) per training window
    patch_size: int = 20  # TRs per patch: each parcel's window is cut into window // patch_size tokens
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    decoder_hidden: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # the paper's ratios: 0.2, 0.5, 0.75
    dropout: float = 0.0
    coord_scale: float = 100.0  # MNI mm are divided by this before the spatial embedding (keeps inputs ~[-1, 1])
    activation_checkpointing: bool = False  # recompute encoder + decoder blocks in backward: memory for compute (650M)

    def __post_init__(self) -> None:
        if self.window % self.patch_size:
            raise ValueError(f"window {self.window} is not a multiple of patch_size {self.patch_size}")
        if self.hidden % self.heads or self.decoder_hidden % self.decoder_heads:
            raise ValueError("hidden sizes must be divisible by their head counts")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def patches_per_parcel(self) -> int:
        return self.window // self.patch_size


# Presets keep the paper's choices; `tiny` is for CPU tests. Each named size is within 10 % of its name
# (tests/model/test_presets.py counts the parameters on the meta device).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden=64, layers=2, heads=4, decoder_hidden=32, decoder_layers=1, decoder_heads=4),
    "13M": ModelConfig(hidden=512, layers=4, heads=8, decoder_hidden=256, decoder_layers=1, decoder_heads=8),
    "111M": ModelConfig(hidden=768, layers=12, heads=12, decoder_hidden=512, decoder_layers=8, decoder_heads=16),
    "650M": ModelConfig(hidden=1280, layers=32, heads=16, decoder_hidden=512, decoder_layers=8, decoder_heads=16),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides (e.g. `preset("tiny", mask_ratio=0.5)`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining: optimiser, schedule, data sampling and the Ray Train scaling."""

    epochs: int = 5
    batch_size: int = 16  # per worker
    lr: float = 3e-4  # peak learning rate after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05  # share of all steps spent in linear warmup
    grad_clip: float = 1.0
    crops_per_recording: int = 4  # random windows drawn from each training recording per epoch
    val_fraction: float = 0.1  # of participants (subject-level split)
    test_fraction: float = 0.1
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker; bf16 autocast on GPU
    cpus_per_worker: int = 1
    loader_workers: int = 0  # torch DataLoader worker processes per Ray worker
    compile: bool = False  # torch.compile the model (GPU; helps little on CPU)
    seed: int = 0
    max_failures: int = 1  # Ray Train restarts the worker group from the latest checkpoint this many times


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic cohort: ground truth known by construction (see brainlm/data/synthetic.py)."""

    subjects: int = 40
    timepoints: int = 300
    tr: float = 0.72  # seconds (HCP-like); drives the haemodynamic response
    parcels_from: str = "A424"  # "A424" or a path to an atlas TSV
    max_parcels: int | None = None  # keep a network-balanced subset of the atlas (small CPU tests)
    task_fraction: float = 0.5  # share of recordings that are "task" (block design into Visual)
    recordings_per_subject: int = 2
    noise: float = 0.5  # std of parcel-level noise relative to the network signal
    seed: int = 0


@dataclass(frozen=True)
class IngestConfig:
    """How a lab's folder becomes a stored cohort."""

    min_timepoints: int = 200
    skip_invalid: bool = False
    workers: int = 0  # parallel parcellation processes; 0 = one per core
    push: bool = True  # dvc push after a successful ingest
    executor: str = "process"  # "process" (local pool) or "ray" (tasks on $RAY_ADDRESS's cluster, else local)


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MlflowSettings:
    """mlflow.yaml: where runs and models live. Relative paths are relative to the brainlm home."""

    tracking_uri: str = "sqlite:///.brainlm/mlflow.db"
    artifact_root: str = ".brainlm/mlartifacts"
    pretrain_experiment: str = "brainlm-pretrain"
    tasks_experiment: str = "brainlm-tasks"
    pretrained_model: str = "brainlm-pretrained"
    new_alias: str = "challenger"
    production_alias: str = "champion"


@dataclass(frozen=True)
class Settings:
    """Where everything lives on this machine. `BRAINLM_HOME` (default: the current directory) is the root."""

    home: Path = field(default_factory=Path.cwd)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

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
        """MLFLOW_TRACKING_URI wins; a relative sqlite path in mlflow.yaml is made absolute under home."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            uri = prefix + str((self.home / uri[len(prefix):]).resolve())
        return uri

    def artifact_root(self) -> str:
        root = self.mlflow.artifact_root
        if "://" in root:
            return root
        return (self.home / root).resolve().as_uri()


def load_settings(home: str | os.PathLike | None = None) -> Settings:
    """Settings for `home` (default `$BRAINLM_HOME` or cwd), reading `mlflow.yaml` there if present.

    `BRAINLM_MLFLOW_CONFIG` points at another mlflow.yaml. Without one, the defaults above apply; they are
    the same values the repository's mlflow.yaml ships with.
    """
    import yaml

    root = Path(home or os.environ.get("BRAINLM_HOME") or Path.cwd()).resolve()
    cfg_path = Path(os.environ.get("BRAINLM_MLFLOW_CONFIG") or root / "mlflow.yaml")
    mlflow_cfg = MlflowSettings()
    if cfg_path.exists():
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        try:
            mlflow_cfg = from_dict(MlflowSettings, raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cfg_path}: {e}") from e
    elif "BRAINLM_MLFLOW_CONFIG" in os.environ:
        raise ConfigError(f"BRAINLM_MLFLOW_CONFIG={cfg_path} does not exist")
    return Settings(home=root, mlflow=mlflow_cfg)


_DATACLASSES: dict[str, type] = {
    c.__name__: c for c in (ModelConfig, TrainConfig, SynthConfig, IngestConfig, MlflowSettings)
}


# ------------------------------------------------------------------------------------- interpretation


@dataclass(frozen=True)
class NetworksConfig:
    """Functional networks from attention: kNN of parcels into an atlas partition (brainlm/tasks/networks.py)."""

    labels: str | None = None  # the atlas network column to predict; None: "yeo7" if there, else the first
    source: str = "decoder"  # "decoder": masked tokens' attention to the visible ones; "encoder": nothing masked
    layer: int | None = None  # block index (negative counts from the end); None averages every block
    same_time: bool = True  # only attention between tokens of the same patch (time) index
    neighbours: int = 5  # k of the kNN classifier
    folds: int = 5  # stratified cross-validation folds over parcels (fewer if a network is smaller)
    max_recordings: int | None = None  # a seeded sample of the cohort's recordings; None: all of them
    max_windows: int | None = None  # non-overlapping windows per recording, from its start; None: all
    mask_draws: int = 4  # "decoder" source: random masks per window (at the model's own mask ratio)
    seed: int = 0


@dataclass(frozen=True)
class AttentionConfig:
    """CLS-attention maps and their group contrasts (brainlm/tasks/attention.py)."""

    layer: int | None = None  # block whose CLS attention is read; None averages every block
    resolution: str = "recording"  # "recording": attention mass per parcel; "time": per parcel and time point
    max_windows: int | None = None  # non-overlapping windows per recording, from its start; None: all
    permutations: int = 5000
    alpha: float = 0.05  # significance level for the corrected p-values
    networks: str | None = None  # atlas column grouping parcels for network tests; None: "yeo7"/first; "": none
    seed: int = 0


@dataclass(frozen=True)
class PerturbConfig:
    """Zero-shot in-silico perturbation with the model frozen (brainlm/tasks/perturb.py)."""

    mode: str = "parcel_time"  # "parcel_time": a series per parcel; "parcel": one offset per parcel
    representation: str = "reconstruction"  # matched: masked-patch predictions, the "forecast", or the "cls"
    sparsity: float = 1.0  # weight of the group-lasso penalty (per parcel) against the matching loss
    steps: int = 300
    lr: float = 0.05
    horizon: int = 1  # patches forecast at the end of each window ("forecast" and drive mode)
    max_recordings: int | None = None  # per group; None: all of them
    max_windows: int | None = 1  # windows per recording, from its start (aligned across recordings)
    networks: str | None = None  # atlas column grouping parcels to rank networks; None: "yeo7"/first; "": none
    seed: int = 0
