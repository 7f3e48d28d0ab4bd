"""The pretraining engine in plain torch: optimiser, schedule, step, evaluation, and the data it runs on.

    make_loaders(cohort, ...)          train: random crops, one batch per optimiser step; val / probe: fixed
                                       windows, each with its fixed mask noise (MaskedWindows)
    build_optimizer + build_scheduler  AdamW (decay on weight matrices only), linear warmup + cosine, in steps
    train_steps(model, batches, n)     n optimiser steps (train_step each); mean loss and seconds
    evaluate(model, loader, ...)       masked MSE / R² of the model and of reference predictors, on one set of
                                       masks drawn in one place (mask_noise)
    train_in_process(cohort, ...)      all of the above for a whole run in this process: no Ray, no MLflow,
                                       no checkpoints in between (bench/science.py, the tests' pretrained models)

The launcher (`brainlm.launcher`) runs these inside Ray Train workers; bench/ and a GPU machine without Ray or
MLflow use them directly. This module imports torch and numpy only (and the model and configs).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from brainlm.config import ModelConfig, TrainConfig
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM
from brainlm.references import Predictor, predict_zero, reference_predictors, training_covariance


class TrainingError(BrainLMError):
    """A cohort or config the trainer cannot run on (e.g. no validation participants)."""


# ---------------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | str,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases, norms and the CLS/mask tokens are exempt.

    Decaying a LayerNorm gain or a learned token pulls it towards zero, which is not regularisation (MAE and
    nanoGPT make the same split). Parameters that do not require gradients are left out. `lr_scale(name)`
    multiplies `cfg.lr` for a parameter (fine-tuning: a pretrained encoder learns more slowly than a new
    head); without it every parameter gets `cfg.lr` (unset: `TrainConfig.with_lr_for` the model). Fused kernels on
    CUDA.
    """
    if cfg.lr is None:  # the width-scaled default needs the BrainLM's config
        cfg = cfg.with_lr_for(unwrap(model).cfg)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        for decays in (True, False):  # per scale: the decayed group, then the exempt one (checkpoints' order)
            groups.setdefault((scale, decays), [])
        groups[scale, not (p.ndim < 2 or name.endswith("_token"))].append(p)
    param_groups = [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * scale}
                    for (scale, decays), params in groups.items()]
    fused = True if torch.device(device).type == "cuda" else None  # None: PyTorch's default (foreach) kernels
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier on `cfg.lr` per step for LambdaLR: linear warmup, then cosine down to `min_lr_ratio`.

    Warmup takes `warmup_steps` (at most `steps`) and reaches 1.0 on its last step; the cosine reaches
    `min_lr_ratio` on step `steps` − 1 and stays there if training runs longer.
    """
    warmup = min(cfg.warmup_steps, cfg.steps)
    decay_steps = max(1, cfg.steps - warmup - 1)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over `cfg.steps` optimiser steps (`lr_lambda`); step it after every step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU, where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, signals: Tensor, coords: Tensor, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device) -> Tensor:
    """One optimiser step on a batch (B, P, T); returns the detached loss, still on `device`.

    No `.item()` or other host sync here: callers accumulate losses on the device and read them once per
    evaluation period, so the GPU never waits for Python.
    """
    model.train()
    signals = signals.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        loss = model(signals, coords).loss
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def train_steps(model: nn.Module, batches: Iterator[Tensor], n: int, coords: Tensor,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """`n` optimiser steps on the next `n` batches: (mean training loss, seconds).

    Losses stay on the device until the one `.item()` at the end, which also waits for the GPU, so the time
    is honest.
    """
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for _ in range(n):
        total += train_step(model, next(batches), coords, optimizer, scheduler, cfg, device)
    mean = (total / n).item()
    return mean, time.perf_counter() - start


def evaluation_steps(start: int, cfg: TrainConfig) -> list[int]:
    """The steps after which training stops to evaluate, checkpoint and log: every `eval_every`, and the last.

    A run resumed at `start` keeps the same points (they are multiples of `eval_every`, not offsets from it).
    """
    points = range((start // cfg.eval_every + 1) * cfg.eval_every, cfg.steps, cfg.eval_every)
    return [*points, cfg.steps] if start < cfg.steps else []


def unwrap(model: nn.Module) -> BrainLM:
    """The BrainLM inside DistributedDataParallel (`.module`) and/or torch.compile (`._orig_mod`)."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    if not isinstance(model, BrainLM):
        raise TypeError(f"expected a BrainLM (possibly wrapped in DDP / torch.compile), got {type(model).__name__}")
    return model


# ------------------------------------------------------------------------------------------ evaluation


# The references that need nothing but the windows; the launcher and the promotion gate add `spatial` and
# `temporal` (`brainlm.references.reference_predictors`, from the training split's covariance).
REFERENCES: dict[str, Predictor] = {"zero": predict_zero}


def mask_noise(seed: int, index: int, tokens: int) -> Tensor:
    """The mask noise of evaluation window `index`: (tokens,) in [0, 1), a function of (seed, index) alone.

    The model keeps the tokens with the smallest noise visible (`BrainLM.random_masking`), so this fixes each
    window's mask whatever the batch size, worker count or evaluation period.
    """
    return torch.from_numpy(np.random.default_rng([seed, index]).random(tokens, dtype=np.float32))


class MaskedWindows(Dataset):
    """Evaluation windows with their masks: item i is (window (P, T), mask noise (P · T/patch_size,))."""

    def __init__(self, windows: Dataset, patch_size: int, seed: int):
        self.windows, self.patch_size, self.seed = windows, patch_size, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        window = self.windows[i]
        P, T = window.shape
        return window, mask_noise(self.seed, i, P * (T // self.patch_size))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, coords: Tensor, device: torch.device, mask_ratio: float,
             references: Mapping[str, Predictor] = REFERENCES) -> dict[str, float]:
    """Masked-patch MSE and R² of the model, and of each reference predictor on the same masked patches.

    `loader` yields (signals, noise) batches (`MaskedWindows`), so the masks are the same every time and
    numbers are comparable across evaluations. Returns `masked_mse`, `masked_r2` and, per reference `name`,
    `name_mse` and `name_r2`. Sums are accumulated on the device (float64) and R² is taken over all masked
    values at once (= `model.masked_r2` on the whole set). Under torch.distributed every rank must call this
    on its shard: the sums are all-reduced, and every rank gets the global numbers.
    """
    model.eval()
    names = list(references)
    # squared error of the model and of each reference, then sum of targets, of squared targets, count
    sums = torch.zeros(len(names) + 4, dtype=torch.float64, device=device)
    for signals, noise in loader:
        signals, noise = signals.to(device, non_blocking=True), noise.to(device, non_blocking=True)
        with autocast(device):
            out = model(signals, coords, mask_ratio=mask_ratio, noise=noise)
        target = signals.reshape(out.pred.shape).double()
        masked = out.mask[..., None].double()  # (B, P, N, 1): broadcast over the values of a patch
        predictions = [out.pred, *(references[name](signals, out.mask).reshape(out.pred.shape) for name in names)]
        sums += torch.stack([
            *(((p.double() - target) ** 2 * masked).sum() for p in predictions),
            (target * masked).sum(),
            (target**2 * masked).sum(),
            masked.sum() * target.shape[-1],
        ])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    *sse, total, total_sq, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluate: the loader gave no masked values (is it empty, or mask_ratio 0?)")
    ss_tot = max(total_sq - total * total / n, 1e-12)
    out = {"masked_mse": sse[0] / n, "masked_r2": 1 - sse[0] / ss_tot}
    for name, error in zip(names, sse[1:], strict=True):
        out |= {f"{name}_mse": error / n, f"{name}_r2": 1 - error / ss_tot}
    return out


# ---------------------------------------------------------------------------------------------- data


class RandomCrops(Dataset):
    """Item k: a `window`-TR crop drawn uniformly from every possible crop of the given recordings.

    The draw is a function of (seed, k) alone, so a step's batch is the same after a resume. Longer
    recordings offer more crops and are drawn more often; only the crop is read (memory-mapped slicing).
    `cohort` needs `timepoints(id)` and `recording(id)` (a `brainlm.data.store.Cohort`).
    """

    def __init__(self, cohort: Any, recording_ids: list[str], window: int, seed: int):
        if not recording_ids:
            raise TrainingError(f"cohort {cohort.path}: no training recordings to crop")
        counts = np.array([cohort.timepoints(r) - window + 1 for r in recording_ids])
        if (counts < 1).any():
            short = [r for r, c in zip(recording_ids, counts, strict=True) if c < 1]
            raise TrainingError(f"cohort {cohort.path}: recordings shorter than the {window}-TR window: "
                                f"{', '.join(short[:5])}")
        self.cohort, self.recording_ids, self.window, self.seed = cohort, list(recording_ids), window, seed
        self.ends = np.cumsum(counts)  # crop c belongs to the first recording whose end is above c

    def locate(self, k: int) -> tuple[str, int]:
        """(recording id, start TR) of item k."""
        crop = int(np.random.default_rng([self.seed, k]).integers(self.ends[-1]))
        r = int(np.searchsorted(self.ends, crop, side="right"))
        return self.recording_ids[r], crop - (int(self.ends[r - 1]) if r else 0)

    def __getitem__(self, k: int) -> Tensor:
        recording_id, start = self.locate(k)
        crop = self.cohort.recording(recording_id)[:, start : start + self.window]
        return torch.from_numpy(np.array(crop, dtype=np.float32))


class StepSampler(Sampler[int]):
    """The `RandomCrops` items of optimiser steps [start, stop) for one rank, `batch` per step.

    Step s of rank r takes items (s · world + r) · batch + j, j < batch: ranks never share a window, and a run
    resumed at step s draws exactly what it would have drawn without the interruption.
    """

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch


@dataclass
class Loaders:
    train: DataLoader  # one batch per remaining optimiser step of this rank
    val: DataLoader  # this rank's shard of the validation windows, with their masks
    probe: DataLoader  # this rank's shard of fixed training windows (train metrics measured like val)
    references: dict[str, Predictor]  # zero, spatial (training split's covariance), temporal


def make_loaders(cohort: Any, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, rank: int = 0,
                 world: int = 1, start_step: int = 0) -> Loaders:
    """Subject-level split; random training crops for steps [start_step, cfg.steps); fixed evaluation sets.

    Validation: `eval_crops` fixed windows per validation recording. Probe: the same from as many training
    recordings as there are validation recordings. Both are sharded over ranks by index, and a window's mask
    depends on its index only, so every worker count scores the same masks. References: the zero, spatial
    and temporal predictors, the spatial one from the training recordings' parcel covariance.
    """
    split = cohort.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train_ids, val_ids = split["train"], split["val"]
    if not val_ids:
        raise TrainingError(f"cohort {cohort.path}: the split has no validation recordings "
                            f"({len(cohort.participants)} participants, val_fraction={cfg.val_fraction}); at "
                            f"least 3 participants are needed")
    train = RandomCrops(cohort, train_ids, model_cfg.window, cfg.seed)
    sampler = StepSampler(start_step, cfg.steps, cfg.batch_size, rank, world)
    val = MaskedWindows(cohort.window_dataset(val_ids, model_cfg.window, cfg.eval_crops, cfg.seed),
                        model_cfg.patch_size, cfg.seed)
    probe = MaskedWindows(cohort.window_dataset(train_ids[: len(val_ids)], model_cfg.window, cfg.eval_crops,
                                                cfg.seed), model_cfg.patch_size, cfg.seed)
    return Loaders(
        train=_loader(train, cfg, device, sampler=sampler),
        val=_loader(Subset(val, range(rank, len(val), world)), cfg, device),
        probe=_loader(Subset(probe, range(rank, len(probe), world)), cfg, device),
        references=reference_predictors(training_covariance(cohort, split)),
    )


def _loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, **kwargs: Any) -> DataLoader:
    workers = cfg.loader_workers
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, **kwargs)


# --------------------------------------------------------------------------------------- in process


@dataclass
class InProcessRun:
    model: BrainLM  # eval mode
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    metrics: dict[str, float]  # the last evaluation: step, windows, train_loss, val_* (the model's and the
                               # references', as the launcher logs them)
    seconds: float  # training steps only, evaluations left out


def train_in_process(cohort: Any, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device | str = "cpu",
                     progress: Callable[[dict[str, float]], None] | None = None) -> InProcessRun:
    """Pretrain a fresh BrainLM on `cohort` in this process: the launcher's split, loaders, optimiser, schedule and
    evaluation points (every `eval_every` steps and the last, on the validation windows' fixed masks), one worker.

    The initial weights and the training masks come from `cfg.seed`. `progress(metrics)` is called after every
    evaluation. For the platform's runs use `brainlm.launcher.fit` (Ray Train: checkpoints, resume, MLflow).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = BrainLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    loaders = make_loaders(cohort, model_cfg, cfg, device)
    batches = iter(loaders.train)
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=device)
    step, seconds, metrics = 0, 0.0, {}
    for stop in evaluation_steps(0, cfg):
        train_loss, took = train_steps(model, batches, stop - step, coords, optimizer, scheduler, cfg, device)
        step, seconds = stop, seconds + took
        val = evaluate(model, loaders.val, coords, device, model_cfg.mask_ratio, loaders.references)
        metrics = {"step": step, "windows": step * cfg.batch_size, "train_loss": train_loss,
                   **{f"val_{k}": v for k, v in val.items()}}
        if progress is not None:
            progress(metrics)
    return InProcessRun(model.eval(), optimizer, scheduler, metrics, seconds)
