"""Ray Train end to end: a 2-worker run survives an injected failure, and a second fit resumes the run.

Two Ray fits in all (each takes 20–60 s on 2 cores), sharing one Ray instance for the module.
"""

import dataclasses

import pytest
from fixtures_cohort import make_cohort  # tests/ is on sys.path: pytest inserts conftest.py's folder

from brainlm import checkpoint
from brainlm.config import TrainConfig, load_settings, preset
from brainlm.launcher import FAIL_ENV, fit, ray_runtime

pytestmark = pytest.mark.slow

MODEL = preset("tiny", window=60, mask_ratio=0.5)
TRAIN = TrainConfig(steps=9, eval_every=3, batch_size=4, lr=3e-3, num_workers=2, max_failures=1)
RUN = "resume-test"


@pytest.fixture(scope="module")
def ray_session():
    with ray_runtime(TRAIN):
        yield


@pytest.fixture(scope="module")
def failed_once(ray_session, tmp_path_factory):
    """A 9-step, 2-worker fit (evaluated every 3 steps) whose workers all raise at step 4 on the first attempt.

    The failure comes at the first evaluation point at or after step 4, i.e. after step 6's checkpoint.
    """
    root = tmp_path_factory.mktemp("ray_resume")
    cohort = make_cohort(root / "cohort", n_participants=10, parcels=16, timepoints=240)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_ENV, "4")
        result = fit(cohort, MODEL, TRAIN, settings=load_settings(root), run_name=RUN, storage_path=root / "ray",
                     on_evaluation=seen.append)
    return result, seen, cohort


def test_worker_failure_resumes_from_the_last_checkpoint(failed_once):
    result, seen, _ = failed_once
    steps = [h["step"] for h in result.history]
    assert steps == [3, 6, 9] and [m["step"] for m in seen] == [3, 6, 9]
    # Steps 1-6 ran in the first attempt; the restarted workers began from step 6's checkpoint, not from 0.
    assert [h["resumed_from"] for h in result.history] == [0, 0, 6]
    windows_per_step = TRAIN.batch_size * TRAIN.num_workers
    assert [h["windows"] for h in result.history] == [s * windows_per_step for s in steps]

    state = checkpoint.read_state(result.checkpoint_dir)
    assert state["step"] == 9 and result.metrics["steps"] == 9 and result.metrics["windows"] == 9 * windows_per_step
    assert len(list(result.checkpoint_dir.parent.glob("checkpoint_2*"))) == 2  # num_to_keep
    model, model_cfg, _ = checkpoint.load(result.checkpoint_dir)
    assert model_cfg == MODEL
    for key in ("train_masked_mse", "train_masked_r2", "val_masked_mse", "val_masked_r2", "val_zero_mse",
                "val_zero_r2", "windows_per_s"):
        assert result.metrics[key] == result.metrics[key], key  # present and not NaN


def test_second_fit_with_the_same_run_name_resumes_and_logs_to_mlflow(failed_once, home):
    from mlflow import MlflowClient

    from brainlm import registry

    first, _, cohort = failed_once
    storage = first.storage_path
    settings = load_settings()
    with pytest.raises(FileExistsError, match=RUN):
        fit(cohort, MODEL, TRAIN, settings=settings, run_name=RUN, storage_path=storage, resume=False)

    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "resume", params={}, tags={}, settings=settings)
    longer = dataclasses.replace(TRAIN, steps=11)
    result = fit(cohort, MODEL, longer, settings=settings, run_name=RUN, storage_path=storage, mlflow_run_id=run_id)

    assert [h["step"] for h in result.history] == [3, 6, 9, 11]  # the step counter runs on
    assert result.history[:3] == first.history  # carried over from the first fit's checkpoint
    assert result.history[3]["resumed_from"] == 9 and result.metrics["steps"] == 11
    assert result.metrics["windows"] == 11 * TRAIN.batch_size * TRAIN.num_workers

    client = MlflowClient(settings.tracking_uri())
    logged = client.get_metric_history(run_id, "val_masked_mse")
    assert [(m.step, m.value) for m in logged] == [(11, pytest.approx(result.metrics["val_masked_mse"]))]
    params = client.get_run(run_id).data.params
    assert params["train.steps"] == "11" and params["model.window"] == "60" and params["ray_run_name"] == RUN
