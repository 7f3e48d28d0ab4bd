"""Forecasting references: persistence, per-parcel AR(1), ridge VAR over all parcels, an LSTM and a latent neural ODE.

Each takes a context (B, P, Tc) of robust-scaled parcel series and returns the next `horizon` TRs (B, P, horizon).
The linear ones are fitted in closed form on whole training recordings and rolled out step by step; their
parameters are plain arrays (`arrays()` / `from_arrays`), so they are saved as safetensors like every other model.
The LSTM and the ODE predict the change from the last observed TR (a residual on persistence), the usual way
to make a sequence model a strong reference rather than one that first has to learn to copy its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# ------------------------------------------------------------------------------------- linear models


class Persistence:
    """The last observed TR, repeated over the horizon."""

    kind = "persistence"

    def predict(self, context: np.ndarray, horizon: int) -> np.ndarray:
        return np.repeat(context[..., -1:], horizon, axis=-1)

    def config(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_arrays(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Persistence:
        return cls()


class AR1:
    """x_t = a_p x_{t−1} + c_p for each parcel p on its own (ordinary least squares), rolled out."""

    kind = "ar1"

    def __init__(self, a: np.ndarray | None = None, c: np.ndarray | None = None):
        self.a, self.c = a, c

    def fit(self, series: list[np.ndarray]) -> AR1:
        """series: recordings (P, T)."""
        prev = np.concatenate([x[:, :-1] for x in series], axis=1).astype(np.float64)
        nxt = np.concatenate([x[:, 1:] for x in series], axis=1).astype(np.float64)
        mp, mn = prev.mean(1), nxt.mean(1)
        var = ((prev - mp[:, None]) ** 2).mean(1)
        cov = ((prev - mp[:, None]) * (nxt - mn[:, None])).mean(1)
        self.a = (cov / np.maximum(var, 1e-12)).astype(np.float32)
        self.c = (mn - self.a * mp).astype(np.float32)
        return self

    def predict(self, context: np.ndarray, horizon: int) -> np.ndarray:
        x, out = context[..., -1], []
        for _ in range(horizon):
            x = self.a * x + self.c
            out.append(x)
        return np.stack(out, axis=-1).astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"a": self.a, "c": self.c}

    @classmethod
    def from_arrays(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> AR1:
        return cls(arrays["a"], arrays["c"])


class RidgeVAR:
    """A vector autoregression over all parcels, x_t = Σ_l A_l x_{t−l} + c, fitted by ridge regression.

    `select` picks the lag and ridge strength by the rolled-out forecast error on held-out recordings; the
    intercept is not penalised. The normal equations are accumulated recording by recording, so memory stays at
    (P·lag)² however much data there is.
    """

    kind = "var"

    def __init__(self, lag: int = 1, alpha: float = 1.0, weights: np.ndarray | None = None):
        self.lag, self.alpha, self.weights = lag, alpha, weights  # weights (P·lag + 1, P)

    @staticmethod
    def _design(x: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
        """(X (T − lag, P·lag + 1) = [x_{t−1}, …, x_{t−lag}, 1], Y (T − lag, P) = x_t) of one recording (P, T)."""
        T = x.shape[1]
        X = np.concatenate([x[:, lag - k : T - k].T for k in range(1, lag + 1)] + [np.ones((T - lag, 1))], axis=1)
        return X.astype(np.float64), x[:, lag:].T.astype(np.float64)

    @classmethod
    def _normal_equations(cls, series: list[np.ndarray], lag: int) -> tuple[np.ndarray, np.ndarray]:
        xtx, xty = 0.0, 0.0
        for x in series:
            X, Y = cls._design(x, lag)
            xtx, xty = xtx + X.T @ X, xty + X.T @ Y
        return xtx, xty

    @staticmethod
    def _solve(xtx: np.ndarray, xty: np.ndarray, alpha: float) -> np.ndarray:
        """Ridge weights; `alpha` is per training TR (xtx[-1, -1] counts them), so it means the same at any size."""
        penalty = np.full(len(xtx), alpha * xtx[-1, -1])
        penalty[-1] = 0.0  # the intercept
        return np.linalg.solve(xtx + np.diag(penalty), xty).astype(np.float32)

    def fit(self, series: list[np.ndarray]) -> RidgeVAR:
        xtx, xty = self._normal_equations(series, self.lag)
        self.weights = self._solve(xtx, xty, self.alpha)
        return self

    @classmethod
    def select(cls, train: list[np.ndarray], val_context: np.ndarray, val_target: np.ndarray,
               lags: tuple[int, ...], alphas: tuple[float, ...]) -> tuple[RidgeVAR, list[dict[str, float]]]:
        """The (lag, alpha) with the lowest rolled-out MSE on the validation windows, each fitted on `train`.

        Returns the chosen settings as an unfitted model (fit it on the data it should use) and every
        candidate's validation MSE.
        """
        scores = []
        for lag in lags:
            if lag >= val_context.shape[-1]:
                continue
            xtx, xty = cls._normal_equations(train, lag)
            for alpha in alphas:
                model = cls(lag, alpha, cls._solve(xtx, xty, alpha))
                mse = float(((model.predict(val_context, val_target.shape[-1]) - val_target) ** 2).mean())
                scores.append({"lag": lag, "alpha": alpha, "val_mse": mse})
        best = min(scores, key=lambda s: s["val_mse"])
        return cls(int(best["lag"]), float(best["alpha"])), scores

    def predict(self, context: np.ndarray, horizon: int) -> np.ndarray:
        """Rolled out: each predicted TR becomes the newest lag for the next."""
        B, P, _ = context.shape
        history = [context[..., -k] for k in range(1, self.lag + 1)]  # newest first, each (B, P)
        ones, out = np.ones((B, 1), np.float32), []
        for _ in range(horizon):
            x = np.concatenate([*history, ones], axis=1) @ self.weights
            out.append(x)
            history = [x, *history[:-1]]
        return np.stack(out, axis=-1).astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"lag": self.lag, "alpha": self.alpha}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    @classmethod
    def from_arrays(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> RidgeVAR:
        return cls(int(config["lag"]), float(config["alpha"]), arrays["weights"])


LINEAR_FORECASTERS = {c.kind: c for c in (Persistence, AR1, RidgeVAR)}


# ------------------------------------------------------------------------------------- neural models


class LSTMForecaster(nn.Module):
    """An LSTM over the context's TRs (all parcels as one input vector); a linear head maps its last state to the
    change of every parcel over the horizon."""

    kind = "lstm"

    def __init__(self, n_parcels: int, horizon: int, hidden: int = 128):
        super().__init__()
        self.n_parcels, self.horizon, self.hidden = n_parcels, horizon, hidden
        self.lstm = nn.LSTM(n_parcels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_parcels * horizon)
        nn.init.zeros_(self.head.weight)  # starts as persistence
        nn.init.zeros_(self.head.bias)

    def forward(self, context: Tensor, coords: Tensor | None = None) -> Tensor:
        B, P, _ = context.shape
        _, (h, _) = self.lstm(context.transpose(1, 2))
        return context[..., -1:] + self.head(h[-1]).reshape(B, P, self.horizon)

    def config(self) -> dict[str, Any]:
        return {"n_parcels": self.n_parcels, "horizon": self.horizon, "hidden": self.hidden}


class _ODEFunc(nn.Module):
    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, latent))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class ODEForecaster(nn.Module):
    """A latent neural ODE: a GRU encodes the context into z(0), dz/dt = f(z) is integrated over the horizon
    (torchdiffeq, fixed-step RK4, one unit of time per TR) and a linear read-out gives each parcel's change."""

    kind = "ode"

    def __init__(self, n_parcels: int, horizon: int, latent: int = 32, hidden: int = 64):
        super().__init__()
        self.n_parcels, self.horizon, self.latent, self.hidden = n_parcels, horizon, latent, hidden
        self.encoder = nn.GRU(n_parcels, hidden, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.func = _ODEFunc(latent, hidden)
        self.readout = nn.Linear(latent, n_parcels)
        nn.init.zeros_(self.readout.weight)  # starts as persistence
        nn.init.zeros_(self.readout.bias)

    def forward(self, context: Tensor, coords: Tensor | None = None) -> Tensor:
        from torchdiffeq import odeint

        _, h = self.encoder(context.transpose(1, 2))
        z0 = self.to_latent(h[-1])
        times = torch.arange(self.horizon + 1, dtype=context.dtype, device=context.device)
        z = odeint(self.func, z0, times, method="rk4", options={"step_size": 0.5})[1:]  # (H, B, latent)
        return context[..., -1:] + self.readout(z).permute(1, 2, 0)

    def config(self) -> dict[str, Any]:
        return {"n_parcels": self.n_parcels, "horizon": self.horizon, "latent": self.latent, "hidden": self.hidden}


NEURAL_FORECASTERS = {c.kind: c for c in (LSTMForecaster, ODEForecaster)}
