"""What the downstream tasks share: the backbone a task fine-tunes, windows, the training loop, metrics, tables.

    Backbone (nn.Module)   forecast(context, coords) -> the next patch      embed(signals, coords, pooling) -> (B, D)
      ├─ BrainLMBackbone     a registered / pretrained BrainLM (or a fresh one: the `scratch` model)
      └─ ViTMAEBackbone      a released Hugging Face ViTMAE checkpoint (brainlm/released.py)

Every task model is an nn.Module or a small numpy model whose parameters are plain arrays, so each one is saved
as safetensors + a JSON config (brainlm/tasks/saved.py) and never pickled. This module needs torch and numpy.
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
from torch.utils.data import DataLoader

from brainlm.config import ModelConfig, from_dict, to_dict
from brainlm.data.store import Cohort, CohortError
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


POOLINGS = ("cls", "mean", "connectivity")


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


def fixed_windows(cohort: Cohort, recording_ids: list[str], window: int, *, stride: int | None = None,
                  per_recording: int | None = None) -> Windows:
    """Windows at fixed starts: every `stride` TRs, or `per_recording` evenly spaced ones (first and last included).

    Works for any recording length >= window; a recording exactly one window long gives one window.
    """
    signals, owner = [], []
    for row, rid in enumerate(recording_ids):
        x = cohort.recording(rid)
        last = x.shape[1] - window
        if last < 0:
            raise CohortError(f"cohort {cohort.path}: recording {rid} has {x.shape[1]} TRs, fewer than the "
                              f"{window}-TR window")
        if per_recording is not None:
            starts = np.unique(np.linspace(0, last, per_recording).round().astype(int))
        else:
            starts = np.arange(0, last + 1, stride or window)
        for s in starts:
            signals.append(np.array(x[:, s : s + window], dtype=np.float32))
            owner.append(row)
    if not signals:
        raise TaskError(f"cohort {cohort.path}: no recordings to cut windows from")
    return Windows(np.stack(signals), np.array(owner), list(recording_ids))


def crop_batches(cohort: Cohort, recording_ids: list[str], window: int, crops_per_recording: int,
                 batch_size: int, seed: int) -> Iterator[Tensor]:
    """An endless stream of shuffled batches of random training crops (B, P, window), a new draw each pass."""
    dataset = cohort.window_dataset(recording_ids, window, crops_per_recording, seed)
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
                            generator=generator)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------------------- training


Named = list[tuple[str, nn.Parameter]]


def split_encoder(module: nn.Module, backbone: nn.Module | None, encoder_scale: float) -> list[tuple[Named, float]]:
    """(parameters, lr scale) groups of `module`: the backbone's encoder at `encoder_scale`, the rest at 1."""
    named = list(module.named_parameters())
    if backbone is None:
        return [(named, 1.0)]
    encoder = {id(p) for n, p in backbone.named_parameters() if backbone.is_encoder(n)}
    return [([(n, p) for n, p in named if id(p) in encoder], encoder_scale),
            ([(n, p) for n, p in named if id(p) not in encoder], 1.0)]


def optimizer_for(groups: list[tuple[Named, float]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over (parameters, lr scale) groups; weight decay on weight matrices only, none on norms, biases
    and tokens. A scale of 0 freezes its parameters (they stop requiring gradients)."""
    param_groups = []
    for named, scale in groups:
        decay, no_decay = [], []
        for name, p in named:
            if scale == 0:
                p.requires_grad_(False)
                continue
            (no_decay if p.ndim < 2 or name.endswith("_token") else decay).append(p)
        param_groups += [{"params": decay, "weight_decay": weight_decay, "lr": lr * scale},
                         {"params": no_decay, "weight_decay": 0.0, "lr": lr * scale}]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def warmup_cosine(total_steps: int, warmup_fraction: float, floor: float = 0.1) -> Callable[[int], float]:
    warmup = round(warmup_fraction * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def train_steps(name: str, module: nn.Module, groups: list[tuple[Named, float]],
                loss_fn: Callable[[Tensor], Tensor], batches: Iterator[Tensor], *, steps: int, lr: float,
                weight_decay: float, warmup_fraction: float, grad_clip: float, progress: Progress) -> list[float]:
    """A fixed budget of optimiser steps (AdamW, warmup + cosine, clipping); returns the loss per step.

    Prints about ten progress lines. Every neural model of a comparison goes through this one loop.
    """
    module.train()
    optimizer = optimizer_for(groups, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_fraction))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    start, every = time.perf_counter(), max(1, steps // 10)
    for step in range(steps):
        loss = loss_fn(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = np.mean(losses[-every:])
            progress(f"  {name:<12} step {step + 1:>5}/{steps}  loss {recent:.4f}  "
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


def table_text(table: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A comparison table as aligned plain text: one row per model, one column per metric."""
    cells = [[str(c) for c in [table.index.name or "model", *table.columns]]]
    for name, row in table.iterrows():
        cells.append([str(name), *(_fmt(v, floatfmt) for v in row)])
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
