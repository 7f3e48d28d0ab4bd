"""A registered model's life in MLflow: a fit that raises leaves its run FAILED (and registers nothing); a newer
version promoted to champion takes the aliases off the older one."""

import pytest
import torch
from fixtures_cohort import make_cohort
from mlflow import MlflowClient

from brainlm import checkpoint, pipelines, registry
from brainlm.config import TrainConfig, load_settings, preset
from brainlm.data.store import open_cohort
from brainlm.engine import build_optimizer, build_scheduler
from brainlm.launcher import FAIL_ENV
from brainlm.model import BrainLM

pytestmark = pytest.mark.slow


@pytest.fixture
def cohort(home):
    return open_cohort(make_cohort(load_settings().cohorts_dir / "fixture", n_participants=6, parcels=8,
                                   timepoints=200))


def test_a_fit_that_raises_leaves_its_mlflow_run_failed(cohort, monkeypatch):
    settings = load_settings()
    # Every worker raises after step 1's checkpoint, and Ray Train may not restart them: the fit fails.
    monkeypatch.setenv(FAIL_ENV, "1")
    train_cfg = TrainConfig(steps=2, eval_every=1, batch_size=4, eval_crops=1, num_workers=1, max_failures=0)

    with pytest.raises(Exception, match=FAIL_ENV):
        pipelines.pretrain(cohort.path, "tiny", train_cfg, settings)

    client = MlflowClient(settings.tracking_uri())
    experiment = client.get_experiment_by_name(settings.mlflow.pretrain_experiment)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert registry.list_models(settings=settings) == []


def test_promoting_a_newer_version_takes_the_aliases_off_the_older_one(cohort, tmp_path):
    settings = load_settings()
    cfg, train_cfg = preset("tiny"), TrainConfig()
    model = BrainLM(cfg)
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    weights = checkpoint.save(tmp_path / "ckpt", model, optimizer, build_scheduler(optimizer, train_cfg), step=1,
                              windows=16, model_cfg=cfg, train_cfg=train_cfg, metrics={"val_masked_mse": 1.0})
    name = settings.mlflow.pretrained_model

    def register() -> str:
        run_id = registry.start_run(settings.mlflow.pretrain_experiment, "aliases", {}, {}, settings=settings)
        version = registry.log_pretrained(run_id, weights, cfg, pipelines.cohort_info(cohort), None, preset="tiny",
                                          settings=settings)
        registry.end_run(run_id, settings=settings)
        return str(version.version)

    def aliases() -> dict[str, list[str]]:
        return {row["version"]: row["aliases"] for row in registry.list_models(name, settings=settings)}

    first = register()
    registry.promote(name, first, settings=settings)
    assert aliases() == {first: ["challenger", "champion"]}

    second = register()  # a new version is the challenger
    assert aliases() == {first: ["champion"], second: ["challenger"]}

    registry.promote(name, second, settings=settings)
    assert aliases() == {first: [], second: ["challenger", "champion"]}
    assert str(MlflowClient(settings.tracking_uri()).get_model_version_by_alias(name, "champion").version) == second
