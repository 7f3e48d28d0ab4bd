"""Reference predictors for masked-patch reconstruction, scored on exactly the model's masks.

A pretrained model is only worth something if it beats simple predictors on the same data, split and masks:

    zero      predict 0: the median of a robust-scaled series (the floor any model must clear)
    spatial   each masked value from the visible parcels at the same timepoint: the Gaussian conditional
              mean Σ_hv (Σ_vv + λI)⁻¹ x_v, with the parcel covariance Σ from the TRAINING split only
    temporal  linear interpolation of the parcel's own visible timepoints (constant beyond the first / last
              visible one; a parcel with nothing visible in the window predicts 0)

Every predictor maps (signals (B, P, T), mask (B, P, N)) → predictions (B, P, T), where the mask has one
entry per (parcel, patch) token, 1 = masked, as `BrainLMOutput.mask`. `brainlm.engine.evaluate` scores the
model and every reference on the model's own masks, so their figures are directly comparable.

Σ is the second moment about the median (robust scaling puts the median at 0), averaged over every timepoint
of the training recordings. On real resting-state data the spatial reference is the one to beat: a masked
patch is far more predictable from other parcels at the same timepoints than from its own neighbouring patches.
This module needs torch and numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

Predictor = Callable[[Tensor, Tensor], Tensor]  # (signals (B, P, T), mask (B, P, N)) → (B, P, T)

COVARIANCE_RECORDINGS = 512  # training_covariance reads at most this many recordings
DEFAULT_RIDGE = 1e-2  # λ = DEFAULT_RIDGE × trace(Σ) / P: 1 % of the average parcel variance
_SOLVE_BYTES = 64 * 1024**2  # the batched solves work through (P, P) float64 systems in chunks this big


# ------------------------------------------------------------------------------------------- covariance


def parcel_covariance(recordings: Iterable[np.ndarray | Tensor]) -> Tensor:
    """(P, P) float64 second moment Σ = mean over all timepoints of x xᵀ, from parcels × time arrays."""
    total, count = None, 0
    for rec in recordings:
        x = rec.double() if isinstance(rec, Tensor) else torch.from_numpy(np.array(rec, dtype=np.float64))
        if x.ndim != 2:
            raise ValueError(f"parcel_covariance expects parcels × time arrays, got shape {tuple(x.shape)}")
        total = x @ x.T if total is None else total + x @ x.T
        count += x.shape[1]
    if total is None or count == 0:
        raise ValueError("parcel_covariance: no recordings (or no timepoints) to estimate the covariance from")
    return total / count


def training_covariance(cohort, split: Mapping[str, list[str]]) -> Tensor:
    """Σ from the training recordings of `split` (as `Cohort.split` returns it), never the held-out ones.

    Refuses a split whose training recordings share a participant with its validation or test recordings:
    the spatial reference would then have seen the held-out subjects' covariance and flatter itself. At most
    `COVARIANCE_RECORDINGS` recordings are read, evenly spaced over the training list.
    """
    train = list(split.get("train", []))
    if not train:
        raise ValueError("training_covariance: the split has no training recordings")
    participant = dict(zip(cohort.manifest["recording"], cohort.manifest["participant"], strict=True))
    held_out = {participant[r] for name in ("val", "test") for r in split.get(name, [])}
    leaked = sorted({participant[r] for r in train} & held_out)
    if leaked:
        raise ValueError(f"training_covariance: {len(leaked)} participant(s) are in the training split and a "
                         f"held-out split; split by participant (Cohort.split) before estimating Σ")
    # Σ is P × P: a few hundred recordings pin it down, and a large cohort is not read in full before training.
    step = max(1, math.ceil(len(train) / COVARIANCE_RECORDINGS))
    return parcel_covariance(cohort.recording(r) for r in train[::step])


# ------------------------------------------------------------------------------------------- predictors


def expand_mask(mask: Tensor, timepoints: int) -> Tensor:
    """Token mask (B, P, N) → per-timepoint mask (B, P, T), bool, True = masked."""
    B, P, N = mask.shape
    if timepoints % N:
        raise ValueError(f"{timepoints} timepoints are not a whole number of the mask's {N} patches")
    return mask.bool().repeat_interleave(timepoints // N, dim=-1)


def predict_zero(signals: Tensor, mask: Tensor) -> Tensor:
    """The median of a robust-scaled series, 0, everywhere."""
    return torch.zeros_like(signals)


def predict_temporal(signals: Tensor, mask: Tensor) -> Tensor:
    """Linear interpolation of each parcel's visible timepoints; constant beyond the ends; 0 with none visible.

    Visible timepoints keep their values. Vectorised: the previous and next visible timepoint of every
    timepoint come from a running max / min over time indices.
    """
    B, P, T = signals.shape
    visible = ~expand_mask(mask, T)
    t = torch.arange(T, device=signals.device).expand(B, P, T)
    prev = torch.where(visible, t, -1).cummax(dim=-1).values  # last visible at or before t (-1: none)
    nxt = torch.where(visible, t, T).flip(-1).cummin(dim=-1).values.flip(-1)  # first visible at or after t
    has_prev, has_next = prev >= 0, nxt < T
    x = signals.float()
    x_prev = torch.gather(x, -1, prev.clamp(min=0))
    x_next = torch.gather(x, -1, nxt.clamp(max=T - 1))
    gap = (nxt - prev).clamp(min=1).float()
    between = x_prev + (x_next - x_prev) * (t - prev).float() / gap
    pred = torch.where(has_prev & has_next, between, torch.where(has_prev, x_prev, x_next))
    return torch.where(has_prev | has_next, pred, torch.zeros_like(pred)).to(signals.dtype)


class SpatialReference:
    """Gaussian conditional mean of masked parcels given the visible ones at the same timepoint.

    For one timepoint with hidden parcels h and visible parcels v: x̂_h = Σ_hv (Σ_vv + λI)⁻¹ x_v. Within a
    patch every timepoint has the same visible set, so each (window, patch) is one linear system solved for
    all its timepoints at once; systems are batched (hidden rows and columns replaced by the identity, so all
    have the same size). λ = ridge × trace(Σ) / P.
    """

    def __init__(self, covariance: Tensor, ridge: float = DEFAULT_RIDGE):
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"covariance must be (P, P), got {tuple(cov.shape)}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.covariance = (cov + cov.T) / 2
        self.ridge = ridge
        self.lam = ridge * float(torch.diagonal(self.covariance).mean())

    def __call__(self, signals: Tensor, mask: Tensor) -> Tensor:
        B, P, T = signals.shape
        if P != self.covariance.shape[0]:
            raise ValueError(f"signals have {P} parcels, the covariance {self.covariance.shape[0]}")
        N = mask.shape[-1]
        S = T // N
        expand_mask(mask, T)  # checks the shapes agree
        cov = self.covariance.to(signals.device)
        # One system per (window, patch): G = B·N groups, each with its visible pattern and S timepoints.
        vis = (~mask.bool()).permute(0, 2, 1).reshape(B * N, P).double()  # (G, P)
        x = signals.double().reshape(B, P, N, S).permute(0, 2, 1, 3).reshape(B * N, P, S)  # (G, P, S)
        out = torch.empty_like(x)
        chunk = max(1, _SOLVE_BYTES // (8 * P * P))
        eye = torch.eye(P, dtype=torch.float64, device=signals.device)
        for i in range(0, B * N, chunk):
            v = vis[i : i + chunk]
            outer = v[:, :, None] * v[:, None, :]
            # Visible block (Σ_vv + λI), identity on hidden rows/columns: its solve against x_v (hidden rows
            # zeroed) is (Σ_vv + λI)⁻¹ x_v on the visible rows and 0 on the hidden ones.
            system = outer * (cov + self.lam * eye) + (1 - v)[:, :, None] * eye
            weights = torch.linalg.solve(system, x[i : i + chunk] * v[:, :, None])
            pred = cov @ weights  # rows h: Σ_hv (Σ_vv + λI)⁻¹ x_v
            out[i : i + chunk] = torch.where(v[:, :, None].bool(), x[i : i + chunk], pred)
        return out.reshape(B, N, P, S).permute(0, 2, 1, 3).reshape(B, P, T).to(signals.dtype)


def reference_predictors(covariance: Tensor, ridge: float = DEFAULT_RIDGE) -> dict[str, Predictor]:
    """The three references by name: zero, spatial (from the training covariance), temporal."""
    return {"zero": predict_zero, "spatial": SpatialReference(covariance, ridge), "temporal": predict_temporal}


def scores(metrics: Mapping[str, float], prefix: str = "val_") -> dict[str, float]:
    """{reference: masked MSE} from an evaluation's metrics (`<prefix><name>_mse`, the model's own excluded)."""
    return {k[len(prefix):-len("_mse")]: v for k, v in metrics.items()
            if k.startswith(prefix) and k.endswith("_mse") and k != f"{prefix}masked_mse"}


def scores_text(metrics: Mapping[str, float], prefix: str = "val_") -> str:
    """"zero 0.5428, spatial 0.2610, temporal 0.9120": the references' masked MSE, for a progress line."""
    return ", ".join(f"{name} {value:.4f}" for name, value in scores(metrics, prefix).items())


def verdict(metrics: Mapping[str, float], prefix: str = "val_") -> str:
    """In words: does the model's masked MSE beat the best reference scored beside it?

    `metrics` holds `<prefix>masked_mse` and `<prefix><name>_mse` per reference (an evaluation's metrics).
    """
    model, refs = metrics[f"{prefix}masked_mse"], scores(metrics, prefix)
    if not refs:
        return "no reference was scored"
    best = min(refs, key=refs.get)
    if model < refs[best]:
        return f"beats every reference (best: {best}, masked MSE {refs[best]:.4f}; {model / refs[best]:.2f}× of it)"
    beaten = sorted(name for name, value in refs.items() if model < value)
    return (f"does NOT beat the {best} reference (masked MSE {refs[best]:.4f} against the model's {model:.4f}); "
            f"beats {', '.join(beaten) if beaten else 'none'}")
