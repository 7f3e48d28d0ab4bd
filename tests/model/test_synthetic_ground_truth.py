"""The synthetic cohort has the structure its ground truth claims, so downstream tasks have true answers."""

import filecmp
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainlm.config import SynthConfig
from brainlm.data.atlas import load_atlas
from brainlm.data.synthetic import PHENOTYPE_EFFECTS, YEO7, SynthError, load_ground_truth, synthesize

GROUPS = ["Subcortex", "Cerebellum"]


def _recordings(folder):
    """(ground truth, {recording id: time × parcels array}, each parcel's network)."""
    truth = load_ground_truth(folder)
    series = {r["recording"]: np.load(folder / f"{r['recording']}.npy") for r in truth.info["recordings"]}
    return truth, series, np.array(truth.parcel_networks(load_atlas(folder / "atlas.tsv").index))


def _zscore(x, axis=0):
    return (x - x.mean(axis, keepdims=True)) / x.std(axis, keepdims=True)


@pytest.mark.parametrize("max_parcels", [None, 32], ids=["A424", "32-parcels"])
def test_within_network_correlation_exceeds_between(tmp_path, max_parcels):
    folder = synthesize(tmp_path, SynthConfig(subjects=2, timepoints=200, max_parcels=max_parcels))
    truth, series, networks = _recordings(folder)
    assert len(networks) == (max_parcels or 424)
    same = networks[:, None] == networks[None]
    off_diagonal = ~np.eye(len(networks), dtype=bool)
    within, between = [], []
    for x in series.values():
        corr = np.corrcoef(x.T)
        within.append(corr[same & off_diagonal].mean())
        between.append(corr[~same].mean())
    assert np.mean(within) > 0.5 and np.mean(within) > np.mean(between) + 0.4


def test_networks_files_and_balanced_subset(tmp_path):
    folder = synthesize(tmp_path, SynthConfig(subjects=3, timepoints=100, max_parcels=32))
    truth = load_ground_truth(folder)
    assert truth.network_order == [*YEO7, *GROUPS] and truth.info["network_source"] == "yeo7"
    sizes = [len(truth.networks[name]) for name in truth.network_order]
    assert sum(sizes) == 32 and min(sizes) >= 3 and max(sizes) <= 4  # 32 over 9 networks, as even as can be

    full, written = load_atlas("A424"), load_atlas(folder / "atlas.tsv")
    rows = np.searchsorted(full.index, written.index)  # the subset keeps original indices, names, coordinates
    assert np.array_equal(full.coords[rows], written.coords)
    assert [full.names[r] for r in rows] == written.names
    assert written.network_labels("yeo7") == truth.parcel_networks(written.index)

    names = sorted(p.name for p in folder.glob("*.npy"))
    assert len(names) == 6 and all(re.fullmatch(r"sub-\d{4}_task-(rest|task)_run-\d+\.npy", n) for n in names)
    conditions = [r["condition"] for r in truth.info["recordings"]]
    assert conditions.count("task") == conditions.count("rest") == 3  # task_fraction 0.5
    x = np.load(folder / names[0])
    assert x.dtype == np.float32 and x.shape == (100, 32)  # time × parcels, as a lab's files come
    participants = pd.read_csv(folder / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "neuroticism", "pcl", "gad7",
                                          "phq9"]


def test_ground_truth_model_is_valid(tmp_path):
    folder = synthesize(tmp_path, SynthConfig(subjects=5, timepoints=100, max_parcels=20))
    truth = load_ground_truth(folder)
    k = len(truth.network_order)
    var, couplings = np.array(truth.info["var_matrix"]), truth.arrays["subject_coupling"]
    assert np.abs(np.linalg.eigvals(var)).max() < 1  # a stationary VAR(1)
    assert couplings.shape == (5, k, k) and np.allclose(couplings, couplings.transpose(0, 2, 1))
    assert np.allclose(np.diagonal(couplings, axis1=1, axis2=2), 1)
    assert (np.linalg.eigvalsh(couplings) > 0).all()
    assert truth.arrays["latent_bold"].shape == (10, k, 100)
    parcel_networks = truth.parcel_networks(truth.arrays["parcel_index"])
    assert truth.arrays["network_ids"].tolist() == [truth.network_order.index(n) for n in parcel_networks]
    assert truth.arrays["task_response"].shape == (k, 100)
    task = truth.info["task"]
    assert task["network"] == "Visual" and task["onsets"][0] == task["durations"][0] == task["period"] // 2
    effects = [(e["phenotype"], *e["networks"], e["delta_per_sd"]) for e in truth.effects]
    assert effects == list(PHENOTYPE_EFFECTS)


def test_task_recordings_carry_visual_power_at_the_block_frequency(tmp_path):
    folder = synthesize(tmp_path, SynthConfig(subjects=8, timepoints=210, max_parcels=32))
    truth, series, networks = _recordings(folder)
    period = truth.info["task"]["period"]
    wave = np.exp(-2j * np.pi * np.arange(210) / period)
    power = {"rest": [], "task": []}
    for rec in truth.info["recordings"]:
        visual = _zscore(_zscore(series[rec["recording"]])[:, networks == truth.task_network].mean(1))
        power[rec["condition"]].append(np.abs(wave @ visual) ** 2 / len(visual))
    assert np.mean(power["task"]) > 2 * np.mean(power["rest"])


def test_clinical_scores_are_right_skewed_non_negative_counts(tmp_path):
    cfg = SynthConfig(subjects=200, timepoints=50, max_parcels=18, recordings_per_subject=1)
    folder = synthesize(tmp_path, cfg)
    participants = pd.read_csv(folder / "participants.tsv", sep="\t")
    for score in ("pcl", "gad7", "phq9"):
        values = participants[score].to_numpy()
        assert (values >= 0).all() and np.issubdtype(values.dtype, np.integer)
        assert stats.skew(values) > 0.5, score
    assert set(participants["sex"]) == {"F", "M"}
    assert participants["age"].between(18, 85).all()


def test_phenotype_coupling_effects_are_recoverable(tmp_path):
    """Across subjects, each phenotype correlates with its network pair's correlation, with the set sign."""
    folder = synthesize(tmp_path, SynthConfig(subjects=40, timepoints=300, max_parcels=32))
    truth, series, networks = _recordings(folder)
    order = truth.network_order
    participants = pd.read_csv(folder / "participants.tsv", sep="\t").set_index("participant_id")
    signals = {rid: np.stack([_zscore(x)[:, networks == name].mean(1) for name in order])
               for rid, x in series.items()}  # network mean signals, (K, T) per recording
    for effect in truth.effects:
        a, b = (order.index(n) for n in effect["networks"])
        pair = {}
        for rec in truth.info["recordings"]:
            r = np.corrcoef(signals[rec["recording"]][[a, b]])[0, 1]
            pair.setdefault(rec["participant"], []).append(r)
        measured = [np.mean(pair[p]) for p in participants.index]
        phenotype = participants[effect["phenotype"]]
        if effect["phenotype"] == "sex":
            phenotype = phenotype == "M"
        r, p = stats.pearsonr(phenotype.astype(float), measured)
        assert np.sign(r) == np.sign(effect["delta_per_sd"]) and p < 1e-3, (effect, r, p)


def test_same_seed_writes_identical_bytes(tmp_path):
    cfg = SynthConfig(subjects=3, timepoints=60, max_parcels=20)
    first, second = synthesize(tmp_path / "a", cfg), synthesize(tmp_path / "b", cfg)
    names = sorted(p.name for p in first.iterdir())
    assert len(names) == 10  # 6 recordings, participants.tsv, atlas.tsv, ground_truth.json/.npz
    _, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    assert mismatch == errors == []
    other = synthesize(tmp_path / "c", SynthConfig(subjects=3, timepoints=60, max_parcels=20, seed=1))
    assert not filecmp.cmp(first / names[0], other / names[0], shallow=False)


def test_user_atlas_without_networks_gets_kmeans_networks(tmp_path):
    a424 = load_atlas("A424")
    user = a424.to_frame()[["index", "name", "x", "y", "z"]].iloc[::5]
    user.to_csv(tmp_path / "user.tsv", sep="\t", index=False)
    cfg = SynthConfig(subjects=2, timepoints=100, parcels_from=str(tmp_path / "user.tsv"))
    folder = synthesize(tmp_path / "out", cfg)
    truth, series, networks = _recordings(folder)
    assert truth.info["network_source"] == "kmeans"
    assert truth.network_order == [f"Cluster {k}" for k in range(1, 8)]
    assert sorted(i for members in truth.networks.values() for i in members) == user["index"].tolist()
    posterior = [np.mean(a424.coords[np.isin(a424.index, truth.networks[n]), 1]) for n in truth.network_order]
    assert posterior == sorted(posterior) and truth.task_network == "Cluster 1"
    corr = np.corrcoef(next(iter(series.values())).T)
    same = networks[:, None] == networks[None]
    assert corr[same & ~np.eye(len(networks), dtype=bool)].mean() > corr[~same].mean() + 0.4


def test_refuses_bad_configs_and_a_used_folder(tmp_path):
    with pytest.raises(SynthError, match="max_parcels=10 is too small: 9 networks"):
        synthesize(tmp_path / "small", SynthConfig(max_parcels=10))
    with pytest.raises(SynthError, match="timepoints must cover one task block cycle"):
        synthesize(tmp_path / "short", SynthConfig(timepoints=20))
    folder = synthesize(tmp_path / "used", SynthConfig(subjects=1, timepoints=60, max_parcels=18))
    with pytest.raises(SynthError, match="already holds a synthetic cohort"):
        synthesize(folder, SynthConfig(subjects=1, timepoints=60, max_parcels=18))
    synthesize(folder, SynthConfig(subjects=1, timepoints=60, max_parcels=18, seed=2), overwrite=True)
    assert load_ground_truth(folder).info["seed"] == 2
    with pytest.raises(SynthError, match="not a synthetic cohort"):
        load_ground_truth(tmp_path / "small")
