"""Clinical targets: the paper's transforms round-trip, and they are fitted on each fold's training subjects only."""

import numpy as np
import pandas as pd
import pytest
from fixtures_cohort import make_cohort

from brainlm.config import CLINICAL_TARGETS, ClinicalConfig, preset
from brainlm.data.store import open_cohort
from brainlm.errors import ConfigError
from brainlm.model import BrainLM
from brainlm.tasks.clinical import PHQ9_CUTOFF, TARGETS, TargetTransform, run_clinical, supported_targets
from brainlm.tasks.common import BrainLMBackbone, TaskError


@pytest.mark.parametrize("target, values", [
    ("age", [18, 25, 40, 63, 85]),
    ("neuroticism", [0, 12, 24, 30, 48]),
    ("pcl", [0, 3, 12, 40, 80]),
    ("gad7", [0, 1, 5, 9, 21]),
    ("phq9", [0, 2, 6, 14, 27]),
])
def test_transforms_round_trip_and_have_the_papers_form(target, values):
    values = np.array(values, dtype=float)
    t = TargetTransform.fit(target, values)
    y = t.transform(values)
    assert np.allclose(t.inverse(y), values)
    assert TargetTransform.from_dict(t.to_dict()) == t  # stored with the model as JSON and read back
    if target == "age":
        assert y.mean() == pytest.approx(0) and y.std() == pytest.approx(1)
    else:
        assert y.min() == pytest.approx(0) and y.max() == pytest.approx(1)
    if target in ("pcl", "gad7"):  # log1p first: the middle of a skewed score moves up
        assert y[2] == pytest.approx(np.log1p(values[2]) / np.log1p(values[-1]))


def test_binary_targets():
    phq9 = TargetTransform.fit("phq9_binary", [3, 9, 10, 20])
    assert list(phq9.transform([3, 9, 10, 20])) == [0, 0, 1, 1] and PHQ9_CUTOFF == 10
    assert list(TargetTransform.fit("sex", ["M", "F"]).transform(["F", "M", "F"])) == [0, 1, 0]


def test_supported_targets_follow_the_phenotype_columns(tmp_path):
    cohort = open_cohort(make_cohort(tmp_path / "c", n_participants=8, parcels=4, timepoints=40))
    assert supported_targets(cohort) == ["age", "sex"]  # the fixture's participants.tsv has age and sex only


def test_transforms_are_never_fitted_on_test_subjects(tmp_path):
    """One subject's age is extreme: in the fold where that subject is tested, the fitted transform must not
    know it. Every fold's transform must equal one fitted on that fold's training subjects alone."""
    path = make_cohort(tmp_path / "c", n_participants=10, parcels=6, timepoints=100)
    ph = pd.read_csv(path / "participants.tsv", sep="\t")
    ph.loc[3, "age"] = 500
    ph.to_csv(path / "participants.tsv", sep="\t", index=False)
    cohort = open_cohort(path)
    backbone = BrainLMBackbone(BrainLM(preset("tiny", window=100)))
    cfg = ClinicalConfig(target="age", folds=5, models=("ridge_fc",), ridge_alphas=(1.0,))
    result = run_clinical(cohort, backbone, cfg, progress=lambda line: None)

    ages = ph.set_index("participant_id")["age"].astype(float)
    assert len(result.fold_transforms) == 5
    seen_outlier_as_test = False
    for transform, test_people in zip(result.fold_transforms, result.fold_test_subjects, strict=True):
        train = ages.drop(test_people)
        assert (transform.a, transform.b) == pytest.approx((train.mean(), train.std(ddof=0)))
        if "sub-0004" in test_people:
            seen_outlier_as_test = True
            assert transform.a < 100  # the extreme age stayed out
    assert seen_outlier_as_test
    # the registered model is refitted on everyone, and carries that transform
    final = TargetTransform.from_dict(result.fitted["ridge_fc"].config["target"])
    assert (final.a, final.b) == pytest.approx((ages.mean(), ages.std(ddof=0)))


def test_every_target_the_config_offers_has_a_transform():
    assert tuple(TARGETS) == CLINICAL_TARGETS == dict(ClinicalConfig.__dataclass_fields__)["target"].metadata["choices"]


def test_unknown_target_or_missing_column_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="ClinicalConfig.target = 'iq': must be one of 'age', ") as info:
        ClinicalConfig(target="iq")
    assert info.value.field == "target"
    cohort = open_cohort(make_cohort(tmp_path / "c", n_participants=10, parcels=4, timepoints=100))
    backbone = BrainLMBackbone(BrainLM(preset("tiny", window=100)))
    with pytest.raises(TaskError, match="no 'neuroticism' column"):
        run_clinical(cohort, backbone, ClinicalConfig(target="neuroticism"))
