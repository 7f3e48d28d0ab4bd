"""Zero-shot in-silico perturbation: which inputs would the frozen model need to change to see group B in A?

    representation(model, signals, coords, kind)      what is matched (below)
    optimise_perturbation(model, source, target, ...)  one additive perturbation δ of the source windows
    drive(model, signals, coords, parcels, signal)     add a signal to chosen parcels; forecast change elsewhere
    predict_perturbation(model, model_input, params)   the served `brainlm-perturbation` model's answer

Representations. "reconstruction" (the default): the model's predictions of the masked patches under a few
fixed random masks at its own mask ratio — the pretraining task, kept in distribution. "forecast": its
prediction of the last `horizon` patches of every parcel with those patches masked. "cls": the unmasked
encoder's CLS embedding.

Matching. δ (per parcel × time, or one offset per parcel) is shared by every source window; it minimises

    ‖mean_s r(x_s + δ) − mean_t r(x_t)‖²_w / ‖mean_s r(x_s) − mean_t r(x_t)‖²_w  +  λ Σ_p rms(δ_p)

where r is the representation and ‖·‖_w weighs each feature by the inverse of its variance within the groups
(a difference the size of the group means' noise counts little). The first term is 1 before the perturbation
and 0 when the source group's mean representation reaches the target group's; the second (a group lasso over
parcels) keeps δ on as few parcels as it can. It is minimised by proximal gradient descent with gradients
normalised to unit RMS: the relative size of the gradients across parcels is kept (Adam's per-coordinate
scaling would lose it), and the proximal step sets a parcel exactly to zero while its gradient stays below λ
times the typical one. Parcels and networks are ranked by rms(δ_p). The model's weights never change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from brainlm.config import REPRESENTATIONS, PerturbConfig
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

RECONSTRUCTION_MASKS = 2  # fixed random masks whose predictions make the "reconstruction" representation
PERTURBATION_MODEL = "brainlm-perturbation"  # registered name of the served perturbation model


class PerturbError(BrainLMError, ValueError):
    """A perturbation that cannot be computed as asked (unknown mode, parcel, or a horizon too long)."""


# ------------------------------------------------------------------------------------ representations


@contextlib.contextmanager
def frozen(model: BrainLM) -> Iterator[BrainLM]:
    """The model in eval mode with gradients off for its weights (they flow to the input only)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def forecast(model: BrainLM, signals: Tensor, coords: Tensor, horizon: int = 1) -> Tensor:
    """(B, P, horizon · patch) prediction of each parcel's last `horizon` patches, which are masked.

    Differentiable with respect to `signals`. Everything before the horizon is visible.
    """
    B, P, T = signals.shape
    N = T // model.cfg.patch_size
    if not 1 <= horizon < N:
        raise PerturbError(f"horizon must be between 1 and {N - 1} patches for a {T}-TR window, got {horizon}")
    order = torch.arange(P * N, dtype=torch.float32, device=signals.device).reshape(P, N) / (P * N)
    order[:, N - horizon :] += 1.0  # the highest noise is masked: exactly the last `horizon` patches
    out = model(signals, coords, mask_ratio=horizon / N, noise=order.reshape(1, -1).expand(B, -1))
    return out.pred[:, :, N - horizon :].reshape(B, P, -1)


def reconstruction(model: BrainLM, signals: Tensor, coords: Tensor, draws: int = RECONSTRUCTION_MASKS,
                   seed: int = 0) -> Tensor:
    """(B, features) the model's predictions of the masked patches under `draws` fixed random masks.

    The masks are drawn at the model's own mask ratio from `seed` and are the same for every window, so the
    features line up across windows and groups: this is the pretraining task itself, kept in distribution.
    """
    B, P, T = signals.shape
    N = T // model.cfg.patch_size
    generator = torch.Generator().manual_seed(seed)
    predictions = []
    for _ in range(draws):
        noise = torch.rand(1, P * N, generator=generator).to(signals.device).expand(B, -1)
        out = model(signals, coords, noise=noise)
        predictions.append(out.pred[:, out.mask[0].bool()].reshape(B, -1))
    return torch.cat(predictions, dim=1)


def representation(model: BrainLM, signals: Tensor, coords: Tensor, kind: str = "reconstruction",
                   horizon: int = 1, seed: int = 0) -> Tensor:
    """(B, features) what a perturbation is matched on; differentiable with respect to `signals`.

    "reconstruction": the masked-patch predictions under masks drawn from `seed`; "forecast": the predicted
    last `horizon` patches; "cls": the unmasked encoder's CLS embedding.
    """
    if kind == "reconstruction":
        return reconstruction(model, signals, coords, seed=seed)
    if kind == "cls":
        latent, _, _, _ = model.forward_encoder(signals, coords, 0.0)
        return latent[:, 0]
    if kind == "forecast":
        return forecast(model, signals, coords, horizon).reshape(signals.shape[0], -1)
    raise PerturbError(f"unknown representation {kind!r}; choose one of {list(REPRESENTATIONS)}")


# ---------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class PerturbationResult:
    delta: np.ndarray  # (P, T) the perturbation (constant over time in "parcel" mode)
    size: np.ndarray  # (P,) rms of each parcel's perturbation, the ranking score
    loss_start: float  # matching loss before (1 by construction) and after
    loss_end: float
    history: list[float]  # matching loss every step
    parcels: pd.DataFrame  # name, network, size, rank (1 = largest), sorted by size
    networks: pd.DataFrame  # network, parcels, size (mean over its parcels), share of the total, sorted


def optimise_perturbation(model: BrainLM, source: Tensor, target: Tensor, coords: Tensor, cfg: PerturbConfig,
                          parcel_names: list[str] | None = None,
                          network_labels: list[str] | None = None) -> PerturbationResult:
    """The sparse additive perturbation that moves the source windows' mean representation onto the target's.

    source (S, P, T) and target (R, P, T) are windows of the same length and parcels; coords (P, 3).
    """
    _, P, T = source.shape
    with frozen(model):
        with torch.no_grad():
            before = representation(model, source, coords, cfg.representation, cfg.horizon, cfg.seed)
            after = representation(model, target, coords, cfg.representation, cfg.horizon, cfg.seed)
            goal, start = after.mean(0), before.mean(0)
            # Each feature counts in units of its spread within the groups: a difference that is only noise of
            # the group means weighs little, and the penalty then keeps δ off the parcels that would chase it.
            spread = torch.cat([before - start, after - goal]).pow(2).mean(0)
            weight = 1 / (spread + 1e-6 * spread.mean() + 1e-12)
        scale = (weight * (start - goal) ** 2).sum().clamp(min=1e-12)
        delta = torch.zeros(P, T if cfg.mode == "parcel_time" else 1, requires_grad=True)

        def matching(x: Tensor) -> Tensor:
            r = representation(model, x, coords, cfg.representation, cfg.horizon, cfg.seed)
            return (weight * (r.mean(0) - goal) ** 2).sum() / scale

        history = []
        for step in range(cfg.steps):
            loss = matching(source + delta)
            (grad,) = torch.autograd.grad(loss, delta)
            history.append(loss.item())
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))  # cosine to zero: settles
            with torch.no_grad():
                delta -= lr * grad / grad.pow(2).mean().sqrt().clamp(min=1e-20)
                rms = delta.pow(2).mean(1, keepdim=True).sqrt()
                delta *= (1 - lr * cfg.sparsity / rms.clamp(min=1e-20)).clamp(min=0)  # group soft-threshold
        with torch.no_grad():
            end = float(matching(source + delta))
    full = delta.detach().expand(P, T).numpy().astype(np.float64)
    size = np.sqrt((full**2).mean(1))
    parcels, networks = rank_parcels(size, parcel_names, network_labels)
    return PerturbationResult(delta=full, size=size, loss_start=1.0, loss_end=end, history=history,
                              parcels=parcels, networks=networks)


def rank_parcels(size: np.ndarray, parcel_names: list[str] | None,
                 network_labels: list[str] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parcels sorted by `size` (rank 1 = largest), and networks by their parcels' mean size."""
    P = len(size)
    names = parcel_names or [str(i) for i in range(P)]
    labels = network_labels or [""] * P
    parcels = pd.DataFrame({"name": names, "network": labels, "size": size})
    parcels = parcels.sort_values("size", ascending=False, kind="stable").reset_index(drop=True)
    parcels["rank"] = np.arange(1, P + 1)
    rows = []
    for network in dict.fromkeys(n for n in labels if n):
        members = np.array(labels) == network
        rows.append({"network": network, "parcels": int(members.sum()), "size": float(size[members].mean()),
                     "share": float(size[members].sum() / max(size.sum(), 1e-20))})
    networks = pd.DataFrame(rows, columns=["network", "parcels", "size", "share"])
    networks = networks.sort_values("size", ascending=False, kind="stable").reset_index(drop=True)
    return parcels, networks


# ------------------------------------------------------------------------------------------- drive


@dataclass(frozen=True)
class DriveResult:
    change: np.ndarray  # (P,) rms change of each parcel's forecast, over windows and forecast TRs
    driven: np.ndarray  # (P,) bool: the parcels the signal was added to
    parcels: pd.DataFrame  # name, network, driven, change, sorted by change (undriven parcels first)
    networks: pd.DataFrame  # network, parcels, change (mean over its undriven parcels), sorted


@torch.no_grad()
def drive(model: BrainLM, signals: Tensor, coords: Tensor, parcels: list[int], signal: np.ndarray,
          horizon: int = 1, parcel_names: list[str] | None = None,
          network_labels: list[str] | None = None) -> DriveResult:
    """Add `signal` (T,) or (len(parcels), T) to the chosen parcels of every window; report forecast changes."""
    B, P, T = signals.shape
    positions = _positions(parcels, P)
    perturbation = np.zeros((P, T), dtype=np.float32)
    perturbation[positions] = _as_rows(signal, len(positions), T)
    with frozen(model):
        base = forecast(model, signals, coords, horizon)
        moved = forecast(model, signals + torch.from_numpy(perturbation), coords, horizon)
    change = ((moved - base) ** 2).mean((0, 2)).sqrt().double().numpy()
    driven = np.zeros(P, dtype=bool)
    driven[positions] = True
    names = parcel_names or [str(i) for i in range(P)]
    labels = network_labels or [""] * P
    table = pd.DataFrame({"name": names, "network": labels, "driven": driven, "change": change})
    table = table.sort_values(["driven", "change"], ascending=[True, False], kind="stable").reset_index(drop=True)
    rows = [{"network": n, "parcels": int(((np.array(labels) == n) & ~driven).sum()),
             "change": float(change[(np.array(labels) == n) & ~driven].mean())}
            for n in dict.fromkeys(n for n in labels if n) if ((np.array(labels) == n) & ~driven).any()]
    networks = pd.DataFrame(rows, columns=["network", "parcels", "change"])
    networks = networks.sort_values("change", ascending=False, kind="stable").reset_index(drop=True)
    return DriveResult(change=change, driven=driven, parcels=table, networks=networks)


def drive_signal(kind: str, timepoints: int, amplitude: float = 1.0, period: float = 40.0) -> np.ndarray:
    """(T,) a named driving signal: "sine" or "block" (on/off) of `period` TRs, or "constant"."""
    t = np.arange(timepoints, dtype=np.float64)
    if kind == "sine":
        wave = np.sin(2 * np.pi * t / period)
    elif kind == "block":
        wave = ((t % period) >= period / 2).astype(np.float64)
    elif kind == "constant":
        wave = np.ones(timepoints)
    else:
        raise PerturbError(f"unknown signal {kind!r}; choose sine, block or constant")
    return (amplitude * wave).astype(np.float32)


def _positions(parcels: list[int], n_parcels: int) -> np.ndarray:
    positions = np.asarray(parcels, dtype=np.int64)
    if positions.size == 0 or positions.min() < 0 or positions.max() >= n_parcels:
        raise PerturbError(f"parcels to drive must be positions in [0, {n_parcels}), got {parcels}")
    return np.unique(positions)


def _as_rows(signal: np.ndarray, rows: int, timepoints: int) -> np.ndarray:
    signal = np.asarray(signal, dtype=np.float32)
    if signal.shape == (timepoints,):
        return np.broadcast_to(signal, (rows, timepoints))
    if signal.shape == (rows, timepoints):
        return signal
    raise PerturbError(f"signal must have shape ({timepoints},) or ({rows}, {timepoints}), got {signal.shape}")


def predict_perturbation(model: BrainLM, model_input: Mapping[str, Any],
                         params: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The served model's answer (serving_perturbation.py calls this).

    input  {"signals" (B, P, T), "coords" (P, 3), "perturbation" (P, T) added to every window}
    params {"horizon": patches to forecast (default 1)}
    output {"forecast" (B, P, horizon · patch), "perturbed_forecast" (same), "change" (B, P) rms change}
    """
    horizon = int((params or {}).get("horizon", 1))
    signals = torch.from_numpy(np.asarray(model_input["signals"], dtype=np.float32))
    coords = torch.from_numpy(np.asarray(model_input["coords"], dtype=np.float32))
    perturbation = torch.from_numpy(np.asarray(model_input["perturbation"], dtype=np.float32))
    if perturbation.shape != signals.shape[1:]:
        raise PerturbError(f"perturbation must have the signals' (parcels, time) shape {tuple(signals.shape[1:])}, "
                           f"got {tuple(perturbation.shape)}")
    with torch.no_grad(), frozen(model):
        base = forecast(model, signals, coords, horizon)
        moved = forecast(model, signals + perturbation, coords, horizon)
    return {"forecast": base.numpy(), "perturbed_forecast": moved.numpy(),
            "change": ((moved - base) ** 2).mean(-1).sqrt().numpy()}
