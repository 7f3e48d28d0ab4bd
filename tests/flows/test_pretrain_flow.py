"""The `pretrain` flow end to end on a tiny cohort (real Prefect, Ray Train and MLflow), and its refusals."""

import re

import pandas as pd
import pytest
from fixtures_cohort import make_cohort
from fixtures_prefect import flow_run_states
from mlflow import MlflowClient

from brainlm import pipelines, registry
from brainlm.config import load_settings, preset
from brainlm.data.store import CohortError, open_cohort


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_pretrain_flow_registers_a_challenger(home, assert_no_participant_ids):
    from flows.pretrain import pretrain

    settings = load_settings()
    cohort = open_cohort(make_cohort(settings.cohorts_dir / "fixture", n_participants=8, parcels=16, timepoints=240))

    state = pretrain(cohort="fixture", preset="tiny", steps=5, eval_every=3, batch_size=8, num_workers=1, lr=1e-3,
                     betas=[0.8, 0.9], use_gpu=False, return_state=True)
    result = state.result()

    # Prefect ran it: the flow run and a task run per step, COMPLETED, as its API reports them.
    tasks = dict.fromkeys(["load cohort", "check shape", "train", "register"], "COMPLETED")
    assert flow_run_states(state.state_details.flow_run_id) == ("pretrain", "COMPLETED", tasks)

    assert isinstance(result, pipelines.PretrainResult)
    assert (result.model_name, result.version, result.alias) == (settings.mlflow.pretrained_model, "1", "challenger")
    assert (result.checkpoint_dir / "model.safetensors").is_file()
    [row] = registry.list_models(settings=settings)
    assert (row["version"], row["aliases"], row["run_id"]) == ("1", ["challenger"], result.run_id)
    assert (row["cohort"], row["preset"], row["data_version"]) == ("fixture", "tiny", registry.UNVERSIONED)
    assert row["metrics"]["step"] == 5 and row["metrics"]["windows"] == 40 and row["metrics"]["val_masked_mse"] > 0
    assert "trained     5 optimiser steps, 40 windows" in result.summary()
    # The references, scored on the model's masks, beside the model: on the version, in the summary, in words.
    for name in ("zero", "spatial", "temporal"):
        assert row["metrics"][f"val_{name}_mse"] == result.metrics[f"val_{name}_mse"] > 0
        assert f"{name} {result.metrics[f'val_{name}_mse']:.4f}" in result.summary()
    assert row["metrics"]["val_spatial_mse"] < row["metrics"]["val_zero_mse"]  # latent mixtures: parcels predict
    assert "does NOT beat the spatial reference" in result.summary()  # 5 steps learn nothing

    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden"] == str(preset("tiny").hidden) and params["train.steps"] == "5"
    assert (params["train.lr"], params["train.betas"], params["train.eval_every"]) == ("0.001", "[0.8, 0.9]", "3")
    assert run.data.tags["cohort"] == "fixture" and run.data.tags["preset"] == "tiny"
    # one point per evaluation (every 3 steps and the last), logged by the Ray worker from the run id + settings
    assert [m.step for m in client.get_metric_history(result.run_id, "val_masked_mse")] == [3, 5]
    spatial = client.get_metric_history(result.run_id, "val_spatial_mse")  # scored once, logged every time
    assert [m.step for m in spatial] == [3, 5] and spatial[0].value == spatial[1].value
    assert_no_participant_ids(settings, cohort.participants)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_pretrain_flow_on_a_missing_cohort_names_its_path(home):
    from flows.pretrain import pretrain

    missing = load_settings().cohorts_dir / "nowhere"
    with pytest.raises(CohortError, match=re.escape(str(missing))):
        pretrain(cohort="nowhere")


def test_pretrain_on_a_missing_or_empty_cohort_names_its_path(home, tmp_path):
    with pytest.raises(CohortError, match=re.escape(str(tmp_path / "absent"))):
        pipelines.pretrain(tmp_path / "absent")
    empty = make_cohort(tmp_path / "empty", n_participants=3, parcels=4, timepoints=40)
    pd.DataFrame(columns=pd.read_csv(empty / "manifest.csv").columns).to_csv(empty / "manifest.csv", index=False)
    with pytest.raises(CohortError, match=re.escape(f"cohort {empty} has no recordings")):
        pipelines.pretrain(empty)
    assert not (home / ".brainlm" / "mlflow.db").exists()  # refused before any run was opened


def test_check_cohort_refuses_recordings_shorter_than_the_window(tmp_path):
    cohort = open_cohort(make_cohort(tmp_path / "short", n_participants=3, parcels=4, timepoints=150))
    with pytest.raises(CohortError, match=re.escape(f"cohort {cohort.path}: 3 recording(s) shorter than the "
                                                    f"model's 200-TR window")):
        pipelines.check_cohort(cohort, preset("tiny"))
    pipelines.check_cohort(cohort, preset("tiny", window=100))
