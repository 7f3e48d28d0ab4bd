"""A registered BrainLM for tests that need one in a tracking store, without training it.

`register_fresh_model` writes a checkpoint of a freshly initialised model with the trainer's own writer
(`brainlm.checkpoint.save`) and registers it through `brainlm.registry.log_pretrained`, the path a pretraining
run takes, so the model in the store is exactly what training would have registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.entities.model_registry import ModelVersion

from brainlm import checkpoint, pipelines, registry
from brainlm.config import ModelConfig, Settings, TrainConfig, preset, to_dict
from brainlm.data.store import Cohort
from brainlm.engine import build_optimizer, build_scheduler
from brainlm.model import BrainLM


@dataclass
class Registered:
    version: ModelVersion
    model: BrainLM  # the registered weights, in eval mode
    cfg: ModelConfig
    run_id: str


def register_fresh_model(settings: Settings, cohort: Cohort, directory: Path, data_version: str | None = None,
                         seed: int = 1) -> Registered:
    """Register a freshly initialised tiny BrainLM over `cohort`'s atlas as the next version (@challenger)."""
    cfg, train_cfg = preset("tiny"), TrainConfig()
    torch.manual_seed(seed)
    model = BrainLM(cfg)
    optimizer = build_optimizer(model, train_cfg, "cpu")
    metrics = {"step": 1, "windows": 16, "val_masked_mse": 1.0}
    saved = checkpoint.save(directory, model, optimizer, build_scheduler(optimizer, train_cfg), step=1, windows=16,
                            model_cfg=cfg, train_cfg=train_cfg, metrics=metrics)
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, "fresh-model", {"model": to_dict(cfg)},
                                {"cohort": cohort.name}, settings=settings)
    registry.log_metrics(run_id, metrics, step=1, settings=settings)
    version = registry.log_pretrained(run_id, saved, cfg, pipelines.cohort_info(cohort), data_version,
                                      preset="tiny", settings=settings)
    registry.end_run(run_id, settings=settings)
    return Registered(version, model.eval(), cfg, run_id)
