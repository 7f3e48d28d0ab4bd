"""The Great Expectations suites: each rule catches its own violation, and results land in the cohort."""

import json
import tempfile

import numpy as np
import pandas as pd
import pytest

from brainlm.data.validation import RECORDING_STATS, CohortValidator

SCORES = ("neuroticism", "pcl", "gad7", "phq9")


def participants(**columns) -> pd.DataFrame:
    frame = pd.DataFrame({
        "participant_id": ["sub-01", "sub-02", "sub-03"],
        "age": [25.0, 40.0, np.nan],  # missing values are allowed
        "sex": ["F", "male", None],
        "gad7": [0, 5, 21],
        "handedness": ["R", "L", "R"],  # unknown columns pass through unchecked
    })
    for name, values in columns.items():
        frame[name] = values
    return frame


def stats(**columns) -> pd.DataFrame:
    frame = pd.DataFrame({
        "recording": ["a", "b"], "participant": ["sub-01", "sub-02"], "parcels": [16, 16],
        "timepoints": [220, 300], "n_nonfinite": [0, 0], "dtype": ["float32", "float32"],
        "median_abs_max": [0.0, 1e-7], "iqr_min": [1.0, 0.9999999], "iqr_max": [1.0, 1.0000001],
        "checksum": ["c1", "c2"],
    })
    for name, values in columns.items():
        frame[name] = values
    return frame


def failed(result) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in result.failures}


def test_valid_tables_pass_and_docs_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    validator = CohortValidator(tmp_path / "validation")

    assert validator.participants(participants(), SCORES).success
    assert validator.recordings(stats(), n_parcels=16, min_timepoints=200, participants=["sub-01", "sub-02"]).success
    index = validator.build_docs()

    assert index.is_file() and "recordings" in index.read_text()
    saved = json.loads((tmp_path / "validation" / "recordings.json").read_text())
    assert saved["success"] is True and len(saved["results"]) == 12
    assert validator.summary.success and "recordings: 12/12 expectations passed" in validator.summary.lines()
    assert not list((tmp_path / "system-tmp").iterdir())  # GX's default /tmp docs site is not built


@pytest.mark.parametrize("column, values, expectation", [
    ("age", [25, 130, 40], "expect_column_values_to_be_between"),
    ("age", [25, -1, 40], "expect_column_values_to_be_between"),
    ("age", ["25", "forty", "30"], "expect_column_values_to_be_in_type_list"),
    ("sex", ["F", "X", "M"], "expect_column_values_to_be_in_set"),
    ("gad7", [0, -3, 2], "expect_column_values_to_be_between"),
    ("participant_id", ["sub-01", "sub-01", "sub-03"], "expect_column_values_to_be_unique"),
    ("participant_id", ["sub-01", None, "sub-03"], "expect_column_values_to_not_be_null"),
])
def test_participants_rules(tmp_path, column, values, expectation):
    result = CohortValidator(tmp_path).participants(participants(**{column: values}), SCORES)
    assert not result.success
    assert (expectation, column) in failed(result)
    [failure] = [f for f in result.failures if f.expectation == expectation]
    if expectation != "expect_column_values_to_be_in_type_list":
        assert 1 in failure.rows  # the offending row is named


def test_participants_without_an_id_column_fail(tmp_path):
    result = CohortValidator(tmp_path).participants(participants().drop(columns="participant_id"), SCORES)
    assert ("expect_column_to_exist", "participant_id") in failed(result)


@pytest.mark.parametrize("column, values", [
    ("parcels", [16, 15]),
    ("timepoints", [220, 199]),
    ("n_nonfinite", [0, 3]),
    ("dtype", ["float32", "float64"]),
    ("median_abs_max", [0.0, 0.01]),
    ("iqr_min", [1.0, 0.5]),
    ("iqr_max", [1.0, 2.0]),
    ("checksum", ["c1", "c1"]),  # duplicate data
    ("recording", ["a", "a"]),
    ("participant", ["sub-01", "sub-99"]),  # not in participants.tsv
])
def test_recording_rules(tmp_path, column, values):
    result = CohortValidator(tmp_path).recordings(
        stats(**{column: values}), n_parcels=16, min_timepoints=200, participants=["sub-01", "sub-02"]
    )
    assert not result.success
    assert [f.column for f in result.failures] == [column]
    assert result.failures[0].rows == [1] or column in ("checksum", "recording")


def test_recordings_table_must_have_exactly_the_stat_columns(tmp_path):
    frame = stats().drop(columns="dtype")
    result = CohortValidator(tmp_path).recordings(frame, n_parcels=16, min_timepoints=200, participants=None)
    assert ("expect_table_columns_to_match_set", None) in failed(result)
    assert set(RECORDING_STATS) - set(frame.columns) == {"dtype"}
