"""A registered model served over REST from an environment built from nothing but the model itself.

`mlflow models serve -m models:/brainlm-pretrained@challenger` with its default environment manager
(virtualenv): MLflow creates a new virtualenv from the model's own `python_env.yaml` + `requirements.txt`
(package-index packages only: brainlm's code travels in the model's `code/`), starts the scoring server in it,
and the test posts a recording and gets its embedding back.

Building that environment installs torch and MLflow (about 2–3 minutes on 2 cores). MLflow names the
environment by a hash of the model's requirements; the test keeps it in pytest's cache folder
(`.pytest_cache/d/mlflow-envs`), so a new checkout or changed requirements build it from scratch and a rerun
with the same requirements starts in seconds. Either way it never contains an installed brainlm, which the test
checks.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fixtures_cohort import make_cohort
from fixtures_model import register_fresh_model
from servers import free_port, http_ok, stop_group, wait_for

from brainlm.config import load_settings
from brainlm.data.store import open_cohort

PARCELS = 12
ENV_BUILD_TIMEOUT = 780  # a first build on a busy 2-core machine, downloads included (measured: 2–2½ min)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_served_model_builds_its_own_environment_and_embeds_a_recording(home, tmp_path, request, monkeypatch):
    settings = load_settings()
    cohort = open_cohort(make_cohort(settings.cohorts_dir / "fixture", n_participants=3, parcels=PARCELS,
                                     timepoints=200))
    registered = register_fresh_model(settings, cohort, tmp_path / "ckpt")
    uri = f"models:/{settings.mlflow.pretrained_model}@{settings.mlflow.new_alias}"

    # What a fresh environment is built from: pinned index packages, brainlm's source inside the model.
    # (MLflow resolves `models:/` against the process-wide tracking URI, which the registry leaves unset.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert all("==" in line for line in requirements), requirements
    assert not any(line.startswith("brainlm") for line in requirements), requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements  # unpinned, pip would pick a CUDA build
    shipped = sorted(p.relative_to(model_dir / "code").as_posix() for p in (model_dir / "code").rglob("*")
                     if p.is_file())
    assert shipped == [f"brainlm/{m}.py" for m in ("__init__", "checkpoint", "config", "errors", "model", "registry")]

    env_root = request.config.cache.mkdir("mlflow-envs")
    port = free_port()
    # The server runs as a user would start it: no PYTHONPATH, from a folder without brainlm in it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env |= {"MLFLOW_TRACKING_URI": settings.tracking_uri(), "MLFLOW_ENV_ROOT": str(env_root)}
    log = tmp_path / "serve.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    started = time.monotonic()
    with log.open("w") as out:
        server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", uri, "--env-manager", "virtualenv",
                                   "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), "mlflow models serve", ENV_BUILD_TIMEOUT,
                 server, log)
        print(f"\nenvironment + scoring server ready in {time.monotonic() - started:.0f} s")

        [env_dir] = [p for p in env_root.iterdir() if p.name.startswith("mlflow-") and f"{p}/bin/activate" in
                     log.read_text()]
        find_brainlm = "import importlib.util, sys; sys.exit(importlib.util.find_spec('brainlm') is not None)"
        assert subprocess.run([str(env_dir / "bin" / "python"), "-c", find_brainlm], env=env, cwd=tmp_path).returncode == 0, (
            f"brainlm is installed in the serving environment {env_dir}: the test would not show that the model "
            f"carries its own code")

        signals = np.random.default_rng(0).standard_normal((2, PARCELS, registered.cfg.window)).astype(np.float32)
        body = json.dumps({"inputs": {"signals": signals.tolist(), "coords": cohort.atlas.coords.tolist()}}).encode()
        request_ = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                          headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request_, timeout=120) as response:
            served = np.asarray(json.load(response)["predictions"]["cls"], dtype=np.float32)
    finally:
        stop_group(server)

    with torch.no_grad():
        expected = registered.model.embed(torch.from_numpy(signals), torch.from_numpy(cohort.atlas.coords)).cls
    assert served.shape == (2, registered.cfg.hidden)
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-4, atol=1e-5)
