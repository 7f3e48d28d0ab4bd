"""Session fixtures for the downstream tasks: a synthetic cohort with planted dynamics and phenotypes, and a tiny
BrainLM pretrained on it once per test session (the training engine's own loaders, steps, evaluation and
checkpoint format, without Ray: the launcher is tested elsewhere), registered per test in that test's own MLflow
store.

Loaded by tests/conftest.py (`pytest_plugins`), so tests in tasks/ and flows/ share one pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_cohort import write_cohort

from brainlm import checkpoint
from brainlm.config import SynthConfig, TrainConfig, preset
from brainlm.data.atlas import load_atlas
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import synthesize
from brainlm.engine import build_optimizer, build_scheduler, evaluate, make_loaders, train_steps
from brainlm.model import BrainLM

# One synthetic population (same dynamics, same phenotype effects): 60 subjects × 2 recordings of 400 TRs over 32
# parcels (network-balanced), with low parcel noise so that a CI budget of pretraining leaves the
# zero-prediction plateau. The first TASK_SUBJECTS form the task cohort; the others only pretrain, so no test
# subject of a task was ever seen by the pretrained model.
SCIENCE_SYNTH = SynthConfig(subjects=60, timepoints=400, max_parcels=32, noise=0.2, seed=0)
TASK_SUBJECTS = 40
# tiny, with a 100-TR window (5 patches: 80 context + 20 predicted TRs), mask 0.5 and a 64-wide decoder, which
# leaves the zero-prediction plateau in fewer steps than the preset's.
SCIENCE_MODEL = preset("tiny", window=100, mask_ratio=0.5, decoder_hidden=64)
# 2 of the 20 pretraining subjects are held out to report how far pretraining got (val masked MSE / predicting 0).
SCIENCE_TRAIN = TrainConfig(steps=600, lr=3e-3, batch_size=16, warmup_steps=30, val_fraction=0.1, test_fraction=0.0,
                            seed=0)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Pretrained:
    cohort_path: Path  # the task cohort (its subjects never pretrained the model)
    checkpoint: Path  # a trainer checkpoint folder (model.safetensors + state.json)
    seconds: float
    val_vs_zero: float  # held-out masked MSE of the pretrained model / that of predicting zero on the same masks

    def cohort(self) -> Cohort:
        return open_cohort(self.cohort_path)


def synthetic_stores(root: Path, cfg: SynthConfig, task_subjects: int) -> tuple[Path, Path]:
    """One synthetic population stored as two cohorts: (task cohort of the first subjects, pretraining cohort)."""
    src = synthesize(root / "raw", cfg)
    phenotypes = pd.read_csv(src / "participants.tsv", sep="\t")
    task_ids = set(phenotypes["participant_id"][:task_subjects])
    paths = []
    for name, keep in (("task", lambda p: p in task_ids), ("pretrain", lambda p: p not in task_ids)):
        recordings, rows = {}, []
        for file in sorted(src.glob("sub-*.npy")):
            participant, condition = file.stem.split("_")[0], file.stem.split("_")[1].removeprefix("task-")
            if keep(participant):
                recordings[file.stem] = np.load(file)
                rows.append({"recording": file.stem, "participant": participant, "condition": condition})
        people = phenotypes[phenotypes["participant_id"].map(keep)]
        paths.append(write_cohort(root / name, recordings, pd.DataFrame(rows), load_atlas(src / "atlas.tsv"), people))
    return paths[0], paths[1]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin against other processes (several times
    slower), and the tasks' small models gain nothing from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Pretrained:
    root = tmp_path_factory.mktemp("pretrained")
    task_path, pretrain_path = synthetic_stores(root, SCIENCE_SYNTH, TASK_SUBJECTS)
    cohort = open_cohort(pretrain_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than two threads fighting other processes on a 2-core machine
    try:
        torch.manual_seed(0)
        model = BrainLM(SCIENCE_MODEL)
        optimizer = build_optimizer(model, SCIENCE_TRAIN, CPU)
        scheduler = build_scheduler(optimizer, SCIENCE_TRAIN)
        loaders = make_loaders(cohort, SCIENCE_MODEL, SCIENCE_TRAIN, CPU)
        coords = torch.as_tensor(cohort.atlas.coords)
        loss, seconds = train_steps(model, iter(loaders.train), SCIENCE_TRAIN.steps, coords, optimizer, scheduler,
                                    SCIENCE_TRAIN, CPU)
        metrics = {"train_loss": loss, **{f"val_{k}": v for k, v in evaluate(model, loaders.val, coords, CPU,
                                                                            SCIENCE_MODEL.mask_ratio).items()}}
    finally:
        torch.set_num_threads(threads)
    folder = checkpoint.save(root / "checkpoint", model, optimizer, scheduler, step=SCIENCE_TRAIN.steps,
                             windows=SCIENCE_TRAIN.steps * SCIENCE_TRAIN.batch_size, model_cfg=SCIENCE_MODEL,
                             train_cfg=SCIENCE_TRAIN, metrics=metrics)
    return Pretrained(task_path, folder, seconds, metrics["val_masked_mse"] / metrics["val_zero_mse"])


def untrained_checkpoint(folder: Path, seed: int = 1) -> Path:
    """A checkpoint of the session model's architecture as initialised, never trained (a model that must lose)."""
    torch.manual_seed(seed)
    model = BrainLM(SCIENCE_MODEL)
    optimizer = build_optimizer(model, SCIENCE_TRAIN, CPU)
    return checkpoint.save(folder, model, optimizer, build_scheduler(optimizer, SCIENCE_TRAIN), step=0, windows=0,
                           model_cfg=SCIENCE_MODEL, train_cfg=SCIENCE_TRAIN, metrics={})


def register_pretrained(pretrained: Pretrained, settings, checkpoint_dir: Path | None = None) -> str:
    """Register the session's checkpoint (or another of its architecture, e.g. `untrained_checkpoint`'s) in the
    current test's MLflow store, as trained on the pretraining cohort; returns its models:/ URI (@challenger)."""
    from brainlm import pipelines, registry

    cohort = open_cohort(pretrained.checkpoint.parent / "pretrain")
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "fixture-pretrain", {}, {}, settings=settings)
    version = registry.log_pretrained(run_id, checkpoint_dir or pretrained.checkpoint, SCIENCE_MODEL,
                                      pipelines.cohort_info(cohort), None, preset="tiny", settings=settings)
    registry.end_run(run_id, "FINISHED", settings=settings)
    return f"models:/{version.name}@{settings.mlflow.new_alias}"
