"""Flows tests: a Prefect test server for the tests that run flows, and no MLflow state across tests."""

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server + database for the session (starting one takes 10–20 s).

    Not autouse: only tests that run a flow pay for it. The startup timeout comes from
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (tests/conftest.py), generous for a busy machine.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """registry.configure exports MLFLOW_TRACKING_URI (as MLflow does, for child processes such as Ray
    workers); put it back afterwards so the next test's home is not pointed at this test's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def assert_no_participant_ids():
    """A check over everything MLflow stored: run names, params, tags, metric keys, registered model and
    version tags, artifact paths and the text of every artifact file. None may contain a participant id."""
    from pathlib import Path
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    def check(settings, participant_ids):
        client = MlflowClient(settings.tracking_uri())
        texts = []
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                texts.append(run.info.run_name)
                texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
                texts += list(run.data.metrics)
        for model in client.search_registered_models():
            texts += [f"{k}={v}" for k, v in model.tags.items()]
            for version in client.search_model_versions(f"name = '{model.name}'"):
                texts += [f"{k}={v}" for k, v in version.tags.items()]
        root = Path(urlparse(settings.artifact_root()).path)
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files, f"no artifacts under {root}"
        texts += [str(p.relative_to(root)) for p in files]
        # every file but the weights, binary ones (figures, arrays) included: ids must not hide in them either
        texts += [p.read_bytes().decode("utf-8", errors="replace") for p in files if p.suffix != ".safetensors"]
        for pid in participant_ids:
            leaks = [t[:200] for t in texts if pid in t]
            assert not leaks, f"participant id {pid} stored in MLflow: {leaks[:3]}"

    return check
