"""The `evaluate` flow end to end (real Prefect, MLflow): every task the cohort supports, every model logged and
registered safely, nothing that names a participant, and a registered task model served from its files."""

import pickle
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
from fixtures_tasks import DOWNSTREAM, register_pretrained
from mlflow import MlflowClient

from brainlm import registry
from brainlm.config import load_settings

FORECAST = ["brainlm", "scratch", "lstm", "ode", "var", "ar1", "persistence"]
CLINICAL = ["brainlm", "ridge_embedding", "svr_embedding", "svr_fc", "ridge_fc"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness", "one_thread")
def test_evaluate_flow_registers_every_model_beside_its_baselines(home, pretrained, assert_no_participant_ids,
                                                                 monkeypatch):
    from flows.evaluate import evaluate

    settings = load_settings()
    uri = register_pretrained(pretrained(DOWNSTREAM), settings)
    cohort = pretrained(DOWNSTREAM).cohort()

    results = evaluate(cohort=str(cohort.path), model=uri, targets=["age"], steps=3, folds=2)

    assert [(r["task"], r["target"]) for r in results] == [("forecast", None), ("clinical", "age")]
    assert list(results[0]["table"]) == FORECAST and list(results[1]["table"]) == CLINICAL
    names = {row["name"]: row for row in registry.list_models(settings=settings)}
    expected = ["brainlm-forecast", *(f"baseline-forecast-{m}" for m in FORECAST[1:]), "brainlm-clinical-age",
                "baseline-clinical-age-ridge-embedding", "baseline-clinical-age-svr-embedding", "baseline-clinical-age-svr-fc", "baseline-clinical-age-ridge-fc"]
    assert set(expected) <= set(names)
    client = MlflowClient(settings.tracking_uri())
    for name in expected:
        version = client.get_model_version(name, names[name]["version"])
        assert version.tags["pretrained_model"] == "brainlm-pretrained/1", name
        assert version.tags["data_version"] == registry.UNVERSIONED and version.tags["cohort"] == cohort.name
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"]
        assert run.data.params["model"] in FORECAST + CLINICAL
    forecast_run = client.get_run(results[0]["run_id"])
    assert forecast_run.data.tags["pretrained_model"] == "brainlm-pretrained/1"
    artifacts = {a.path for a in client.list_artifacts(results[0]["run_id"])}
    assert {"comparison.csv", "comparison.md", "forecast_traces.png", "forecast_error_by_step.png",
            "per_parcel_r2.csv", "mse_by_step.csv"} <= artifacts
    assert "clinical_age_scatter.png" in {a.path for a in client.list_artifacts(results[1]["run_id"])}
    var_run = client.get_run(client.get_model_version("baseline-forecast-var", "1").run_id)
    assert int(var_run.data.params["lag"]) in (1, 2, 3, 4)  # chosen on the validation subjects
    steps = [m.step for m in client.get_metric_history(var_run.info.run_id, "mse_by_step")]
    assert steps == list(range(1, 21))
    assert_no_participant_ids(settings, cohort.participants)

    # Stored files are safetensors, JSON/YAML and code only; the served model answers without unpickling.
    root = Path(urlparse(settings.artifact_root()).path)
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pt", ".bin", ".joblib", ".skops"}, suffixes
    for module, attr in [(pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, attr, lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    coords = np.asarray(cohort.atlas.coords, np.float32)
    # MLflow's own loader resolves `models:/` against the process-wide URI, which the registry leaves unset.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    served = mlflow.pyfunc.load_model("models:/brainlm-forecast@challenger")
    context = np.zeros((2, cohort.n_parcels, 80), np.float32)
    assert served.predict({"context": context, "coords": coords})["forecast"].shape == (2, cohort.n_parcels, 20)
    clinical = mlflow.pyfunc.load_model("models:/baseline-clinical-age-ridge-fc@challenger")
    out = clinical.predict({"signals": np.random.default_rng(0).standard_normal((2, cohort.n_parcels, 100),
                                                                               dtype=np.float32), "coords": coords})
    assert out["value"].shape == (2,) and np.all(out["value"] > 0)  # ages, back in years

    # Self-sufficient like the pretrained model: the brainlm code serving a task model travels inside it, and its
    # requirements are pinned index packages, the ODE's solver among them.
    ode = Path(mlflow.artifacts.download_artifacts("models:/baseline-forecast-ode@challenger",
                                                   dst_path=str(home / "ode")))
    requirements = (ode / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements) and not any(r.startswith("brainlm") for r in requirements)
    assert {"pandas", "torchdiffeq"} <= {r.split("==")[0] for r in requirements}, requirements
    assert (ode / "code" / "brainlm" / "tasks" / "saved.py").is_file()
