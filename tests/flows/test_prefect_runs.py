"""The served deployment, read back from Prefect's API: `python -m flows.serve` (what `make serve` runs) applies
`pretrain/default` to the test server, and a triggered run of it ends COMPLETED, with one COMPLETED task run per
step ("load cohort", "check shape", "train", "register") and its result readable from this process.

(The flow called in-process is read back the same way in test_pretrain_flow.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_cohort import make_cohort
from fixtures_prefect import flow_run_states

from brainlm import pipelines, registry
from brainlm.config import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["load cohort", "check shape", "train", "register"]  # flows/pretrain.py, in the order they run
TINY_RUN = {"cohort": "fixture", "preset": "tiny", "steps": 2, "eval_every": 2, "batch_size": 4, "eval_crops": 1,
            "num_workers": 1}


@pytest.fixture
def served(home, tmp_path):
    """`python -m flows.serve` against the test server, in a session of its own; stopped (with whatever it
    started) afterwards."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick the triggered run up within a second, not ten
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, tmp_path / "serve.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"flows.serve did not apply {name} (exit code {proc.poll()}):\n{log.read_text()}")
                time.sleep(1)


def test_the_served_deployment_runs_once_when_triggered(home, served):
    from prefect.deployments import run_deployment

    proc, log = served
    make_cohort(load_settings().cohorts_dir / "fixture", n_participants=6, parcels=8, timepoints=200)
    deployment = wait_for_deployment("pretrain/default", proc, log)
    assert deployment.parameters["cohort"] == "demo"  # flows/serve.py's defaults; the run overrides them

    flow_run = run_deployment("pretrain/default", parameters=TINY_RUN, timeout=300, poll_interval=1)

    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()}"
    flow_name, flow_state, task_states = flow_run_states(flow_run.id)
    assert (flow_name, flow_state, flow_run.deployment_id) == ("pretrain", "COMPLETED", deployment.id)
    assert task_states == dict.fromkeys(TASKS, "COMPLETED")
    result = flow_run.state.result()  # persisted by the served run, read back here
    assert isinstance(result, pipelines.PretrainResult) and result.version == "1"
    [version] = registry.list_models(settings=load_settings())
    assert (version["version"], version["run_id"], version["aliases"]) == ("1", result.run_id, ["challenger"])
