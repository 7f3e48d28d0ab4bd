"""Prefect flow `pretrain`: load cohort → check shape → train → register, each task one library call.

Call it (`pretrain(cohort="demo")`), run it as a subflow (flows/demo.py), or trigger the deployment
`pretrain/default` that `make serve` serves:

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pretrain/default \
        -p cohort=demo -p steps=200 -p lr=0.001 --watch
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from brainlm import config, pipelines
from brainlm.config import ModelConfig, TrainConfig
from brainlm.data.store import Cohort

# Training is never cached, and the cohort, fit and run objects stay in memory between tasks (a cohort holds
# memory-mapped arrays): only the flow's small result is persisted, which is what deployments read back.
STEP = {"cache_policy": NO_CACHE, "persist_result": False}
DEFAULT_COHORT = "demo"  # what `make demo` ingests


@task(name="load cohort", **STEP)
def load_cohort(cohort: str) -> Cohort:
    return pipelines.load_cohort(cohort)


@task(name="check shape", **STEP)
def check_shape(cohort: Cohort, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    pipelines.check_cohort(cohort, model_cfg, train_cfg)


@task(name="train", **STEP)
def train(cohort: Cohort, model_cfg: ModelConfig, train_cfg: TrainConfig, preset_name: str) -> pipelines.TrainedRun:
    return pipelines.train(cohort, model_cfg, train_cfg, preset_name=preset_name)


@task(name="register", **STEP)
def register(trained: pipelines.TrainedRun, cohort: Cohort, model_cfg: ModelConfig,
             preset_name: str) -> pipelines.PretrainResult:
    return pipelines.register(trained, cohort, model_cfg, preset_name=preset_name)


@flow(name="pretrain", log_prints=True, persist_result=True)
def pretrain(
    cohort: str,
    preset: str = "tiny",
    # brainlm.config.run_options(): the model options (None keeps the preset's value), then TrainConfig
    window: int | None = None,
    mask_ratio: float | None = None,
    time_bias: bool | None = None,
    # field for field (None keeps TrainConfig's default)
    steps: int | None = None,
    eval_every: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    min_lr_ratio: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    eval_crops: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: int | None = None,
    loader_workers: int | None = None,
    compile: bool | None = None,
    seed: int | None = None,
    max_failures: int | None = None,
) -> pipelines.PretrainResult:
    """Pretrain BrainLM on a stored cohort (name or path) and register it as the new challenger.

    Every other parameter is a field of the preset's ModelConfig or of TrainConfig; left at None, it keeps
    that config's value (`brainlm pretrain --help` describes each).
    """
    options = {k: v for k, v in locals().items() if k not in ("cohort", "preset")}
    model_cfg, train_cfg = config.run_configs(preset, **options)
    opened = load_cohort(cohort)
    check_shape(opened, model_cfg, train_cfg)
    trained = train(opened, model_cfg, train_cfg, preset)
    result = register(trained, opened, model_cfg, preset)
    print(result.summary())  # the model beside the references, in words
    return result
