"""Bad input never passes silently and nothing is lost.

Each case adds one bad file to a valid folder and re-ingests a cohort that is already stored: the ingest
must fail naming the file and the rule, and leave the store exactly as it was (data.dvc, files, checksums).
With skip_invalid the valid files go in and the report lists every bad one with its rule.
"""

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from fixtures_ingest import (
    AFFINE,
    FAST,
    GRID,
    block_labels,
    copy_home,
    known_series,
    manifest_checksums,
    pointer,
    settings_for,
    stored_checksums,
    table_folder,
    voxel_image,
    write_label_image,
    write_participants,
    write_table,
)

from brainlm.data import versioning
from brainlm.data.ingest import IngestError, _recover_leftovers, ingest
from brainlm.data.store import open_cohort
from brainlm.errors import BrainLMError

COHORT = "lab"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A home holding one ingested version of cohort `lab`, and the label image its atlas uses."""
    root = tmp_path_factory.mktemp("stored")
    table_folder(root / "src")
    labels = write_label_image(root / "labels.nii.gz")
    ingest(root / "src", COHORT, atlas_image=labels, cfg=FAST, settings=settings_for(root / "home"))
    return root


@pytest.fixture
def case(stored, tmp_path):
    """(home, src, labels): a private copy of the stored home and of its valid source folder."""
    home = copy_home(stored / "home", tmp_path / "home")
    src = tmp_path / "src"
    shutil.copytree(stored / "src", src)
    return home, src, stored / "labels.nii.gz"


def series(**kw) -> np.ndarray:
    return known_series(42, **kw)


def nifti(path, img):
    nib.save(img, path)
    return path


def truncated_nifti(path):
    nifti(path, voxel_image(series(), block_labels()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def with_value(value, parcel=3, t=10):
    x = series()
    x[t, parcel] = value
    return x


def flat():
    x = series()
    x[:, 5] = 7.0
    return x


def nan_voxel_image():
    img = voxel_image(series(), block_labels())
    data = np.asarray(img.dataobj).copy()
    data[2, 2, 2, 17] = np.nan
    return nib.Nifti1Image(data, AFFINE)


def far_away_image():
    """A valid 4D image half a metre away from the atlas: no label falls inside its field of view."""
    affine = AFFINE.copy()
    affine[:3, 3] += 500.0
    return voxel_image(series(), block_labels(), affine)


# (file name, how to write it, the rule ingest must report)
CASES = {
    "nan": ("sub-01_task-x_run-9.npy", lambda p: write_table(p, with_value(np.nan)), "non_finite"),
    "inf": ("sub-01_task-x_run-8.csv", lambda p: write_table(p, with_value(np.inf)), "non_finite"),
    "nan_voxel": ("sub-01_task-x_run-7.nii.gz", lambda p: nifti(p, nan_voxel_image()), "non_finite"),
    "parcels": ("sub-01_task-x_run-6.npy", lambda p: write_table(p, series(parcels=15)), "parcel_count"),
    "transposed": ("sub-01_task-x_run-5.npy", lambda p: write_table(p, series().T.copy()), "parcel_count"),
    "short": ("sub-01_task-x_run-4.tsv", lambda p: write_table(p, series(timepoints=50)), "too_few_timepoints"),
    "flat": ("sub-01_task-x_run-3.npy", lambda p: write_table(p, flat()), "flat_parcel"),
    "truncated": ("sub-02_task-x_run-9.nii.gz", truncated_nifti, "corrupt_nifti"),
    "garbage_nifti": ("sub-02_task-x_run-8.nii.gz", lambda p: p.write_bytes(gzip.compress(b"no nifti")),
                      "corrupt_nifti"),
    "3d": ("sub-02_task-x_run-7.nii.gz", lambda p: nifti(p, nib.Nifti1Image(np.ones(GRID, np.float32), AFFINE)),
           "not_4d"),
    "elsewhere": ("sub-02_task-x_run-6.nii.gz", lambda p: nifti(p, far_away_image()), "atlas_no_overlap"),
    "no_row": ("sub-99_task-x_run-1.npy", lambda p: write_table(p, series()), "no_participant_row"),
    "duplicate": ("sub-03_task-rest_run-1_copy.npy",
                  lambda p: shutil.copyfile(p.parent / "sub-03_task-rest_run-1.npy", p), "duplicate"),
    "garbage_npy": ("sub-03_task-x_run-8.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "unreadable"),
    "bad_csv": ("sub-03_task-x_run-7.csv", lambda p: p.write_text("a,b\n1,2\nthree,4\n"), "unreadable"),
    "broken_link": ("sub-03_task-x_run-6.npy", lambda p: os.symlink(p.parent / "missing.npy", p), "unreadable"),
    "unknown_type": ("sub-03_notes.txt", lambda p: p.write_text("lab notes"), "unsupported_format"),
}


def assert_store_untouched(home, before_pointer, before_checksums):
    assert pointer(home) == before_pointer  # the store's DVC hash is unchanged
    assert len(versioning.versions(home)) == 1
    cohort = open_cohort(COHORT, settings_for(home))
    assert stored_checksums(cohort.path) == before_checksums
    assert manifest_checksums(cohort) == before_checksums
    assert not list((home / "data" / "cohorts").glob(".*"))  # no half-built cohort left behind


@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_fails_the_ingest_and_leaves_the_store(case, name):
    home, src, labels = case
    filename, write, rule = CASES[name]
    write(src / filename)
    before_pointer = pointer(home)
    before = stored_checksums(home / "data" / "cohorts" / COHORT)

    with pytest.raises(IngestError) as err:
        ingest(src, COHORT, atlas_image=labels, cfg=FAST, settings=settings_for(home))

    assert f"{filename}: {rule}:" in str(err.value)
    assert [(r.path, r.rule) for r in err.value.report.rejected] == [(filename, rule)]
    assert_store_untouched(home, before_pointer, before)


def test_invalid_participants_table_fails_the_ingest(case):
    home, src, labels = case
    ids = ["sub-01", "sub-02", "sub-03"]
    write_participants(src, ids, age=[30, 150, 40], sex=["F", "X", "M"], gad7=[1, -2, 3])
    before_pointer, before = pointer(home), stored_checksums(home / "data" / "cohorts" / COHORT)

    with pytest.raises(IngestError) as err:
        ingest(src, COHORT, atlas_image=labels, cfg=dataclasses.replace(FAST, skip_invalid=True),
               settings=settings_for(home))

    message = str(err.value)
    assert "participants.tsv: participants_schema:" in message
    for column in ("age", "sex", "gad7"):
        assert f"({column})" in message
    assert "sub-02" in message
    assert_store_untouched(home, before_pointer, before)


@pytest.mark.slow
def test_skip_invalid_stores_the_valid_files_and_reports_the_rest(case):
    home, src, labels = case
    valid = {p.stem for p in src.iterdir() if p.name.startswith("sub-")}
    for filename, write, _ in CASES.values():
        write(src / filename)

    report = ingest(src, COHORT, atlas_image=labels, cfg=dataclasses.replace(FAST, skip_invalid=True),
                    settings=settings_for(home))

    assert sorted((r.path, r.rule) for r in report.rejected) == sorted((f, rule) for f, _, rule in CASES.values())
    cohort = open_cohort(COHORT, settings_for(home))
    assert set(cohort.recording_ids) == valid
    # The version names what it left out and why; the details (which may quote paths) are in the report.
    assert sorted((r["path"], r["rule"]) for r in cohort.info["rejected"]) == sorted(
        (f, rule) for f, _, rule in CASES.values())
    rejected_csv = (report.reports / "rejected.csv").read_text()
    assert all(f in rejected_csv for f, _, _ in CASES.values())
    assert len(versioning.versions(home)) == 2


def test_atlas_problems_are_refused_before_any_file_is_read(case, tmp_path):
    home, src, labels = case
    nifti(src / "sub-01_task-x_run-1.nii.gz", voxel_image(series(), block_labels()))
    before_pointer = pointer(home)
    with pytest.raises(BrainLMError, match="--atlas-image"):  # SRC/atlas.tsv has no label image of its own
        ingest(src, COHORT, cfg=FAST, settings=settings_for(home))
    wrong = nifti(tmp_path / "wrong_labels.nii.gz", nib.Nifti1Image(block_labels() + 1, AFFINE))
    with pytest.raises(BrainLMError, match="labels not in the TSV"):
        ingest(src, COHORT, atlas_image=wrong, cfg=FAST, settings=settings_for(home))
    assert pointer(home) == before_pointer


def test_a_cohort_caught_between_the_swap_renames_is_restored(case):
    """A kill after `NAME → .NAME.old-*` and before `tmp → NAME`: the next ingest puts the old one back."""
    home, _, _ = case
    cohorts = home / "data" / "cohorts"
    before = stored_checksums(cohorts / COHORT)
    os.rename(cohorts / COHORT, cohorts / f".{COHORT}.old-deadbeef")
    (cohorts / f".{COHORT}.tmp-cafe0000" / "recordings").mkdir(parents=True)

    notes = _recover_leftovers(cohorts)

    assert stored_checksums(cohorts / COHORT) == before
    assert sorted(p.name for p in cohorts.iterdir()) == [COHORT]
    assert any("restored" in n for n in notes)


@pytest.mark.slow
def test_cli_exits_non_zero_naming_the_file_and_rule(case):
    home, src, labels = case
    filename, write, rule = CASES["nan"]
    write(src / filename)
    before_pointer = pointer(home)
    proc = subprocess.run(
        [sys.executable, "-m", "brainlm.cli", "ingest", str(src), "--cohort", COHORT,
         "--atlas-image", str(labels), "--workers", "1"],
        capture_output=True, text=True, env={**os.environ, "BRAINLM_HOME": str(home)}, timeout=300,
    )
    assert proc.returncode != 0
    assert f"{filename}: {rule}:" in proc.stderr
    assert pointer(home) == before_pointer
