"""`make serve`'s deployments on a real Prefect server (`prefect server start`, one for this module), served by
`python -m flows.serve` as serve.sh runs it: a new cohort version has the champion evaluated on it by itself.

    brainlm ingest (CLI, PREFECT_API_URL set) ─┐                          ┌─> evaluate/default flow run
    ingest/default (the flow)                  ├─> brainlm.cohort.versioned ─> automation ─┘   (cohort, data version)
    the same data again: no new version ───────┘   (no event, no run)

The tests run in order on one home and one served process: the deployments and their schedule; the CLI's event
(no champion yet: the triggered run evaluates nothing and says so); the ingest flow's event with a champion (its
MLflow runs carry the new data version); the same data again; the `promote` deployment keeping a worse model out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_tasks import DOWNSTREAM, register_pretrained, untrained_checkpoint
from mlflow import MlflowClient
from servers import prefect_server, stop_group, wait_for

from brainlm import pipelines, registry
from brainlm.config import SynthConfig, load_settings
from brainlm.data import versioning
from brainlm.data.synthetic import synthesize

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BRAINLM = Path(sys.executable).parent / "brainlm"
COHORT = "lab"
EVENT = "brainlm.cohort.versioned"
# The served evaluation's budget: forecasting only, two optimiser steps per neural model.
SERVE_CONFIG = "evaluate:\n  parameters: {targets: [], steps: 2}\ningest:\n  parameters: {workers: 1}\n"


@dataclass
class Stack:
    url: str  # PREFECT_API_URL
    home: Path
    env: dict[str, str]  # what a shell of the lab has: the server, the home, this checkout's code
    proc: subprocess.Popen  # python -m flows.serve
    log: Path

    def brainlm(self, *args: str) -> str:
        proc = subprocess.run([str(BRAINLM), *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"brainlm {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("served")
    home = root / "home"
    home.mkdir()
    (root / "serve.yaml").write_text(SERVE_CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", versioning.REMOTE_ENV)}
    env |= {"BRAINLM_HOME": str(home), "BRAINLM_SERVE_CONFIG": str(root / "serve.yaml"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "OMP_NUM_THREADS": "1"}
    with prefect_server(root) as url, temporary_settings({PREFECT_API_URL: url}), pytest.MonkeyPatch.context() as mp:
        env["PREFECT_API_URL"] = url
        mp.setenv("BRAINLM_HOME", str(home))  # this process reads the same stores through the library
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        log = root / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**env, "PREFECT_HOME": str(root / "prefect-client"),
                                         "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
        try:
            yield Stack(url, home, env, proc, log)
        finally:
            stop_group(proc)


def lab_input(folder: Path, seed: int) -> Path:
    """A lab's folder (synthetic): 6 participants, 240-TR recordings, 20 parcels."""
    return synthesize(folder, SynthConfig(subjects=6, timepoints=240, max_parcels=20, recordings_per_subject=1,
                                          seed=seed))


def deployment(stack: Stack, name: str, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    def read():
        with get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                return None

    return wait_for(read, f"flows.serve applying {name}", timeout, stack.proc, stack.log)


def evaluate_runs(stack: Stack) -> list:
    """Every flow run of evaluate/default, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    evaluate = deployment(stack, "evaluate/default")
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[evaluate.id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def triggered_run(stack: Stack, data_version: str, timeout: float = 300):
    """The evaluate/default run the automation started for `data_version`, once it has finished."""
    def finished():
        runs = [r for r in evaluate_runs(stack) if r.parameters.get("data_version") == data_version]
        return runs[0] if runs and runs[0].state.is_final() else None

    return wait_for(finished, f"the evaluation of data version {data_version}", timeout, stack.proc, stack.log)


def versioned_events(stack: Stack) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50).events


def test_make_serve_serves_the_four_deployments_with_a_paused_nightly_evaluation(stack):
    from prefect.client.orchestration import get_client

    ingest, pretrain, evaluate, promote = (deployment(stack, f"{flow}/default")
                                           for flow in ("ingest", "pretrain", "evaluate", "promote"))
    demo = pipelines.DEMO_TRAIN  # the demo's budget (600 steps, evaluated every 100)
    assert pretrain.parameters == {"cohort": "demo", "preset": "tiny", "steps": demo.steps, "eval_every": demo.eval_every}
    assert ingest.parameters == {"workers": 1} and promote.parameters == {"cohort": "demo"}
    assert evaluate.parameters == {"cohort": "demo", "targets": [], "steps": 2}  # serve.yaml over the defaults
    [nightly] = evaluate.schedules
    assert (nightly.schedule.cron, nightly.active) == ("0 3 * * *", False)
    with get_client(sync_client=True) as client:
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{evaluate.id}")
    assert automation.enabled and automation.trigger.expect == {EVENT}
    [action] = automation.actions
    assert action.parameters == {"cohort": "{{ event.resource['brainlm.cohort'] }}",
                                 "data_version": "{{ event.resource['brainlm.data_version'] }}"}


def test_brainlm_ingest_announces_a_new_version_and_its_evaluation_runs_by_itself(stack, tmp_path):
    """With no champion yet, the triggered evaluation completes having evaluated nothing, and says why."""
    from importlib.metadata import entry_points

    hooks = {ep.value for ep in entry_points(group="brainlm.cohort_versioned")}
    assert "flows.events:cohort_versioned" in hooks, "brainlm's Prefect hook is not installed: run make install"
    out = stack.brainlm("ingest", str(lab_input(tmp_path / "v1", seed=0)), "--cohort", COHORT)
    version = versioning.current_version(stack.home).tag
    assert f"told Prefect ({stack.url}): {EVENT} for cohort {COHORT}" in out

    run = triggered_run(stack, version)
    assert run.state.is_completed(), f"{run.state}\n{stack.log.read_text()[-3000:]}"
    assert run.parameters == {"cohort": COHORT, "data_version": version, "targets": [], "steps": 2}
    assert run.state.result() == []  # no brainlm-pretrained@champion to evaluate yet
    [event] = versioned_events(stack)
    assert (event.resource["brainlm.cohort"], event.resource["brainlm.data_version"]) == (COHORT, version)


def test_an_ingest_flow_run_of_new_data_has_the_champion_evaluated_on_that_version(stack, pretrained, tmp_path):
    from prefect.deployments import run_deployment

    settings = load_settings(stack.home)
    register_pretrained(pretrained(DOWNSTREAM), settings)
    registry.promote(settings.mlflow.pretrained_model, "1", settings=settings)

    ingested = run_deployment("ingest/default", parameters={"src": str(lab_input(tmp_path / "v2", seed=1)),
                                                            "cohort": COHORT}, timeout=300, poll_interval=1)
    assert ingested.state.is_completed(), f"{ingested.state}\n{stack.log.read_text()[-3000:]}"
    report = ingested.state.result()
    version = versioning.current_version(stack.home).tag
    assert report["new_version"] and report["data_version"] == version and report["recordings"] == 6

    run = triggered_run(stack, version)
    assert run.state.is_completed(), f"{run.state}\n{stack.log.read_text()[-3000:]}"
    [forecast] = run.state.result()
    assert forecast["task"] == "forecast" and "brainlm" in forecast["table"]
    # Every run of that evaluation is linked to the new data version and to the champion it evaluated.
    client = MlflowClient(settings.tracking_uri())
    experiment = client.get_experiment_by_name(settings.mlflow.tasks_experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.cohort = '{COHORT}'")
    assert len(runs) == 1 + len(forecast["table"])  # the comparison and one child run per model
    assert {r.data.tags[registry.DATA_VERSION_TAG] for r in runs} == {version}
    assert {r.data.tags["pretrained_model"] for r in runs} == {"brainlm-pretrained/1"}
    assert len(versioned_events(stack)) == 2


def test_the_same_data_ingested_again_is_no_new_version_and_triggers_nothing(stack, tmp_path):
    before = evaluate_runs(stack)
    out = stack.brainlm("ingest", str(lab_input(tmp_path / "v2", seed=1)), "--cohort", COHORT)
    assert "unchanged: the store already held this data" in out and "told Prefect" not in out
    time.sleep(8)  # a triggered run shows up within a few seconds of its event
    assert len(evaluate_runs(stack)) == len(before) and len(versioned_events(stack)) == 2


def test_the_promote_deployment_keeps_a_worse_challenger_out_and_records_why(stack, pretrained, tmp_path):
    from prefect.deployments import run_deployment

    settings = load_settings(stack.home)
    register_pretrained(pretrained(DOWNSTREAM), settings, untrained_checkpoint(tmp_path / "untrained"))

    flow_run = run_deployment("promote/default", parameters={"cohort": COHORT}, timeout=300, poll_interval=1)

    assert flow_run.state.is_completed(), f"{flow_run.state}\n{stack.log.read_text()[-3000:]}"
    decision = flow_run.state.result()
    assert (decision["challenger"], decision["champion"], decision["promoted"]) == ("2", "1", False)
    name = settings.mlflow.pretrained_model
    assert registry.alias_version(name, "champion", settings=settings) == "1"
    tags = MlflowClient(settings.tracking_uri()).get_model_version(name, "2").tags
    assert tags["gate.decision"] == "not promoted" and tags["gate.reason"] == decision["reason"]
    assert tags["gate.data_version"] == versioning.current_version(stack.home).tag and tags["gate.cohort"] == COHORT
