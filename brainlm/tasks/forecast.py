"""Forecasting: the last patch (`horizon` TRs) of every model window from the TRs before it, on held-out subjects.

    split      subject level: train (+ val, which only the VAR and AR(1) use to choose their settings) and test
    test set   fixed windows of each test recording (one every `eval_stride` TRs): context | horizon
    models     brainlm      the pretrained backbone, fine-tuned with the horizon masked
               scratch      the same architecture, randomly initialised, the same budget
               lstm, ode    sequence models trained on the same crops for the same number of steps
               var          ridge vector autoregression over all parcels (lag, ridge chosen on val), rolled out
               ar1          per parcel, rolled out
               persistence  the last observed TR
    metrics    MSE and R² over every predicted value, MSE per predicted step, R² per parcel

Every model sees the same training recordings and is scored on the same test windows. The window and the
horizon are the backbone's (200 and 20 for the presets), for any parcel count and recording length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from brainlm.baselines.forecast import (
    AR1,
    LINEAR_FORECASTERS,
    LSTMForecaster,
    ODEForecaster,
    Persistence,
    RidgeVAR,
)
from brainlm.config import FORECAST_MODELS, ForecastConfig
from brainlm.data.store import Cohort
from brainlm.engine import RandomCrops
from brainlm.tasks.common import (
    Progress,
    TaskError,
    batched,
    check_backbone_fits,
    encoder_lr,
    fine_tuning,
    fit_steps,
    fixed_windows,
    fresh_copy,
    r2_score,
    step_batches,
)

MODELS = FORECAST_MODELS  # the table's rows, in this order
EXAMPLE_WINDOWS = 3  # test windows kept for the trace plots


class BackboneForecaster(nn.Module):
    """A backbone (pretrained or fresh) as a forecaster: context (B, P, Tc) → (B, P, horizon)."""

    kind = "backbone"

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, context: Tensor, coords: Tensor) -> Tensor:
        return self.backbone.forecast(context, coords)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.describe()}


@dataclass
class FittedModel:
    """What is saved and registered for one model: its kind, JSON config and parameters (module or arrays)."""

    name: str
    kind: str  # "backbone", "lstm", "ode", "var", "ar1", "persistence"
    config: dict[str, Any]
    module: nn.Module | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # what to log as run params (settings it chose)


@dataclass
class ForecastResult:
    table: pd.DataFrame  # one row per model: mse, r2, mse_first_step, mse_last_step, parcel_r2_median
    per_step_mse: dict[str, np.ndarray]  # model → (horizon,)
    per_parcel_r2: dict[str, np.ndarray]  # model → (P,)
    examples: dict[str, np.ndarray]  # "target" (k, P, window) and, per model, its forecast (k, P, horizon)
    fitted: dict[str, FittedModel]
    parcel_names: list[str]
    window: int
    horizon: int
    sizes: dict[str, int]  # subjects and windows per split (counts only)


def run_forecast(cohort: Cohort, backbone: nn.Module, cfg: ForecastConfig | None = None,
                 progress: Progress = print) -> ForecastResult:
    """Fit every model of `cfg.models` on the training subjects and score it on the same held-out windows."""
    cfg = cfg or ForecastConfig()
    check_backbone_fits(backbone, cohort)
    torch.manual_seed(cfg.seed)
    window, horizon = backbone.window, backbone.horizon
    split = cohort.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if not split["test"] or not split["val"]:
        raise TaskError(f"cohort {cohort.path} has {len(cohort.participants)} participants: forecasting needs at "
                        f"least 3 (train, val and test subjects); raise val_fraction/test_fraction or add data")
    fit_ids = split["train"] + split["val"]  # every model trains on these; val alone selects VAR / AR settings
    test = fixed_windows(cohort, split["test"], window, stride=cfg.eval_stride)
    context, target = test.signals[..., : window - horizon], test.signals[..., window - horizon :]
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=cfg.device)
    sizes = {"train_subjects": _subjects(cohort, fit_ids), "test_subjects": _subjects(cohort, split["test"]),
             "test_windows": len(test.signals), "val_subjects": _subjects(cohort, split["val"])}
    progress(f"forecasting on cohort {cohort.name}: {cohort.n_parcels} parcels, window {window} = "
             f"{window - horizon} context + {horizon} predicted TRs; {sizes['train_subjects']} training and "
             f"{sizes['test_subjects']} test subjects ({sizes['test_windows']} test windows)")

    fitted, preds = {}, {}
    for name in [m for m in MODELS if m in cfg.models]:  # a fixed order: the table reads the same every time
        progress(f"- {name}")
        model = _fit(name, backbone, cohort, fit_ids, split, cfg, coords, window, horizon, progress)
        fitted[name] = model
        preds[name] = _predict(model, context, coords, horizon, cfg)

    table, per_step, per_parcel = _score(preds, target)
    k = min(EXAMPLE_WINDOWS, len(test.signals))
    examples = {"target": test.signals[:k], **{name: p[:k] for name, p in preds.items()}}
    return ForecastResult(table=table, per_step_mse=per_step, per_parcel_r2=per_parcel, examples=examples,
                          fitted=fitted, parcel_names=list(cohort.atlas.names), window=window, horizon=horizon,
                          sizes=sizes)


def _subjects(cohort: Cohort, recording_ids: list[str]) -> int:
    rows = cohort.manifest["recording"].isin(recording_ids)
    return int(cohort.manifest.loc[rows, "participant"].nunique())


# ---------------------------------------------------------------------------------------------- fitting


def _fit(name: str, backbone: nn.Module, cohort: Cohort, fit_ids: list[str], split: dict[str, list[str]],
         cfg: ForecastConfig, coords: Tensor, window: int, horizon: int, progress: Progress) -> FittedModel:
    if name == "persistence":
        return FittedModel(name, Persistence.kind, {})
    if name == "ar1":
        model = AR1().fit([np.asarray(cohort.recording(r), np.float32) for r in fit_ids])
        return FittedModel(name, AR1.kind, model.config(), arrays=model.arrays())
    if name == "var":
        return _fit_var(cohort, split, fit_ids, cfg, window, horizon, progress)
    lr_scale = None
    if name in ("brainlm", "scratch"):
        start = copy.deepcopy(backbone) if name == "brainlm" else fresh_copy(backbone)
        module: nn.Module = BackboneForecaster(start)
        if name == "brainlm":  # the pretrained encoder may learn more slowly; `scratch` has nothing to protect
            lr_scale = encoder_lr(module, cfg.encoder_lr_scale)
    else:
        module = (LSTMForecaster(cohort.n_parcels, horizon, cfg.lstm_hidden) if name == "lstm"
                  else ODEForecaster(cohort.n_parcels, horizon, cfg.ode_latent, cfg.ode_hidden))
    module.to(cfg.device)
    train_cfg = fine_tuning(cfg)
    # every neural model draws the same crops: item k is a function of (seed, k) alone
    batches = step_batches(RandomCrops(cohort, fit_ids, window, cfg.seed), train_cfg)

    def loss_fn(batch: Tensor) -> Tensor:
        batch = batch.to(cfg.device)
        pred = module(batch[..., : window - horizon], coords)
        return ((pred - batch[..., window - horizon :]) ** 2).mean()

    losses = fit_steps(name, module, loss_fn, batches, train_cfg, cfg.device, progress, lr_scale)
    params = {"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
              "final_train_mse": float(np.mean(losses[-max(1, cfg.steps // 10):]))}
    if name == "brainlm":
        params["encoder_lr_scale"] = cfg.encoder_lr_scale
    kind = BackboneForecaster.kind if name in ("brainlm", "scratch") else module.kind
    return FittedModel(name, kind, module.config(), module=module.cpu(), params=params)


def _fit_var(cohort: Cohort, split: dict[str, list[str]], fit_ids: list[str], cfg: ForecastConfig, window: int,
             horizon: int, progress: Progress) -> FittedModel:
    """Choose lag and ridge on the val subjects (fitted on train), then refit on train + val."""
    train = [np.asarray(cohort.recording(r), np.float32) for r in split["train"]]
    val = fixed_windows(cohort, split["val"], window, stride=cfg.eval_stride).signals
    chosen, scores = RidgeVAR.select(train, val[..., : window - horizon], val[..., window - horizon :],
                                     cfg.var_lags, cfg.var_alphas)
    best = min(scores, key=lambda s: s["val_mse"])
    progress(f"  var          lag {chosen.lag}, ridge {chosen.alpha:g} (val MSE {best['val_mse']:.4f} of "
             f"{len(scores)} candidates)")
    chosen.fit([np.asarray(cohort.recording(r), np.float32) for r in fit_ids])
    return FittedModel("var", RidgeVAR.kind, chosen.config(), arrays=chosen.arrays(),
                       params={"lag": chosen.lag, "alpha": chosen.alpha, "val_mse": best["val_mse"]})


# ---------------------------------------------------------------------------------------- predicting


def _predict(model: FittedModel, context: np.ndarray, coords: Tensor, horizon: int,
             cfg: ForecastConfig) -> np.ndarray:
    if model.module is not None:
        module = model.module.to(cfg.device).eval()
        out = batched(lambda x: module(x, coords), context, cfg.batch_size, cfg.device)
        module.cpu()
        return out
    linear = LINEAR_FORECASTERS[model.kind].from_arrays(model.config, model.arrays)
    return linear.predict(context, horizon)


def _score(preds: dict[str, np.ndarray], target: np.ndarray
           ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rows, per_step, per_parcel = {}, {}, {}
    for name, pred in preds.items():
        err = (pred.astype(np.float64) - target) ** 2  # (n, P, H)
        per_step[name] = err.mean(axis=(0, 1))
        per_parcel[name] = np.array([r2_score(target[:, p], pred[:, p]) for p in range(target.shape[1])])
        rows[name] = {"mse": float(err.mean()), "r2": r2_score(target, pred),
                      "mse_first_step": float(per_step[name][0]), "mse_last_step": float(per_step[name][-1]),
                      "parcel_r2_median": float(np.median(per_parcel[name]))}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table, per_step, per_parcel

