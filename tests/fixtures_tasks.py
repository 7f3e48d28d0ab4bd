"""Session fixtures for the downstream tasks: a synthetic cohort with planted dynamics and phenotypes, and a tiny
BrainLM pretrained on it once per test session (a plain torch loop with the trainer's own step and checkpoint
writer: the Ray launcher is tested elsewhere), registered per test in that test's own MLflow store.

Loaded by tests/conftest.py (`pytest_plugins`), so tests in tasks/ and flows/ share one pretraining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_cohort import write_cohort

from brainlm.config import SynthConfig, TrainConfig, preset
from brainlm.data.atlas import load_atlas
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import synthesize
from brainlm.model import BrainLM
from brainlm.tasks.common import crop_batches
from brainlm.train import build_optimizer, lr_lambda, save_checkpoint, train_step

# One synthetic population (same dynamics, same phenotype effects): 60 subjects × 2 recordings of 400 TRs over 32
# parcels (network-balanced), with low parcel noise so that a CI budget of pretraining leaves the
# zero-prediction plateau. The first TASK_SUBJECTS form the task cohort; the others only pretrain, so no test
# subject of a task was ever seen by the pretrained model.
SCIENCE_SYNTH = SynthConfig(subjects=60, timepoints=400, max_parcels=32, noise=0.2, seed=0)
TASK_SUBJECTS = 40
# tiny, with a 100-TR window (5 patches: 80 context + 20 predicted TRs) and a 64-wide decoder, which leaves the
# plateau in fewer steps (see /work/shared notes on pretraining dynamics); mask 0.5.
SCIENCE_MODEL = preset("tiny", window=100, mask_ratio=0.5, decoder_hidden=64)
SCIENCE_TRAIN = TrainConfig(lr=3e-3, batch_size=16, warmup_fraction=0.05, seed=0)
PRETRAIN_STEPS = 600


@dataclass(frozen=True)
class Pretrained:
    cohort_path: Path  # the task cohort (its subjects never pretrained the model)
    checkpoint: Path  # a trainer checkpoint folder (model.safetensors + state.json)
    seconds: float

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
        optimizer = build_optimizer(model, SCIENCE_TRAIN, "cpu")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(PRETRAIN_STEPS, SCIENCE_TRAIN))
        coords = torch.as_tensor(cohort.atlas.coords)
        batches = crop_batches(cohort, cohort.recording_ids, SCIENCE_MODEL.window, 8, SCIENCE_TRAIN.batch_size, 1)
        start = time.perf_counter()
        for _ in range(PRETRAIN_STEPS):
            train_step(model, next(batches), coords, optimizer, schedule, SCIENCE_TRAIN, torch.device("cpu"))
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    checkpoint = save_checkpoint(root / "checkpoint", model, optimizer, schedule, 1, PRETRAIN_STEPS, SCIENCE_MODEL,
                                 SCIENCE_TRAIN, {"train_loss": 0.0})
    return Pretrained(task_path, checkpoint, seconds)


def register_pretrained(pretrained: Pretrained, settings) -> str:
    """Register the session's checkpoint in the current test's MLflow store; returns its models:/ URI."""
    from brainlm import pipelines, registry

    cohort = open_cohort(pretrained.checkpoint.parent / "pretrain")
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "fixture-pretrain", {}, {}, settings)
    version = registry.log_pretrained(run_id, pretrained.checkpoint, SCIENCE_MODEL, pipelines.cohort_info(cohort),
                                      None, preset="tiny", settings=settings)
    registry.end_run(run_id, "FINISHED", settings)
    return f"models:/{version.name}@{settings.mlflow.new_alias}"
