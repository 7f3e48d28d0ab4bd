"""The platform's workflow steps as plain Python, shared by the CLI and the Prefect flows.

    pretrain(cohort, preset or ModelConfig, TrainConfig)
        load_cohort      open the stored cohort                         (CohortError naming the path)
        check_cohort     parcels match the atlas, every recording fills a window, the split has validation
        train            MLflow run (config as params; cohort, data version, preset as tags) + Ray Train fit
        register         log the checkpoint as a model version, aliased challenger; close the run

Each Prefect task in `flows/` calls exactly one of these functions, so the CLI and the flows run the same code.
Participant ids never reach MLflow: run params and tags are checked against the cohort's participants.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brainlm
from brainlm import registry
from brainlm.config import (
    IngestConfig,
    ModelConfig,
    Settings,
    SynthConfig,
    TrainConfig,
    load_settings,
    preset,
    to_dict,
)
from brainlm.data.store import Cohort, CohortError, open_cohort
from brainlm.errors import BrainLMError
from brainlm.launcher import FitResult, fit
from brainlm.references import scores_text, verdict


class PrivacyError(BrainLMError):
    """A participant id was about to be written to MLflow."""


@dataclass
class TrainedRun:
    """What `train` hands to `register`: the MLflow run and the finished fit."""

    run_id: str
    run_name: str
    fit: FitResult
    data_version: str | None


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    model_name: str
    version: str
    alias: str
    checkpoint_dir: Path
    metrics: dict[str, float]
    cohort_path: Path
    data_version: str | None
    tracking_uri: str

    def summary(self) -> str:
        m = self.metrics
        return "\n".join([
            f"registered {self.model_name} version {self.version} @{self.alias} (MLflow run {self.run_id})",
            f"  val masked MSE {m['val_masked_mse']:.4f}  R² {m['val_masked_r2']:.3f}  (references on the same "
            f"masks: {scores_text(m)})",
            f"  the model   {verdict(m)}",
            f"  trained     {int(m['steps'])} optimiser steps, {int(m['windows'])} windows",
            f"  cohort      {self.cohort_path}  (data version {self.data_version or registry.UNVERSIONED})",
            f"  checkpoint  {self.checkpoint_dir}",
            f"  tracking    {self.tracking_uri}",
        ])


# ------------------------------------------------------------------------------------------ pretrain


def pretrain(
    cohort: str | Path,
    model: str | ModelConfig = "tiny",
    train_cfg: TrainConfig | None = None,
    settings: Settings | None = None,
    *,
    preset_name: str | None = None,
) -> PretrainResult:
    """Pretrain BrainLM on a stored cohort and register the result as the new challenger.

    `model` is a preset name ("tiny", "13M", ...) or a ModelConfig; `preset_name` labels a ModelConfig
    built from a preset (the CLI passes it), for the registry's `preset` tag.
    """
    settings = settings or load_settings()
    model_cfg, preset_name = resolve_model(model, preset_name)
    train_cfg = train_cfg or TrainConfig()
    opened = load_cohort(cohort, settings)
    check_cohort(opened, model_cfg, train_cfg)
    trained = train(opened, model_cfg, train_cfg, preset_name=preset_name, settings=settings)
    return register(trained, opened, model_cfg, preset_name=preset_name, settings=settings)


def resolve_model(model: str | ModelConfig, preset_name: str | None = None) -> tuple[ModelConfig, str]:
    """(config, label for the `preset` tag): a preset by name, or a given config ("custom" unless named)."""
    if isinstance(model, str):
        return preset(model), model
    return model, preset_name or "custom"


def load_cohort(name_or_path: str | Path, settings: Settings | None = None) -> Cohort:
    """The stored cohort; a missing or empty one raises CohortError naming its path."""
    return open_cohort(name_or_path, settings)


def check_cohort(cohort: Cohort, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None) -> None:
    """Refuse a cohort the model cannot train on, naming the cohort path and the offending recordings.

    Every stored recording must be there as float32 with the atlas's parcel count (so the spatial embedding
    has a centroid for each row; `Cohort.recording` checks this) and have at least `model_cfg.window`
    timepoints (so a training window fits). Only the .npy headers are read (memory-mapped). With `train_cfg`,
    its split must leave both training and validation participants.
    """
    too_short = []
    for recording_id in cohort.recording_ids:
        timepoints = cohort.recording(recording_id).shape[1]
        if timepoints < model_cfg.window:
            too_short.append(f"{recording_id} ({timepoints} TRs)")
    if too_short:
        raise CohortError(f"cohort {cohort.path}: {len(too_short)} recording(s) shorter than the model's "
                          f"{model_cfg.window}-TR window, e.g. {', '.join(too_short[:5])}; re-ingest with "
                          f"--min-timepoints {model_cfg.window} or use a model with a shorter window (--window)")
    if train_cfg is not None:
        split = cohort.split(train_cfg.val_fraction, train_cfg.test_fraction, train_cfg.seed)
        if not split["train"] or not split["val"]:
            raise CohortError(f"cohort {cohort.path}: {len(cohort.participants)} participant(s) leave no "
                              f"{'validation' if split['train'] else 'training'} participants (val_fraction "
                              f"{train_cfg.val_fraction}, test_fraction {train_cfg.test_fraction}); at least "
                              f"3 participants are needed")


def train(
    cohort: Cohort,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    preset_name: str,
    settings: Settings | None = None,
) -> TrainedRun:
    """Open an MLflow run for this pretraining and fit; the run is marked FAILED if the fit raises."""
    settings = registry.configure(settings or load_settings())
    version = data_version(cohort, settings)
    run_name = registry.unique_run_name(cohort.name, preset_name)  # unique: never resumes an old Ray run
    # `fit` logs the full model/train config and the cohort to the run; the check covers those values too.
    config = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "cohort": cohort.name}
    params = {"preset": preset_name}
    tags = {registry.COHORT_TAG: cohort.name, registry.DATA_VERSION_TAG: version or registry.UNVERSIONED,
            registry.PRESET_TAG: preset_name, "brainlm_version": brainlm.__version__}
    check_no_participant_ids(cohort, config, params, tags, {"run_name": run_name})
    run_id = registry.start_run(settings.mlflow.pretrain_experiment, run_name, params, tags, settings=settings)
    with registry.end_run_on_error(run_id, settings=settings):
        result = fit(cohort, model_cfg, train_cfg, settings=settings, run_name=run_name,
                     storage_path=settings.ray_results_dir, mlflow_run_id=run_id, resume=False)
    return TrainedRun(run_id=run_id, run_name=run_name, fit=result, data_version=version)


def register(
    trained: TrainedRun,
    cohort: Cohort,
    model_cfg: ModelConfig,
    *,
    preset_name: str,
    settings: Settings | None = None,
) -> PretrainResult:
    """Register the trained checkpoint as a new version of the pretrained model (alias challenger)."""
    settings = registry.configure(settings or load_settings())
    info = cohort_info(cohort)
    check_no_participant_ids(cohort, {"cohort": info.name, "atlas": info.atlas})
    with registry.end_run_on_error(trained.run_id, settings=settings):
        version = registry.log_pretrained(
            trained.run_id, trained.fit.checkpoint_dir, model_cfg, info, trained.data_version,
            preset=preset_name, settings=settings,
        )
    registry.end_run(trained.run_id, "FINISHED", settings=settings)
    return PretrainResult(
        run_id=trained.run_id, run_name=trained.run_name, model_name=version.name, version=str(version.version),
        alias=settings.mlflow.new_alias, checkpoint_dir=trained.fit.checkpoint_dir, metrics=trained.fit.metrics,
        cohort_path=cohort.path, data_version=trained.data_version, tracking_uri=settings.tracking_uri(),
    )


def cohort_info(cohort: Cohort) -> registry.CohortInfo:
    """Counts and the atlas of a cohort, for the registry: never who is in it."""
    return registry.CohortInfo(
        name=cohort.name, atlas=cohort.atlas.name, n_parcels=cohort.atlas.n_parcels,
        n_recordings=len(cohort.recording_ids), n_participants=len(cohort.participants),
        coords=cohort.atlas.coords,
    )


def data_version(cohort: Cohort, settings: Settings) -> str | None:
    """The DVC version of the home's data/ (`<md5>@<git rev>`) when it holds this cohort, for lineage tags.

    None when the home is not a DVC project yet (no data.dvc: the cohort was never ingested here) or the
    cohort lives outside the home's data/ (opened by path), since then no version of this home describes it.
    """
    from brainlm.data.versioning import current_version  # imports DVC: only when a run starts

    if not cohort.path.resolve().is_relative_to(settings.data_dir.resolve()):
        return None
    version = current_version(settings.home)
    return None if version is None else version.tag


def check_no_participant_ids(cohort: Cohort, *mappings: dict[str, Any]) -> None:
    """Refuse to log text in which a participant id of `cohort` appears as a word (e.g. "sub-0001").

    Keys and string values (nested dicts flattened, lists item by item) are split on anything that is not a
    letter, digit, "-" or ".", and ids are compared whole: "sub-01" is caught in "run_sub-01" but not in
    "sub-010". Numbers are not labels and are not checked, so a participant called "2" does not collide with
    `layers=2`; pass numbers as numbers.
    """
    ids = set(cohort.participants) | set(cohort.phenotypes["participant_id"].astype(str))
    for mapping in mappings:
        for key, text in _texts(mapping):
            leaked = sorted(ids & set(re.split(r"[^A-Za-z0-9.\-]+", text)))
            if leaked:
                raise PrivacyError(f"refusing to log {key}={text!r} to MLflow: it contains participant id(s) "
                                   f"{leaked} of cohort {cohort.path}")


def _texts(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) for every key and every string value of a nested mapping."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        yield name, str(key)
        if isinstance(value, dict):
            yield from _texts(value, f"{name}.")
        elif isinstance(value, str):
            yield name, value
        elif isinstance(value, list | tuple):
            yield from ((name, item) for item in value if isinstance(item, str))


# ---------------------------------------------------------------------------------------------- demo


# Sized so `make demo` (synth → ingest → pretrain tiny → register) finishes in a few minutes on 2 CPU cores.
DEMO_SYNTH = SynthConfig(subjects=24, timepoints=300, max_parcels=64, recordings_per_subject=2, seed=0)
DEMO_TRAIN = TrainConfig(steps=600, eval_every=100, warmup_steps=30, batch_size=16, num_workers=1)


def demo_input_dir(cohort: str, settings: Settings | None = None) -> Path:
    """Where the demo writes its synthetic input: local state, outside the versioned `data/` (it is
    regenerated from a seed, not a lab's data)."""
    return (settings or load_settings()).state_dir / "raw" / cohort


def synthesize_demo(out_dir: str | Path, cfg: SynthConfig = DEMO_SYNTH) -> Path:
    """A synthetic input folder at `out_dir`, written once: a complete folder is reused as it is.

    `synthesize` writes ground_truth.npz last, so its presence marks a finished folder; anything less (an
    interrupted run) is rewritten.
    """
    from brainlm.data.synthetic import GROUND_TRUTH_NPZ, synthesize

    out_dir = Path(out_dir)
    if (out_dir / GROUND_TRUTH_NPZ).exists():
        print(f"using the synthetic cohort already in {out_dir}")
        return out_dir
    return synthesize(out_dir, cfg, overwrite=True)


def ingest_cohort(src: str | Path, cohort: str, settings: Settings | None = None, *, cfg: IngestConfig | None = None,
                  atlas: str | None = None, atlas_image: str | None = None):
    """`brainlm ingest SRC --cohort NAME [--atlas ...]` (default IngestConfig); prints and returns the IngestReport."""
    from brainlm.data.ingest import ingest

    report = ingest(src, cohort, atlas=atlas, atlas_image=atlas_image, cfg=cfg, settings=settings)
    print(report.summary())
    return report


def where_things_are(result: PretrainResult, settings: Settings | None = None, prefect_home: str | None = None) -> str:
    """The demo's closing message: where each result lives and how to look at it.

    `prefect_home` is where the flow runs were recorded (the flows pass Prefect's PREFECT_HOME setting).
    """
    settings = settings or load_settings()
    tracking = settings.tracking_uri()
    mlflow_ui = (f".venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000 --workers 1"
                 if tracking.startswith("sqlite:") else f"open {tracking}")
    lines = [
        "",
        "brainlm demo finished",
        f"  cohort            {result.cohort_path}",
        f"  data version      {result.data_version or registry.UNVERSIONED}",
        f"  checkpoint        {result.checkpoint_dir}",
        f"  MLflow store      {tracking}",
        f"  MLflow artifacts  {settings.artifact_root()}",
        f"  registered model  {result.model_name} version {result.version} @{result.alias}  "
        f"(load: models:/{result.model_name}@{result.alias})",
        "",
        "Look at the results:",
        f"  MLflow UI   {mlflow_ui}",
        "              then open http://127.0.0.1:5000 (experiment brainlm-pretrain, Models tab)",
        f"  Prefect UI  {'PREFECT_HOME=' + prefect_home + ' ' if prefect_home else ''}.venv/bin/prefect server start",
        "              then open http://127.0.0.1:4200 (the demo's flow runs are recorded there)",
        "  models      .venv/bin/brainlm models",
        f"  promote     .venv/bin/brainlm promote --gate --cohort {result.cohort_path.name}   (champion only if it "
        f"beats the references on held-out participants; by hand: brainlm promote {result.model_name} "
        f"{result.version})",
    ]
    return "\n".join(lines)


