"""Pictures of what the model knows: glass brains at the atlas centroids, attention connectomes, confusion matrices.

Every function writes one PNG and returns its path. Matplotlib runs on its Agg backend (no display needed);
glass brains are nilearn's `plot_markers` / `plot_connectome` over MNI centroids, so any atlas with
coordinates can be drawn without a label image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nilearn import plotting  # noqa: E402

DPI = 110
GLASS_MODE = "lzry"  # left, top, right: the views that show a whole-brain marker map


def glass_brain(values: np.ndarray, coords: np.ndarray, path: str | Path, title: str,
                diverging: bool = False, highlight: np.ndarray | None = None) -> Path:
    """One marker per parcel, coloured by `values`; `diverging` centres the colour scale on zero.

    `highlight` (bool per parcel) draws those parcels larger, e.g. the ones that survive correction.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    top = float(np.abs(values).max()) or 1.0
    vmin, vmax = (-top, top) if diverging else (float(values.min()), float(values.max()) or 1.0)
    if vmin == vmax:
        vmax = vmin + 1.0
    sizes = np.full(len(values), 20.0)
    if highlight is not None:
        sizes[np.asarray(highlight, dtype=bool)] = 60.0
    figure = plt.figure(figsize=(10, 3.2))
    display = plotting.plot_markers(values, np.asarray(coords, dtype=np.float64), node_size=sizes,
                                    node_cmap="RdBu_r" if diverging else "viridis", node_vmin=vmin,
                                    node_vmax=vmax, display_mode=GLASS_MODE, title=title, figure=figure)
    return _save(display, figure, path)


def connectome(matrix: np.ndarray, coords: np.ndarray, labels: list[str], path: str | Path, title: str,
               edges_per_parcel: float = 1.0) -> Path:
    """The strongest edges of a parcel × parcel matrix (symmetrised, above its median pair), nodes coloured by label.

    About `edges_per_parcel` × P edges are drawn, so a 400-parcel atlas stays readable.
    """
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
    figure = plt.figure(figsize=(10, 3.2))
    display = plotting.plot_connectome(m, np.asarray(coords, dtype=np.float64), node_color=colours, node_size=15,
                                       edge_cmap="Reds", edge_vmin=0.0, edge_vmax=float(m.max()) or 1.0, display_mode=GLASS_MODE, title=title,
                                       figure=figure, colorbar=False, edge_kwargs={"linewidth": 0.6})
    return _save(display, figure, path)


def confusion(matrices: dict[str, np.ndarray], networks: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrices side by side (rows: true network, columns: predicted)."""
    figure, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 1, 4.2), squeeze=False)
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
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the panels' own
    return _save(None, figure, path)


def _save(display, figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white")
    if display is not None:
        display.close()
    plt.close(figure)
    return path
