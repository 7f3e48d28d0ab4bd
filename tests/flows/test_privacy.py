"""No participant id anywhere in MLflow after the demo plus an evaluation, and the scan that says so finds what it
should.

The scan (tests/privacy.py) reads the whole tracking store and artifact root; the first test plants an id in
each kind of place it covers, so a scan that silently looked nowhere would fail there.
"""

import pandas as pd
import pytest
from mlflow import MlflowClient
from privacy import assert_no_participant_ids, find_participant_ids, stored_items

from brainlm import registry
from brainlm.config import load_settings
from brainlm.data.store import open_cohort

PID = "sub-7Q2X"


@pytest.mark.slow
def test_the_scan_finds_an_id_wherever_mlflow_keeps_it(home, tmp_path):
    settings = load_settings()
    client = MlflowClient(settings.tracking_uri())
    experiment = registry.configure(settings).mlflow.pretrain_experiment
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    clean = {"note": "sub-7Q2X0 and xsub-7Q2X are other labels"}  # not the id as a token

    def run_with(**planted):
        run = client.create_run(experiment_id, run_name=planted.get("name", "clean"),
                                tags={**clean, **planted.get("tags", {})})
        for key, value in planted.get("params", {}).items():
            client.log_param(run.info.run_id, key, value)
        for key in planted.get("metrics", ["loss"]):
            client.log_metric(run.info.run_id, key, 1.0)
        for name, data in planted.get("files", {}).items():
            path = tmp_path / run.info.run_id / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            client.log_artifact(run.info.run_id, str(path))
        return run.info.run_id

    run_with(files={"clean.json": b'{"cohort": "lab"}'})
    assert find_participant_ids(settings, [PID]) == []  # near misses are not ids

    planted = {
        run_with(name=f"pretrain-{PID}"): "name",
        run_with(params={"cohort.subject": PID}): "params",
        run_with(tags={"who": f"run_{PID}"}): "tags",
        run_with(metrics=[f"val_mse_{PID}"]): "metric names",
        run_with(files={f"{PID}_report.txt": b"nothing to see"}): f"{PID}_report.txt",
        run_with(files={"report.json": f'{{"participant": "{PID.upper()}"}}'.encode()}): "report.json",
        run_with(files={"weights.bin": b"\x00\x81binary\x00" + PID.encode() + b"\xff\x00"}): "weights.bin",
    }
    client.create_registered_model("leaky")
    version = client.create_model_version("leaky", "file:///nowhere", tags={"held_out": PID})
    sqlite_only = client.create_run(experiment_id, run_name="deleted")
    client.set_tag(sqlite_only.info.run_id, "who", PID)
    client.delete_run(sqlite_only.info.run_id)

    leaks = find_participant_ids(settings, [PID])
    where = " | ".join(leak.where for leak in leaks)
    for run_id, place in planted.items():  # run metadata names the run; an artifact's path holds its run id
        assert any(run_id in leak.where and place in leak.where for leak in leaks), (place, where)
    assert f"registered model leaky version {version.version}" in where
    assert f"run {sqlite_only.info.run_id} tags" in where  # deleted runs are still in the store
    assert any(leak.where.startswith("database ") for leak in leaks)
    with pytest.raises(AssertionError, match=PID):
        assert_no_participant_ids(settings, [PID])


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness", "one_thread")
def test_no_participant_id_anywhere_in_mlflow_after_the_demo_and_an_evaluation(home):
    """The demo, then the `evaluate` flow on its cohort (forecasting and clinical prediction of age on a tiny budget:
    per-model runs, comparison tables, plots, task models), then the scan of everything MLflow holds."""
    from flows.demo import demo
    from flows.evaluate import evaluate

    result = demo(steps=4)
    evaluated = evaluate(cohort="demo", model=f"models:/{result.model_name}@{result.alias}", targets=["age"], steps=2,
                         folds=2)

    settings = load_settings()
    cohort = open_cohort("demo", settings)
    raw = pd.read_csv(home / ".brainlm" / "raw" / "demo" / "participants.tsv", sep="\t")
    ids = set(cohort.participants) | set(raw["participant_id"].astype(str))
    assert len(ids) == 24

    places = [where for where, _ in stored_items(settings)]
    assert any(w.startswith(f"run {result.run_id}") for w in places)
    assert [(e["task"], e["target"]) for e in evaluated] == [("forecast", None), ("clinical", "age")]
    assert all(any(w.startswith(f"run {e['run_id']}") for w in places) for e in evaluated)
    assert any(w.startswith("registered model brainlm-clinical-age") for w in places)
    assert any(w.startswith("artifact ") and w.endswith("clinical_age_scatter.png") for w in places)
    assert any(w.startswith("artifact ") and w.endswith("model.safetensors") for w in places)
    assert any(w.startswith("registered model ") for w in places) and any(w.startswith("database ") for w in places)
    assert_no_participant_ids(settings, ids)
