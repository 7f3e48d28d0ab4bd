"""One evaluation entry point, shared by `brainlm evaluate` and the Prefect flow `evaluate`.

    evaluate("forecast" | "clinical", cohort, model, target=...)
        resolve_backbone   models:/NAME@ALIAS (registered BrainLM) or a released ViTMAE checkpoint folder
        run the task       brainlm/tasks/forecast.py or clinical.py: every model on the same subjects
        log                an MLflow run for the comparison (table as CSV + Markdown, plots) in the tasks
                           experiment, and one child run per model (params, metrics, data version, the
                           pretrained model it came from), each model registered as safetensors + JSON:
                           brainlm-forecast, baseline-forecast-lstm, ..., brainlm-clinical-age,
                           baseline-clinical-age-svr-fc, ...

Participant ids never reach MLflow: every run name, param and tag is checked against the cohort, and artifacts
hold only counts, model names, parcel names and numbers.

Every task run (these, and the interpretation runs of brainlm/interpret.py) reads its model through
`load_pretrained` (the model and its lineage tags), is tagged by `run_tags` and runs inside `tracked_run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

import brainlm
from brainlm import registry
from brainlm.config import TASKS, ClinicalConfig, ForecastConfig, Settings, load_settings, to_dict
from brainlm.data.store import Cohort, open_cohort
from brainlm.model import BrainLM
from brainlm.tasks import plots
from brainlm.tasks.common import Progress, TaskError, table_markdown, table_text

PRETRAINED_TAG = "pretrained_model"
# The index packages a served task model imports: the pretrained model's pins, and pandas (the task code it
# carries reads tables).
TASK_REQUIREMENTS = [*registry.PIP_REQUIREMENTS, f"pandas=={pd.__version__}"]
TASK_TAG, TARGET_TAG, MODEL_TAG = "task", "target", "model"


@dataclass
class EvaluationResult:
    task: str
    target: str | None
    cohort: str
    table: pd.DataFrame
    run_id: str  # the comparison run; each model has a child run
    registered: dict[str, str]  # model → "registered-name/version"
    result: Any  # ForecastResult or ClinicalResult

    def summary(self) -> str:
        what = f"{self.task}" + (f" of {self.target}" if self.target else "")
        lines = [f"{what} on cohort {self.cohort} (MLflow run {self.run_id})", "", table_text(self.table), ""]
        lines += [f"  {model:<14} registered as {ref}" for model, ref in self.registered.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ backbone


def load_pretrained(model: str, settings: Settings) -> tuple[BrainLM, dict[str, str]]:
    """(BrainLM, lineage tags) for a registered model, `models:/NAME@ALIAS` or `models:/NAME/N`: the version it
    is, the run that trained it and that run's data version, for every task run that reads it."""
    network, _ = registry.load_model(model, settings=settings)
    version = registry.model_version(model, settings=settings)
    return network, {
        PRETRAINED_TAG: f"{version['name']}/{version['version']}",
        "pretrained_run_id": version["run_id"] or "",
        "pretrained_data_version": version["data_version"] or registry.UNVERSIONED,
    }


def resolve_backbone(model: str, settings: Settings) -> tuple[nn.Module, dict[str, str]]:
    """(backbone, lineage tags) for `models:/NAME@ALIAS`, `models:/NAME/N`, or a released checkpoint folder."""
    from brainlm.released import is_released_checkpoint, load_released
    from brainlm.tasks.common import BrainLMBackbone

    if is_released_checkpoint(model):
        return load_released(model), {PRETRAINED_TAG: f"released:{Path(model).resolve().name}"}
    if not model.startswith("models:/") and ("/" in model or model.startswith(".")):
        raise TaskError(f"{model} is neither a models:/NAME@ALIAS URI nor a folder with a released checkpoint "
                        f"(config.json + model.safetensors)")
    network, lineage = load_pretrained(model, settings)
    return BrainLMBackbone(network), lineage


def run_tags(task: str, cohort: Cohort, lineage: dict[str, str], settings: Settings, **extra: str) -> dict[str, str]:
    """The tags of a task run: its task, cohort and data version, the model it read, the brainlm version."""
    from brainlm.pipelines import data_version

    return {registry.COHORT_TAG: cohort.name,
            registry.DATA_VERSION_TAG: data_version(cohort, settings) or registry.UNVERSIONED, TASK_TAG: task,
            **lineage, "brainlm_version": brainlm.__version__, **extra}


@contextlib.contextmanager
def tracked_run(cohort: Cohort, run_name: str, params: dict[str, Any], tags: dict[str, str],
                settings: Settings) -> Iterator[str]:
    """A run of the tasks experiment around a block; yields its id.

    Params, tags and the run name are checked for the cohort's participant ids before anything is logged. The
    run ends FINISHED when the block completes and FAILED (KILLED on Ctrl-C) when it raises.
    """
    from brainlm.pipelines import check_no_participant_ids

    check_no_participant_ids(cohort, params, tags, {"run_name": run_name})
    run_id = registry.start_run(settings.mlflow.tasks_experiment, run_name, params, tags, settings=settings)
    with registry.end_run_on_error(run_id, settings=settings):
        yield run_id
    registry.end_run(run_id, "FINISHED", settings=settings)


def supported(cohort: Cohort) -> list[tuple[str, str | None]]:
    """(task, target) pairs the cohort supports: forecasting always, clinical per phenotype column present."""
    from brainlm.tasks.clinical import supported_targets

    return [("forecast", None), *(("clinical", t) for t in supported_targets(cohort))]


@dataclass
class Plan:
    """What an evaluation of a cohort runs: `model` on each (task, target) of `tasks`, or nothing, as `note` says."""

    model: str | None
    tasks: list[tuple[str, str | None]]
    note: str | None = None


def plan(cohort: str | Path, model: str | None = None, targets: list[str] | None = None,
         data_version: str | None = None, settings: Settings | None = None) -> Plan:
    """The evaluations the `evaluate` flow runs on `cohort`.

    model: models:/NAME@ALIAS, models:/NAME/N or a released checkpoint folder; None is the pretrained model's
        champion, and with no champion yet there is nothing to evaluate (said in `note`, not an error: a new
        cohort may land before any model is promoted).
    targets: the clinical targets (None: every one the cohort's phenotypes allow; [] none); forecasting always.
    data_version: the version this evaluation is for (a run triggered by a new version gets it); if the cohort
        has moved on to another version since, nothing runs: that version's own evaluation covers it.
    """
    from brainlm.pipelines import data_version as current_data_version

    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    if data_version is not None:
        current = current_data_version(opened, settings) or registry.UNVERSIONED
        if current != data_version:
            return Plan(None, [], f"cohort {opened.name} is at data version {current} now, not {data_version}: "
                                  f"the evaluation of {current} covers it")
    if model is None:
        name, alias = settings.mlflow.pretrained_model, settings.mlflow.production_alias
        if registry.alias_version(name, alias, settings=settings) is None:
            return Plan(None, [], f"no {name}@{alias} yet ({settings.tracking_uri()}): nothing to evaluate on "
                                  f"cohort {opened.name}; promote a model (brainlm promote --gate) first")
        model = f"models:/{name}@{alias}"
    tasks = [(t, target) for t, target in supported(opened) if t == "forecast" or targets is None or target in targets]
    return Plan(model, tasks)


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(task: str, cohort: str | Path | Cohort, model: str, *, target: str | None = None,
             forecast_cfg: ForecastConfig | None = None, clinical_cfg: ClinicalConfig | None = None,
             settings: Settings | None = None, progress: Progress = print) -> EvaluationResult:
    """Run one task on a cohort for every model of its comparison, log and register them all."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose from {list(TASKS)}")
    settings = settings or load_settings()
    backbone, lineage = resolve_backbone(model, settings)  # a released folder is read before MLflow is touched
    opened = cohort if isinstance(cohort, Cohort) else open_cohort(cohort, settings)
    registry.configure(settings)
    if task == "forecast":
        from brainlm.tasks.forecast import run_forecast

        cfg: Any = forecast_cfg or ForecastConfig()
        result = run_forecast(opened, backbone, cfg, progress)
    else:
        from brainlm.tasks.clinical import run_clinical

        cfg = clinical_cfg or ClinicalConfig()
        cfg = dataclasses.replace(cfg, target=target or cfg.target, refit=True)  # the registered models
        target = cfg.target
        result = run_clinical(opened, backbone, cfg, progress)

    tags = run_tags(task, opened, lineage, settings, **({TARGET_TAG: target} if target else {}))
    run_name = registry.unique_run_name(task, *([target] if target else []), opened.name)
    params = {"config": to_dict(cfg), "model_uri": _loggable(model), "sizes": result.sizes}
    progress("logging to MLflow and registering every model")
    with tracked_run(opened, run_name, params, tags, settings) as parent:
        registered = {}
        for name in result.table.index:
            registered[name] = _log_model_run(task, target, name, result, opened, parent, tags, settings)
        _log_comparison(task, result, parent, settings)
        registry.log_metrics(parent, {f"{name}.{k}": v for name, row in result.table.iterrows()
                                      for k, v in row.items()}, step=0, settings=settings)
    return EvaluationResult(task=task, target=target, cohort=opened.name, table=result.table, run_id=parent,
                            registered=registered, result=result)


def _loggable(model: str) -> str:
    """A model reference for MLflow: a URI as given, a local folder by its name only."""
    return model if model.startswith("models:/") else f"released:{Path(model).resolve().name}"


def registered_name(task: str, target: str | None, model: str) -> str:
    """brainlm-forecast, baseline-forecast-lstm, brainlm-clinical-age, baseline-clinical-age-svr-fc, ..."""
    task_part = task if task == "forecast" else f"clinical-{target}"
    name = f"brainlm-{task_part}" if model == "brainlm" else f"baseline-{task_part}-{model}"
    return name.replace("_", "-")


def _log_model_run(task: str, target: str | None, name: str, result: Any, cohort: Cohort, parent: str,
                   tags: dict[str, str], settings: Settings) -> str:
    """A child run for one model: its params and metrics; its saved form registered under its own name."""
    from brainlm.tasks.saved import CONFIG_FILE, WEIGHTS_FILE, load_task_model, save_task_model

    fitted = result.fitted[name]
    row = result.table.loc[name]
    run_tags = {**tags, MODEL_TAG: name, "mlflow.parentRunId": parent}
    run_name = f"{task}{'-' + target if target else ''}-{name}-{cohort.name}"
    with tracked_run(cohort, run_name, {"model": name, **fitted.params}, run_tags, settings) as run_id:
        registry.log_metrics(run_id, row.to_dict(), step=0, settings=settings)
        _log_metric_series(task, name, result, run_id, settings)
        extra = {"window": result.window, "horizon": result.horizon} if task == "forecast" else {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_task_model(task, fitted, tmp, extra)
            predictor = load_task_model(folder / CONFIG_FILE, folder / WEIGHTS_FILE)  # what will be served
            example = _example(task, cohort, result, fitted)
            version = registry.log_model(
                run_id, folder / WEIGHTS_FILE, _json(folder / CONFIG_FILE),
                registered_model_name=registered_name(task, target, name), input_example=example,
                output_example=predictor.predict(example), metrics=_numeric(row), tags=tags,
                code=registry.SERVING_TASKS_CODE, pip_requirements=_requirements(fitted), settings=settings,
            )
    return f"{version.name}/{version.version}"


def _log_metric_series(task: str, name: str, result: Any, run_id: str, settings: Settings) -> None:
    """Forecast: MSE at each step ahead (step = TRs ahead). Clinical: every fold's metrics (step = fold)."""
    if task == "forecast":
        for step, mse in enumerate(result.per_step_mse[name], start=1):
            registry.log_metrics(run_id, {"mse_by_step": float(mse)}, step=step, settings=settings)
    else:
        for fold, metrics in enumerate(result.fold_metrics[name], start=1):
            registry.log_metrics(run_id, {f"fold_{k}": v for k, v in metrics.items()}, step=fold, settings=settings)


def _example(task: str, cohort: Cohort, result: Any, fitted: Any) -> dict[str, np.ndarray]:
    """An input example of noise (never a participant's data) over the cohort's parcels, with their centroids."""
    rng = np.random.default_rng(0)
    coords = np.asarray(cohort.atlas.coords, np.float32)
    P = cohort.n_parcels
    if task == "forecast":
        return {"context": rng.standard_normal((1, P, result.window - result.horizon), dtype=np.float32),
                "coords": coords}
    return {"signals": rng.standard_normal((1, P, result.window), dtype=np.float32), "coords": coords}


def _requirements(fitted: Any) -> list[str]:
    """TASK_REQUIREMENTS, with torchdiffeq for the neural ODE and transformers for a released backbone."""
    reqs = list(TASK_REQUIREMENTS)
    if fitted.kind == "ode":
        from importlib.metadata import version

        reqs.append(f"torchdiffeq=={version('torchdiffeq')}")
    if (fitted.config.get("backbone") or {}).get("type") == "vitmae":
        import transformers

        reqs.append(f"transformers=={transformers.__version__}")
    return reqs


def _log_comparison(task: str, result: Any, run_id: str, settings: Settings) -> None:
    """The comparison table (CSV + Markdown) and the plots, as artifacts of the comparison run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result.table.to_csv(folder / "comparison.csv")
        (folder / "comparison.md").write_text(table_markdown(result.table))
        if task == "forecast":
            pd.DataFrame(result.per_parcel_r2, index=pd.Index(result.parcel_names, name="parcel")).to_csv(
                folder / "per_parcel_r2.csv")
            pd.DataFrame(result.per_step_mse, index=pd.RangeIndex(1, result.horizon + 1, name="step")).to_csv(
                folder / "mse_by_step.csv")
            plots.forecast_traces(result, folder / "forecast_traces.png")
            plots.forecast_error_by_step(result, folder / "forecast_error_by_step.png")
        else:
            plots.clinical_scatter(result, folder / f"clinical_{result.target}_scatter.png")
        registry.log_artifacts(run_id, folder, settings=settings)


def _json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def _numeric(row: pd.Series) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if np.isfinite(v)}

