"""The figures a person looks at after an evaluation (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRACE_PARCELS = 3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def forecast_traces(result, path: Path) -> Path:
    """One held-out window: the context and the true horizon of a few parcels, and every model's forecast."""
    plt = _pyplot()
    target = result.examples["target"][0]  # (P, window)
    parcels = np.unique(np.linspace(0, target.shape[0] - 1, TRACE_PARCELS).round().astype(int))
    start = result.window - result.horizon
    t = np.arange(result.window)
    fig, axes = plt.subplots(len(parcels), 1, figsize=(10, 2.6 * len(parcels)), sharex=True, squeeze=False)
    for ax, p in zip(axes[:, 0], parcels, strict=True):
        ax.plot(t, target[p], color="black", lw=1.2, label="true")
        ax.axvline(start - 0.5, color="grey", ls=":", lw=1)
        for name in result.per_step_mse:
            ax.plot(t[start:], result.examples[name][0, p], lw=1.2, label=name)
        ax.set_ylabel(result.parcel_names[p], fontsize=8)
    axes[0, 0].set_title(f"forecast of the last {result.horizon} TRs of a held-out window (left of the dotted "
                         f"line: context)")
    axes[0, 0].legend(ncol=4, fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("TR within the window")
    return _save(fig, path, plt)


def forecast_error_by_step(result, path: Path) -> Path:
    """MSE at each predicted step, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, result.horizon + 1)
    for name, mse in result.per_step_mse.items():
        ax.plot(steps, mse, marker=".", label=name)
    ax.set_xlabel("steps ahead (TRs)")
    ax.set_ylabel("MSE (held-out windows)")
    ax.set_title("forecast error by step")
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def clinical_scatter(result, path: Path) -> Path:
    """Out-of-fold prediction against truth per subject, one panel per model (transformed scale)."""
    plt = _pyplot()
    names = list(result.predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pred = result.predictions[name]
        ax.scatter(result.truth, pred, s=14, alpha=0.7)
        if result.task == "regression":
            lo, hi = np.nanmin([result.truth, pred]), np.nanmax([result.truth, pred])
            ax.plot([lo, hi], [lo, hi], color="grey", ls=":", lw=1)
            ax.set_title(f"{name}: R² {result.table.loc[name, 'r2']:.2f}", fontsize=9)
        else:
            ax.axhline(0, color="grey", ls=":", lw=1)
            ax.set_title(f"{name}: AUC {result.table.loc[name, 'auc']:.2f}", fontsize=9)
        ax.set_xlabel(f"true {result.target} (transformed)")
    axes[0, 0].set_ylabel("predicted (out of fold)")
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
