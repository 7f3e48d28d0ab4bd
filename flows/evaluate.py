"""Prefect flow `evaluate`: every task the cohort supports, each one library call (brainlm/evaluate.py).

Forecasting always; clinical prediction for each phenotype column the cohort's participants.tsv has (or the
`targets` asked for). Each task logs its comparison and registers every model, BrainLM and baselines alike.

    .venv/bin/python -c "from flows.evaluate import evaluate; evaluate(cohort='demo', model='models:/brainlm-pretrained@challenger')"
"""

from __future__ import annotations

from prefect import flow, task

from brainlm import evaluate as evaluation
from brainlm import pipelines
from brainlm.config import ClinicalConfig, ForecastConfig, with_options
from flows.pretrain import STEP


@task(name="plan", **STEP)
def plan(cohort: str, targets: list[str] | None) -> list[tuple[str, str | None]]:
    supported = evaluation.supported(pipelines.load_cohort(cohort))
    return [(t, target) for t, target in supported if t == "forecast" or targets is None or target in targets]


@task(name="evaluate task", task_run_name="{name}-{target}", **STEP)
def run_task(name: str, target: str | None, cohort: str, model: str, forecast_cfg: ForecastConfig,
             clinical_cfg: ClinicalConfig) -> dict:
    result = evaluation.evaluate(name, cohort, model, target=target, forecast_cfg=forecast_cfg,
                                 clinical_cfg=clinical_cfg)
    print(result.summary())
    return {"task": name, "target": target, "run_id": result.run_id, "registered": result.registered,
            "table": result.table.to_dict(orient="index")}


@flow(name="evaluate", log_prints=True, persist_result=True)
def evaluate(cohort: str, model: str, targets: list[str] | None = None, steps: int | None = None,
             folds: int | None = None, forecast: bool = True) -> list[dict]:
    """Evaluate `model` (models:/NAME@ALIAS or a released checkpoint folder) on every task `cohort` supports.

    targets: the clinical targets to run (default: every one the cohort's phenotypes allow).
    steps / folds: None keeps the task configs' budgets.
    """
    forecast_cfg = with_options(ForecastConfig(), steps=steps)
    clinical_cfg = with_options(ClinicalConfig(), steps=steps, folds=folds)
    results = []
    for name, target in plan(cohort, targets):
        if name == "forecast" and not forecast:
            continue
        results.append(run_task(name, target, cohort, model, forecast_cfg, clinical_cfg))
    return results
