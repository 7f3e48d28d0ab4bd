"""The registry on a real SQLite MLflow store: log → register @challenger → promote @champion → load.

A registered model must come back bit-identical without a single pickle being read (its files are
safetensors, JSON/YAML and code only), and nothing MLflow stores may name a participant of its cohort.
"""

import os
import pickle
from pathlib import Path

import mlflow
import pytest
import torch
from fixtures_cohort import make_cohort

from brainlm import checkpoint as checkpoints
from brainlm import pipelines, registry
from brainlm.config import TrainConfig, load_settings, preset, to_dict
from brainlm.data.store import open_cohort
from brainlm.engine import build_optimizer, build_scheduler
from brainlm.model import BrainLM

PARCELS = 12
SAFE_SUFFIXES = {".safetensors", ".json", ".yaml", ".txt", ".py"}
SAFE_NAMES = {"MLmodel", "registered_model_meta"}  # YAML files without a suffix


@pytest.fixture
def cohort(home):
    path = make_cohort(load_settings().cohorts_dir / "fixture", n_participants=4, parcels=PARCELS, timepoints=200)
    return open_cohort(path)


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder written by the trainer's own writer, from a freshly initialised tiny model."""
    cfg, train_cfg = preset("tiny"), TrainConfig()
    torch.manual_seed(1)
    model = BrainLM(cfg)
    optimizer = build_optimizer(model, train_cfg, "cpu")
    scheduler = build_scheduler(optimizer, train_cfg)
    metrics = {"step": 10, "windows": 160, "lr": 1e-4, "val_masked_mse": 0.5, "val_masked_r2": 0.25,
               "val_zero_mse": 0.9}
    directory = checkpoints.save(tmp_path / "ckpt", model, optimizer, scheduler, step=10, windows=160,
                                 model_cfg=cfg, train_cfg=train_cfg, metrics=metrics)
    return directory, model.eval(), cfg


def forbid_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read while loading a registered model")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.slow
def test_register_promote_and_load_without_pickles(cohort, checkpoint, monkeypatch, tmp_path,
                                                  assert_no_participant_ids):
    settings = load_settings()
    directory, original, cfg = checkpoint
    name = settings.mlflow.pretrained_model

    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "registry-test", {"model": to_dict(cfg)},
                                {"cohort": cohort.name}, settings=settings)
    registry.log_metrics(run_id, {"val_masked_mse": 0.7, "note": "not a number"}, step=1, settings=settings)
    version = registry.log_pretrained(run_id, directory, cfg, pipelines.cohort_info(cohort), "md5abc@rev123",
                                      preset="tiny", settings=settings)
    registry.end_run(run_id, "FINISHED", settings=settings)
    # Logging a model used MLflow's process-wide tracking URI only while it ran: nothing was left behind
    # for later code (another home, a process started afterwards) to pick up.
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != settings.tracking_uri()

    assert (version.name, str(version.version), version.aliases) == (name, "1", ["challenger"])
    assert version.tags["data_version"] == "md5abc@rev123"
    assert version.tags["cohort"] == "fixture" and version.tags["preset"] == "tiny"
    assert float(version.tags["metric.val_masked_mse"]) == 0.5
    # the version carries quality metrics and how long the model trained, not bookkeeping such as the lr
    assert float(version.tags["metric.step"]) == 10 and float(version.tags["metric.windows"]) == 160
    assert "metric.lr" not in version.tags

    registry.promote(name, version.version, settings=settings)
    rows = registry.list_models(settings=settings)
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["version"], row["aliases"], row["run_id"]) == (name, "1", ["challenger", "champion"], run_id)
    assert (row["data_version"], row["cohort"], row["preset"]) == ("md5abc@rev123", "fixture", "tiny")
    assert row["metrics"]["val_masked_mse"] == 0.5 and row["metrics"]["val_zero_mse"] == 0.9
    assert row["created"].endswith("+00:00")

    # Only safetensors, JSON/YAML and code in the logged model: there is no pickle to read. (MLflow's own
    # functions resolve `models:/` URIs against the process-wide URI, which the registry leaves unset.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    names = sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file())
    assert "serving.py" in names and any(n.endswith("model.safetensors") for n in names)
    unsafe = [n for n in names if Path(n).suffix not in SAFE_SUFFIXES and Path(n).name not in SAFE_NAMES]
    assert not unsafe, f"unexpected files in the logged model: {unsafe}"

    # ...and loading (ours and MLflow's pyfunc) works with every unpickling entry point made to raise.
    forbid_unpickling(monkeypatch)
    loaded, loaded_cfg = registry.load_model(f"models:/{name}@champion", settings=settings)
    assert loaded_cfg == cfg
    assert registry.load_model(name, alias="challenger", settings=settings)[1] == cfg
    signals, coords = torch.randn(2, PARCELS, cfg.window), torch.from_numpy(cohort.atlas.coords)
    noise = torch.rand(2, PARCELS * cfg.patches_per_parcel)
    with torch.no_grad():
        assert torch.equal(original(signals, coords, noise=noise).pred, loaded(signals, coords, noise=noise).pred)
    assert torch.equal(original.embed(signals, coords).cls, loaded.embed(signals, coords).cls)

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = served.predict({"signals": signals.numpy(), "coords": cohort.atlas.coords})
    torch.testing.assert_close(torch.from_numpy(out["cls"]), original.embed(signals, coords).cls)

    with pytest.raises(registry.RegistryError, match="no version 7"):
        registry.promote(name, 7, settings=settings)
    with pytest.raises(registry.RegistryError, match="cannot resolve"):
        registry.load_model(name, alias="nobody", settings=settings)
    assert_no_participant_ids(settings, cohort.participants)


def test_participant_ids_are_refused_before_anything_is_logged(home):
    cohort = open_cohort(make_cohort(load_settings().cohorts_dir / "c", n_participants=3, parcels=4, timepoints=40))
    pipelines.check_no_participant_ids(cohort, {"model": {"layers": 2}, "note": "sub-00010 is someone else"})
    with pytest.raises(pipelines.PrivacyError, match="sub-0002"):
        pipelines.check_no_participant_ids(cohort, {"cohort": "fixture"}, {"tags": {"example": "run of sub-0002"}})
    with pytest.raises(pipelines.PrivacyError, match="sub-0003"):
        pipelines.check_no_participant_ids(cohort, {"runs": ["a", "x_sub-0003_y"]})
    with pytest.raises(pipelines.PrivacyError, match="sub-0001"):
        pipelines.check_no_participant_ids(cohort, {"sub-0001": "a key"})
