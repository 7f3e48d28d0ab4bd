"""`make demo`: synthetic cohort → ingest (subflow) → pretrain (subflow) → register, on one machine, no set-up.

Runs on Prefect's temporary local server (no `prefect server` needed) and the embedded defaults: MLflow on
SQLite and the DVC remote under `.brainlm/`, Ray Train on local CPU workers. Then prints where everything is.

    .venv/bin/python -m flows.demo [--steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.settings import PREFECT_HOME

from brainlm import pipelines
from brainlm.config import load_settings, to_dict
from flows.ingest import ingest
from flows.pretrain import DEFAULT_COHORT, STEP, pretrain


@task(name="synthesize", **STEP)
def synthesize(out_dir: str) -> str:
    return str(pipelines.synthesize_demo(out_dir))


@flow(name="demo", log_prints=True)
def demo(cohort: str = DEFAULT_COHORT, steps: int = pipelines.DEMO_TRAIN.steps) -> pipelines.PretrainResult:
    """Synthesize the demo's input under `.brainlm/` (once), ingest it as `cohort`, pretrain tiny, register it."""
    settings = load_settings()
    src = synthesize(str(pipelines.demo_input_dir(cohort, settings)))
    ingest(src, cohort)  # the `ingest` flow, as a subflow: a new data version is announced like any other
    result = pretrain(cohort=cohort, preset="tiny", **{**to_dict(pipelines.DEMO_TRAIN), "steps": steps})
    print(pipelines.where_things_are(result, settings, prefect_home=str(PREFECT_HOME.value())))
    return result


def ensure_prefect_home() -> Path:
    """Create PREFECT_HOME with its parents: Prefect makes only the last folder, and its temporary server
    cannot open its database in a folder whose parent is missing (e.g. `.brainlm/` in a fresh clone)."""
    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=pipelines.DEMO_TRAIN.steps, help="pretraining optimiser steps")
    args = parser.parse_args()
    ensure_prefect_home()
    demo(steps=args.steps)
