"""Prefect flow `ingest`: a lab's folder → a validated, versioned cohort; a new version is announced.

    ingest     parse, robust-scale, validate (Great Expectations), store, `dvc add` + push (brainlm/data/ingest.py)
    announce   only when the data version is new: the event `brainlm.cohort.versioned` (flows/events.py), on which
               the automation that `make serve` serves evaluates the champion

Run it from the deployment `ingest/default` that `make serve` serves:

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run ingest/default \\
        -p src=/path/to/lab-folder -p cohort=lab --watch
"""

from __future__ import annotations

from prefect import flow, task

from brainlm import pipelines
from brainlm.config import IngestConfig, with_options
from brainlm.hooks import CohortVersioned
from flows import events
from flows.pretrain import STEP


@task(name="ingest", **STEP)
def store(src: str, cohort: str, cfg: IngestConfig, atlas: str | None, atlas_image: str | None):
    return pipelines.ingest_cohort(src, cohort, cfg=cfg, atlas=atlas, atlas_image=atlas_image)


@task(name="announce", **STEP)
def announce(version: CohortVersioned) -> str:
    return events.announce(version)


@flow(name="ingest", log_prints=True, persist_result=True)
def ingest(
    src: str,
    cohort: str,
    atlas: str | None = None,
    atlas_image: str | None = None,
    # IngestConfig, field for field (None keeps its default)
    min_timepoints: int | None = None,
    skip_invalid: bool | None = None,
    workers: int | None = None,
    push: bool | None = None,
    executor: str | None = None,
) -> dict:
    """Ingest the recordings under `src` (a folder this machine sees) as cohort `cohort`, as `brainlm ingest` does.

    atlas: "A424" or an atlas TSV (default SRC/atlas.tsv, else A424); atlas_image: its label image for NIfTI input.
    """
    cfg = with_options(IngestConfig(), min_timepoints=min_timepoints, skip_invalid=skip_invalid, workers=workers,
                       push=push, executor=executor)
    report = store(src, cohort, cfg, atlas, atlas_image)
    version = CohortVersioned.from_report(report)
    if version is not None:
        print(announce(version))
    return report.as_dict()
