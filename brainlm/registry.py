"""The one place that talks to MLflow: runs, metrics, model logging, the registry, loading.

    configure ──> start_run ──> log_metrics (each epoch, from any process) ──> log_model ──> end_run
                                                                                  │
        registry:  <name>  version N  @challenger ──promote──> @champion ──load_model──> BrainLM

Models are logged WITHOUT pickles, as MLflow "models from code": the logged model holds `config.json`,
`model.safetensors` and a small code file (`brainlm/serving.py`) that MLflow executes to rebuild the network.
`load_model` rebuilds BrainLM from the same two files and never unpickles anything.

The functions are generic over the experiment and the registered model name, so task models (forecasting,
regression, ...) and their baselines are logged and registered by the same code as the pretrained model.
Where the tracking store and artifacts live comes from `mlflow.yaml` through `brainlm.config.load_settings`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from safetensors.torch import load_file

import brainlm
from brainlm.config import ModelConfig, Settings, from_dict, load_settings, to_dict
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

SERVING_CODE = Path(__file__).with_name("serving.py")  # the code file MLflow runs to rebuild BrainLM
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_NAME_IN_RUN = "model"

# Tags every registered version carries (the lineage `brainlm models` shows).
COHORT_TAG = "cohort"
DATA_VERSION_TAG = "data_version"
PRESET_TAG = "preset"
METRIC_TAG_PREFIX = "metric."
UNVERSIONED = "unversioned"  # the data-version tag when the home is not a DVC project

# What the served model needs; pinned to what is installed so a served model matches the trained one.
PIP_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    f"numpy=={np.__version__}",
    f"safetensors=={safetensors.__version__}",
    f"mlflow=={mlflow.__version__}",
    f"brainlm=={brainlm.__version__}",
]


class RegistryError(BrainLMError):
    """A run, model, version or alias that does not exist, or a model that cannot be rebuilt safely."""


@dataclass(frozen=True)
class CohortInfo:
    """What a registered model records about its training cohort: counts and the atlas, never any ids."""

    name: str
    atlas: str
    n_parcels: int
    n_recordings: int
    n_participants: int
    coords: np.ndarray  # (P, 3) parcel centroids, MNI mm: the serving input example uses them

    def as_tags(self) -> dict[str, str]:
        return {
            COHORT_TAG: self.name, "cohort_atlas": self.atlas, "cohort_parcels": str(self.n_parcels),
            "cohort_recordings": str(self.n_recordings), "cohort_participants": str(self.n_participants),
        }


# ------------------------------------------------------------------------------------ set-up, runs


def configure(settings: Settings | None = None) -> Settings:
    """Point MLflow at this home's tracking store and create the experiments that are missing.

    Experiments get `artifact_location=settings.artifact_root()`, so artifacts land under the home (or the
    S3 root mlflow.yaml names) and not in MLflow's default `./mlartifacts` of whatever the cwd happens to be.
    """
    settings = settings or load_settings()
    # Progress bars for kilobyte-sized model files only clutter the CLI and the demo's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The fluent API (needed to log a model) reads a process-wide URI; MLflow also exports it as
    # MLFLOW_TRACKING_URI, which Settings.tracking_uri() honours, so processes started later (Ray workers)
    # resolve the same store.
    mlflow.set_tracking_uri(settings.tracking_uri())
    client = _client(settings)
    for name in (settings.mlflow.pretrain_experiment, settings.mlflow.tasks_experiment):
        _experiment_id(client, name, settings)
    return settings


def _experiment_id(client: MlflowClient, name: str, settings: Settings) -> str:
    """The id of experiment `name`, created (with the configured artifact root) if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=settings.artifact_root())
    except MlflowException as e:  # another process created it since we looked: use theirs
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
    settings: Settings | None = None,
) -> str:
    """Create a run in `experiment` (created if new) with its full configuration as params; returns its id."""
    settings = configure(settings)
    client = _client(settings)
    run = client.create_run(_experiment_id(client, experiment, settings), run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    log_params(run.info.run_id, params, settings)
    return run.info.run_id


def log_params(run_id: str, params: Mapping[str, Any], settings: Settings | None = None) -> None:
    """Nested dicts (e.g. {"model": to_dict(cfg)}) become dotted keys ("model.hidden")."""
    flat = _flatten(params)
    _client(settings).log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()])


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int, settings: Settings | None = None) -> None:
    """Log the numeric entries of `metrics` at `step`. Needs only the run id, so a Ray worker can call it."""
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in _numeric(_flatten(metrics)).items()]
    _client(settings).log_batch(run_id, metrics=entries)


def log_artifacts(run_id: str, local_dir: Path, artifact_path: str | None = None,
                  settings: Settings | None = None) -> None:
    """Upload every file under `local_dir` (e.g. a report folder of tables and figures) to the run."""
    _client(settings).log_artifacts(run_id, str(local_dir), artifact_path)


def end_run(run_id: str, status: str = "FINISHED", settings: Settings | None = None) -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    RunStatus.from_string(status)  # refuses a misspelt status before it reaches the store
    _client(settings).set_terminated(run_id, status)


# ------------------------------------------------------------------------------------ logging models


def log_model(
    run_id: str,
    weights: Path,
    config: Mapping[str, Any],
    *,
    registered_model_name: str,
    input_example: dict[str, np.ndarray],
    output_example: dict[str, np.ndarray],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    code: Path = SERVING_CODE,
    params: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> ModelVersion:
    """Log safetensors weights + a JSON config as a models-from-code pyfunc, register it, alias it.

    The new version gets `tags`, `metrics` as `metric.<name>` tags (what `list_models` shows, so a task model
    and its baselines compare side by side) and the alias `settings.mlflow.new_alias` ("challenger").
    `code` is the file MLflow executes to rebuild the model from `context.artifacts["weights"]` and
    `["config"]`; `params` (name → default value) become the signature's inference parameters.
    The run is left FINISHED: registration is the last thing a training run does.
    """
    settings = configure(settings)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(json.dumps(dict(config), indent=2))
        with mlflow.start_run(run_id=run_id):  # log_model attaches the model to the active run
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(code),
                artifacts={"weights": str(weights), "config": str(config_path)},
                signature=infer_signature(input_example, output_example, params=dict(params) if params else None),
                input_example=input_example,
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=registered_model_name,
            )
    client = _client(settings)
    version = str(info.registered_model_version)
    all_tags = {**tags, **{METRIC_TAG_PREFIX + k: float(v) for k, v in metrics.items()}}
    for key, value in all_tags.items():
        client.set_model_version_tag(registered_model_name, version, key, str(value))
    client.set_registered_model_alias(registered_model_name, settings.mlflow.new_alias, version)
    return client.get_model_version(registered_model_name, version)


def log_pretrained(
    run_id: str,
    checkpoint_dir: Path,
    model_cfg: ModelConfig,
    cohort_info: CohortInfo,
    data_version: str | None,
    *,
    preset: str | None = None,
    settings: Settings | None = None,
) -> ModelVersion:
    """Register a pretraining checkpoint as `settings.mlflow.pretrained_model`, aliased challenger.

    The version is tagged with its cohort (name and counts), DVC data version, preset and the checkpoint's
    metrics (from its `state.json`), which is what `list_models` shows.
    """
    settings = settings or load_settings()
    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / WEIGHTS_FILE
    metrics = _checkpoint_metrics(checkpoint_dir)
    model, _ = build_model_from_weights(model_cfg, weights)  # also proves the weights fit the config
    example = _pretrained_example(model_cfg, cohort_info.coords)
    tags = {
        **cohort_info.as_tags(),
        DATA_VERSION_TAG: data_version or UNVERSIONED,
        PRESET_TAG: preset or "custom",
    }
    return log_model(
        run_id, weights, to_dict(model_cfg),
        registered_model_name=settings.mlflow.pretrained_model,
        input_example=example, output_example=predict_embedding(model, example), metrics=metrics, tags=tags,
        settings=settings,
    )


def _pretrained_example(cfg: ModelConfig, coords: np.ndarray) -> dict[str, np.ndarray]:
    """One window of noise (never a participant's data) over the cohort's parcels, with their centroids."""
    coords = np.asarray(coords, dtype=np.float32)
    signals = np.random.default_rng(0).standard_normal((1, coords.shape[0], cfg.window), dtype=np.float32)
    return {"signals": signals, "coords": coords}


def predict_embedding(model: BrainLM, model_input: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The served model's answer (serving.py calls this): {"signals" (B, P, T), "coords" (P, 3)} → {"cls" (B, D)}."""
    signals = torch.from_numpy(np.asarray(model_input["signals"], dtype=np.float32))
    coords = torch.from_numpy(np.asarray(model_input["coords"], dtype=np.float32))
    return {"cls": model.embed(signals, coords).cls.numpy()}


def _checkpoint_metrics(checkpoint_dir: Path) -> dict[str, float]:
    """The model-quality metrics of a checkpoint's last epoch (`train_*`, `val_*`) and its epoch count.

    Bookkeeping numbers (learning rate, throughput, seconds) stay in the run's metrics, not on the version.
    """
    state_path = checkpoint_dir / "state.json"
    if not state_path.exists():
        raise RegistryError(f"{checkpoint_dir} has no state.json: not a brainlm checkpoint")
    metrics = _numeric(_flatten(json.loads(state_path.read_text()).get("metrics", {})))
    return {k: v for k, v in metrics.items() if k.startswith(("train_", "val_")) or k == "epoch"}


# ------------------------------------------------------------------------------- registry, loading


def promote(name: str, version: str | int, alias: str | None = None, settings: Settings | None = None) -> None:
    """Point `alias` (default: the production alias, "champion") at `version` of registered model `name`."""
    settings = settings or load_settings()
    client = _client(settings)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"registered model {name!r} has no version {version} ({settings.tracking_uri()})") from e
    client.set_registered_model_alias(name, alias or settings.mlflow.production_alias, str(version))


def load_model(
    uri_or_name: str, alias: str | None = None, settings: Settings | None = None
) -> tuple[BrainLM, ModelConfig]:
    """Rebuild BrainLM from a registered model: `models:/name@alias`, `models:/name/3`, or a name + alias.

    Downloads the model's files and builds the network from `config.json` + `model.safetensors`. Nothing is
    unpickled: safetensors holds raw tensors, and the config is JSON.
    """
    settings = settings or load_settings()
    uri = uri_or_name if ":/" in uri_or_name else f"models:/{uri_or_name}@{alias or settings.mlflow.production_alias}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=settings.tracking_uri()))
        except MlflowException as e:
            raise RegistryError(f"cannot resolve {uri} in {settings.tracking_uri()}: {e.message}") from e
        files = _pyfunc_artifacts(local)
        return build_model(files["config"], files["weights"])


def _pyfunc_artifacts(model_dir: Path) -> dict[str, Path]:
    """The logged model's own map of artifact name → file (read from its MLmodel YAML)."""
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    artifacts = {name: model_dir / a["path"] for name, a in flavor.get("artifacts", {}).items()}
    if {"weights", "config"} - set(artifacts) or artifacts["weights"].suffix != ".safetensors":
        raise RegistryError(f"{model_dir} is not a brainlm model (needs safetensors weights + JSON config)")
    return artifacts


def build_model(config_path: str | Path, weights_path: str | Path) -> tuple[BrainLM, ModelConfig]:
    """BrainLM from `config.json` + `model.safetensors`, in eval mode. Shared with serving.py."""
    cfg = from_dict(ModelConfig, json.loads(Path(config_path).read_text()))
    model, cfg = build_model_from_weights(cfg, Path(weights_path))
    return model, cfg


def build_model_from_weights(cfg: ModelConfig, weights_path: Path) -> tuple[BrainLM, ModelConfig]:
    model = BrainLM(cfg)
    model.load_state_dict(load_file(str(weights_path)))  # strict: every key must match the config
    return model.eval(), cfg


def list_models(name: str | None = None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every registered version (newest first), as `brainlm models` shows it.

    Each row: name, version, aliases, metrics (from the version's `metric.*` tags), run_id, data_version,
    cohort, preset, created (UTC ISO time).
    """
    settings = settings or load_settings()
    client = _client(settings)
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for model_name in names:
        for v in client.search_model_versions(f"name = '{model_name}'"):
            rows.append(_version_row(client, v))
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


def _version_row(client: MlflowClient, v: ModelVersion) -> dict[str, Any]:
    # search results may omit aliases; the registered model's alias map is authoritative
    aliases = sorted(a for a, ver in client.get_registered_model(v.name).aliases.items() if ver == v.version)
    return {
        "name": v.name,
        "version": str(v.version),
        "aliases": aliases,
        "metrics": {k[len(METRIC_TAG_PREFIX):]: float(val) for k, val in v.tags.items()
                    if k.startswith(METRIC_TAG_PREFIX)},
        "run_id": v.run_id,
        "data_version": v.tags.get(DATA_VERSION_TAG),
        "cohort": v.tags.get(COHORT_TAG),
        "preset": v.tags.get(PRESET_TAG),
        "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------ helpers


def _client(settings: Settings | None) -> MlflowClient:
    return MlflowClient((settings or load_settings()).tracking_uri())


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    """Scalar numbers only (bools and strings are not metrics)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float | np.number) and not isinstance(v, bool)}

