"""`make demo`: synthetic cohort → ingest → pretrain (subflow) → register, on one machine, no set-up.

Runs on Prefect's temporary local server (no `prefect server` needed) and the embedded defaults: MLflow on
SQLite and the DVC remote under `.brainlm/`, Ray Train on local CPU workers. Then prints where everything is.

    .venv/bin/python -m flows.demo
"""

from __future__ import annotations

from prefect import flow, task
from prefect.settings import PREFECT_HOME

from brainlm import pipelines
from brainlm.config import load_settings, to_dict
from flows.pretrain import DEFAULT_COHORT, STEP, pretrain


@task(name="synthesize", **STEP)
def synthesize(out_dir: str) -> str:
    return str(pipelines.synthesize_demo(out_dir))


@task(name="ingest", **STEP)
def ingest(src: str, cohort: str) -> str:
    return str(pipelines.ingest_cohort(src, cohort).path)


@flow(name="demo", log_prints=True)
def demo(cohort: str = DEFAULT_COHORT, steps: int = pipelines.DEMO_TRAIN.steps) -> pipelines.PretrainResult:
    """Synthesize `data/raw/<cohort>` (once), ingest it as `cohort`, pretrain the tiny preset, register it."""
    settings = load_settings()
    src = synthesize(str(settings.data_dir / "raw" / cohort))
    ingest(src, cohort)
    result = pretrain(cohort=cohort, preset="tiny", **{**to_dict(pipelines.DEMO_TRAIN), "steps": steps})
    print(pipelines.where_things_are(result, settings, prefect_home=str(PREFECT_HOME.value())))
    return result


if __name__ == "__main__":
    demo()
