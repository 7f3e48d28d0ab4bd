"""Synthetic cohorts whose answers are known by construction.

A generative model that is simple enough to write down and rich enough that every downstream task has a
true answer:

    networks  parcels are grouped into the atlas's 7 Yeo networks (+ one group per unlabelled anatomical
              group, e.g. Subcortex and Cerebellum for A424); an atlas without a `yeo7` column gets 7
              networks from k-means on its centroids.
    dynamics  neural activity per network is a stable VAR(1), z_t = A z_{t-1} + e_t, whose innovations e_t
              have a network coupling (correlation) matrix C_s that differs between subjects.
    BOLD      z is convolved with the canonical double-gamma HRF, sampled at TR, and each parcel reads its
              network's signal with its own loading, plus AR(1) noise (`cfg.noise` relative to the signal),
              around a parcel baseline (BOLD-like percent signal change).
    task      "task" recordings add a block design (boxcar into the Visual network's neural input), which
              the VAR spreads along A and the HRF smooths.
    phenotype age, sex, neuroticism, PCL, GAD7 and PHQ9 each shift named couplings of C_s by a known amount
              per standard deviation (`PHENOTYPE_EFFECTS`), so phenotypes are predictable from the data.

Everything is drawn from `cfg.seed` through separate named streams and computed in float64; what is written
is rounded to a fixed number of decimals before the cast to float32, so that last-bit differences between
BLAS/LAPACK builds cannot reach the files: the same config writes the same bytes on every machine.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from sklearn.cluster import KMeans

from brainlm.config import SynthConfig, to_dict
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.errors import BrainLMError

YEO7 = (
    "Visual", "Somatomotor", "Dorsal Attention", "Ventral Attention", "Limbic", "Frontoparietal", "Default",
)
NETWORK_COLUMN = "yeo7"  # the atlas column that names networks; without it, k-means on centroids
N_NETWORKS = len(YEO7)

# Other spellings of the Yeo-7 names (Schaefer labels, Yeo's numbering), keyed by `_squash(name)`: used
# only to put networks in canonical order.
_YEO7_ALIASES = {
    **{name.lower().replace(" ", ""): name for name in YEO7},
    **{str(i + 1): name for i, name in enumerate(YEO7)},
    "vis": "Visual", "sommot": "Somatomotor", "dorsattn": "Dorsal Attention", "ventattn": "Ventral Attention",
    "salventattn": "Ventral Attention", "cont": "Frontoparietal", "control": "Frontoparietal",
}

# (phenotype, network, network, change of their coupling per standard deviation of the phenotype).
# Network names are Yeo-7 names; for other network sets they stand for the network at that rank of the
# network order (see `_network_order`). Each pair appears once, so each effect is separately recoverable.
PHENOTYPE_EFFECTS: tuple[tuple[str, str, str, float], ...] = (
    ("age", "Default", "Dorsal Attention", 0.2),  # less segregation with age
    ("age", "Somatomotor", "Visual", -0.2),
    ("sex", "Somatomotor", "Ventral Attention", 0.2),  # sex coded M = 1, F = 0
    ("neuroticism", "Limbic", "Default", 0.2),
    ("pcl", "Ventral Attention", "Limbic", 0.2),
    ("gad7", "Frontoparietal", "Ventral Attention", -0.2),
    ("phq9", "Default", "Frontoparietal", -0.2),
)
PHENOTYPES = ("age", "sex", "neuroticism", "pcl", "gad7", "phq9")

TASK_AMPLITUDE = 1.5  # peak task response in the task network, in SDs of its resting signal
BLOCK_SECONDS = 15.0  # task blocks: 15 s on, 15 s off, starting with rest
HRF_SECONDS = 32.0  # length of the sampled haemodynamic response
NOISE_AR = 0.3  # lag-1 autocorrelation of parcel noise (fMRI noise is not white)
SIGNAL_PERCENT = 1.0  # one SD of parcel signal = this % of the parcel's baseline
SUBJECT_JITTER = 0.03  # SD of subject-specific coupling changes not explained by phenotypes
MIN_EIGENVALUE = 0.05  # couplings are projected to correlation matrices at least this well conditioned
# Decimals kept in what is written: BOLD values (~500-1500) to 1e-3 (a millionth of the signal's SD is far
# below float32's own resolution there), unit-scale signals and parameters to 1e-6.
BOLD_DECIMALS = 3
UNIT_DECIMALS = 6

GROUND_TRUTH_JSON = "ground_truth.json"
GROUND_TRUTH_NPZ = "ground_truth.npz"

# Independent random streams: changing one part of the model does not reshuffle the others.
(_STREAM_NETWORKS, _STREAM_SUBSET, _STREAM_MODEL, _STREAM_PHENOTYPES, _STREAM_COUPLING,
 _STREAM_RECORDING) = range(6)


# ------------------------------------------------------------------------------------------ public API


class SynthError(BrainLMError, ValueError):
    """A synthetic cohort that cannot be made as configured, or a folder that holds none."""


def synthesize(out_dir: str | Path, cfg: SynthConfig | None = None, overwrite: bool = False) -> Path:
    """Write a synthetic input folder (recordings, participants.tsv, atlas.tsv, ground truth); return it.

    Recordings are `sub-XXXX_task-{rest|task}_run-N.npy`, float32 time × parcels. `overwrite=True` replaces
    a previous synthetic cohort in the folder; otherwise a folder that already holds recordings is refused
    (mixing two cohorts' files would corrupt both).
    """
    cfg = cfg or SynthConfig()
    _check_config(cfg)
    atlas = load_atlas(cfg.parcels_from)
    labels, labelled, source = _networks(atlas, cfg.seed)
    order = _network_order(labels, labelled, atlas.coords)
    if cfg.max_parcels is not None and cfg.max_parcels < atlas.n_parcels:
        keep = _balanced_subset(labels, order, cfg.max_parcels, _rng(cfg.seed, _STREAM_SUBSET))
        atlas, labels = atlas.subset(keep), [labels[p] for p in keep]
    net_ids = np.array([order.index(label) for label in labels], dtype=np.int64)
    effects = _resolve_effects(order[: len(labelled)])

    model = _draw_model(len(order), atlas.n_parcels, _rng(cfg.seed, _STREAM_MODEL))
    phenotypes = _draw_phenotypes(cfg.subjects, _rng(cfg.seed, _STREAM_PHENOTYPES))
    scores = _standardise(phenotypes)
    coupling_rng = _rng(cfg.seed, _STREAM_COUPLING)
    couplings = _subject_couplings(model["base_coupling"], effects, scores, order, coupling_rng)
    plan = _recording_plan(cfg.subjects, cfg.recordings_per_subject, cfg.task_fraction)
    design = block_design(cfg.timepoints, cfg.tr)
    # The task drives network 0: Visual, or the network standing in for it (see _network_order).
    latent, task_response = _network_signals(model["var_matrix"], couplings, plan, design, 0, cfg)

    out = _prepare_folder(Path(out_dir), overwrite)  # only now: a config error leaves the folder untouched
    for n, rec in enumerate(plan):
        rng = _rng(cfg.seed, _STREAM_RECORDING, n, 1)
        series = _parcel_signals(latent[n], net_ids, model["loadings"], model["baseline"], cfg.noise, rng)
        np.save(out / f"{rec['recording']}.npy", _float32(series, BOLD_DECIMALS))

    phenotypes.to_csv(out / "participants.tsv", sep="\t", index=False, lineterminator="\n")
    atlas.to_tsv(out / "atlas.tsv")
    info = _ground_truth_info(cfg, atlas, order, net_ids, source, model, effects, scores, plan, design)
    (out / GROUND_TRUTH_JSON).write_text(json.dumps(info, indent=2) + "\n")
    _write_npz(out / GROUND_TRUTH_NPZ, {
        "parcel_index": atlas.index,
        "network_ids": net_ids,
        "loadings": model["loadings"],
        "baseline": model["baseline"],
        "var_matrix": np.round(model["var_matrix"], UNIT_DECIMALS),
        "base_coupling": np.round(model["base_coupling"], UNIT_DECIMALS),
        "subject_coupling": np.round(couplings, UNIT_DECIMALS),
        "task_regressor": _float32(design["regressor"], UNIT_DECIMALS),
        "task_response": _float32(task_response, UNIT_DECIMALS),
        "latent_bold": _float32(latent, UNIT_DECIMALS),
    })
    return out


@dataclass(frozen=True)
class GroundTruth:
    """What `synthesize` put in: `info` from ground_truth.json, `arrays` from ground_truth.npz.

    arrays: `parcel_index` (P,) atlas indices and `network_ids` (P,) positions in `network_order`;
    `loadings`, `baseline` (P,); `var_matrix`, `base_coupling` (K, K); `subject_coupling` (subjects, K, K);
    `latent_bold` (recordings, K, T) network signals in `info["recordings"]` order; `task_response` (K, T),
    the noise-free signal task recordings add; `task_regressor` (T,), the HRF-convolved boxcar.
    """

    path: Path
    info: dict
    arrays: dict[str, np.ndarray]

    @property
    def network_order(self) -> list[str]:
        return self.info["network_order"]

    @property
    def networks(self) -> dict[str, list[int]]:
        """Network name → atlas indices of its parcels."""
        return self.info["networks"]

    @property
    def task_network(self) -> str:
        return self.info["task"]["network"]

    @property
    def effects(self) -> list[dict]:
        return self.info["phenotype_effects"]

    def parcel_networks(self, index) -> list[str]:
        """The network of each parcel given by atlas index (e.g. a stored cohort's `atlas.index`)."""
        lookup = {int(i): name for name, members in self.networks.items() for i in members}
        missing = [int(i) for i in index if int(i) not in lookup]
        if missing:
            raise KeyError(f"{self.path}: parcel indices {missing[:10]} are not in this synthetic cohort")
        return [lookup[int(i)] for i in index]


def load_ground_truth(folder: str | Path) -> GroundTruth:
    """Read back the ground truth `synthesize` wrote into `folder`."""
    folder = Path(folder)
    json_path, npz_path = folder / GROUND_TRUTH_JSON, folder / GROUND_TRUTH_NPZ
    for path in (json_path, npz_path):
        if not path.is_file():
            raise SynthError(f"{path} not found: {folder} is not a synthetic cohort (write one with "
                                    f"`brainlm synth {folder}`)")
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return GroundTruth(path=folder, info=json.loads(json_path.read_text()), arrays=arrays)


def canonical_hrf(tr: float, seconds: float = HRF_SECONDS) -> np.ndarray:
    """SPM's canonical double-gamma haemodynamic response sampled every `tr` s, normalised to sum 1.

    A gamma peaking near 5 s minus a sixth of one peaking near 15 s (the undershoot).
    """
    t = np.arange(0.0, seconds, tr)
    response = t**5 * np.exp(-t) / math.gamma(6) - t**15 * np.exp(-t) / (6 * math.gamma(16))
    return response / response.sum()


def block_design(timepoints: int, tr: float, block_seconds: float = BLOCK_SECONDS) -> dict:
    """Alternating rest/task blocks of `block_seconds`, starting with rest; onsets and durations in TRs."""
    block = max(1, round(block_seconds / tr))
    onsets = np.arange(block, timepoints, 2 * block)
    durations = np.minimum(block, timepoints - onsets)
    boxcar = np.zeros(timepoints)
    for onset, duration in zip(onsets, durations, strict=True):
        boxcar[onset : onset + duration] = 1.0
    return {
        "onsets": onsets.tolist(),
        "durations": durations.tolist(),
        "period": 2 * block,  # TRs per on/off cycle
        "boxcar": boxcar,
        "regressor": lfilter(canonical_hrf(tr), [1.0], boxcar),  # HRF-convolved boxcar
    }


# ---------------------------------------------------------------------------------------- networks


def _networks(atlas: Atlas, seed: int) -> tuple[list[str], list[str], str]:
    """Each parcel's network, the labelled (non-group) network names, and where the labels came from.

    Parcels the `yeo7` column leaves unlabelled get their anatomical group (`Atlas.network_labels`).
    """
    if NETWORK_COLUMN in atlas.networks:
        labels = atlas.network_labels(NETWORK_COLUMN)
        labelled = sorted({label for label in atlas.networks[NETWORK_COLUMN] if label})
        if len(labelled) < N_NETWORKS:
            raise SynthError(
                f"atlas {atlas.name}: column {NETWORK_COLUMN!r} names {len(labelled)} networks "
                f"({labelled}); synthetic cohorts need {N_NETWORKS}. Drop the column to get "
                f"{N_NETWORKS} networks from k-means on the centroids instead."
            )
        return labels, labelled, NETWORK_COLUMN
    if atlas.n_parcels < 2 * N_NETWORKS:
        raise SynthError(f"atlas {atlas.name} has {atlas.n_parcels} parcels; synthetic cohorts need at "
                         f"least {2 * N_NETWORKS} (two per network)")
    clusters = _kmeans(atlas.coords.astype(np.float64), N_NETWORKS, _rng(seed, _STREAM_NETWORKS))
    # Name clusters from posterior to anterior, so "Cluster 1" (the stand-in for Visual) is occipital.
    rank = np.argsort(np.argsort([atlas.coords[clusters == k, 1].mean() for k in range(N_NETWORKS)]))
    labels = [f"Cluster {rank[k] + 1}" for k in clusters]
    return labels, [f"Cluster {k + 1}" for k in range(N_NETWORKS)], "kmeans"


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn's k-means (k-means++ seeding, best of 10), seeded from `rng`; a cluster id per point."""
    if len(np.unique(points, axis=0)) < k:
        raise SynthError(f"the atlas has fewer than {k} distinct centroids; k-means cannot form {k} networks")
    model = KMeans(n_clusters=k, n_init=10, random_state=int(rng.integers(2**31 - 1)))
    return model.fit_predict(points)


def _network_order(labels: list[str], labelled: list[str], coords: np.ndarray) -> list[str]:
    """Labelled networks first, Yeo-7 names in canonical order, others posterior → anterior; then groups.

    Rank r of this order is what `YEO7[r]` means in PHENOTYPE_EFFECTS and rank 0 receives the task, so for
    an atlas whose networks are not the Yeo-7 names the most posterior network stands in for Visual.
    """
    labels_arr = np.array(labels)

    def key(name: str) -> tuple[int, float]:
        canonical = _YEO7_ALIASES.get(_squash(name))
        if canonical is not None:
            return (0, float(YEO7.index(canonical)))
        return (1, float(coords[labels_arr == name, 1].mean()))

    groups = list(dict.fromkeys(label for label in labels if label not in set(labelled)))
    return sorted(labelled, key=key) + groups


def _squash(name: str) -> str:
    """Lower case without spaces, underscores or hyphens: "Dorsal Attention" → "dorsalattention"."""
    return re.sub(r"[\s_-]", "", name.lower())


def _balanced_subset(labels: list[str], names: list[str], budget: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Row positions of `budget` parcels spread as evenly as possible over the networks `names` (sorted).

    Every network keeps at least two parcels, so within-network correlation stays defined.
    """
    if budget < 2 * len(names):
        raise SynthError(f"max_parcels={budget} is too small: {len(names)} networks need at least two "
                         f"parcels each ({2 * len(names)})")
    members = {name: np.flatnonzero(np.array(labels) == name) for name in names}
    quota = dict.fromkeys(names, 0)
    left = budget
    while left:  # water-filling: equal shares, leftovers to the networks that still have parcels
        open_ = [n for n in names if quota[n] < len(members[n])]
        share = max(1, left // len(open_))
        for name in open_:
            take = min(share, len(members[name]) - quota[name], left)
            quota[name] += take
            left -= take
            if not left:
                break
    keep = [rng.choice(members[name], size=quota[name], replace=False) for name in names]
    return np.sort(np.concatenate(keep))


def _resolve_effects(labelled_order: list[str]) -> list[tuple[str, str, str, float]]:
    """PHENOTYPE_EFFECTS with Yeo-7 names replaced by this cohort's network at the same rank."""
    by_rank = dict(zip(YEO7, labelled_order, strict=False))
    return [(phen, by_rank[a], by_rank[b], delta) for phen, a, b, delta in PHENOTYPE_EFFECTS]


# ------------------------------------------------------------------------------------------- model


def _draw_model(n_networks: int, n_parcels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Cohort-wide parameters: VAR(1) matrix, base coupling, parcel loadings and baselines."""
    var = np.where(rng.random((n_networks, n_networks)) < 0.2, rng.uniform(-0.2, 0.2, (n_networks,) * 2), 0.0)
    np.fill_diagonal(var, rng.uniform(0.4, 0.8, n_networks))  # persistence of each network's activity
    radius = np.abs(np.linalg.eigvals(var)).max()
    if radius > 0.9:  # keep the process stable (stationary) with margin
        var *= 0.9 / radius
    upper = np.triu(rng.uniform(-0.1, 0.3, (n_networks, n_networks)), 1)
    return {
        "var_matrix": var,
        "base_coupling": _to_correlation(upper + upper.T + np.eye(n_networks)),
        "loadings": rng.uniform(0.6, 1.2, n_parcels),
        "baseline": rng.uniform(500.0, 1500.0, n_parcels),
    }


def _to_correlation(matrix: np.ndarray) -> np.ndarray:
    """A valid, well-conditioned correlation matrix close to the symmetric `matrix`.

    Eigenvalues are floored at MIN_EIGENVALUE, then the diagonal is rescaled to 1: phenotype effects added
    to a coupling matrix can push it out of the valid range.
    """
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    fixed = (v * np.maximum(w, MIN_EIGENVALUE)) @ v.T
    d = np.sqrt(np.diag(fixed))
    return fixed / np.outer(d, d)


def _draw_phenotypes(subjects: int, rng: np.random.Generator) -> pd.DataFrame:
    """Ages, sexes and four questionnaire scores; the clinical scores share a latent distress factor.

    PCL (0-80), GAD7 (0-21) and PHQ9 (0-27) are log-normal counts: non-negative, integer, right-skewed.
    """
    distress = rng.standard_normal(subjects)

    def loaded(r: float) -> np.ndarray:  # a standard normal correlated r with distress
        return r * distress + math.sqrt(1 - r * r) * rng.standard_normal(subjects)

    def score(median: float, spread: float, top: int) -> np.ndarray:
        return np.clip(np.round(median * np.exp(spread * loaded(0.7)) - 1), 0, top).astype(np.int64)

    return pd.DataFrame({
        "participant_id": [_participant(s) for s in range(subjects)],
        "age": np.clip(np.round(rng.normal(45, 15, subjects)), 18, 85).astype(np.int64),
        "sex": np.where(rng.random(subjects) < 0.5, "F", "M"),
        "neuroticism": np.clip(np.round(24 + 8 * loaded(0.6)), 0, 48).astype(np.int64),
        "pcl": score(12.0, 0.8, 80),
        "gad7": score(5.0, 0.7, 21),
        "phq9": score(6.0, 0.7, 27),
    })


def _standardise(phenotypes: pd.DataFrame) -> dict[str, dict]:
    """Each phenotype as z-scores over the cohort (sex: M = 1, F = 0), with the mean and SD used."""
    out = {}
    for name in PHENOTYPES:
        values = phenotypes[name].to_numpy()
        values = (values == "M").astype(np.float64) if name == "sex" else values.astype(np.float64)
        mean, sd = float(values.mean()), float(values.std())
        z = (values - mean) / sd if sd > 0 else np.zeros_like(values)  # one subject, or all alike: no effect
        out[name] = {"z": z, "mean": mean, "sd": sd}
    return out


def _subject_couplings(base: np.ndarray, effects, scores: dict, order: list[str],
                       rng: np.random.Generator) -> np.ndarray:
    """(subjects, K, K) coupling matrices: base + phenotype effects + a little subject-specific jitter."""
    subjects = len(next(iter(scores.values()))["z"])
    k = len(order)
    couplings = np.repeat(base[None], subjects, axis=0)
    for phen, a, b, delta in effects:
        i, j = order.index(a), order.index(b)
        couplings[:, i, j] += delta * scores[phen]["z"]
        couplings[:, j, i] = couplings[:, i, j]
    jitter = np.triu(rng.normal(0.0, SUBJECT_JITTER, (subjects, k, k)), 1)
    couplings += jitter + jitter.transpose(0, 2, 1)
    return np.stack([_to_correlation(c) for c in couplings])


def _recording_plan(subjects: int, per_subject: int, task_fraction: float) -> list[dict]:
    """Recording ids, participants and conditions; task recordings are spread evenly over the cohort."""
    plan = []
    for s in range(subjects):
        runs = {"rest": 0, "task": 0}
        for r in range(per_subject):
            i = s * per_subject + r
            crosses = math.floor((i + 1) * task_fraction) > math.floor(i * task_fraction)
            condition = "task" if crosses else "rest"
            runs[condition] += 1
            participant = _participant(s)
            plan.append({
                "recording": f"{participant}_task-{condition}_run-{runs[condition]}",
                "participant": participant,
                "subject": s,
                "condition": condition,
            })
    return plan


def _participant(s: int) -> str:
    return f"sub-{s + 1:04d}"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


# ------------------------------------------------------------------------------------------ signals


def _network_signals(var: np.ndarray, couplings: np.ndarray, plan: list[dict], design: dict, task_k: int,
                     cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Network BOLD (recordings, K, T) float64: unit-variance resting signal + the task response (K, T).

    The VAR runs for a burn-in longer than the HRF first, so every recording starts in steady state.
    All recordings advance together (vectorised over recordings), one TR per step.
    """
    hrf = canonical_hrf(cfg.tr)
    burn = len(hrf) + 50
    steps, k = burn + cfg.timepoints, len(var)
    chol = np.linalg.cholesky(couplings)  # (subjects, K, K)
    innovations = np.stack([
        _rng(cfg.seed, _STREAM_RECORDING, n, 0).standard_normal((steps, k)) @ chol[rec["subject"]].T
        for n, rec in enumerate(plan)
    ])  # (N, steps, K)
    rest = lfilter(hrf, [1.0], _run_var(var, innovations), axis=1)[:, burn:]
    rest = (rest - rest.mean(1, keepdims=True)) / rest.std(1, keepdims=True)

    drive = np.zeros((1, steps, k))
    drive[0, burn:, task_k] = design["boxcar"]
    response = lfilter(hrf, [1.0], _run_var(var, drive), axis=1)[0, burn:]  # (T, K), noise-free
    response *= TASK_AMPLITUDE / np.abs(response[:, task_k]).max()
    is_task = np.array([rec["condition"] == "task" for rec in plan])[:, None, None]
    bold = (rest + is_task * response[None]).transpose(0, 2, 1)
    return bold, response.T


def _run_var(var: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """z_t = A z_{t-1} + inputs_t for a batch of (steps, K) input series, from z = 0."""
    z = np.zeros_like(inputs)
    z[:, 0] = inputs[:, 0]
    for t in range(1, inputs.shape[1]):
        z[:, t] = z[:, t - 1] @ var.T + inputs[:, t]
    return z


def _parcel_signals(network_bold: np.ndarray, net_ids: np.ndarray, loadings: np.ndarray, baseline: np.ndarray,
                    noise: float, rng: np.random.Generator) -> np.ndarray:
    """One recording, (T, P) float64: baseline × (1 + % signal × (loading × network BOLD + AR(1) noise))."""
    timepoints, parcels = network_bold.shape[1], len(net_ids)
    white = rng.standard_normal((timepoints, parcels))
    white[0] /= math.sqrt(1 - NOISE_AR**2)  # start the AR(1) in its stationary distribution
    ar_noise = lfilter([math.sqrt(1 - NOISE_AR**2)], [1.0, -NOISE_AR], white, axis=0)
    signal = loadings * network_bold[net_ids].T + noise * ar_noise
    return baseline * (1.0 + SIGNAL_PERCENT / 100.0 * signal)


# -------------------------------------------------------------------------------------------- output


def _ground_truth_info(cfg, atlas, order, net_ids, source, model, effects, scores, plan, design) -> dict:
    """Everything needed to score a downstream task, as plain JSON."""
    return {
        "seed": cfg.seed,
        "tr": cfg.tr,
        "config": to_dict(cfg),
        "atlas": atlas.name,
        "n_parcels": atlas.n_parcels,
        "network_source": source,  # "yeo7" (atlas column) or "kmeans" (on centroids)
        "network_order": order,
        "networks": {name: atlas.index[net_ids == k].tolist() for k, name in enumerate(order)},
        "var_matrix": _rounded(model["var_matrix"]),
        "coupling": _rounded(model["base_coupling"]),
        "phenotype_effects": [
            {"phenotype": phen, "networks": [a, b], "delta_per_sd": delta,
             "phenotype_mean": round(scores[phen]["mean"], 6), "phenotype_sd": round(scores[phen]["sd"], 6)}
            for phen, a, b, delta in effects
        ],
        "phenotype_coding": {"sex": {"M": 1, "F": 0}},
        "task": {
            "network": order[0],
            "onsets": design["onsets"],
            "durations": design["durations"],
            "period": design["period"],
            "amplitude": TASK_AMPLITUDE,
            "units": "TRs",
        },
        "hrf": {"kind": "SPM canonical double gamma", "seconds": HRF_SECONDS},
        "noise": {"sd": cfg.noise, "ar1": NOISE_AR, "signal_percent": SIGNAL_PERCENT},
        "recordings": [{k: rec[k] for k in ("recording", "participant", "condition")} for rec in plan],
    }


def _rounded(matrix: np.ndarray) -> list:
    return np.round(matrix, UNIT_DECIMALS).tolist()


def _float32(values: np.ndarray, decimals: int) -> np.ndarray:
    """float64 → float32 through a fixed rounding, so machines that differ in the last bits write the same."""
    return np.round(values, decimals).astype(np.float32)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so the same arrays always give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _prepare_folder(out: Path, overwrite: bool) -> Path:
    """Create `out`; refuse (or, with overwrite, clear) a previous cohort's recordings and ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    previous = sorted(out.glob("sub-*.npy")) + [p for p in (out / GROUND_TRUTH_JSON, out / GROUND_TRUTH_NPZ)
                                                 if p.exists()]
    if previous and not overwrite:
        raise SynthError(f"{out} already holds a synthetic cohort ({len(previous)} files, e.g. "
                              f"{previous[0].name}); choose an empty folder or pass overwrite=True")
    for path in previous:
        path.unlink()
    return out


def _check_config(cfg: SynthConfig) -> None:
    """Refuse configs that cannot produce a meaningful cohort, saying which field and why."""
    block = max(1, round(BLOCK_SECONDS / cfg.tr)) if cfg.tr > 0 else 0
    rules = [
        (cfg.subjects >= 1, f"subjects must be >= 1, got {cfg.subjects}"),
        (cfg.recordings_per_subject >= 1,
         f"recordings_per_subject must be >= 1, got {cfg.recordings_per_subject}"),
        (cfg.tr > 0, f"tr must be > 0 seconds, got {cfg.tr}"),
        (cfg.timepoints >= 2 * block, f"timepoints must cover one task block cycle ({2 * block} TRs at "
                                      f"tr={cfg.tr}), got {cfg.timepoints}"),
        (0.0 <= cfg.task_fraction <= 1.0, f"task_fraction must be in [0, 1], got {cfg.task_fraction}"),
        (cfg.noise >= 0, f"noise must be >= 0, got {cfg.noise}"),
        (cfg.max_parcels is None or cfg.max_parcels > 0,
         f"max_parcels must be positive, got {cfg.max_parcels}"),
    ]
    broken = [message for ok, message in rules if not ok]
    if broken:
        raise SynthError("SynthConfig: " + "; ".join(broken))
