"""Group contrasts: the permutation test is calibrated on null data, finds planted effects, and groups are checked.

Null data here have strong participant effects and several recordings per participant, the case where treating
recordings as independent makes false positives: the participant-level permutations must stay calibrated.
"""

import numpy as np
import pandas as pd
import pytest
from fixtures_cohort import make_cohort
from scipy import stats

from brainlm.data.store import open_cohort
from brainlm.tasks.attention import (
    AttentionError,
    ClsMaps,
    Groups,
    contrast,
    permutation_test,
    precision_at_k,
    split_groups,
)

FEATURES = 400  # independent null "parcels" per data set


def _between_null(rng, participants=24, per_participant=3, features=FEATURES):
    """Null data: participant offsets (SD 1) + recording noise (SD 0.5); groups fixed per participant."""
    offsets = rng.standard_normal((participants, features))
    who = np.repeat(np.arange(participants), per_participant)
    values = offsets[who] + 0.5 * rng.standard_normal((len(who), features))
    group_of = rng.permutation(np.arange(participants) % 2 == 0)
    return values, group_of[who], np.array([f"p{i}" for i in who])


def _within_null(rng, participants=20, features=FEATURES):
    """Null data: each participant has one recording per condition, with a shared participant offset."""
    offsets = 2.0 * rng.standard_normal((participants, features))
    who = np.repeat(np.arange(participants), 2)
    values = offsets[who] + 0.5 * rng.standard_normal((len(who), features))
    in_a = np.tile([True, False], participants)
    return values, in_a, np.array([f"p{i}" for i in who])


@pytest.mark.parametrize("design", [_between_null, _within_null], ids=["between", "within"])
def test_null_p_values_are_uniform(design):
    values, in_a, participants = design(np.random.default_rng(1))
    result = permutation_test(values, in_a, participants, permutations=999, seed=2)
    assert result.scheme == ("between participants" if design is _between_null else "within participants")
    assert stats.kstest(result.p, "uniform").pvalue > 0.01
    assert 0.02 <= (result.p < 0.05).mean() <= 0.09
    assert result.p.min() >= 1 / 1000  # the observed labelling counts among the permutations


def test_recording_level_permutation_would_be_anticalibrated():
    """The reason permutations respect participants: recordings of one person are not independent."""
    values, in_a, participants = _between_null(np.random.default_rng(1))
    as_if_independent = np.array([f"r{i}" for i in range(len(values))])
    naive = permutation_test(values, in_a, as_if_independent, permutations=999, seed=2)
    proper = permutation_test(values, in_a, participants, permutations=999, seed=2)
    assert (naive.p < 0.05).mean() > 0.2 > (proper.p < 0.05).mean()


def test_family_wise_error_rate_is_controlled():
    """Across null data sets, the max-statistic p-values flag anything at most ~5 % of the time."""
    rng = np.random.default_rng(3)
    flagged = []
    for _ in range(200):
        values, in_a, participants = _between_null(rng, participants=16, per_participant=2, features=30)
        flagged.append((permutation_test(values, in_a, participants, 199, seed=int(rng.integers(1e9))).p_fwer
                        < 0.05).any())
    assert 0.01 <= np.mean(flagged) <= 0.10


def test_planted_effects_survive_correction_and_nothing_else_does():
    rng = np.random.default_rng(4)
    values, in_a, participants = _between_null(rng, participants=30, per_participant=2, features=100)
    planted = np.zeros(100, dtype=bool)
    planted[:5] = True
    values[np.ix_(in_a, planted)] += 2.5
    result = permutation_test(values, in_a, participants, permutations=1999, seed=0)
    assert (result.p_fwer[planted] < 0.05).all() and (result.p_fdr[planted] < 0.05).all()
    assert (result.p_fwer[~planted] < 0.05).sum() == 0
    assert (result.statistic[planted] > 0).all()  # the contrast is group a − group b
    assert precision_at_k(np.abs(result.statistic), planted) == 1.0


def test_within_participant_t_is_the_paired_t():
    """One recording per group and participant: the statistic is the paired t, and extra one-group people
    (no within-participant information) change nothing."""
    values, in_a, participants = _within_null(np.random.default_rng(5), participants=10, features=3)
    result = permutation_test(values, in_a, participants, permutations=99)
    paired = stats.ttest_rel(values[in_a], values[~in_a]).statistic
    assert result.scheme == "within participants" and np.allclose(result.statistic, paired)
    extra = permutation_test(np.vstack([values, np.ones((2, 3)) * 100]), np.append(in_a, [True, False]),
                             np.append(participants, ["x", "y"]), permutations=99)
    assert np.allclose(extra.statistic, paired) and (extra.units_a, extra.units_b) == (10, 10)


def test_pooled_features_test_a_time_course_of_either_sign():
    """A difference that flips sign over time cancels in the mean but not in the pooled mean t²."""
    rng = np.random.default_rng(7)
    values, in_a, participants = _between_null(rng, participants=24, per_participant=1, features=20)
    wave = np.tile([1.5, -1.5], 5)
    values[np.ix_(in_a, np.arange(10))] += wave  # feature 0: columns 0-9 differ, alternating in sign
    pooled = permutation_test(values, in_a, participants, 999, pool=np.repeat([0, 1], 10))
    assert pooled.p[0] < 0.01 and pooled.p[1] > 0.05 and pooled.statistic[0] > 3 * pooled.statistic[1]
    summed = permutation_test(values[:, :10].mean(1, keepdims=True), in_a, participants, 999)
    assert summed.p[0] > 0.05


def test_contrast_tables_by_parcel_and_network():
    rng = np.random.default_rng(6)
    values, in_a, participants = _between_null(rng, participants=20, per_participant=1, features=6)
    values[in_a, :3] += 3.0  # the first network differs
    groups = Groups(column="x", names=("a", "b"), recording_ids=[f"r{i}" for i in range(20)], in_a=in_a,
                    participants=participants, excluded=0)
    maps = ClsMaps(mass=np.exp(values), parcels=values, tokens=values[:, :, None, None])
    for resolution in ("recording", "time"):
        result = contrast(maps, groups, [f"P{i}" for i in range(6)], ["A", "A", "A", "B", "B", ""], resolution, 999)
        assert result.parcels["name"].tolist() == [f"P{i}" for i in range(6)]
        assert result.networks["network"].tolist()[0] == "A" and set(result.networks["network"]) == {"A", "B"}
        assert result.networks.loc[0, "parcels"] == 3 and result.networks.loc[0, "p_fwer"] < 0.05
        assert (result.parcels["difference"][:3] > 0).all()
    with pytest.raises(AttentionError, match="unknown resolution"):
        contrast(maps, groups, [f"P{i}" for i in range(6)], None, "voxel")


# ------------------------------------------------------------------------------------------- groups


@pytest.fixture
def cohort(tmp_path):
    path = make_cohort(tmp_path / "c", n_participants=6, parcels=8, timepoints=60, recordings_per_participant=2)
    manifest = pd.read_csv(path / "manifest.csv")
    manifest["condition"] = ["rest", "task"] * 6  # each participant: one rest, one task
    manifest.to_csv(path / "manifest.csv", index=False)
    phenotypes = pd.read_csv(path / "participants.tsv", sep="\t")
    phenotypes["phq9"] = [2, 4, 12, 15, "", 20]
    phenotypes["site"] = ["a", "b", "a", "b", "c", "a"]
    phenotypes.to_csv(path / "participants.tsv", sep="\t", index=False)
    return open_cohort(path)


def test_groups_from_manifest_and_phenotype_columns(cohort):
    by_condition = split_groups(cohort, "condition", ("task", "rest"))
    assert by_condition.names == ("task", "rest") and by_condition.in_a.sum() == 6
    assert by_condition.counts()["participants_a"] == 6 and by_condition.excluded == 0
    assert split_groups(cohort, "condition").names == ("rest", "task")  # two values: sorted

    severe = split_groups(cohort, "phq9", threshold=10)
    assert severe.names == ("phq9>=10", "phq9<10")
    assert severe.in_a.sum() == 6 and (~severe.in_a).sum() == 4 and severe.excluded == 2  # one missing phq9

    assert split_groups(cohort, "site", ("a", "b")).excluded == 2  # site c is in neither group


@pytest.mark.parametrize("kwargs, message", [
    ({"column": "mood"}, "unknown group column 'mood'"),
    ({"column": "participant"}, "unknown group column 'participant'"),
    ({"column": "condition", "groups": ("task", "sleep")}, "unknown group 'sleep'"),
    ({"column": "site"}, "has 3 values"),
    ({"column": "site", "threshold": 1.0}, "not numeric"),
    ({"column": "site", "groups": ("a", "c")}, "group 'c' of column 'site' has 1 participant"),
])
def test_group_mistakes_are_one_line_errors(cohort, kwargs, message):
    with pytest.raises(AttentionError, match=message) as error:
        split_groups(cohort, **kwargs)
    assert "\n" not in str(error.value)
