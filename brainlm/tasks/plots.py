"""The figures a person looks at after a task (matplotlib, written as PNG files; each function returns its path).

    evaluation       forecast_traces, forecast_error_by_step, clinical_scatter
    interpretation   glass_brain (a value per parcel at the atlas centroids), connectome (the strongest edges
                     of a parcel × parcel matrix), confusion (network identification)

Glass brains are nilearn's `plot_markers` / `plot_connectome` over MNI centroids, so any atlas with coordinates
is drawn without a label image. Matplotlib runs on its Agg backend (files only, no display).
"""

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


GLASS_MODE = "lzry"  # left, top, right: the views that show a whole-brain marker map


def glass_brain(values: np.ndarray, coords: np.ndarray, path: str | Path, title: str,
                diverging: bool = False, highlight: np.ndarray | None = None) -> Path:
    """One marker per parcel, coloured by `values`; `diverging` centres the colour scale on zero.

    `highlight` (bool per parcel) draws those parcels larger, e.g. the ones that survive correction.
    """
    plt = _pyplot()
    from nilearn import plotting

    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    top = float(np.abs(values).max()) or 1.0
    vmin, vmax = (-top, top) if diverging else (float(values.min()), float(values.max()) or 1.0)
    if vmin == vmax:
        vmax = vmin + 1.0
    sizes = np.full(len(values), 20.0)
    if highlight is not None:
        sizes[np.asarray(highlight, dtype=bool)] = 60.0
    fig = plt.figure(figsize=(10, 3.2))
    display = plotting.plot_markers(values, np.asarray(coords, dtype=np.float64), node_size=sizes,
                                    node_cmap="RdBu_r" if diverging else "viridis", node_vmin=vmin,
                                    node_vmax=vmax, display_mode=GLASS_MODE, title=title, figure=fig)
    return _save(fig, path, plt, display)


def connectome(matrix: np.ndarray, coords: np.ndarray, labels: list[str], path: str | Path, title: str,
               edges_per_parcel: float = 1.0) -> Path:
    """The strongest edges of a parcel × parcel matrix (symmetrised, above its median pair), nodes coloured by label.

    About `edges_per_parcel` × P edges are drawn, so a 400-parcel atlas stays readable.
    """
    plt = _pyplot()
    from nilearn import plotting

    m = np.asarray(matrix, dtype=np.float64)
    m = (m + m.T) / 2
    off = ~np.eye(len(m), dtype=bool)
    m = np.where(off, m - np.median(m[off]), 0.0).clip(min=0)  # edges above the typical pair
    upper = np.sort(m[np.triu(off)])[::-1]
    keep = max(1, min(len(upper), round(edges_per_parcel * len(m))))
    threshold = upper[keep - 1] if upper[keep - 1] > 0 else np.inf
    m = np.where(m >= threshold, m, 0.0)
    names = list(dict.fromkeys(labels))
    palette = plt.get_cmap("tab20")
    colours = [palette(names.index(label) % 20) if label else (0.6, 0.6, 0.6, 1.0) for label in labels]
    fig = plt.figure(figsize=(10, 3.2))
    display = plotting.plot_connectome(m, np.asarray(coords, dtype=np.float64), node_color=colours, node_size=15,
                                       edge_cmap="Reds", edge_vmin=0.0, edge_vmax=float(m.max()) or 1.0,
                                       display_mode=GLASS_MODE, title=title, figure=fig, colorbar=False,
                                       edge_kwargs={"linewidth": 0.6})
    return _save(fig, path, plt, display)


def confusion(matrices: dict[str, np.ndarray], networks: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrices side by side (rows: true network, columns: predicted)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 1, 4.2), squeeze=False)
    for ax, (name, counts) in zip(axes[0], matrices.items(), strict=True):
        counts = np.asarray(counts, dtype=np.float64)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"{name}\naccuracy {np.trace(counts) / max(counts.sum(), 1):.2f}", fontsize=9)
        ticks = np.arange(len(networks))
        ax.set_xticks(ticks, networks, rotation=90, fontsize=6)
        ax.set_yticks(ticks, networks if ax is axes[0][0] else [""] * len(networks), fontsize=6)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true network", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the panels' own
    return _save(fig, path, plt, tight=False)


def _save(fig, path: str | Path, plt, display=None, tight: bool = True) -> Path:
    """Write `fig` as a PNG (white background) and free it; `display` is a nilearn display drawn on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight and display is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")
    if display is not None:
        display.close()
    plt.close(fig)
    return path
