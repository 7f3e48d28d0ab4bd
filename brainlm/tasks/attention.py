"""Where the model looks: attention read-outs, per-recording CLS-attention maps, and group contrasts.

    windows(recording, window)                  non-overlapping windows from a recording's start
    attention_weights(blocks, layers, reduce)   context: chosen blocks compute their weights explicitly
    cls_maps(model, cohort, ids, cfg)           (recordings, parcels) CLS attention mass on each parcel
    split_groups(cohort, column, ...)           two groups from a manifest or phenotype column
    permutation_test(values, in_a, participants) t per feature, permutation p, FDR and max-statistic FWER
    cls_contrast(model, cohort, groups, cfg)    per-parcel and per-network contrast of the CLS maps

The model computes attention through `scaled_dot_product_attention`, which never materialises the weights.
`attention_weights` switches chosen blocks to the explicit path for one forward pass (a pre-hook sets the
block's `need_weights`) and reduces the (B, heads, L, L) weights at once, so only the layer asked for pays
the O(L²) memory and nothing of that size outlives its block.

Permutations respect who the recordings belong to. Between-participant groups (a phenotype, or a condition
each participant has only one of) are tested on participant means, with group labels permuted across
participants; within-participant groups (task and rest recordings of the same people) are tested on values
centred within each participant, with labels permuted within participants (participants with only one of
the two groups carry no within-participant information and are left out). Either way a participant's
several recordings never count as independent evidence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from brainlm.config import AttentionConfig
from brainlm.data.atlas import Atlas
from brainlm.data.store import Cohort
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM

DEFAULT_NETWORKS = "yeo7"  # the network column used when none is named, if the atlas has it
# Columns that name recordings or people, or describe files: never a grouping (group names reach MLflow).
IDENTIFYING_COLUMNS = frozenset({"recording", "participant", "participant_id", "checksum", "source"})
MIN_UNITS = 2  # units (participants or recordings) per group below which no test is attempted


class AttentionError(BrainLMError, ValueError):
    """An attention read-out or contrast that cannot be made as asked (unknown column, too few recordings)."""


# ------------------------------------------------------------------------------------------ read-outs


def windows(recording: np.ndarray, window: int, max_windows: int | None = None) -> Tensor:
    """(W, P, window) float32: consecutive non-overlapping windows of a parcels × time recording.

    Windows start at TR 0, so window w covers the same TRs in every recording (task designs stay aligned).
    """
    timepoints = recording.shape[1]
    count = timepoints // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise AttentionError(f"a recording of {timepoints} TRs is shorter than the model's {window}-TR window")
    crop = np.asarray(recording[:, : count * window], dtype=np.float32)
    return torch.from_numpy(crop.reshape(crop.shape[0], count, window).transpose(1, 0, 2).copy())


def select_layers(n_blocks: int, layer: int | None) -> list[int]:
    """Block positions for `layer` (an index, negative from the end) or every block (None)."""
    if layer is None:
        return list(range(n_blocks))
    if not -n_blocks <= layer < n_blocks:
        raise AttentionError(f"layer {layer} does not exist: the model has {n_blocks} blocks "
                             f"(use 0..{n_blocks - 1}, negative counts from the end)")
    return [layer % n_blocks]


@contextlib.contextmanager
def attention_weights(blocks: nn.ModuleList, layers: list[int],
                      reduce: Callable[[Tensor], Tensor]) -> Iterator[list[Tensor]]:
    """While active, each chosen block's attention returns weights; `reduce(weights)` is appended to the list.

    weights are (B, heads, L, L) with rows summing to 1; the block itself receives no weights back, so a
    caller that did not ask for them keeps its fast path everywhere else.
    """
    captured: list[Tensor] = []

    def ask_for_weights(module, args):
        return (args[0], True)

    def keep_reduced(module, args, output):
        out, weights = output
        captured.append(reduce(weights))
        return out, None

    handles = []
    try:
        for i in layers:
            handles.append(blocks[i].attn.register_forward_pre_hook(ask_for_weights))
            handles.append(blocks[i].attn.register_forward_hook(keep_reduced))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def cls_attention(model: BrainLM, signals: Tensor, coords: Tensor, layer: int | None = -1) -> Tensor:
    """(B, P): the CLS token's attention mass on each parcel (summed over its patches, mean over heads).

    With `layer=None` the blocks' maps are averaged. Nothing is masked (the model sees every token).
    """
    B, P, T = signals.shape
    N = T // model.cfg.patch_size

    def reduce(weights: Tensor) -> Tensor:
        return weights[:, :, 0, 1:].mean(1).reshape(B, P, N).sum(-1)

    with attention_weights(model.blocks, select_layers(len(model.blocks), layer), reduce) as maps:
        model.embed(signals, coords)
    return torch.stack(maps).mean(0)


def cls_maps(model: BrainLM, cohort: Cohort, recording_ids: list[str], cfg: AttentionConfig) -> np.ndarray:
    """(recordings, parcels): each recording's CLS-attention map, averaged over its windows."""
    model.eval()
    coords = torch.from_numpy(cohort.atlas.coords)
    maps = []
    for recording_id in recording_ids:
        x = windows(cohort.recording(recording_id), model.cfg.window, cfg.max_windows)
        maps.append(cls_attention(model, x, coords, cfg.layer).mean(0).numpy())
    return np.stack(maps).astype(np.float64)


# --------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Groups:
    """Two groups of recordings; every contrast is `names[0]` minus `names[1]`.

    `participants` (one per recording) only decides how labels are permuted: it never leaves this process.
    """

    column: str
    names: tuple[str, str]
    recording_ids: list[str]
    in_a: np.ndarray  # (R,) bool: True for the first group
    participants: np.ndarray  # (R,) participant of each recording
    excluded: int  # recordings with no value in the column, or a value in neither group

    def counts(self) -> dict[str, int]:
        """Recordings and participants per group (numbers only: safe to log)."""
        a, b = self.in_a, ~self.in_a
        return {
            "recordings_a": int(a.sum()), "recordings_b": int(b.sum()),
            "participants_a": len(set(self.participants[a])), "participants_b": len(set(self.participants[b])),
            "recordings_excluded": self.excluded,
        }


def split_groups(cohort: Cohort, column: str, groups: tuple[str, str] | None = None,
                 threshold: float | None = None) -> Groups:
    """Two groups of the cohort's recordings from a manifest column (e.g. `condition`) or a phenotype column.

    Categorical: `groups=(A, B)` picks two values (the contrast is A − B); without it the column must hold
    exactly two values. Numeric: `threshold=x` splits into `column>=x` (first) and `column<x`. Recordings
    whose value is missing or in neither group are left out and counted.
    """
    values = _column_values(cohort, column)
    if threshold is not None:
        if groups is not None:
            raise AttentionError("give either two group values or a threshold, not both")
        numeric = pd.to_numeric(values, errors="coerce")
        present = values.notna() & (values.astype(str).str.strip() != "")
        if numeric[present].isna().any():
            bad = sorted(set(values[present & numeric.isna()].astype(str)))[:5]
            raise AttentionError(f"column {column!r} is not numeric (values such as {bad}); a threshold "
                                 f"needs numbers, use --groups A B for categories")
        names = (f"{column}>={threshold:g}", f"{column}<{threshold:g}")
        label = pd.Series(np.where(numeric >= threshold, names[0], names[1]), index=values.index)
        label[numeric.isna()] = ""
    else:
        label = values.fillna("").astype(str).str.strip()
        found = sorted(set(label) - {""})
        if groups is None:
            if len(found) != 2:
                raise AttentionError(f"column {column!r} has {len(found)} values ({found[:10]}); choose two with "
                                     f"--groups A B, or split a numeric column with --threshold")
            groups = (found[0], found[1])
        unknown = [g for g in groups if g not in found]
        if unknown:
            raise AttentionError(f"unknown group {unknown[0]!r} in column {column!r}; its values are {found[:20]}")
        if groups[0] == groups[1]:
            raise AttentionError(f"the two groups must differ, got {groups[0]!r} twice")
        names = (str(groups[0]), str(groups[1]))
    keep = label.isin(names).to_numpy()
    participants = cohort.manifest["participant"].astype(str).to_numpy()[keep]
    in_a = (label[keep] == names[0]).to_numpy()
    result = Groups(column=column, names=names, recording_ids=cohort.manifest["recording"][keep].tolist(),
                    in_a=in_a, participants=participants, excluded=int((~keep).sum()))
    for name, members in ((names[0], in_a), (names[1], ~in_a)):
        people = len(set(participants[members]))
        if people < MIN_UNITS:
            raise AttentionError(f"group {name!r} of column {column!r} has {people} participant(s); a contrast "
                                 f"needs at least {MIN_UNITS} per group")
    return result


def _column_values(cohort: Cohort, column: str) -> pd.Series:
    """One value per manifest row: the manifest's own column, else the participant's phenotype."""
    manifest, phenotypes = cohort.manifest, cohort.phenotypes
    if column in manifest.columns and column not in IDENTIFYING_COLUMNS:
        return manifest[column].reset_index(drop=True)
    if column in phenotypes.columns and column not in IDENTIFYING_COLUMNS:
        by_participant = dict(zip(phenotypes["participant_id"].astype(str), phenotypes[column], strict=True))
        return pd.Series([by_participant.get(p) for p in manifest["participant"].astype(str)])
    available = [c for c in [*manifest.columns, *phenotypes.columns] if c not in IDENTIFYING_COLUMNS]
    raise AttentionError(f"unknown group column {column!r}; cohort {cohort.name} has {available}")


# --------------------------------------------------------------------------------- permutation test


@dataclass(frozen=True)
class PermutationResult:
    t: np.ndarray  # (F,) Welch t of group a − group b on the tested units
    p: np.ndarray  # (F,) two-sided permutation p, uncorrected
    p_fdr: np.ndarray  # (F,) Benjamini-Hochberg adjusted
    p_fwer: np.ndarray  # (F,) max-statistic (family-wise) adjusted
    scheme: str  # "between participants" or "within participants"
    units_a: int
    units_b: int


def permutation_test(values: np.ndarray, in_a: np.ndarray, participants: np.ndarray, permutations: int = 5000,
                     seed: int = 0) -> PermutationResult:
    """Permutation test of a − b for every column of `values` (recordings × features).

    The permutations respect participants (see the module docstring). p-values count the observed
    labelling among the permutations ((1 + hits) / (1 + permutations)), so they are never 0; the max-statistic
    family is the columns of `values`.
    """
    values = np.asarray(values, dtype=np.float64)
    in_a = np.asarray(in_a, dtype=bool)
    participants = np.asarray(participants).astype(str)
    if permutations < 1:
        raise AttentionError(f"permutations must be >= 1, got {permutations}")
    units, labels, blocks, scheme = _design(values, in_a, participants)
    n_a, n_b = int(labels.sum()), int((~labels).sum())
    if min(n_a, n_b) < MIN_UNITS:
        raise AttentionError(f"{scheme}: {n_a} and {n_b} units in the two groups; a permutation test needs at "
                             f"least {MIN_UNITS} in each")
    observed = _welch_t(units, labels[None].astype(np.float64))[0]
    shuffled = _permuted_labels(labels, blocks, permutations, np.random.default_rng(seed))
    null = np.abs(_welch_t(units, shuffled))  # (permutations, F)
    strength = np.abs(observed) - 1e-12  # ties count as at least as extreme
    p = (1 + (null >= strength).sum(0)) / (1 + permutations)
    p_fwer = (1 + (null.max(1)[:, None] >= strength[None]).sum(0)) / (1 + permutations)
    return PermutationResult(t=observed, p=p, p_fdr=stats.false_discovery_control(p, method="bh"),
                             p_fwer=p_fwer, scheme=scheme, units_a=n_a, units_b=n_b)


def _design(values: np.ndarray, in_a: np.ndarray, participants: np.ndarray):
    """(units × features, unit labels, permutation blocks or None, scheme name)."""
    people, index = np.unique(participants, return_inverse=True)
    share_a = np.bincount(index, weights=in_a.astype(float), minlength=len(people)) / np.bincount(index)
    if np.all((share_a == 0) | (share_a == 1)):  # each participant in one group: test participant means
        sums = np.zeros((len(people), values.shape[1]))
        np.add.at(sums, index, values)
        return sums / np.bincount(index)[:, None], share_a == 1, None, "between participants"
    mixed = (share_a > 0) & (share_a < 1)
    keep = mixed[index]  # participants seen in both groups: centre their recordings, permute within each
    kept_index = index[keep]
    means = np.zeros((len(people), values.shape[1]))
    np.add.at(means, kept_index, values[keep])
    counts = np.maximum(np.bincount(kept_index, minlength=len(people)), 1)
    centred = values[keep] - (means / counts[:, None])[kept_index]
    return centred, in_a[keep], kept_index, "within participants"


def _permuted_labels(labels: np.ndarray, blocks: np.ndarray | None, permutations: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(permutations, units) float 0/1 labels, shuffled freely (blocks None) or within each block."""
    n = len(labels)
    keys = rng.random((permutations, n))
    if blocks is not None:  # sorting by block + a random key in [0, 1) shuffles only within blocks
        order = np.argsort(blocks, kind="stable")
        keys = keys + blocks[order][None]
        positions = np.argsort(keys, axis=1)
        shuffled = np.empty((permutations, n), dtype=bool)
        shuffled[:, order] = labels[order][positions]
        return shuffled.astype(np.float64)
    return labels[np.argsort(keys, axis=1)].astype(np.float64)


def _welch_t(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(S, F) Welch t of group 1 − group 0 for each of S labellings (S × units, 0/1) of units × features."""
    n_a = labels.sum(1, keepdims=True)
    n_b = labels.shape[1] - n_a
    sum_a, sq_a = labels @ values, labels @ values**2
    sum_b, sq_b = values.sum(0) - sum_a, (values**2).sum(0) - sq_a
    mean_a, mean_b = sum_a / n_a, sum_b / n_b
    var_a = np.maximum(sq_a - n_a * mean_a**2, 0) / (n_a - 1)
    var_b = np.maximum(sq_b - n_b * mean_b**2, 0) / (n_b - 1)
    se = np.sqrt(var_a / n_a + var_b / n_b)
    diff = mean_a - mean_b
    return np.divide(diff, se, out=np.zeros_like(diff), where=se > 1e-12 * (np.abs(diff) + 1))


# ------------------------------------------------------------------------------------------ contrast


@dataclass(frozen=True)
class Contrast:
    """A group contrast of per-parcel maps: tables by parcel and by network, and the group means."""

    groups: tuple[str, str]
    counts: dict[str, int]
    scheme: str
    parcels: pd.DataFrame  # name, network, mean_a, mean_b, difference, t, p, p_fdr, p_fwer (atlas order)
    networks: pd.DataFrame  # network, parcels, mean_a, mean_b, difference, t, p, p_fdr, p_fwer (by |t|)

    def top_networks(self) -> list[str]:
        return self.networks["network"].tolist()


def contrast(maps: np.ndarray, groups: Groups, parcel_names: list[str], network_labels: list[str] | None,
             permutations: int = 5000, seed: int = 0) -> Contrast:
    """Contrast per-parcel maps (recordings × parcels, rows in `groups.recording_ids` order) between groups.

    Parcels are one family of tests and networks (the mean over a network's parcels, unlabelled parcels
    left out) another; each gets its own FDR and FWER correction, from the same permutations.
    """
    maps = np.asarray(maps, dtype=np.float64)
    parcels = _table(maps, groups, permutation_test(maps, groups.in_a, groups.participants, permutations, seed))
    parcels.insert(0, "name", parcel_names)
    parcels.insert(1, "network", network_labels or [""] * len(parcel_names))
    networks = pd.DataFrame()
    if network_labels:
        labels = np.array(network_labels)
        names = [n for n in dict.fromkeys(network_labels) if n]
        if names:
            by_network = np.stack([maps[:, labels == n].mean(1) for n in names], axis=1)
            result = permutation_test(by_network, groups.in_a, groups.participants, permutations, seed)
            networks = _table(by_network, groups, result)
            networks.insert(0, "network", names)
            networks.insert(1, "parcels", [int((labels == n).sum()) for n in names])
            networks = networks.sort_values("t", key=np.abs, ascending=False, kind="stable").reset_index(drop=True)
    return Contrast(groups=groups.names, counts=groups.counts(), scheme=parcels.attrs["scheme"],
                    parcels=parcels, networks=networks)


def _table(values: np.ndarray, groups: Groups, result: PermutationResult) -> pd.DataFrame:
    mean_a, mean_b = values[groups.in_a].mean(0), values[~groups.in_a].mean(0)
    table = pd.DataFrame({"mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b, "t": result.t,
                          "p": result.p, "p_fdr": result.p_fdr, "p_fwer": result.p_fwer})
    table.attrs["scheme"] = result.scheme
    return table


def network_column(atlas: Atlas, requested: str | None) -> str:
    """`requested`, or for None: "yeo7" when the atlas has it, else its first network column, else ""."""
    if requested is not None:
        return requested
    if DEFAULT_NETWORKS in atlas.networks:
        return DEFAULT_NETWORKS
    return next(iter(atlas.networks), "")


def network_labels_or_none(cohort: Cohort, column: str | None) -> list[str] | None:
    """Each parcel's network in `column` (anatomical groups fill the gaps); None when there is no column.

    `column` None picks a default (`network_column`); "" asks for no network grouping.
    """
    column = network_column(cohort.atlas, column)
    if not column:
        return None
    if column not in cohort.atlas.networks:
        raise AttentionError(f"unknown network column {column!r}; atlas {cohort.atlas.name} has "
                             f"{sorted(cohort.atlas.networks) or 'no network columns'}")
    labels = cohort.atlas.network_labels(column)
    return ["" if label == "Unlabelled" else label for label in labels]


def cls_contrast(model: BrainLM, cohort: Cohort, groups: Groups, cfg: AttentionConfig) -> tuple[Contrast, np.ndarray]:
    """The CLS-attention contrast between two groups, and the maps it came from (recordings × parcels)."""
    maps = cls_maps(model, cohort, groups.recording_ids, cfg)
    labels = network_labels_or_none(cohort, cfg.networks)
    return contrast(maps, groups, cohort.atlas.names, labels, cfg.permutations, cfg.seed), maps


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int | None = None) -> float:
    """Share of the k highest-scoring items that are relevant (k defaults to the number relevant)."""
    relevant = np.asarray(relevant, dtype=bool)
    k = int(relevant.sum()) if k is None else k
    if k < 1:
        raise AttentionError("precision at k needs k >= 1 (no relevant items?)")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(relevant[top].mean())
