"""Shared test set-up: quiet, offline tools; every test gets its own brainlm home (no shared files)."""

import os
import sys

import numpy as np
import pytest
import torch

# Before any of the tools is imported: no telemetry, no progress bars, no token-auth warnings.
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(autouse=True)
def _seed_everything():
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """`mlflow.pyfunc.load_model` puts a model's `code/` folder first on `sys.path` and leaves it there. That folder
    holds only the brainlm modules serving needs, so worker processes started later in the same test session
    (ingest's forkserver pool) would import that partial copy instead of the installed package."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin against other processes (several times
    slower), and the tests' tiny models gain nothing from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh brainlm home (data store, MLflow DB, Ray results) for one test."""
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("BRAINLM_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root

# Session fixtures for the task tests (a tiny BrainLM pretrained once per session and setup), shared by tasks/ and
# flows/.
pytest_plugins = ["fixtures_tasks"]
