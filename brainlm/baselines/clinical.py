"""Clinical references: SVR / SVC and ridge on feature vectors (functional connectivity or frozen embeddings).

Models are fitted with scikit-learn (hyperparameters by inner cross-validation on the training subjects only),
then kept as plain arrays — the standardisation, support vectors and dual coefficients (kernel models) or the
weights (linear models) — so they are saved as safetensors and predict with numpy alone, no pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FISHER_CLIP = 0.999999  # keeps arctanh finite for a parcel pair that is (numerically) perfectly correlated


def fc_features(series: np.ndarray) -> np.ndarray:
    """Functional connectivity of one recording (P, T): the upper triangle of the parcel correlations, Fisher z.

    A parcel with no variance contributes zeros (no correlation), not NaN.
    """
    x = np.asarray(series, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    x = x / np.where(norm > 0, norm, 1.0)[:, None]
    corr = np.clip(x @ x.T, -FISHER_CLIP, FISHER_CLIP)
    upper = np.triu_indices(len(corr), k=1)
    return np.arctanh(corr[upper]).astype(np.float32)


@dataclass
class KernelModel:
    """An RBF-kernel SVR (regression) or SVC (classification): decision(x) = Σ_i dual_i K(sv_i, z(x)) + b."""

    mean: np.ndarray
    scale: np.ndarray
    support: np.ndarray
    dual: np.ndarray
    intercept: float
    gamma: float
    task: str
    chosen: dict[str, float]

    def decision(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        sv = self.support.astype(np.float64)
        d2 = (z**2).sum(1)[:, None] + (sv**2).sum(1)[None, :] - 2 * z @ sv.T
        return np.exp(-self.gamma * np.maximum(d2, 0.0)) @ self.dual.astype(np.float64) + self.intercept

    def config(self) -> dict[str, Any]:
        return {"model": "svc" if self.task == "classification" else "svr", "kernel": "rbf", "gamma": self.gamma,
                "intercept": self.intercept, "task_type": self.task, "chosen": self.chosen}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "support": self.support, "dual": self.dual}

    @classmethod
    def from_arrays(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> KernelModel:
        return cls(arrays["mean"], arrays["scale"], arrays["support"], arrays["dual"], float(config["intercept"]),
                   float(config["gamma"]), config["task_type"], config.get("chosen", {}))


@dataclass
class LinearModel:
    """Ridge regression, or a ridge classifier (targets ±1): decision(x) = z(x) · w + b."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    task: str
    chosen: dict[str, float]

    def decision(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return z @ self.coef.astype(np.float64) + self.intercept

    def config(self) -> dict[str, Any]:
        return {"model": "ridge", "intercept": self.intercept, "task_type": self.task, "chosen": self.chosen}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef}

    @classmethod
    def from_arrays(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> LinearModel:
        return cls(arrays["mean"], arrays["scale"], arrays["coef"], float(config["intercept"]),
                   config["task_type"], config.get("chosen", {}))


def _inner_cv(n: int, seed: int):
    from sklearn.model_selection import KFold

    return KFold(min(3, n), shuffle=True, random_state=seed)


def fit_kernel_model(x: np.ndarray, y: np.ndarray, task: str, cs: tuple[float, ...], seed: int) -> KernelModel:
    """StandardScaler + RBF SVR / SVC with C chosen by 3-fold inner cross-validation on (x, y) only."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    estimator = SVC(kernel="rbf", gamma="scale") if task == "classification" else SVR(kernel="rbf", gamma="scale")
    search = GridSearchCV(make_pipeline(StandardScaler(), estimator), {estimator.__class__.__name__.lower() + "__C": list(cs)},
                          cv=_inner_cv(len(y), seed))
    search.fit(x, y.astype(int) if task == "classification" else y)
    scaler, svm = search.best_estimator_[0], search.best_estimator_[1]
    dual, intercept = svm.dual_coef_[0], float(svm.intercept_[0])
    return KernelModel(scaler.mean_.astype(np.float32), _scale(scaler), svm.support_vectors_.astype(np.float32),
                       dual.astype(np.float32), intercept, float(svm._gamma), task,
                       {"C": float(search.best_params_[next(iter(search.best_params_))])})


def fit_linear_model(x: np.ndarray, y: np.ndarray, task: str, alphas: tuple[float, ...], seed: int) -> LinearModel:
    """StandardScaler + ridge (classification: ridge on ±1 targets) with alpha chosen by inner cross-validation."""
    from sklearn.linear_model import Ridge, RidgeClassifier
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    estimator = RidgeClassifier() if task == "classification" else Ridge()
    name = estimator.__class__.__name__.lower() + "__alpha"
    search = GridSearchCV(make_pipeline(StandardScaler(), estimator), {name: list(alphas)}, cv=_inner_cv(len(y), seed))
    search.fit(x, y.astype(int) if task == "classification" else y)
    scaler, ridge = search.best_estimator_[0], search.best_estimator_[1]
    return LinearModel(scaler.mean_.astype(np.float32), _scale(scaler), np.ravel(ridge.coef_).astype(np.float32),
                       float(np.ravel(ridge.intercept_)[0]), task, {"alpha": float(search.best_params_[name])})


def _scale(scaler) -> np.ndarray:
    return np.where(scaler.scale_ > 0, scaler.scale_, 1.0).astype(np.float32)
