"""Pretraining BrainLM on a stored cohort with Ray Train: checkpointed every epoch, resumable.

    fit(cohort, model_cfg, train_cfg, run_name=...)       driver: ray.init, TorchTrainer, one progress line/epoch
      └─ _train_worker(config)                            every Ray worker: data shard, DDP model, the epochs
           ├─ train_step(...)                             one optimiser step (bench/ reuses it)
           ├─ evaluate(...)                               masked MSE, masked R², zero baseline; fixed masks
           └─ save_checkpoint(...) + ray.train.report     rank 0 writes the checkpoint, every rank reports

Resuming. Ray Train V2 restarts a failed worker group from the latest reported checkpoint (up to
`TrainConfig.max_failures` times), and a second `fit` with the same `run_name` and storage path picks that run
up from its latest checkpoint as well (Ray finds the run's checkpoint record under `storage_path/run_name`).
Either way the worker receives the checkpoint from `ray.train.get_checkpoint()` and continues at the next
epoch with the saved weights, optimiser, schedule and history. Use a new `run_name` for a fresh run.

Failure injection (tests): `BRAINLM_FAIL_AT_EPOCH=N` (N >= 2) in the driver's environment when `fit` is called
makes every worker raise at the start of epoch N, but only in an attempt that started without a checkpoint,
so the retry (which starts from epoch N-1's checkpoint) gets through.

This is the only module that imports Ray, and it does so lazily: `build_optimizer`, `train_step`,
`evaluate` and the checkpoint functions work (and import quickly) without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from brainlm.config import ModelConfig, TrainConfig, from_dict, load_settings, to_dict
from brainlm.model import BrainLM

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
FAIL_ENV = "BRAINLM_FAIL_AT_EPOCH"
# Environment the workers need to find the same brainlm home and MLflow store as the driver (Ray workers
# run in their own processes and working directories, started before this fit's environment was set).
_FORWARDED_ENV = ("BRAINLM_HOME", "BRAINLM_MLFLOW_CONFIG", "MLFLOW_TRACKING_URI")
_RAY_OBJECT_STORE_BYTES = 300 * 1024**2  # training moves no data through the object store


class InjectedFailure(RuntimeError):
    """Raised on purpose (BRAINLM_FAIL_AT_EPOCH) to exercise Ray Train's restart-from-checkpoint."""


# ---------------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases, norms and the CLS/mask tokens are exempt.

    Decaying a LayerNorm gain or a learned token pulls it towards zero, which is not regularisation (MAE and
    nanoGPT make the same split). Fused kernels on CUDA.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("_token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = True if torch.device(device).type == "cuda" else None  # None: PyTorch's default (foreach) kernels
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def lr_lambda(total_steps: int, cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier on `cfg.lr` per step for LambdaLR: linear warmup, then cosine down to `min_lr_ratio`.

    Warmup covers `warmup_fraction` of the steps and reaches 1.0 on its last step; the cosine reaches
    `min_lr_ratio` on the last step and stays there if training runs longer (e.g. a resumed run with more
    epochs than planned).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = round(cfg.warmup_fraction * total_steps)
    decay_steps = max(1, total_steps - warmup - 1)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU, where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, signals: Tensor, coords: Tensor, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device) -> Tensor:
    """One optimiser step on a batch (B, P, T); returns the detached loss, still on `device`.

    No `.item()` or other host sync here: callers accumulate losses on the device and read them once per
    epoch, so the GPU never waits for Python.
    """
    model.train()
    signals = signals.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device):
        loss = model(signals, coords).loss
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, coords: Tensor, device: torch.device, mask_ratio: float,
             seed: int) -> dict[str, float]:
    """Masked-patch MSE and R² over a loader, and `zero_mse`: the MSE of predicting zero on the same patches.

    Masks come from a generator seeded with `seed`, so the same loader gives the same masks every epoch and
    the numbers are comparable across epochs. Sums are accumulated on the device (float64) and R² is taken
    over all masked values at once (= `model.masked_r2` on the whole set). Under torch.distributed every rank
    must call this on its shard: the sums are all-reduced, and every rank gets the global numbers.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    # squared error, sum of targets, sum of squared targets, number of masked values
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for signals in loader:
        signals = signals.to(device, non_blocking=True)
        B, P, T = signals.shape
        noise = torch.rand(B, P * (T // _patch_size(model)), generator=generator).to(device)
        with _autocast(device):
            out = model(signals, coords, mask_ratio=mask_ratio, noise=noise)
        target = signals.reshape(out.pred.shape).double()
        masked = out.mask[..., None].double()  # (B, P, N, 1): broadcast over the values of a patch
        sums += torch.stack([
            ((out.pred.double() - target) ** 2 * masked).sum(),
            (target * masked).sum(),
            (target**2 * masked).sum(),
            masked.sum() * target.shape[-1],
        ])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    sse, total, total_sq, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluate: the loader gave no masked values (is it empty, or mask_ratio 0?)")
    ss_tot = max(total_sq - total * total / n, 1e-12)
    return {"masked_mse": sse / n, "masked_r2": 1 - sse / ss_tot, "zero_mse": total_sq / n}


def _patch_size(model: nn.Module) -> int:
    return _unwrap(model).cfg.patch_size


def _unwrap(model: nn.Module) -> BrainLM:
    """The BrainLM inside DistributedDataParallel (`.module`) and/or torch.compile (`._orig_mod`)."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    if not isinstance(model, BrainLM):
        raise TypeError(f"expected a BrainLM (possibly wrapped in DDP / torch.compile), got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int,
                    model_cfg: ModelConfig, train_cfg: TrainConfig, metrics: dict[str, float],
                    history: list[dict] | None = None) -> Path:
    """Write a checkpoint folder: weights (safetensors), optimiser + schedule (tensors only), state.json.

    `epoch` is the number of completed epochs (1-based: 1 after the first), `step` the optimiser steps so far.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    save_file(weights, directory / MODEL_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    state = {
        "epoch": epoch, "step": step, "metrics": metrics, "history": history or [],
        "model_config": to_dict(model_cfg), "train_config": to_dict(train_cfg),
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint folder (epoch, step, metrics, history, model_config, train_config)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a brainlm checkpoint folder")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> tuple[BrainLM, ModelConfig, dict]:
    """The model (in eval mode), its config and state.json from a checkpoint folder; never unpickles."""
    state = read_state(directory)
    model_cfg = from_dict(ModelConfig, state["model_config"])
    model = BrainLM(model_cfg)
    model.load_state_dict(load_file(Path(directory) / MODEL_FILE, device=str(device)))
    return model.to(device).eval(), model_cfg, state


def _restore_training(directory: Path, model: BrainLM, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, model_cfg: ModelConfig,
                      device: torch.device) -> dict[str, Any]:
    """Load weights, optimiser and schedule from a checkpoint into the given objects; return its state."""
    state = read_state(directory)
    saved_cfg = from_dict(ModelConfig, state["model_config"])
    if saved_cfg != model_cfg:
        raise ValueError(f"checkpoint {directory} was trained with {saved_cfg}, not {model_cfg}: resuming needs "
                         f"the same model config; start a fresh run with a new run_name instead")
    model.load_state_dict(load_file(directory / MODEL_FILE, device=str(device)))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
    return state


# ---------------------------------------------------------------------------------------------- data


class _EpochIndices(Sampler):
    """Yields (epoch, index) pairs from a DistributedSampler, so the epoch travels with every index.

    Persistent DataLoader workers hold their own copy of the dataset, so `WindowDataset.set_epoch` in the
    main process would never reach them; passing the epoch with the index keeps crops changing every epoch.
    """

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.sampler.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _AtEpoch(Dataset):
    """A WindowDataset indexed by (epoch, index) pairs from `_EpochIndices`."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        epoch, i = item
        self.windows.set_epoch(epoch)
        return self.windows[i]


@dataclass
class _Loaders:
    train: DataLoader
    val: DataLoader  # this rank's shard of the validation windows (fixed crops)
    probe: DataLoader  # this rank's shard of a fixed sample of training windows (train metrics like val)


def _loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, **kwargs: Any) -> DataLoader:
    workers = cfg.loader_workers
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, **kwargs)


def _make_loaders(cohort, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, rank: int,
                  world: int) -> _Loaders:
    """Subject-level split; random crops of train recordings sharded over ranks; fixed val and probe crops."""
    split = cohort.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train_ids, val_ids = split["train"], split["val"]
    if not val_ids:
        raise ValueError(f"cohort {cohort.path}: the split has no validation recordings "
                         f"({len(cohort.participants)} participants, val_fraction={cfg.val_fraction}); raise "
                         f"val_fraction or add participants (at least 3 are needed for a split)")
    train = cohort.window_dataset(train_ids, model_cfg.window, cfg.crops_per_recording, cfg.seed)
    per_rank = math.ceil(len(train) / world)
    if per_rank < cfg.batch_size:
        raise ValueError(f"{len(train)} training windows per epoch give {per_rank} per worker, fewer than "
                         f"batch_size={cfg.batch_size}: raise crops_per_recording or lower batch_size")
    sampler = _EpochIndices(DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed))
    # Evaluation sets: one fixed crop per recording (set_epoch is never called on them), sharded by rank;
    # the probe is as many training recordings as there are validation recordings.
    val = cohort.window_dataset(val_ids, model_cfg.window, 1, cfg.seed)
    probe = cohort.window_dataset(train_ids[: len(val_ids)], model_cfg.window, 1, cfg.seed)
    return _Loaders(
        train=_loader(_AtEpoch(train), cfg, device, sampler=sampler, drop_last=True),
        val=_loader(Subset(val, range(rank, len(val), world)), cfg, device),
        probe=_loader(Subset(probe, range(rank, len(probe), world)), cfg, device),
    )


# ---------------------------------------------------------------------------------------- the worker


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop; `config` holds only plain values, so each worker rebuilds everything."""
    import ray.train
    import ray.train.torch

    from brainlm.data.store import open_cohort

    os.environ.update(config["env"])  # the driver's brainlm home and MLflow store (see _FORWARDED_ENV)
    model_cfg = from_dict(ModelConfig, config["model"])
    cfg = from_dict(TrainConfig, config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    cohort = open_cohort(config["cohort"])
    loaders = _make_loaders(cohort, model_cfg, cfg, device, rank, world)
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=device)
    model = BrainLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.epochs * len(loaders.train), cfg))

    state = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = _restore_training(Path(directory), model, optimizer, scheduler, model_cfg, device)
    start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]

    model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, NCCL on GPU)
    if cfg.compile:
        model = torch.compile(model)
    torch.manual_seed(cfg.seed + 1 + rank + 1000 * start_epoch)  # masks differ by rank and by attempt

    for epoch in range(start_epoch, cfg.epochs + 1):
        if config["fail_at_epoch"] == epoch and checkpoint is None:
            raise InjectedFailure(f"{FAIL_ENV}={epoch}: failing on purpose at the start of epoch {epoch}")
        loaders.train.sampler.set_epoch(epoch)
        train_loss, seconds = _train_epoch(model, loaders.train, coords, optimizer, scheduler, cfg, device)
        step += len(loaders.train)
        # The plain module: evaluation shards differ in size across ranks, and DDP's forward is for training.
        val = evaluate(_unwrap(model), loaders.val, coords, device, model_cfg.mask_ratio, cfg.seed)
        probe = evaluate(_unwrap(model), loaders.probe, coords, device, model_cfg.mask_ratio, cfg.seed)
        windows = len(loaders.train) * cfg.batch_size * world
        metrics = {
            "epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
            **{f"train_{k}": v for k, v in probe.items()}, **{f"val_{k}": v for k, v in val.items()},
            "windows_per_s": windows / seconds, "epoch_seconds": seconds, "resumed_from": start_epoch - 1,
        }
        history = [*history, metrics]
        _report(metrics, model, optimizer, scheduler, model_cfg, cfg, history, rank, config)


def _train_epoch(model: nn.Module, loader: DataLoader, coords: Tensor, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig,
                 device: torch.device) -> tuple[float, float]:
    """(mean training loss, seconds). Losses stay on the device until the one `.item()` at the end."""
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for signals in loader:
        total += train_step(model, signals, coords, optimizer, scheduler, cfg, device)
    mean = (total / len(loader)).item()  # also waits for the GPU, so the time below is honest
    return mean, time.perf_counter() - start


def _report(metrics: dict[str, float], model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, model_cfg: ModelConfig, cfg: TrainConfig,
            history: list[dict], rank: int, config: dict[str, Any]) -> None:
    """Rank 0 checkpoints, logs to MLflow and sends progress; every rank reports (Ray waits for all)."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_checkpoint(directory, model, optimizer, scheduler, metrics["epoch"], metrics["step"], model_cfg,
                            cfg, metrics, history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            if config["mlflow_run_id"]:
                from brainlm import registry  # MLflow lives there only

                registry.log_metrics(config["mlflow_run_id"], metrics, step=metrics["epoch"])
            config["progress"].put(metrics)
        ray.train.report(metrics, checkpoint=checkpoint)  # copies the checkpoint to storage before returning


# -------------------------------------------------------------------------------------------- driver


@dataclass
class FitResult:
    checkpoint_dir: Path  # the final checkpoint (a local folder: model.safetensors, state.json, ...)
    metrics: dict[str, float]  # the last epoch's metrics, plus `epochs` and `steps`
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch, across resumes
    run_name: str = ""
    storage_path: Path | None = None


def fit(cohort, model_cfg: ModelConfig, train_cfg: TrainConfig, *, run_name: str,
        storage_path: Path | None = None, on_epoch_end: Callable[[dict], None] | None = None,
        mlflow_run_id: str | None = None, resume: bool = True) -> FitResult:
    """Pretrain on `cohort` (a Cohort, name or path) with `train_cfg.num_workers` Ray Train workers.

    Checkpoints every epoch under `storage_path/run_name` (default: the settings' ray_results_dir; a local or
    shared-filesystem path); calling again with the same `run_name` resumes from the latest checkpoint, and
    `resume=False` refuses an existing run instead. Prints one line per epoch and calls
    `on_epoch_end(metrics)` in this process (in a helper thread). With `mlflow_run_id` (a run the caller
    created), the full config is logged to it as params and rank 0 logs every epoch's metrics (step = epoch).
    Starts a local Ray instance when none is running (and stops it afterwards); otherwise uses the running one.

    Metrics per epoch: epoch, step, lr, train_loss (mean training objective), train_/val_ masked_mse,
    masked_r2, zero_mse (evaluation with fixed masks; train_ is a fixed sample of training recordings the
    size of the validation set), windows_per_s (training windows per second over all workers, evaluation
    excluded), epoch_seconds, resumed_from (the checkpoint epoch this worker group started from, 0 = fresh).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from brainlm.data.store import Cohort, open_cohort

    settings = load_settings()
    cohort = cohort if isinstance(cohort, Cohort) else open_cohort(cohort, settings)
    storage_path = Path(storage_path or settings.ray_results_dir).resolve()
    if not resume and (storage_path / run_name).exists():
        raise FileExistsError(f"run {run_name!r} already exists under {storage_path}: pass resume=True to "
                              f"continue it, or choose a new run_name")
    fail_at_epoch = _fail_at_epoch()
    if mlflow_run_id:
        from brainlm import registry

        registry.log_params(mlflow_run_id, _run_params(cohort, model_cfg, train_cfg, run_name))

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env["BRAINLM_HOME"] = str(settings.home)
    if mlflow_run_id:
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri()  # resolved here: workers run elsewhere
    with ray_runtime(train_cfg):
        progress = Queue(actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "cohort": str(cohort.path), "model": to_dict(model_cfg), "train": to_dict(train_cfg),
                "mlflow_run_id": mlflow_run_id, "env": env, "fail_at_epoch": fail_at_epoch,
                "progress": progress,  # the one non-plain value: an actor handle, which Ray passes by reference
            },
            scaling_config=ScalingConfig(
                num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                resources_per_worker={"CPU": train_cfg.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=run_name, storage_path=str(storage_path),
                failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        try:
            with _Progress(progress, train_cfg.epochs, on_epoch_end):
                result = trainer.fit()
        finally:
            progress.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} under {storage_path} finished without a checkpoint")
    checkpoint_dir = Path(result.checkpoint.path)
    state = read_state(checkpoint_dir)
    metrics = {**state["metrics"], "epochs": state["epoch"], "steps": state["step"]}
    return FitResult(checkpoint_dir=checkpoint_dir, metrics=metrics, history=state["history"],
                     run_name=run_name, storage_path=storage_path)


@contextlib.contextmanager
def ray_runtime(cfg: TrainConfig) -> Iterator[None]:
    """Ray for the duration of the block: the running instance if there is one, else a quiet local one
    (stopped on exit). With RAY_ADDRESS set, connects to that cluster, which brings its own resources.

    Local: enough CPUs for `cfg`'s workers, no dashboard, a small object store (training moves no data
    through it) and worker logs kept out of the driver's output (fit prints its own progress; worker
    errors still arrive with the exception).
    """
    import logging

    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        # address="local": always a fresh instance of our own, never some other Ray already running here.
        ray.init(address="local", num_cpus=max(2, cfg.num_workers * cfg.cpus_per_worker), include_dashboard=False,
                 object_store_memory=_RAY_OBJECT_STORE_BYTES, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def _fail_at_epoch() -> int | None:
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 2:
        # Epoch 1 has no checkpoint before it, so every retry would fail again: the run could never finish.
        raise ValueError(f"{FAIL_ENV}={value!r} must be an epoch number >= 2 (1-based): the retry resumes "
                         f"from the checkpoint of the epoch before")
    return int(value)


def _run_params(cohort, model_cfg: ModelConfig, train_cfg: TrainConfig, run_name: str) -> dict[str, Any]:
    """The full config for MLflow; the registry flattens it to `model.hidden`, `train.lr`, ..."""
    return {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "cohort": cohort.name,
            "ray_run_name": run_name}


def progress_line(metrics: dict[str, float], epochs: int) -> str:
    return (f"epoch {metrics['epoch']}/{epochs}  train masked MSE {metrics['train_masked_mse']:.4f} "
            f"R² {metrics['train_masked_r2']:.3f}  |  val masked MSE {metrics['val_masked_mse']:.4f} "
            f"R² {metrics['val_masked_r2']:.3f} (zero {metrics['val_zero_mse']:.4f})  |  "
            f"{metrics['windows_per_s']:.1f} windows/s")


class _Progress:
    """Drains rank 0's per-epoch metrics in a driver thread: prints a line, calls `on_epoch_end`.

    The thread blocks on the queue (no polling) until the `None` that `__exit__` sends once training is over.
    It runs in a copy of the caller's context (so e.g. a Prefect task logger still works there); an exception
    from `on_epoch_end` is raised in the caller once training has finished.
    """

    def __init__(self, queue, epochs: int, on_epoch_end: Callable[[dict], None] | None):
        import contextvars

        self.queue, self.epochs, self.on_epoch_end = queue, epochs, on_epoch_end
        self.error: BaseException | None = None
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._drain,), daemon=True)

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.queue.put(None)  # after every epoch's metrics: the queue is first in, first out
        self.thread.join()
        if self.error is not None and exc_info[0] is None:
            raise RuntimeError(f"on_epoch_end failed: {self.error!r}") from self.error

    def _drain(self) -> None:
        while (metrics := self.queue.get()) is not None:
            print(progress_line(metrics, self.epochs), flush=True)
            if self.on_epoch_end is not None and self.error is None:
                try:
                    self.on_epoch_end(metrics)
                except Exception as e:  # re-raised in the caller's thread by __exit__
                    self.error = e
