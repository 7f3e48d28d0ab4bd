"""The one place that talks to MLflow: runs, metrics, model logging, the registry, loading.

    configure ──> start_run ──> log_metrics (each evaluation, from any process) ──> log_model ──> end_run
                                                                                  │
        registry:  <name>  version N  @challenger ──promote──> @champion ──load_model──> BrainLM

Models are logged WITHOUT pickles, as MLflow "models from code": the logged model holds `config.json`,
`model.safetensors` and a small code file (`brainlm/serving.py`) that MLflow executes to rebuild the network.
`load_model` rebuilds BrainLM from the same two files and never unpickles anything.

The functions are generic over the experiment and the registered model name, so task models (forecasting,
regression, ...) and their baselines are logged and registered by the same code as the pretrained model.
Every function takes the `Settings` that say where the tracking store and artifacts live (`mlflow.yaml`
through `brainlm.config.load_settings`); none reads or sets MLflow's process-wide tracking URI for later
callers, so any process that is handed the settings (a Ray worker, say) talks to the same store.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking._tracking_service import utils as _tracking_utils

import brainlm
from brainlm import checkpoint
from brainlm.config import ModelConfig, Settings, from_dict, to_dict
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

SERVING_CODE = Path(__file__).with_name("serving.py")  # the code file MLflow runs to rebuild BrainLM
SERVING_TASKS_CODE = Path(__file__).with_name("serving_tasks.py")  # ... and a task model (brainlm/tasks/saved.py)
SERVING_PERTURBATION_CODE = Path(__file__).with_name("serving_perturbation.py")  # ... and the perturbation model
CONFIG_FILE = "config.json"
MODEL_NAME_IN_RUN = "model"
T = TypeVar("T")

# Tags every registered version carries (the lineage `brainlm models` shows).
COHORT_TAG = "cohort"
DATA_VERSION_TAG = "data_version"
PRESET_TAG = "preset"
METRIC_TAG_PREFIX = "metric."
UNVERSIONED = "unversioned"  # the data-version tag when the home is not a DVC project

# What the served model imports from a package index (serving.py → registry.py, model.py, checkpoint.py,
# config.py), pinned to what is installed so a served model matches the trained one. brainlm is on no index: the
# brainlm modules it imports travel inside the model (`code_paths`, see `_package_code`). torch is pinned by
# version only: pip takes the CPU or CUDA build that the serving machine's index or wheel folder offers.
PIP_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    f"numpy=={np.__version__}",
    f"safetensors=={safetensors.__version__}",
    f"mlflow=={mlflow.__version__}",
]
PACKAGE_DIR = Path(brainlm.__file__).parent


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


def configure(settings: Settings) -> Settings:
    """Create the experiments `settings` names that are missing from its tracking store; returns `settings`.

    Experiments get `artifact_location=settings.artifact_root()`, so artifacts land under the home (or the
    S3 root mlflow.yaml names) and not in MLflow's default `./mlartifacts` of whatever the cwd happens to be.
    """
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


@contextlib.contextmanager
def _fluent(settings: Settings) -> Iterator[None]:
    """MLflow's fluent API (logging a model, resolving `models:/`) on `settings`' store, for the block only.

    The fluent API reads a process-wide tracking URI, and setting it also exports MLFLOW_TRACKING_URI to the
    environment. Both are put back exactly as they were afterwards, so nothing outside this block (another
    home's settings, a process started later) sees this store by accident.
    """
    before_uri = _tracking_utils._tracking_uri  # what set_tracking_uri last set (None: never)
    before_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    # Progress bars for kilobyte-sized model files only clutter the CLI and the demo's output.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before_env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] or "false"
    mlflow.set_tracking_uri(settings.tracking_uri())
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_uri)
        for key, value in before_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], *, settings: Settings,
) -> str:
    """Create a run in `experiment` (created if new) with its full configuration as params; returns its id."""
    client = _client(configure(settings))
    run = client.create_run(_experiment_id(client, experiment, settings), run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    log_params(run.info.run_id, params, settings=settings)
    return run.info.run_id


@contextlib.contextmanager
def end_run_on_error(run_id: str, *, settings: Settings) -> Iterator[None]:
    """Close the run as FAILED (KILLED on Ctrl-C) if the block raises; the exception propagates."""
    try:
        yield
    except BaseException as e:
        end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", settings=settings)
        raise


def unique_run_name(*parts: str) -> str:
    """`<part>-<part>-...-<UTC time>-<random>`: unique, so a new run never resumes an old Ray run or report."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return "-".join([*parts, stamp, uuid.uuid4().hex[:6]])


def log_params(run_id: str, params: Mapping[str, Any], *, settings: Settings) -> None:
    """Nested dicts (e.g. {"model": to_dict(cfg)}) become dotted keys ("model.hidden")."""
    flat = _flatten(params)
    _client(settings).log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()])


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int, *, settings: Settings) -> None:
    """Log the numeric entries of `metrics` at `step`. Needs only the run id and settings (a Ray worker calls it)."""
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in _numeric(_flatten(metrics)).items()]
    _client(settings).log_batch(run_id, metrics=entries)


def end_run(run_id: str, status: str = "FINISHED", *, settings: Settings) -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    RunStatus.from_string(status)  # refuses a misspelt status before it reaches the store
    _client(settings).set_terminated(run_id, status)


def log_artifacts(run_id: str, directory: Path, artifact_path: str | None = None, *, settings: Settings) -> None:
    """Upload every file under `directory` to the run's artifacts (under `artifact_path`)."""
    _client(settings).log_artifacts(run_id, str(directory), artifact_path)


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
    pip_requirements: list[str] | None = None,
    params: Mapping[str, Any] | None = None,
    settings: Settings,
) -> ModelVersion:
    """Log safetensors weights + a JSON config as a models-from-code pyfunc, register it, alias it.

    The new version gets `tags`, `metrics` as `metric.<name>` tags (what `list_models` shows, so a task model
    and its baselines compare side by side) and the alias `settings.mlflow.new_alias` ("challenger").
    `code` is the file MLflow executes to rebuild the model from `context.artifacts["weights"]` and
    `["config"]`; `pip_requirements` defaults to PIP_REQUIREMENTS; `params` (name → default value) become the
    signature's inference parameters (the `params` of the served model's predict).
    The run is left FINISHED: registration is the last thing a training run does.
    """
    configure(settings)
    with tempfile.TemporaryDirectory() as tmp, _fluent(settings):
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(json.dumps(dict(config), indent=2))
        package = _package_code(Path(code), Path(tmp) / "code")
        with mlflow.start_run(run_id=run_id):  # log_model attaches the model to the active run
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(code),
                artifacts={"weights": str(weights), "config": str(config_path)},
                signature=infer_signature(input_example, output_example, params=dict(params) if params else None),
                input_example=input_example,
                pip_requirements=pip_requirements or PIP_REQUIREMENTS,
                code_paths=[str(package)],
                registered_model_name=registered_model_name,
            )
    client = _client(settings)
    version = str(info.registered_model_version)
    all_tags = {**tags, **{METRIC_TAG_PREFIX + k: float(v) for k, v in metrics.items()}}
    for key, value in all_tags.items():
        client.set_model_version_tag(registered_model_name, version, key, str(value))
    client.set_registered_model_alias(registered_model_name, settings.mlflow.new_alias, version)
    return client.get_model_version(registered_model_name, version)


def _package_code(entry: Path, dest: Path) -> Path:
    """The brainlm modules that the model's code file `entry` imports, copied to `dest/brainlm/`.

    Logged as the model's `code_paths`, they land in the model's `code/brainlm/`, which MLflow puts on `sys.path`
    when it loads the model: an environment built from the model's own requirements.txt (index packages only)
    then imports exactly the brainlm code that logged it. Where brainlm is already imported (training, tests),
    the installed package keeps being used. Only what serving imports travels (followed through the package's
    own imports), not the whole package: the model carries no data-plane or orchestration code.
    """
    target = dest / PACKAGE_DIR.name
    for source in _imported_sources(entry):
        copy = target / source.relative_to(PACKAGE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return target


def _imported_sources(entry: Path) -> set[Path]:
    """The brainlm source files that importing `entry` executes, directly or through one another (absolute
    imports anywhere in a file, functions included, as the package writes them)."""
    found: set[Path] = set()
    todo = [entry]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                new = set(_module_sources(name)) - found
                found |= new
                todo += new
    return found


def _module_sources(name: str) -> list[Path]:
    """Files that `import name` runs if it is a brainlm module: each package's __init__.py down to the module."""
    parts = name.split(".")
    if parts[0] != PACKAGE_DIR.name:
        return []
    files, folder = [PACKAGE_DIR / "__init__.py"], PACKAGE_DIR
    for part in parts[1:]:
        folder = folder / part
        if (folder / "__init__.py").is_file():
            files.append(folder / "__init__.py")
        elif folder.with_suffix(".py").is_file():
            files.append(folder.with_suffix(".py"))
            break
        else:  # a name imported from a module (a function, a class), not a module
            break
    return files


def log_pretrained(
    run_id: str,
    checkpoint_dir: Path,
    model_cfg: ModelConfig,
    cohort_info: CohortInfo,
    data_version: str | None,
    *,
    preset: str | None = None,
    settings: Settings,
) -> ModelVersion:
    """Register a pretraining checkpoint as `settings.mlflow.pretrained_model`, aliased challenger.

    The version is tagged with its cohort (name and counts), DVC data version, preset and the checkpoint's
    metrics (from its `state.json`), which is what `list_models` shows.
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / checkpoint.MODEL_FILE
    metrics = _checkpoint_metrics(checkpoint_dir)
    model = checkpoint.load_weights(model_cfg, weights)  # also proves the weights fit the config
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
    """The model-quality metrics of a checkpoint's last evaluation (`train_*`, `val_*`), its step and windows.

    Bookkeeping numbers (learning rate, throughput, seconds) stay in the run's metrics, not on the version.
    """
    metrics = _numeric(_flatten(checkpoint.read_state(checkpoint_dir)["metrics"]))
    return {k: v for k, v in metrics.items() if k.startswith(("train_", "val_")) or k in ("step", "windows")}


# ------------------------------------------------------------------------------- registry, loading


def promote(name: str, version: str | int, alias: str | None = None, *, settings: Settings) -> None:
    """Point `alias` (default: the production alias, "champion") at `version` of registered model `name`."""
    client = _client(settings)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"registered model {name!r} has no version {version} ({settings.tracking_uri()})") from e
    client.set_registered_model_alias(name, alias or settings.mlflow.production_alias, str(version))


def alias_version(name: str, alias: str, *, settings: Settings) -> str | None:
    """The version of registered model `name` that `alias` points at; None if the model or the alias is missing."""
    client = _client(settings)
    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else str(version)


def annotate_version(name: str, version: str | int, tags: Mapping[str, Any], description: str | None = None, *,
                     settings: Settings) -> None:
    """Set `tags` (values as strings) and, if given, the description of a registered model version."""
    client = _client(settings)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if description is not None:
        client.update_model_version(name, str(version), description=description)


def run_params(run_id: str, *, settings: Settings) -> dict[str, str]:
    """The params a run logged (`train.seed`, `model.window`, ...), as MLflow stores them: strings."""
    try:
        return dict(_client(settings).get_run(run_id).data.params)
    except MlflowException as e:
        raise RegistryError(f"cannot read run {run_id} in {settings.tracking_uri()}: {e.message}") from e


def load_model(uri_or_name: str, alias: str | None = None, *, settings: Settings) -> tuple[BrainLM, ModelConfig]:
    """Rebuild BrainLM from a registered model: `models:/name@alias`, `models:/name/3`, or a name + alias.

    Downloads the model's files and builds the network from `config.json` + `model.safetensors`. Nothing is
    unpickled: safetensors holds raw tensors, and the config is JSON.
    """
    return load_files(uri_or_name, build_model, alias, settings=settings)


def load_files(uri_or_name: str, build: Callable[[Path, Path], T], alias: str | None = None, *,
               settings: Settings) -> T:
    """`build(config_path, weights_path)` on a registered model's downloaded files (removed afterwards).

    Any model logged by `log_model` works: the pretrained BrainLM (`build_model`) or a task model
    (`brainlm.tasks.saved.load_task_model`).
    """
    uri = _model_uri(uri_or_name, alias, settings)
    # MLflow resolves a `models:/` URI against its process-wide registry URI, whatever URI it is given.
    with tempfile.TemporaryDirectory() as tmp, _fluent(settings):
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=settings.tracking_uri()))
        except MlflowException as e:
            raise RegistryError(f"cannot resolve {uri} in {settings.tracking_uri()}: {e.message}") from e
        files = _pyfunc_artifacts(local)
        return build(files["config"], files["weights"])


def _model_uri(uri_or_name: str, alias: str | None, settings: Settings) -> str:
    return uri_or_name if ":/" in uri_or_name else f"models:/{uri_or_name}@{alias or settings.mlflow.production_alias}"


def model_version(uri_or_name: str, alias: str | None = None, *, settings: Settings) -> dict[str, Any]:
    """The registered version a `models:/NAME@ALIAS` or `models:/NAME/N` URI points at, as a `list_models` row."""
    uri = _model_uri(uri_or_name, alias, settings)
    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = _client(settings)
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as e:
        raise RegistryError(f"cannot resolve {uri} in {settings.tracking_uri()}: {e.message}") from e
    return _version_row(client, version)


def _pyfunc_artifacts(model_dir: Path) -> dict[str, Path]:
    """The logged model's own map of artifact name → file (read from its MLmodel YAML)."""
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    artifacts = {name: model_dir / a["path"] for name, a in flavor.get("artifacts", {}).items()}
    if {"weights", "config"} - set(artifacts) or artifacts["weights"].suffix != ".safetensors":
        raise RegistryError(f"{model_dir} is not a brainlm model (needs safetensors weights + JSON config)")
    return artifacts


def build_model(config_path: str | Path, weights_path: str | Path) -> tuple[BrainLM, ModelConfig]:
    """BrainLM from a logged model's `config.json` + `model.safetensors`, in eval mode. Shared with serving.py."""
    cfg = from_dict(ModelConfig, json.loads(Path(config_path).read_text()))
    return checkpoint.load_weights(cfg, weights_path), cfg


def list_models(name: str | None = None, *, settings: Settings) -> list[dict[str, Any]]:
    """Every registered version (newest first), as `brainlm models` shows it.

    Each row: name, version, aliases, metrics (from the version's `metric.*` tags), run_id, data_version,
    cohort, preset, created (UTC ISO time).
    """
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


def _client(settings: Settings) -> MlflowClient:
    return MlflowClient(settings.tracking_uri())


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

