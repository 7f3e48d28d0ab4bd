"""Task models on disk: safetensors + a JSON config, and back — the form they are registered and served in.

    config.json        {"task": "forecast" | "clinical", "kind": ..., "name": ..., ...the model's own config}
    model.safetensors  "module.<name>" for a torch model's state, "array.<name>" for a numpy model's parameters,
                       "backbone.<name>" for the frozen backbone an embedding model reads

`load_task_model` rebuilds any of them without unpickling anything; `TaskPredictor.predict` is what the served
model answers (brainlm/serving_tasks.py):

    forecast   {"context": (B, P, window − horizon), "coords": (P, 3)}  →  {"forecast": (B, P, horizon)}
    clinical   {"signals": (B, P, T), "coords": (P, 3)}                 →  {"score": (B,), "value": (B,)}
               score: the transformed target (classification: a logit / decision value, > 0 = class 1);
               value: back in the phenotype's units (classification: the 0/1 decision)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from brainlm.baselines.clinical import KernelModel, LinearModel, fc_features
from brainlm.baselines.forecast import LINEAR_FORECASTERS, NEURAL_FORECASTERS
from brainlm.tasks.common import TaskError, build_backbone

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_task_model(task: str, model: Any, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a fitted forecast / clinical model (FittedModel or ClinicalModel) as safetensors + config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if model.module is not None:
        tensors |= {f"module.{k}": v.detach().cpu().contiguous().clone() for k, v in model.module.state_dict().items()}
    tensors |= {f"array.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.arrays.items()}
    backbone = getattr(model, "backbone_state", None)
    if backbone is not None:
        tensors |= {f"backbone.{k}": v.detach().cpu().contiguous().clone() for k, v in backbone.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {"task": task, "kind": model.kind, "name": model.name, **model.config, **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_task_model(config_path: str | Path, weights_path: str | Path) -> TaskPredictor:
    config = json.loads(Path(config_path).read_text())
    tensors = load_file(str(weights_path))
    return TaskPredictor(config, tensors)


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class TaskPredictor:
    """A rebuilt task model: `predict(inputs)` with the inputs and outputs in the module docstring."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.config = config
        self.task, self.kind = config["task"], config["kind"]
        self.module = _build_module(config)
        if self.module is not None:
            self.module.load_state_dict(_part(tensors, "module."))  # strict: every key must fit the config
            self.module.eval()
        self.arrays = {k: v.numpy() for k, v in _part(tensors, "array.").items()}
        self.backbone = None
        if "backbone" in config and self.module is None:  # an embedding model reads a frozen backbone
            self.backbone = build_backbone(config["backbone"])
            self.backbone.load_state_dict(_part(tensors, "backbone."))
            self.backbone.eval()

    @torch.no_grad()
    def predict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        coords = torch.as_tensor(np.asarray(inputs["coords"], np.float32)) if "coords" in inputs else None
        if self.task == "forecast":
            return {"forecast": self._forecast(np.asarray(inputs["context"], np.float32), coords)}
        from brainlm.tasks.clinical import TargetTransform

        score = self._clinical(np.asarray(inputs["signals"], np.float32), coords)
        transform = TargetTransform.from_dict(self.config["target"])
        value = (score > 0).astype(np.float64) if self.config["task_type"] == "classification" else transform.inverse(score)
        return {"score": score.astype(np.float32), "value": value.astype(np.float32)}

    def _forecast(self, context: np.ndarray, coords: torch.Tensor | None) -> np.ndarray:
        if self.module is not None:
            return self.module(torch.from_numpy(context), coords).numpy()
        model = LINEAR_FORECASTERS[self.kind].from_arrays(self.config, self.arrays)
        return model.predict(context, int(self.config["horizon"]))

    def _clinical(self, signals: np.ndarray, coords: torch.Tensor | None) -> np.ndarray:
        if self.module is not None:
            return self.module(torch.from_numpy(signals), coords).numpy()
        if self.kind in ("ridge_embedding", "svr_embedding"):
            features = self.backbone.embed(torch.from_numpy(signals), coords, self.config["pooling"]).numpy()
        else:
            features = np.stack([fc_features(x) for x in signals])
        cls = LinearModel if self.kind.startswith("ridge") else KernelModel
        return cls.from_arrays(self.config, self.arrays).decision(features)


def _build_module(config: dict[str, Any]) -> nn.Module | None:
    """The torch module a config describes (randomly initialised), or None for array-only models."""
    kind = config["kind"]
    if config["task"] == "forecast":
        if kind == "backbone":
            from brainlm.tasks.forecast import BackboneForecaster

            return BackboneForecaster(build_backbone(config["backbone"]))
        if kind in NEURAL_FORECASTERS:
            cls = NEURAL_FORECASTERS[kind]
            return cls(**{k: config[k] for k in inspect.signature(cls).parameters})
        if kind in LINEAR_FORECASTERS:
            return None
    elif config["task"] == "clinical":
        if kind == "head":
            from brainlm.tasks.clinical import ClinicalHead

            return ClinicalHead(build_backbone(config["backbone"]), config["pooling"], int(config["hidden"]),
                                int(config["n_parcels"]))
        if kind in ("ridge_embedding", "svr_embedding", "svr_fc", "ridge_fc"):
            return None
    raise TaskError(f"unknown task model: task {config['task']!r}, kind {kind!r}")
