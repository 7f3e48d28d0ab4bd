"""The checkpoint format, in one place: a folder that holds a training run's state after some optimiser steps.

    <checkpoint>/
        model.safetensors   the BrainLM weights (raw tensors: loading runs no code)
        optimizer.pt        AdamW state   } tensors and numbers only, read back with
        scheduler.pt        LambdaLR state}  torch.load(weights_only=True)
        state.json          step, windows, metrics, history, model_config, train_config

The trainer writes one every evaluation period and resumes from one; the registry reads `state.json` for a
model's metrics and registers `model.safetensors`. Nothing here unpickles. Needs torch and safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from brainlm.config import ModelConfig, TrainConfig, from_dict, to_dict
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"


class CheckpointError(BrainLMError):
    """A folder that is not a brainlm checkpoint, or one that does not fit what it is loaded into."""


def save(directory: str | Path, model: BrainLM, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, *, step: int, windows: int, model_cfg: ModelConfig,
         train_cfg: TrainConfig, metrics: dict[str, float], history: list[dict] | None = None) -> Path:
    """Write a checkpoint folder after `step` optimiser steps that have seen `windows` training windows.

    `model` is the plain BrainLM (unwrap DDP / torch.compile first), so the weight names are the model's own.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    state = {
        "step": step, "windows": windows, "metrics": metrics, "history": history or [],
        "model_config": to_dict(model_cfg), "train_config": to_dict(train_cfg),
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """`state.json` of a checkpoint folder (step, windows, metrics, history, model_config, train_config)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {directory} is not a brainlm checkpoint folder")
    return json.loads(path.read_text())


def load_weights(model_cfg: ModelConfig, weights: str | Path, device: torch.device | str = "cpu") -> BrainLM:
    """BrainLM built from `model_cfg` with the safetensors weights at `weights`, in eval mode.

    Strict: every tensor name and shape must match the config, so a config and weights that do not belong
    together fail here rather than predicting nonsense.
    """
    model = BrainLM(model_cfg)
    try:
        model.load_state_dict(load_file(str(weights), device=str(device)))
    except RuntimeError as e:  # missing / unexpected keys or mismatched shapes
        raise CheckpointError(f"{weights} does not fit {model_cfg}: {e}") from e
    return model.to(device).eval()


def load(directory: str | Path, device: torch.device | str = "cpu") -> tuple[BrainLM, ModelConfig, dict]:
    """The model (in eval mode), its config and `state.json` from a checkpoint folder."""
    state = read_state(directory)
    model_cfg = from_dict(ModelConfig, state["model_config"])
    return load_weights(model_cfg, Path(directory) / MODEL_FILE, device), model_cfg, state


def restore(directory: str | Path, model: BrainLM, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, model_cfg: ModelConfig,
            device: torch.device | str) -> dict[str, Any]:
    """Load a checkpoint's weights, optimiser and schedule into the given objects (to resume); return its state.

    The model config must be the one the checkpoint was trained with; the training config may differ (e.g.
    more steps).
    """
    directory = Path(directory)
    state = read_state(directory)
    saved_cfg = from_dict(ModelConfig, state["model_config"])
    if saved_cfg != model_cfg:
        raise CheckpointError(f"checkpoint {directory} was trained with {saved_cfg}, not {model_cfg}: resuming "
                              f"needs the same model config; start a fresh run with a new run name instead")
    model.load_state_dict(load_file(directory / MODEL_FILE, device=str(device)))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
    return state
