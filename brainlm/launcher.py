"""Pretraining on Ray Train: the driver, the worker loop, progress and failure injection.

    fit(cohort, model_cfg, train_cfg, settings=..., run_name=...)   driver: Ray, TorchTrainer, one line per evaluation
      └─ _train_worker(config)        every Ray worker: its data, the DDP model, the steps (brainlm.engine)
           ├─ train_steps(...)        `eval_every` optimiser steps
           ├─ evaluate(...)           masked MSE / R² beside the references, on fixed masks
           └─ _report(...)            rank 0 checkpoints (brainlm.checkpoint) and logs to MLflow; all report

Training is counted in optimiser steps (`TrainConfig.steps`); every `eval_every` steps, and after the last,
the workers evaluate, checkpoint and report. Resuming: Ray Train V2 restarts a failed worker group from the
latest reported checkpoint (up to `TrainConfig.max_failures` times), and a second `fit` with the same
`run_name` and storage path picks that run up from its latest checkpoint as well (Ray finds the run's
checkpoint record under `storage_path/run_name`). Either way the workers continue at the checkpoint's step
with its weights, optimiser, schedule and history, and draw the same windows they would have drawn without the
interruption. Use a new `run_name` for a fresh run.

Failure injection (tests): `BRAINLM_FAIL_AT_STEP=N` (N >= 1) in the driver's environment when `fit` is
called makes every worker raise once it has done N steps, at the first evaluation point at or after N (so
after that checkpoint is reported), but only in an attempt that started without a checkpoint, so the retry
gets through.

This is the only module that uses Ray Train, and it imports Ray lazily. Everything a worker needs (the
cohort's path, the configs, the settings with the MLflow store) travels in its `train_loop_config`: nothing
depends on environment variables the driver happens to have.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainlm import checkpoint
from brainlm.config import ModelConfig, Settings, TrainConfig, from_dict, to_dict
from brainlm.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    evaluation_steps,
    make_loaders,
    train_steps,
    unwrap,
)
from brainlm.model import BrainLM

FAIL_ENV = "BRAINLM_FAIL_AT_STEP"
_RAY_OBJECT_STORE_BYTES = 300 * 1024**2  # training moves no data through the object store


class InjectedFailure(RuntimeError):
    """Raised on purpose (BRAINLM_FAIL_AT_STEP) to exercise Ray Train's restart-from-checkpoint."""


# ---------------------------------------------------------------------------------------- the worker


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop; `config` holds only plain values, so each worker rebuilds everything."""
    import ray.train
    import ray.train.torch

    from brainlm.data.store import open_cohort

    model_cfg = from_dict(ModelConfig, config["model"])
    cfg = from_dict(TrainConfig, config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    cohort = open_cohort(config["cohort"])
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=device)
    model = BrainLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)

    state = {"step": 0, "windows": 0, "history": []}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = checkpoint.restore(directory, model, optimizer, scheduler, model_cfg, device)
    start, step, windows, history = state["step"], state["step"], state["windows"], state["history"]
    loaders = make_loaders(cohort, model_cfg, cfg, device, rank, world, start_step=start)

    model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, NCCL on GPU)
    if cfg.compile:
        model = torch.compile(model)
    # Training masks (drawn inside the model) differ by rank and by attempt.
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, start]).generate_state(1)[0]))
    batches = iter(loaders.train)
    scored: dict[str, dict[str, float]] = {}  # the references' val and probe metrics, once scored

    for end in evaluation_steps(start, cfg):
        if config["fail_at_step"] is not None and restored is None and step >= config["fail_at_step"]:
            raise InjectedFailure(f"{FAIL_ENV}={config['fail_at_step']}: failing on purpose at step {step}")
        train_loss, seconds = train_steps(model, batches, end - step, coords, optimizer, scheduler, cfg, device)
        period_windows = (end - step) * cfg.batch_size * world
        step, windows = end, windows + period_windows
        # The plain module: evaluation shards differ in size across ranks, and DDP's forward is for training.
        # The references see the same windows and masks at every evaluation: scored once, at the first.
        references = {} if scored else loaders.references
        val = evaluate(unwrap(model), loaders.val, coords, device, model_cfg.mask_ratio, references)
        probe = evaluate(unwrap(model), loaders.probe, coords, device, model_cfg.mask_ratio, references)
        scored = scored or {name: {k: v for k, v in m.items() if not k.startswith("masked_")}
                            for name, m in (("val", val), ("probe", probe))}
        val, probe = val | scored["val"], probe | scored["probe"]
        metrics = {
            "step": step, "windows": windows, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
            **{f"train_{k}": v for k, v in probe.items()}, **{f"val_{k}": v for k, v in val.items()},
            "windows_per_s": period_windows / seconds, "period_seconds": seconds, "resumed_from": start,
        }
        history = [*history, metrics]
        _report(metrics, model, optimizer, scheduler, model_cfg, cfg, history, rank, config)


def _report(metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, model_cfg: ModelConfig, cfg: TrainConfig,
            history: list[dict], rank: int, config: dict[str, Any]) -> None:
    """Rank 0 checkpoints, logs to MLflow and sends progress; every rank reports (Ray waits for all)."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            checkpoint.save(directory, unwrap(model), optimizer, scheduler, step=metrics["step"],
                            windows=metrics["windows"], model_cfg=model_cfg, train_cfg=cfg, metrics=metrics,
                            history=history)
            saved = ray.train.Checkpoint.from_directory(directory)
            if config["mlflow_run_id"]:
                from brainlm import registry  # MLflow lives there only

                settings = from_dict(Settings, config["settings"])
                registry.log_metrics(config["mlflow_run_id"], metrics, step=metrics["step"], settings=settings)
            config["progress"].put(metrics)
        ray.train.report(metrics, checkpoint=saved)  # copies the checkpoint to storage before returning


# -------------------------------------------------------------------------------------------- driver


@dataclass
class FitResult:
    checkpoint_dir: Path  # the final checkpoint (a local folder: model.safetensors, state.json, ...)
    metrics: dict[str, float]  # the last evaluation's metrics, plus `steps` and `windows` in all
    history: list[dict] = field(default_factory=list)  # one metrics dict per evaluation, across resumes
    run_name: str = ""
    storage_path: Path | None = None


def fit(cohort, model_cfg: ModelConfig, train_cfg: TrainConfig, *, settings: Settings, run_name: str,
        storage_path: Path | None = None, on_evaluation: Callable[[dict], None] | None = None,
        mlflow_run_id: str | None = None, resume: bool = True) -> FitResult:
    """Pretrain on `cohort` (a Cohort, name or path) with `train_cfg.num_workers` Ray Train workers.

    `settings` says where the cohort store, the Ray results and the MLflow store are. Checkpoints every
    `eval_every` steps under `storage_path/run_name` (default: `settings.ray_results_dir`; a local or
    shared-filesystem path); calling again with the same `run_name` resumes from the latest checkpoint, and
    `resume=False` refuses an existing run instead. Prints one line per evaluation and calls
    `on_evaluation(metrics)` in this process (in a helper thread). With `mlflow_run_id` (a run the caller
    created), the full config is logged to it as params and rank 0 logs every evaluation's metrics there
    (MLflow step = optimiser step). Starts a local Ray instance when none is running (and stops it
    afterwards); otherwise uses the running one.

    Metrics per evaluation: step, windows (training windows seen so far, all workers), lr, train_loss (mean
    training objective over the period), train_ / val_ masked_mse, masked_r2, zero_mse, zero_r2 (fixed
    windows and masks; train_ is a fixed sample of training recordings the size of the validation set),
    windows_per_s (training windows per second over all workers, evaluation excluded), period_seconds,
    resumed_from (the step this worker group started from, 0 = fresh).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from brainlm.data.store import Cohort, open_cohort

    cohort = cohort if isinstance(cohort, Cohort) else open_cohort(cohort, settings)
    storage_path = Path(storage_path or settings.ray_results_dir).resolve()
    if not resume and (storage_path / run_name).exists():
        raise FileExistsError(f"run {run_name!r} already exists under {storage_path}: pass resume=True to "
                              f"continue it, or choose a new run_name")
    fail_at_step = _fail_at_step()
    if mlflow_run_id:
        from brainlm import registry

        registry.log_params(mlflow_run_id, _run_params(cohort, model_cfg, train_cfg, run_name), settings=settings)

    with ray_runtime(train_cfg):
        progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _on_this_node()})
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "cohort": str(cohort.path), "model": to_dict(model_cfg), "train": to_dict(train_cfg),
                "settings": to_dict(settings), "mlflow_run_id": mlflow_run_id, "fail_at_step": fail_at_step,
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
            with _Progress(progress, train_cfg.steps, on_evaluation):
                result = trainer.fit()
        finally:
            progress.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name!r} under {storage_path} finished without a checkpoint")
    checkpoint_dir = Path(result.checkpoint.path)
    state = checkpoint.read_state(checkpoint_dir)
    metrics = {**state["metrics"], "steps": state["step"], "windows": state["windows"]}
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


def _on_this_node():
    """Pin an actor to the driver's node: on a cluster, a worker node lost mid-run (which Ray Train survives)
    must not take the driver's progress queue down with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _fail_at_step() -> int | None:
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{FAIL_ENV}={value!r} must be a step number >= 1: the workers fail at the first "
                         f"evaluation point at or after it, once its checkpoint is reported")
    return int(value)


def _run_params(cohort, model_cfg: ModelConfig, train_cfg: TrainConfig, run_name: str) -> dict[str, Any]:
    """The full config for MLflow; the registry flattens it to `model.hidden`, `train.lr`, ..."""
    return {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "cohort": cohort.name,
            "ray_run_name": run_name}


def progress_line(metrics: dict[str, float], steps: int) -> str:
    return (f"step {metrics['step']}/{steps} ({metrics['windows']} windows)  train masked MSE "
            f"{metrics['train_masked_mse']:.4f} R² {metrics['train_masked_r2']:.3f}  |  val masked MSE "
            f"{metrics['val_masked_mse']:.4f} R² {metrics['val_masked_r2']:.3f} (zero {metrics['val_zero_mse']:.4f})"
            f"  |  {metrics['windows_per_s']:.1f} windows/s")


class _Progress:
    """Drains rank 0's per-evaluation metrics in a driver thread: prints a line, calls `on_evaluation`.

    The thread blocks on the queue (no polling) until the `None` that `__exit__` sends once training is over.
    It runs in a copy of the caller's context (so e.g. a Prefect task logger still works there); an exception
    from `on_evaluation` is raised in the caller once training has finished.
    """

    def __init__(self, queue, steps: int, on_evaluation: Callable[[dict], None] | None):
        import contextvars

        self.queue, self.steps, self.on_evaluation = queue, steps, on_evaluation
        self.error: BaseException | None = None
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._drain,), daemon=True)

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.queue.put(None)  # after every evaluation's metrics: the queue is first in, first out
        self.thread.join()
        if self.error is not None and exc_info[0] is None:
            raise RuntimeError(f"on_evaluation failed: {self.error!r}") from self.error

    def _drain(self) -> None:
        while (metrics := self.queue.get()) is not None:
            print(progress_line(metrics, self.steps), flush=True)
            if self.on_evaluation is not None and self.error is None:
                try:
                    self.on_evaluation(metrics)
                except Exception as e:  # re-raised in the caller's thread by __exit__
                    self.error = e
