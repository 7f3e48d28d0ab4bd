"""Prefect flow `evaluate`: every task the cohort supports, each one library call (brainlm/evaluate.py).

Forecasting always; clinical prediction for each phenotype column the cohort's participants.tsv has (or the
`targets` asked for). Each task logs its comparison and registers every model, BrainLM and baselines alike.
`make serve` serves it as `evaluate/default`, which also runs by itself on every new cohort version (the
automation on the event `brainlm.cohort.versioned`, flows/events.py) and, once switched on, nightly.

    .venv/bin/python -c "from flows.evaluate import evaluate; evaluate(cohort='demo', model='models:/brainlm-pretrained@challenger')"
"""

from __future__ import annotations

from prefect import flow, task

from brainlm import evaluate as evaluation
from brainlm.config import ClinicalConfig, ForecastConfig, with_options
from flows.pretrain import STEP


@task(name="plan", **STEP)
def plan(cohort: str, model: str | None, targets: list[str] | None, data_version: str | None) -> evaluation.Plan:
    return evaluation.plan(cohort, model, targets, data_version)


@task(name="evaluate task", task_run_name="{name}-{target}", **STEP)
def run_task(name: str, target: str | None, cohort: str, model: str, forecast_cfg: ForecastConfig,
             clinical_cfg: ClinicalConfig) -> dict:
    result = evaluation.evaluate(name, cohort, model, target=target, forecast_cfg=forecast_cfg,
                                 clinical_cfg=clinical_cfg)
    print(result.summary())
    return {"task": name, "target": target, "run_id": result.run_id, "registered": result.registered,
            "table": result.table.to_dict(orient="index")}


@flow(name="evaluate", log_prints=True, persist_result=True)
def evaluate(cohort: str, model: str | None = None, targets: list[str] | None = None, steps: int | None = None,
             folds: int | None = None, forecast: bool = True, data_version: str | None = None) -> list[dict]:
    """Evaluate `model` on every task `cohort` supports; each task's runs carry the cohort's data version.

    model: models:/NAME@ALIAS or a released checkpoint folder; None: the pretrained model's champion (none yet:
        nothing runs, and the run says so).
    targets: the clinical targets to run (default: every one the cohort's phenotypes allow; [] none).
    steps / folds: None keeps the task configs' budgets.
    data_version: the version this run is for (the automation on `brainlm.cohort.versioned` passes the event's);
        a cohort that has moved on since is left to its newer version's run.
    """
    forecast_cfg = with_options(ForecastConfig(), steps=steps)
    clinical_cfg = with_options(ClinicalConfig(), steps=steps, folds=folds)
    planned = plan(cohort, model, targets, data_version)
    if planned.note:
        print(planned.note)
    results = []
    for name, target in planned.tasks:
        if name == "forecast" and not forecast:
            continue
        results.append(run_task(name, target, cohort, planned.model, forecast_cfg, clinical_cfg))
    return results
