"""Ray Train end to end: a 2-worker run survives an injected failure, and a second fit resumes the run.

Two Ray fits in all (each takes 20–60 s on 2 cores), sharing one Ray instance for the module.
"""

import dataclasses

import pytest
from fixtures_cohort import make_cohort  # tests/ is on sys.path: pytest inserts conftest.py's folder

from brainlm.config import TrainConfig, preset
from brainlm.train import FAIL_ENV, fit, load_checkpoint, ray_runtime, read_state

pytestmark = pytest.mark.slow

MODEL = preset("tiny", window=60, mask_ratio=0.5)
TRAIN = TrainConfig(epochs=3, batch_size=4, crops_per_recording=2, lr=3e-3, num_workers=2, max_failures=1)
RUN = "resume-test"


@pytest.fixture(scope="module")
def ray_session():
    with ray_runtime(TRAIN):
        yield


@pytest.fixture(scope="module")
def failed_once(ray_session, tmp_path_factory):
    """A 3-epoch, 2-worker fit whose workers all raise at the start of epoch 2 on the first attempt."""
    root = tmp_path_factory.mktemp("ray_resume")
    cohort = make_cohort(root / "cohort", n_participants=10, parcels=16, timepoints=240)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINLM_HOME", str(root))
        mp.setenv(FAIL_ENV, "2")
        result = fit(cohort, MODEL, TRAIN, run_name=RUN, storage_path=root / "ray", on_epoch_end=seen.append)
    return result, seen, cohort


def test_worker_failure_resumes_from_the_last_checkpoint(failed_once):
    result, seen, _ = failed_once
    epochs = [h["epoch"] for h in result.history]
    assert epochs == [1, 2, 3] and [m["epoch"] for m in seen] == [1, 2, 3]
    # Epoch 1 ran in the first attempt; the restarted workers began from its checkpoint, not from scratch.
    assert [h["resumed_from"] for h in result.history] == [0, 1, 1]
    steps_per_epoch = result.history[0]["step"]
    assert steps_per_epoch > 0 and [h["step"] for h in result.history] == [steps_per_epoch * e for e in epochs]

    state = read_state(result.checkpoint_dir)
    assert state["epoch"] == 3 and result.metrics["epochs"] == 3 and result.metrics["steps"] == 3 * steps_per_epoch
    assert len(list(result.checkpoint_dir.parent.glob("checkpoint_2*"))) == 2  # num_to_keep
    model, model_cfg, _ = load_checkpoint(result.checkpoint_dir)
    assert model_cfg == MODEL
    for key in ("train_masked_mse", "train_masked_r2", "val_masked_mse", "val_masked_r2", "val_zero_mse",
                "windows_per_s"):
        assert result.metrics[key] == result.metrics[key], key  # present and not NaN


def test_second_fit_with_the_same_run_name_resumes_and_logs_to_mlflow(failed_once, home):
    from mlflow import MlflowClient

    from brainlm import registry
    from brainlm.config import load_settings

    first, _, cohort = failed_once
    storage = first.storage_path
    with pytest.raises(FileExistsError, match=RUN):
        fit(cohort, MODEL, TRAIN, run_name=RUN, storage_path=storage, resume=False)

    settings = load_settings()
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "resume", params={}, tags={})
    longer = dataclasses.replace(TRAIN, epochs=4)
    result = fit(cohort, MODEL, longer, run_name=RUN, storage_path=storage, mlflow_run_id=run_id)

    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[:3] == first.history  # carried over from the first fit's checkpoint
    assert result.history[3]["resumed_from"] == 3 and result.metrics["epochs"] == 4

    client = MlflowClient(settings.tracking_uri())
    logged = client.get_metric_history(run_id, "val_masked_mse")
    assert [(m.step, m.value) for m in logged] == [(4, pytest.approx(result.metrics["val_masked_mse"]))]
    params = client.get_run(run_id).data.params
    assert params["train.epochs"] == "4" and params["model.window"] == "60" and params["ray_run_name"] == RUN
