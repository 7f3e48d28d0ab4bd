"""Functional networks from attention: does the model treat the parcels of one network as belonging together?

    parcel_features(model, recordings, atlas, cfg)   one feature vector per parcel and method:
        attention     row p of the model's parcel-to-parcel attention (below), averaged over windows
        untrained     the same from an untrained model of the same architecture (random initialisation)
        fc            row p of the functional connectivity (Fisher-z correlation) of the same windows
        coordinates   the parcel's centroid: what anatomy alone tells
    score_networks(features, atlas, column, cfg)   kNN into the networks of an atlas column, the same
                                                   stratified folds for every method
    identify_networks(model, cohort, cfg)          both, for one column of a stored cohort
    network_table(model, recordings, atlas, columns, cfg)   several columns from one set of features

Parcel-to-parcel attention, for a chosen block (or the mean over blocks), averaged over heads:
  - source "decoder": the model is run as it was trained (random masks at its own mask ratio) and A[p, q] is the
    attention a masked token of parcel p pays to each visible token of parcel q. A masked token carries no
    signal, only its position, so this is where the model has learnt to look to fill parcel p in.
  - source "encoder": nothing is masked and A[p, q] is the attention of parcel p's tokens to parcel q's. This
    follows the signals' similarity as much as anything learnt: an untrained model's encoder attention
    already separates networks whose signals differ (see the `untrained` reference).
  `same_time` keeps only pairs of tokens with the same patch index; otherwise a query's attention is summed
  over all of parcel q's patches.

A parcel's features are its row of the symmetrised matrix, with the diagonal replaced by the row's mean (a
parcel's attention to itself says nothing about its network) and z-scored, so kNN compares the shape of the
rows. Labels come from any network column of the atlas; parcels the column leaves unlabelled (empty) are left
out and counted, and so are networks too small to appear in both the training and the test part of a fold.
The model may come from another atlas: it only needs the parcels' centroids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor

from brainlm.config import NetworksConfig
from brainlm.data.atlas import Atlas
from brainlm.data.store import Cohort
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM
from brainlm.tasks.attention import attention_weights, network_column, select_layers, untrained_like
from brainlm.tasks.common import cut_windows, sample_recordings

METHODS = ("attention", "fc", "untrained", "coordinates")
MIN_PARCELS_PER_NETWORK = 2  # a network must be in the training part of a fold when it is tested
_WEIGHTS_BUDGET = 2**26  # attention weights (floats) held at once: windows are batched to stay below it


class NetworksError(BrainLMError, ValueError):
    """A network identification that cannot be made as asked (unknown label column, too few labelled parcels)."""


# ---------------------------------------------------------------------------------- attention matrix


@torch.no_grad()
def parcel_attention(model: BrainLM, signals: Tensor, coords: Tensor, cfg: NetworksConfig,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Summed parcel-to-parcel attention of a batch of windows (B, P, T), and the matching pair counts.

    Returns (total (P, P), count (P, P)); total / count is the mean attention of a query token of parcel p
    to one token of parcel q (decoder: masked queries, visible keys). Summing lets callers pool windows.
    """
    B, P, T = signals.shape
    N = T // model.cfg.patch_size
    blocks = model.decoder_blocks if cfg.source == "decoder" else model.blocks
    layers = select_layers(len(blocks), cfg.layer)

    def reduce(weights: Tensor) -> Tensor:  # (B, heads, 1 + L, 1 + L) → (B, P, N, P, N) without the CLS
        return weights[:, :, 1:, 1:].mean(1).reshape(B, P, N, P, N)

    total = torch.zeros(P, P, dtype=torch.float64)
    count = torch.zeros(P, P, dtype=torch.float64)
    draws = cfg.mask_draws if cfg.source == "decoder" else 1
    for _ in range(draws):
        with attention_weights(blocks, layers, reduce) as captured:
            if cfg.source == "decoder":
                noise = torch.rand(B, P * N, generator=generator)
                mask = model(signals, coords, noise=noise).mask  # (B, P, N) 1 = masked
            else:
                model.embed(signals, coords)
                mask = None
        weights = torch.stack(captured).mean(0).double()
        pairs = _pairs(mask, B, P, N)  # which (query, key) tokens count
        if cfg.same_time:
            total += torch.diagonal(weights * pairs, dim1=2, dim2=4).sum((0, -1))
            count += torch.diagonal(pairs.expand_as(weights), dim1=2, dim2=4).sum((0, -1))
        else:  # a query's attention summed over all of the key parcel's tokens
            total += (weights * pairs).sum((0, 2, 4)) * N
            count += pairs.expand_as(weights).sum((0, 2, 4))
    return total, count


def _pairs(mask: Tensor | None, B: int, P: int, N: int) -> Tensor:
    """(B, P, N, P, N) 1 where the query token is masked and the key visible; all ones without a mask."""
    if mask is None:
        return torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    mask = mask.double()
    return mask[:, :, :, None, None] * (1 - mask)[:, None, None, :, :]


def attention_matrix(model: BrainLM, recordings: Iterable[np.ndarray], coords: np.ndarray,
                     cfg: NetworksConfig) -> np.ndarray:
    """(P, P) parcel-to-parcel attention, pooled over the windows of parcels × time `recordings`."""
    model.eval()
    P = len(coords)
    L = P * model.cfg.patches_per_parcel + 1
    heads = model.cfg.decoder_heads if cfg.source == "decoder" else model.cfg.heads
    batch = max(1, _WEIGHTS_BUDGET // (heads * L * L))
    generator = torch.Generator().manual_seed(cfg.seed)
    centroids = torch.from_numpy(np.asarray(coords, dtype=np.float32))
    total = torch.zeros(P, P, dtype=torch.float64)
    count = torch.zeros(P, P, dtype=torch.float64)
    for recording in recordings:
        x = torch.from_numpy(cut_windows(recording, model.cfg.window, max_windows=cfg.max_windows))
        for start in range(0, len(x), batch):
            t, c = parcel_attention(model, x[start : start + batch], centroids, cfg, generator)
            total, count = total + t, count + c
    return (total / count.clamp(min=1)).numpy()


def fc_matrix(recordings: Iterable[np.ndarray], window: int, max_windows: int | None) -> np.ndarray:
    """(P, P) mean Fisher-z correlation over recordings, each over the same windows the model sees."""
    total, n = 0.0, 0
    for recording in recordings:
        x = cut_windows(recording, window, max_windows=max_windows)  # (W, P, window)
        series = x.transpose(1, 0, 2).reshape(x.shape[1], -1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # a flat parcel has no correlation: 0
            corr = np.nan_to_num(np.corrcoef(series))
        total, n = total + np.arctanh(np.clip(corr, -0.999999, 0.999999)), n + 1
    if n == 0:
        raise NetworksError("no recordings to compute functional connectivity from")
    return total / n


def feature_rows(matrix: np.ndarray) -> np.ndarray:
    """Row p of the symmetrised matrix, diagonal replaced by the row mean, z-scored: one vector per parcel."""
    m = np.asarray(matrix, dtype=np.float64)
    m = (m + m.T) / 2
    off = ~np.eye(len(m), dtype=bool)
    m = np.where(off, m, (m * off).sum(1, keepdims=True) / max(len(m) - 1, 1))
    sd = m.std(1, keepdims=True)
    return (m - m.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def parcel_features(model: BrainLM, recordings: Callable[[], Iterator[np.ndarray]], atlas: Atlas,
                    cfg: NetworksConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({method: (P, F) features}, {method: (P, P) matrix}) for every method in METHODS.

    `recordings()` yields the parcels × time recordings afresh on each call (each method reads them once).
    """
    matrices = {
        "attention": attention_matrix(model, recordings(), atlas.coords, cfg),
        "fc": fc_matrix(recordings(), model.cfg.window, cfg.max_windows),
        "untrained": attention_matrix(untrained_like(model, cfg.seed), recordings(), atlas.coords, cfg),
    }
    features = {name: feature_rows(m) for name, m in matrices.items()}
    features["coordinates"] = atlas.coords.astype(np.float64)
    return features, matrices


def cohort_recordings(cohort: Cohort, cfg: NetworksConfig) -> Callable[[], Iterator[np.ndarray]]:
    """The recordings `cfg` picks from a stored cohort, read (memory-mapped) on each pass."""
    ids = sample_recordings(cohort.recording_ids, cfg.max_recordings, cfg.seed)
    return lambda: (cohort.recording(r) for r in ids)


# ------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class MethodScore:
    accuracy: float
    balanced_accuracy: float
    confusion: np.ndarray  # (K, K) counts: rows true network, columns predicted, in `networks` order
    predicted: list[str]  # one per labelled parcel


@dataclass(frozen=True)
class NetworkResult:
    column: str
    networks: list[str]  # the classes, in atlas order of first appearance
    positions: np.ndarray  # atlas rows of the parcels that were classified
    labels: list[str]  # their true networks
    excluded_unlabelled: int  # parcels with an empty label in `column`
    excluded_small: dict[str, int]  # networks left out for having fewer than 2 parcels: their sizes
    folds: int
    scores: dict[str, MethodScore]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # (P, P) per method, for figures

    @property
    def chance_accuracy(self) -> float:
        """Always guessing the largest network."""
        return max(self.labels.count(n) for n in self.networks) / len(self.labels)

    @property
    def chance_balanced(self) -> float:
        return 1.0 / len(self.networks)

    def table(self) -> pd.DataFrame:
        """One row per method: accuracy, balanced_accuracy (then the counts they rest on)."""
        return pd.DataFrame([
            {"method": name, "accuracy": s.accuracy, "balanced_accuracy": s.balanced_accuracy}
            for name, s in self.scores.items()
        ])


def labelled_parcels(atlas: Atlas, column: str) -> tuple[np.ndarray, list[str], int, dict[str, int]]:
    """(atlas rows, their labels, number unlabelled, {too-small network: size}) for a network column."""
    if column not in atlas.networks:
        raise NetworksError(f"unknown label column {column!r}; atlas {atlas.name} has "
                            f"{sorted(atlas.networks) or 'no network columns'} (columns after index, name, x, "
                            f"y, z in its TSV)")
    labels = np.array([label.strip() for label in atlas.networks[column]])
    named = labels != ""
    sizes = pd.Series(labels[named]).value_counts()
    small = {str(n): int(c) for n, c in sizes.items() if c < MIN_PARCELS_PER_NETWORK}
    keep = named & ~np.isin(labels, list(small))
    if len(set(labels[keep])) < 2:
        raise NetworksError(f"too few labelled parcels in column {column!r} of atlas {atlas.name}: "
                            f"{int(keep.sum())} parcels in {len(set(labels[keep]))} network(s) with at least "
                            f"{MIN_PARCELS_PER_NETWORK} parcels; classifying needs two such networks")
    positions = np.flatnonzero(keep)
    return positions, labels[keep].tolist(), int((~named).sum()), small


def score_networks(features: dict[str, np.ndarray], atlas: Atlas, column: str, cfg: NetworksConfig,
                   matrices: dict[str, np.ndarray] | None = None) -> NetworkResult:
    """kNN of the labelled parcels into the networks of `column`: every method on the same folds."""
    positions, labels, unlabelled, small = labelled_parcels(atlas, column)
    y = np.array(labels)
    networks = list(dict.fromkeys(labels))
    folds = max(2, min(cfg.folds, min(labels.count(n) for n in networks)))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(positions, y))
    scores = {}
    for name, x in features.items():
        x = x[positions]
        predicted = np.empty(len(y), dtype=object)
        for train, test in splits:
            knn = KNeighborsClassifier(n_neighbors=min(cfg.neighbours, len(train)))
            predicted[test] = knn.fit(x[train], y[train]).predict(x[test])
        predicted = predicted.astype(str)
        scores[name] = MethodScore(
            accuracy=float((predicted == y).mean()),
            balanced_accuracy=float(balanced_accuracy_score(y, predicted)),
            confusion=confusion_matrix(y, predicted, labels=networks),
            predicted=predicted.tolist(),
        )
    return NetworkResult(column=column, networks=networks, positions=positions, labels=labels,
                         excluded_unlabelled=unlabelled, excluded_small=small, folds=folds, scores=scores,
                         matrices=matrices or {})


def identify_networks(model: BrainLM, cohort: Cohort, cfg: NetworksConfig) -> NetworkResult:
    """Classify the cohort's parcels into the networks of `cfg.labels` from each method's features."""
    column = label_column(cohort.atlas, cfg.labels)  # refuse a bad column before any attention is computed
    features, matrices = parcel_features(model, cohort_recordings(cohort, cfg), cohort.atlas, cfg)
    return score_networks(features, cohort.atlas, column, cfg, matrices)


def label_column(atlas: Atlas, requested: str | None) -> str:
    """The network column to classify into (default: "yeo7", else the atlas's first), checked to be usable."""
    column = network_column(atlas, requested)
    if not column:
        raise NetworksError(f"atlas {atlas.name} has no network columns to classify into; add one to its TSV "
                            f"(a column after index, name, x, y, z with a label per parcel)")
    labelled_parcels(atlas, column)
    return column


def network_table(model: BrainLM, recordings: Callable[[], Iterator[np.ndarray]], atlas: Atlas, columns: list[str],
                  cfg: NetworksConfig) -> pd.DataFrame:
    """Accuracy table for several label columns from one set of features.

    One row per (labels, method): networks, parcels, accuracy, balanced_accuracy, chance_accuracy,
    chance_balanced. `recordings` as for `parcel_features`.
    """
    features, _ = parcel_features(model, recordings, atlas, cfg)
    rows = []
    for column in columns:
        result = score_networks(features, atlas, column, cfg)
        for _, row in result.table().iterrows():
            rows.append({"labels": column, "networks": len(result.networks), "parcels": len(result.labels),
                         **row.to_dict(), "chance_accuracy": result.chance_accuracy,
                         "chance_balanced": result.chance_balanced})
    return pd.DataFrame(rows)
