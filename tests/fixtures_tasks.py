"""Session fixtures for the task tests: a tiny BrainLM pretrained once per session on a synthetic population whose
answers are known (planted networks, dynamics, a block task, phenotype effects), registered per test in that
test's own MLflow store.

One population is split by subject into a task cohort and a pretraining cohort, so no subject a task runs on
was seen in pretraining. The model is pretrained by the training engine itself (its loaders, steps, evaluation
and checkpoint format, in process: `brainlm.engine.train_in_process`; the launcher is tested elsewhere). Every
setup trains the same architecture, `MODEL`, in one place; the setups differ in the population and the budget:

    DOWNSTREAM      forecasting and clinical prediction (tasks/test_downstream_science.py, flows/test_evaluate_flow.py),
                    gated promotion and the served deployments (flows/test_promotion.py, test_served_deployments.py)
    INTERPRETATION  networks, CLS-attention contrasts, perturbation (tasks/test_synthetic_answers.py,
                    flows/test_interpretation_cli.py): 48 parcels, so each planted network has several

`pretrained(SETUP)` (the session fixture) trains a setup on first use and returns the same result afterwards.
`untrained_checkpoint` is a setup's architecture never trained (a model that must lose); `register_pretrained`
registers a checkpoint in the current test's MLflow store.
Loaded by tests/conftest.py (`pytest_plugins`), so tests in tasks/ and flows/ share one pretraining per setup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_cohort import write_cohort

from brainlm import checkpoint
from brainlm.config import ModelConfig, SynthConfig, TrainConfig, preset
from brainlm.data.atlas import load_atlas
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import GroundTruth, load_ground_truth, synthesize
from brainlm.engine import build_optimizer, build_scheduler, train_in_process
from brainlm.model import BrainLM

# tiny, with a 100-TR window (5 patches: 80 context + 20 predicted TRs), mask 0.5 and a 64-wide decoder, which
# leaves the zero-prediction plateau in fewer steps than the preset's.
MODEL = preset("tiny", window=100, mask_ratio=0.5, decoder_hidden=64)


@dataclass(frozen=True)
class Setup:
    """A synthetic population, how many of its first subjects form the task cohort, and the pretraining budget
    (on the other subjects; `train.val_fraction` of those are held out to report how far pretraining got)."""

    synth: SynthConfig
    task_subjects: int
    train: TrainConfig
    model: ModelConfig = MODEL


# 60 subjects × 2 recordings of 400 TRs over 32 parcels (network-balanced), with low parcel noise so that a CI
# budget of pretraining leaves the zero-prediction plateau; 40 task subjects, 20 pretraining subjects.
DOWNSTREAM = Setup(
    synth=SynthConfig(subjects=60, timepoints=400, max_parcels=32, noise=0.2, seed=0),
    task_subjects=40,
    train=TrainConfig(steps=600, eval_every=600, lr=3e-3, batch_size=16, warmup_steps=30, val_fraction=0.1,
                      test_fraction=0.0, seed=0),
)
# 48 parcels: the seven Yeo networks with 5-6 parcels each (6 visual, the network the task drives) plus 10
# subcortical and cerebellar parcels that no Yeo network labels; every subject has a rest and a task recording;
# 24 task subjects, 12 pretraining subjects.
INTERPRETATION = Setup(
    synth=SynthConfig(subjects=36, timepoints=300, max_parcels=48, seed=0),
    task_subjects=24,
    train=TrainConfig(steps=1200, eval_every=1200, lr=3e-3, batch_size=16, warmup_steps=60, val_fraction=0.1,
                      test_fraction=0.0, seed=0),
)


@dataclass(frozen=True)
class Pretrained:
    source: Path  # the synthetic input folder (recordings, participants.tsv, atlas.tsv, ground truth)
    cohort_path: Path  # the task cohort (its subjects never pretrained the model)
    checkpoint: Path  # a trainer checkpoint folder (model.safetensors + state.json)
    seconds: float
    val_vs_zero: float  # held-out masked MSE of the pretrained model / that of predicting zero on the same masks

    def cohort(self) -> Cohort:
        return open_cohort(self.cohort_path)

    def model(self) -> BrainLM:
        """The pretrained model, in eval mode (a fresh copy: a test may not change what another reads)."""
        model, _, _ = checkpoint.load(self.checkpoint)
        return model

    @property
    def truth(self) -> GroundTruth:
        return load_ground_truth(self.source)


def synthetic_stores(root: Path, cfg: SynthConfig, task_subjects: int) -> tuple[Path, Path, Path]:
    """One synthetic population: (its input folder, the task cohort of the first subjects, the pretraining cohort
    of the others)."""
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
    return src, paths[0], paths[1]


def pretrain(root: Path, setup: Setup) -> Pretrained:
    """Synthesise and store `setup`'s population under `root` and pretrain `setup.model` on its pretraining cohort."""
    src, task_path, pretrain_path = synthetic_stores(root, setup.synth, setup.task_subjects)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than two threads fighting other processes on a 2-core machine
    try:
        run = train_in_process(open_cohort(pretrain_path), setup.model, setup.train)
    finally:
        torch.set_num_threads(threads)
    folder = checkpoint.save(root / "checkpoint", run.model, run.optimizer, run.scheduler,
                             step=run.metrics["step"], windows=run.metrics["windows"], model_cfg=setup.model,
                             train_cfg=setup.train, metrics=run.metrics)
    return Pretrained(src, task_path, folder, run.seconds, run.metrics["val_masked_mse"] / run.metrics["val_zero_mse"])


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Callable[[Setup], Pretrained]:
    """`pretrained(SETUP)`: the session's model pretrained on that setup, trained on first use."""
    trained: dict[Setup, Pretrained] = {}

    def get(setup: Setup) -> Pretrained:
        if setup not in trained:
            trained[setup] = pretrain(tmp_path_factory.mktemp("pretrained"), setup)
        return trained[setup]

    return get


def untrained_checkpoint(folder: Path, setup: Setup = DOWNSTREAM, seed: int = 1) -> Path:
    """A checkpoint of `setup`'s architecture as initialised, never trained (a model that must lose)."""
    torch.manual_seed(seed)
    model = BrainLM(setup.model)
    optimizer = build_optimizer(model, setup.train, "cpu")
    return checkpoint.save(folder, model, optimizer, build_scheduler(optimizer, setup.train), step=0, windows=0,
                           model_cfg=setup.model, train_cfg=setup.train, metrics={})


def register_pretrained(pretrained: Pretrained, settings, checkpoint_dir: Path | None = None,
                        alias: str | None = None) -> str:
    """Register the session's checkpoint (or another of its architecture, e.g. `untrained_checkpoint`'s) in the
    current test's MLflow store, as trained on the pretraining cohort, aliased challenger (and `alias` if given);
    returns its models:/ URI."""
    from brainlm import pipelines, registry

    folder = checkpoint_dir or pretrained.checkpoint
    model_cfg = checkpoint.load(folder)[1]
    cohort = open_cohort(pretrained.checkpoint.parent / "pretrain")
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "fixture-pretrain", {}, {}, settings=settings)
    version = registry.log_pretrained(run_id, folder, model_cfg, pipelines.cohort_info(cohort), None, preset="tiny",
                                      settings=settings)
    registry.end_run(run_id, "FINISHED", settings=settings)
    if alias:
        registry.promote(version.name, version.version, alias, settings=settings)
    return f"models:/{version.name}@{alias or settings.mlflow.new_alias}"
