"""What the downstream tasks share: the backbone a task fine-tunes, windows, the training loop, metrics, tables.

    Backbone (nn.Module)   forecast(context, coords) -> the next patch      embed(signals, coords, pooling) -> (B, D)
      ├─ BrainLMBackbone     a registered / pretrained BrainLM (or a fresh one: the `scratch` model)
      └─ ViTMAEBackbone      a released Hugging Face ViTMAE checkpoint (brainlm/released.py)

Every neural model trains as pretraining does (brainlm/engine.py): a fixed number of optimiser steps, each on a
batch of `RandomCrops` drawn by `StepSampler`, with the engine's AdamW and warmup + cosine schedule (the
pretrained encoder may get a smaller learning rate than the new parts). Every task model is an nn.Module or a
small numpy model whose parameters are plain arrays, so each one is saved as safetensors + a JSON config
(brainlm/tasks/saved.py) and never pickled. This module needs torch, numpy and pandas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from brainlm.config import POOLINGS, ModelConfig, TrainConfig, from_dict, to_dict
from brainlm.data.store import Cohort, CohortError
from brainlm.engine import StepSampler, build_optimizer, build_scheduler
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

Progress = Callable[[str], None]


class TaskError(BrainLMError):
    """A task that cannot run on this cohort or model as asked (too few subjects, missing phenotype, ...)."""


# ------------------------------------------------------------------------------------------ backbones


class BrainLMBackbone(nn.Module):
    """A BrainLM as a task backbone: the last patch of every parcel masked for forecasting; CLS / mean tokens."""

    kind = "brainlm"

    def __init__(self, model: BrainLM):
        super().__init__()
        self.model = model
        self.window = model.cfg.window
        self.horizon = model.cfg.patch_size
        self.embed_dim = model.cfg.hidden
        self.n_parcels: int | None = None  # any parcel count

    def forecast(self, context: Tensor, coords: Tensor) -> Tensor:
        """context (B, P, window − horizon) → the next `horizon` TRs (B, P, horizon).

        The horizon's tokens are masked: the encoder sees only the context, and the decoder fills the masked
        tokens in, as in pretraining. The masked slots hold zeros, so nothing of the future can reach the model.
        """
        B, P, _ = context.shape
        n = self.window // self.horizon
        signals = torch.cat([context, context.new_zeros(B, P, self.horizon)], dim=-1)
        noise = torch.zeros(B, P, n, device=context.device)
        noise[:, :, -1] = 1.0  # the largest noise is masked first: exactly the last patch of every parcel
        out = self.model(signals, coords, mask_ratio=1.0 / n, noise=noise.reshape(B, P * n))
        return out.pred[:, :, -1, :]

    def embed(self, signals: Tensor, coords: Tensor, pooling: str) -> Tensor:
        """Unmasked encoding (with gradients, for fine-tuning), pooled as `pool` says."""
        latent, _, _, _ = self.model.forward_encoder(signals, coords, 0.0)
        return pool(latent, pooling, signals.shape[1])

    def pooled_size(self, pooling: str, n_parcels: int) -> int:
        return pooled_size(pooling, self.embed_dim, n_parcels)

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "model": to_dict(self.model.cfg)}

    @staticmethod
    def is_encoder(name: str) -> bool:
        """Whether parameter `name` (of this module) belongs to the encoder rather than the decoder."""
        return not name.startswith(("model.decoder", "model.mask_token"))


def pool(latent: Tensor, pooling: str, groups: int) -> Tensor:
    """(B, 1 + L, D) encoder output, CLS first, tokens in spatial-group-major order → (B, features).

    cls           the CLS embedding (B, D): the recording-level token
    mean          the mean token embedding (B, D)
    connectivity  second-order pooling: each spatial group's (parcel's) mean token embedding, centred over the
                  groups, and the cosine similarity of every pair of groups — the upper triangle, (B, G(G−1)/2).
                  A phenotype that lives in how regions co-vary is not a first-order summary of the tokens.
    """
    if pooling == "cls":
        return latent[:, 0]
    if pooling == "mean":
        return latent[:, 1:].mean(dim=1)
    if pooling == "connectivity":
        B, L, D = latent[:, 1:].shape
        regions = latent[:, 1:].reshape(B, groups, L // groups, D).mean(dim=2)
        regions = F.normalize(regions - regions.mean(dim=1, keepdim=True), dim=-1)
        similarity = regions @ regions.transpose(1, 2)
        upper = torch.triu_indices(groups, groups, offset=1, device=latent.device)
        return similarity[:, upper[0], upper[1]]
    raise TaskError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")


def pooled_size(pooling: str, dim: int, groups: int) -> int:
    return groups * (groups - 1) // 2 if pooling == "connectivity" else dim


def build_backbone(description: dict[str, Any]) -> nn.Module:
    """A freshly initialised backbone from `describe()`'s output (weights are loaded by the caller)."""
    if description["type"] == BrainLMBackbone.kind:
        return BrainLMBackbone(BrainLM(from_dict(ModelConfig, description["model"])))
    if description["type"] == "vitmae":
        from brainlm.released import ViTMAEBackbone

        return ViTMAEBackbone.from_description(description)
    raise TaskError(f"unknown backbone type {description['type']!r}")


def fresh_copy(backbone: nn.Module) -> nn.Module:
    """The same architecture, randomly initialised: the `scratch` reference."""
    return build_backbone(backbone.describe())


def check_backbone_fits(backbone: nn.Module, cohort: Cohort) -> None:
    """Refuse a cohort whose parcels or recording lengths the backbone cannot read, naming both."""
    if backbone.n_parcels is not None and backbone.n_parcels != cohort.n_parcels:
        raise TaskError(f"the model reads {backbone.n_parcels} parcels but cohort {cohort.path} has "
                        f"{cohort.n_parcels} (atlas {cohort.atlas.name}); use a cohort on that atlas")
    short = [r for r in cohort.recording_ids if cohort.timepoints(r) < backbone.window]
    if short:
        raise CohortError(f"cohort {cohort.path}: {len(short)} recording(s) shorter than the model's "
                          f"{backbone.window}-TR window, e.g. {', '.join(short[:3])}")


# -------------------------------------------------------------------------------------------- windows


@dataclass
class Windows:
    """Fixed windows of recordings: signals (n, P, W) float32 and, per window, its recording's row."""

    signals: np.ndarray
    recording: np.ndarray  # (n,) index into `recording_ids`
    recording_ids: list[str]


def sample_recordings(recording_ids: list[str], count: int | None, seed: int) -> list[str]:
    """All of `recording_ids`, or a seeded sample of `count` of them, in their order."""
    if count is None or count >= len(recording_ids):
        return list(recording_ids)
    chosen = np.random.default_rng(seed).choice(len(recording_ids), size=count, replace=False)
    return [recording_ids[i] for i in sorted(chosen)]


def cut_windows(recording: np.ndarray, window: int, *, stride: int | None = None, per_recording: int | None = None,
                max_windows: int | None = None) -> np.ndarray:
    """(n, P, window) float32 windows of one parcels × time recording, at fixed starts.

    Starts every `stride` TRs from TR 0 (default: back to back, so window w covers the same TRs of every
    recording and a task design stays aligned), or `per_recording` evenly spaced ones (first and last
    included); `max_windows` keeps the first ones. Any length >= window works; one window long gives one window.
    """
    last = recording.shape[1] - window
    if last < 0:
        raise TaskError(f"a recording of {recording.shape[1]} TRs is shorter than the model's {window}-TR window")
    if per_recording is not None:
        starts = np.unique(np.linspace(0, last, per_recording).round().astype(int))
    else:
        starts = np.arange(0, last + 1, stride or window)
    return np.stack([np.array(recording[:, s : s + window], dtype=np.float32) for s in starts[:max_windows]])


def fixed_windows(cohort: Cohort, recording_ids: list[str], window: int, *, stride: int | None = None,
                  per_recording: int | None = None, max_windows: int | None = None) -> Windows:
    """`cut_windows` of every recording in `recording_ids`, with the recording each window came from."""
    signals, owner = [], []
    for row, rid in enumerate(recording_ids):
        x = cohort.recording(rid)
        if x.shape[1] < window:
            raise CohortError(f"cohort {cohort.path}: recording {rid} has {x.shape[1]} TRs, fewer than the "
                              f"{window}-TR window")
        cut = cut_windows(x, window, stride=stride, per_recording=per_recording, max_windows=max_windows)
        signals.append(cut)
        owner += [row] * len(cut)
    if not signals:
        raise TaskError(f"cohort {cohort.path}: no recordings to cut windows from")
    return Windows(np.concatenate(signals), np.array(owner), list(recording_ids))


# ------------------------------------------------------------------------------------------- training


def fine_tuning(cfg: Any) -> TrainConfig:
    """The pretraining engine's settings for a task's budget (ForecastConfig / ClinicalConfig): its steps, batch,
    peak lr, warmup, weight decay, clipping and seed; AdamW's betas and the cosine floor are pretraining's."""
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed)


def step_batches(dataset: Dataset, cfg: TrainConfig) -> Iterator[Any]:
    """One batch per optimiser step, `cfg.steps` in all: items 0, 1, 2, ... of a dataset whose item k is a
    random draw fixed by (seed, k), such as the engine's `RandomCrops` (as in pretraining: no epochs)."""
    return iter(DataLoader(dataset, batch_size=cfg.batch_size, sampler=StepSampler(0, cfg.steps, cfg.batch_size)))


class Labelled(Dataset):
    """`RandomCrops` with each crop's label: item k is (crop k, the label of the recording it was cut from)."""

    def __init__(self, crops: Dataset, labels: dict[str, float]):
        self.crops, self.labels = crops, labels

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        recording_id, _ = self.crops.locate(k)
        return self.crops[k], torch.tensor(self.labels[recording_id], dtype=torch.float32)


def encoder_lr(module: nn.Module, scale: float) -> Callable[[str], float]:
    """`build_optimizer`'s lr scale for a task module holding a pretrained backbone as `module.backbone`:
    `scale` for the backbone's encoder, 1 for the rest (its decoder, new heads). A scale of 0 freezes the
    encoder (its parameters stop requiring gradients, so the optimiser leaves them out)."""
    def is_encoder(name: str) -> bool:
        return name.startswith("backbone.") and module.backbone.is_encoder(name.removeprefix("backbone."))

    if scale == 0:
        for name, p in module.named_parameters():
            if is_encoder(name):
                p.requires_grad_(False)
    return lambda name: scale if is_encoder(name) else 1.0


def fit_steps(name: str, module: nn.Module, loss_fn: Callable[[Any], Tensor], batches: Iterator[Any],
              cfg: TrainConfig, device: str, progress: Progress,
              lr_scale: Callable[[str], float] | None = None) -> list[float]:
    """`cfg.steps` optimiser steps with the pretraining engine's AdamW and schedule; returns the loss per step.

    Every neural model of a comparison goes through this one loop. Prints about ten progress lines.
    """
    module.train()
    optimizer = build_optimizer(module, cfg, device, lr_scale)
    scheduler = build_scheduler(optimizer, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    start, every = time.perf_counter(), max(1, cfg.steps // 10)
    for step, batch in enumerate(batches):
        loss = loss_fn(batch)  # full precision: the task models are small, and an ODE solve is touchy in bf16
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            recent = np.mean(losses[-every:])
            progress(f"  {name:<12} step {step + 1:>5}/{cfg.steps}  loss {recent:.4f}  "
                     f"({time.perf_counter() - start:.0f} s)")
    module.eval()
    return losses


@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], inputs: np.ndarray, batch_size: int, device: str = "cpu") -> np.ndarray:
    """Apply `fn` to `inputs` in batches without gradients; numpy in, numpy out."""
    outs = [fn(torch.from_numpy(inputs[i : i + batch_size]).to(device)).float().cpu().numpy()
            for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs)


# -------------------------------------------------------------------------------------------- metrics


def r2_score(target: np.ndarray, pred: np.ndarray) -> float:
    """1 − SSE / SS around the targets' mean; 0 = as good as predicting that mean."""
    target, pred = np.asarray(target, np.float64), np.asarray(pred, np.float64)
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1 - ((target - pred) ** 2).sum() / max(ss_tot, 1e-12))


def mean_ci(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a t-interval of the mean across folds."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------------------------- tables


def table_text(table: pd.DataFrame, floatfmt: str = ".4f", formats: dict[str, str] | None = None) -> str:
    """A table as aligned plain text: the index first (one row per model, method, network...), then one
    column per metric; numbers in `floatfmt`, or in `formats[column]` (e.g. ".3g" for p-values)."""
    formats = formats or {}
    cells = [[str(c) for c in [table.index.name or "model", *table.columns]]]
    for name, row in table.iterrows():
        cells.append([str(name), *(_fmt(v, formats.get(c, floatfmt)) for c, v in row.items())])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def table_markdown(table: pd.DataFrame, floatfmt: str = ".4f") -> str:
    header = [table.index.name or "model", *map(str, table.columns)]
    rows = [[str(name), *(_fmt(v, floatfmt) for v in row)] for name, row in table.iterrows()]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if not np.isfinite(value) else format(value, floatfmt)
    return str(value)
