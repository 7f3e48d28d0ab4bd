"""Where the model looks: attention read-outs, per-recording CLS-attention maps, and group contrasts.

    attention_weights(blocks, layers, reduce)   context: chosen blocks compute their weights explicitly
    cls_maps(model, cohort, ids, cfg)           each recording's CLS attention over parcels (and over time)
    split_groups(cohort, column, ...)           two groups from a manifest or phenotype column
    permutation_test(values, in_a, participants) a statistic per feature, permutation p, FDR and FWER
    cls_contrast(model, cohort, groups, cfg)    per-parcel and per-network contrast of the CLS maps

The model computes attention through `scaled_dot_product_attention`, which never materialises the weights.
`attention_weights` switches chosen blocks to the explicit path for one forward pass (a pre-hook sets the
block's `need_weights`) and reduces the (B, heads, L, L) weights at once, so only the layer asked for pays
the O(L²) memory and nothing of that size outlives its block.

Attention is a composition: the CLS token's weights over a window's tokens sum to one, so a change on some
tokens moves every other token's weight too. Contrasts are therefore made on centred log weights (log weight
minus the mean log weight over the window: the centred log-ratio of compositional data), where a change on
the visual tokens stays on the visual tokens. Two resolutions:
  - "recording": per parcel, the centred log of its attention mass (summed over its patches), averaged over
    the recording's windows; the statistic is a signed t. Right for states without a common time course
    (resting-state phenotypes).
  - "time": per parcel and token (window w, patch n) — windows start at TR 0, so token (w, n) is the same
    moment of every recording; the statistic is the mean of t² over the parcel's tokens, sensitive to a
    change of either sign at any moment. Right for designs locked to the recording start (a block task).

Permutations respect who the recordings belong to. Between-participant groups (a phenotype, or a condition
each participant has only one of) are tested on participant means with a Welch t, group labels permuted across
participants. Within-participant groups (task and rest recordings of the same people) are tested on each
participant's difference of group means with a one-sample t, labels permuted within participants
(participants seen in only one group carry no within-participant information and are left out). Either way a
participant's several recordings never count as independent evidence.
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

from brainlm.config import RESOLUTIONS, AttentionConfig
from brainlm.data.atlas import Atlas
from brainlm.data.store import Cohort
from brainlm.errors import BrainLMError
from brainlm.model import BrainLM
from brainlm.tasks.common import cut_windows

DEFAULT_NETWORKS = "yeo7"  # the network column used when none is named, if the atlas has it
# Columns that name recordings or people, or describe files: never a grouping (group names reach MLflow).
IDENTIFYING_COLUMNS = frozenset({"recording", "participant", "participant_id", "checksum", "source"})
MIN_UNITS = 2  # participants per group below which no test is attempted
_CHUNK_FLOATS = 2**24  # permutation statistics held at once: permutations are processed in chunks


class AttentionError(BrainLMError, ValueError):
    """An attention read-out or contrast that cannot be made as asked (unknown column, too few recordings)."""


# ------------------------------------------------------------------------------------------ read-outs


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
        return (args[0], True, *args[2:])  # need_weights is the second argument; the rest passes through

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


def untrained_like(model: BrainLM, seed: int) -> BrainLM:
    """A model of the same architecture with random weights (seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BrainLM(model.cfg).eval()


@torch.no_grad()
def cls_attention(model: BrainLM, signals: Tensor, coords: Tensor, layer: int | None = -1) -> Tensor:
    """(B, P, N): the CLS token's attention on each (parcel, patch) token, mean over heads.

    With `layer=None` the blocks' maps are averaged. Nothing is masked (the model sees every token).
    """
    B, P, T = signals.shape
    N = T // model.cfg.patch_size

    def reduce(weights: Tensor) -> Tensor:
        return weights[:, :, 0, 1:].mean(1).reshape(B, P, N)

    with attention_weights(model.blocks, select_layers(len(model.blocks), layer), reduce) as maps:
        model.embed(signals, coords)
    return torch.stack(maps).mean(0)


def centred_log(weights: Tensor) -> Tensor:
    """log weights minus their mean over the last two dims (per window): the centred log-ratio."""
    logs = weights.double().clamp(min=1e-30).log()
    return logs - logs.mean((-2, -1), keepdim=True)


@dataclass(frozen=True)
class ClsMaps:
    """Each recording's CLS attention: its mass per parcel, and the centred log weights the tests use."""

    mass: np.ndarray  # (R, P) attention mass on each parcel (summed over patches), mean over windows
    parcels: np.ndarray  # (R, P) centred log of the parcel masses, mean over windows ("recording")
    tokens: np.ndarray  # (R, P, W, N) centred log weight per token, first W windows of every recording ("time")


def cls_maps(model: BrainLM, cohort: Cohort, recording_ids: list[str], cfg: AttentionConfig) -> ClsMaps:
    """The CLS-attention maps of `recording_ids`; "time" maps keep the windows every recording has."""
    model.eval()
    coords = torch.from_numpy(cohort.atlas.coords)
    mass, parcels, tokens = [], [], []
    for recording_id in recording_ids:
        x = cut_windows(cohort.recording(recording_id), model.cfg.window, max_windows=cfg.max_windows)
        weights = cls_attention(model, torch.from_numpy(x), coords, cfg.layer)  # (W, P, N)
        per_parcel = weights.sum(-1, keepdim=True)  # (W, P, 1)
        mass.append(per_parcel[..., 0].mean(0).double().numpy())
        parcels.append(centred_log(per_parcel)[..., 0].mean(0).numpy())
        tokens.append(centred_log(weights).numpy())
    common = min(len(t) for t in tokens)
    tokens = np.stack([t[:common].transpose(1, 0, 2) for t in tokens])  # (R, P, W, N)
    return ClsMaps(mass=np.stack(mass), parcels=np.stack(parcels), tokens=tokens)


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
    statistic: np.ndarray  # (F,) signed t of group a − group b, or (pooled columns) the mean t² of the columns
    p: np.ndarray  # (F,) permutation p, uncorrected (two-sided: |t|, or t² which has no sign)
    p_fdr: np.ndarray  # (F,) Benjamini-Hochberg adjusted
    p_fwer: np.ndarray  # (F,) max-statistic (family-wise) adjusted over the F features
    scheme: str  # "between participants" or "within participants"
    units_a: int  # participants in group a that the test used
    units_b: int


def permutation_test(values: np.ndarray, in_a: np.ndarray, participants: np.ndarray, permutations: int = 5000,
                     seed: int = 0, pool: np.ndarray | None = None) -> PermutationResult:
    """Permutation test of group a − group b for every column of `values` (recordings × columns).

    `pool` (one feature index per column) pools columns into features tested by the mean t² of their columns
    (e.g. every time point of a parcel). The permutations respect participants (module docstring); p-values
    count the observed labelling among the permutations ((1 + hits) / (1 + permutations)), so they are never
    0, and the max-statistic family is the features.
    """
    values = np.asarray(values, dtype=np.float64)
    in_a = np.asarray(in_a, dtype=bool)
    participants = np.asarray(participants).astype(str)
    if permutations < 1:
        raise AttentionError(f"permutations must be >= 1, got {permutations}")
    design = _Design.of(values, in_a, participants)
    pool_matrix = _pool_matrix(pool, values.shape[1])

    def statistic(labels: np.ndarray) -> np.ndarray:  # (S, units) labellings → (S, F)
        t = design.t(labels)
        return t if pool_matrix is None else (t**2) @ pool_matrix

    observed = statistic(design.labels[None])[0]
    strength = np.abs(observed) * (1 - 1e-9)  # ties (to rounding) count as at least as extreme
    hits, max_hits = np.zeros(len(observed)), np.zeros(len(observed))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_FLOATS // max(1, design.size * values.shape[1]))
    for start in range(0, permutations, chunk):
        null = np.abs(statistic(design.shuffled(min(chunk, permutations - start), rng)))
        hits += (null >= strength).sum(0)
        max_hits += (null.max(1)[:, None] >= strength[None]).sum(0)
    p = (1 + hits) / (1 + permutations)
    return PermutationResult(statistic=observed, p=p, p_fdr=stats.false_discovery_control(p, method="bh"),
                             p_fwer=(1 + max_hits) / (1 + permutations), scheme=design.scheme,
                             units_a=design.units_a, units_b=design.units_b)


def _pool_matrix(pool: np.ndarray | None, columns: int) -> np.ndarray | None:
    """(columns, F) averaging matrix for pooled features, or None."""
    if pool is None:
        return None
    pool = np.asarray(pool, dtype=np.int64)
    if pool.shape != (columns,) or pool.min() < 0:
        raise AttentionError(f"pool must give a feature index >= 0 for each of the {columns} columns")
    matrix = np.zeros((columns, pool.max() + 1))
    matrix[np.arange(columns), pool] = 1.0
    return matrix / np.maximum(matrix.sum(0, keepdims=True), 1)


@dataclass(frozen=True)
class _Design:
    """The tested units, their labels, and how labels may be permuted."""

    scheme: str
    values: np.ndarray  # between: participant means (n_p, C); within: recordings sorted by participant (n, C)
    labels: np.ndarray  # (units,) bool, group a
    blocks: np.ndarray | None  # within: participant index of each recording (sorted); between: None
    units_a: int
    units_b: int

    @classmethod
    def of(cls, values: np.ndarray, in_a: np.ndarray, participants: np.ndarray) -> _Design:
        people, index = np.unique(participants, return_inverse=True)
        share_a = np.bincount(index, weights=in_a.astype(float), minlength=len(people)) / np.bincount(index)
        if np.all((share_a == 0) | (share_a == 1)):  # each participant in one group: test participant means
            sums = np.zeros((len(people), values.shape[1]))
            np.add.at(sums, index, values)
            labels = share_a == 1
            design = cls("between participants", sums / np.bincount(index)[:, None], labels, None,
                         int(labels.sum()), int((~labels).sum()))
        else:  # participants seen in both groups: their difference of group means, labels shuffled within each
            both = (share_a > 0) & (share_a < 1)
            keep = np.flatnonzero(both[index])
            order = keep[np.argsort(index[keep], kind="stable")]
            blocks = np.unique(index[order], return_inverse=True)[1]
            design = cls("within participants", values[order], in_a[order], blocks, int(both.sum()),
                         int(both.sum()))
        if min(design.units_a, design.units_b) < MIN_UNITS:
            raise AttentionError(f"{design.scheme}: {design.units_a} and {design.units_b} participants in the two "
                                 f"groups; a permutation test needs at least {MIN_UNITS} in each")
        return design

    @property
    def size(self) -> int:
        return len(self.labels)

    def shuffled(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """(count, units) permuted labels: freely (between) or within each participant's recordings."""
        keys = rng.random((count, self.size))
        if self.blocks is not None:  # units are sorted by block: a block offset keeps every shuffle inside it
            keys = keys + self.blocks[None]
        return self.labels[np.argsort(keys, axis=1)]

    def t(self, labels: np.ndarray) -> np.ndarray:
        """(S, C) t statistic of group a − group b for S labellings (S, units)."""
        if self.blocks is None:
            return _welch_t(self.values, labels.astype(np.float64))
        return _paired_t(self.values, labels.astype(np.float64), self.blocks)


def _welch_t(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(S, C) Welch t of group 1 − group 0 for each of S labellings (S × units, 0/1) of units × columns."""
    n_a = labels.sum(1, keepdims=True)
    n_b = labels.shape[1] - n_a
    sum_a, sq_a = labels @ values, labels @ values**2
    sum_b, sq_b = values.sum(0) - sum_a, (values**2).sum(0) - sq_a
    mean_a, mean_b = sum_a / n_a, sum_b / n_b
    var_a = np.maximum(sq_a - n_a * mean_a**2, 0) / (n_a - 1)
    var_b = np.maximum(sq_b - n_b * mean_b**2, 0) / (n_b - 1)
    return _ratio(mean_a - mean_b, np.sqrt(var_a / n_a + var_b / n_b))


def _paired_t(values: np.ndarray, labels: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """(S, C) one-sample t over blocks of each block's (mean of group 1 − mean of group 0)."""
    n_blocks = blocks.max() + 1
    d = np.empty((labels.shape[0], n_blocks, values.shape[1]))
    for b in range(n_blocks):
        rows = blocks == b
        x, lab = values[rows], labels[:, rows]
        n_a = lab.sum(1, keepdims=True)
        d[:, b] = (lab @ x) / n_a - ((1 - lab) @ x) / (rows.sum() - n_a)
    return _ratio(d.mean(1), d.std(1, ddof=1) / np.sqrt(n_blocks))


def _ratio(diff: np.ndarray, se: np.ndarray) -> np.ndarray:
    """diff / se, and 0 where se vanishes (a column that never varies has no effect to test)."""
    return np.divide(diff, se, out=np.zeros_like(diff), where=se > 1e-12 * (np.abs(diff) + 1))


# ------------------------------------------------------------------------------------------ contrast


@dataclass(frozen=True)
class Contrast:
    """A group contrast of CLS maps: tables by parcel and by network."""

    groups: tuple[str, str]
    counts: dict[str, int]
    scheme: str
    resolution: str
    statistic: str  # what the `statistic` column is
    parcels: pd.DataFrame  # name, network, mean_a, mean_b, difference, statistic, p, p_fdr, p_fwer (atlas order)
    networks: pd.DataFrame  # network, parcels, the same columns, strongest first (empty without a network column)

    def top_networks(self) -> list[str]:
        return self.networks["network"].tolist()


def contrast(maps: ClsMaps, groups: Groups, parcel_names: list[str], network_labels: list[str] | None,
             resolution: str = "recording", permutations: int = 5000, seed: int = 0) -> Contrast:
    """Contrast CLS maps (rows in `groups.recording_ids` order) between the groups, by parcel and by network.

    Parcels are one family of tests and networks (the mean over a network's parcels; unlabelled parcels left
    out) another; each gets its own FDR and FWER correction, from the same permutations.
    """
    if resolution not in RESOLUTIONS:
        raise AttentionError(f"unknown resolution {resolution!r}; choose one of {list(RESOLUTIONS)}")
    R, P = maps.mass.shape
    names = [n for n in dict.fromkeys(network_labels or []) if n]
    members = [np.array(network_labels) == n for n in names]

    def test(values: np.ndarray, mass: np.ndarray, table_names: dict[str, list]) -> pd.DataFrame:
        """values (R, F) or (R, F, K) (K time points pooled per feature); mass (R, F) for the group means."""
        pool = None if values.ndim == 2 else np.repeat(np.arange(values.shape[1]), values.shape[2])
        result = permutation_test(values.reshape(R, -1), groups.in_a, groups.participants, permutations, seed, pool)
        mean_a, mean_b = mass[groups.in_a].mean(0), mass[~groups.in_a].mean(0)
        table = pd.DataFrame({**table_names, "mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b,
                              "statistic": result.statistic, "p": result.p, "p_fdr": result.p_fdr,
                              "p_fwer": result.p_fwer})
        table.attrs["scheme"] = result.scheme
        return table

    by_time = resolution == "time"
    parcel_values = maps.tokens.reshape(R, P, -1) if by_time else maps.parcels
    parcels = test(parcel_values, maps.mass, {"name": parcel_names,
                                              "network": network_labels or [""] * P})
    networks = pd.DataFrame()
    if names:
        network_values = np.stack([parcel_values[:, m].mean(1) for m in members], axis=1)
        network_mass = np.stack([maps.mass[:, m].mean(1) for m in members], axis=1)
        networks = test(network_values, network_mass, {"network": names,
                                                        "parcels": [int(m.sum()) for m in members]})
        networks = networks.sort_values("statistic", key=np.abs, ascending=False, kind="stable")
        networks = networks.reset_index(drop=True)
    statistic = ("mean t² over time of the centred log attention" if by_time
                 else "t of the centred log attention mass")
    return Contrast(groups=groups.names, counts=groups.counts(), scheme=parcels.attrs["scheme"],
                    resolution=resolution, statistic=statistic, parcels=parcels, networks=networks)


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


def cls_contrast(model: BrainLM, cohort: Cohort, groups: Groups, cfg: AttentionConfig) -> tuple[Contrast, ClsMaps]:
    """The CLS-attention contrast between two groups, and the maps it came from."""
    maps = cls_maps(model, cohort, groups.recording_ids, cfg)
    labels = network_labels_or_none(cohort, cfg.networks)
    result = contrast(maps, groups, cohort.atlas.names, labels, cfg.resolution, cfg.permutations, cfg.seed)
    return result, maps


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int | None = None) -> float:
    """Share of the k highest-scoring items that are relevant (k defaults to the number relevant)."""
    relevant = np.asarray(relevant, dtype=bool)
    k = int(relevant.sum()) if k is None else k
    if k < 1:
        raise AttentionError("precision at k needs k >= 1 (no relevant items?)")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(relevant[top].mean())
