"""Ingest end to end on real files: what goes in comes back out of the store, scaled, versioned, validated."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from fixtures_ingest import (
    FAST,
    INDEX,
    bids_folder,
    expected_stored,
    known_series,
    manifest_checksums,
    stored_checksums,
    table_folder,
    voxel_image,
    write_atlas,
    write_label_image,
    write_participants,
)

from brainlm.data import versioning
from brainlm.data.atlas import load_atlas
from brainlm.data.export import export_cohort
from brainlm.data.ingest import discover, ingest
from brainlm.data.parcellate import SourceError, read_cifti
from brainlm.data.store import open_cohort


def assert_stored(cohort, known: dict[str, np.ndarray]) -> None:
    """Every known series is in the cohort as robust_scale(series).T, and the manifest checksums hold."""
    assert sorted(cohort.recording_ids) == sorted(known)
    for rec, series in known.items():
        stored = np.asarray(cohort.recording(rec))
        assert stored.dtype == np.float32 and stored.flags.c_contiguous
        np.testing.assert_allclose(stored, expected_stored(series), atol=2e-5)
    assert stored_checksums(cohort.path) == manifest_checksums(cohort)


def test_parcel_tables_round_trip(home, tmp_path):
    known = table_folder(tmp_path / "src")
    report = ingest(tmp_path / "src", "lab", cfg=FAST)

    cohort = open_cohort("lab")
    assert_stored(cohort, known)
    row = cohort.manifest.set_index("recording").loc["sub-02_task-nback_run-1"]
    assert (row.participant, row.condition, row.source) == ("sub-02", "nback", "sub-02_task-nback_run-1.csv")
    assert cohort.atlas.index.tolist() == INDEX.tolist()  # SRC/atlas.tsv was used, not A424
    assert cohort.phenotypes.columns[0] == "participant_id" and len(cohort.phenotypes) == 3
    info = json.loads((cohort.path / "cohort.json").read_text())
    assert (info["n_recordings"], info["n_participants"], info["n_parcels"]) == (6, 3, 16)

    # The run's report (GX results and data docs) sits beside the store, not in the versioned data.
    reports = home / ".brainlm" / "validation" / "lab"
    assert report.validation.success and report.reports == reports and (reports / "index.html").is_file()
    assert {"participants.json", "recordings.json", "rejected.csv"} <= {p.name for p in reports.iterdir()}
    assert sorted(p.name for p in cohort.path.iterdir()) == ["atlas.tsv", "cohort.json", "manifest.csv",
                                                             "participants.tsv", "recordings"]
    [version] = versioning.versions(home)
    assert version.message == "ingest cohort lab: 6 recordings of 3 participants"
    assert version.md5 == report.version.md5 and str(tmp_path) not in version.message
    assert (home / ".brainlm" / "dvc-remote" / "files" / "md5").is_dir()  # pushed to the local remote
    assert "lab" in report.summary() and "6 recording(s) stored" in report.summary()


def test_participant_ids_join_with_or_without_sub_prefix(home, tmp_path):
    src = tmp_path / "src"
    table_folder(src, participants=2)
    write_participants(src, ["01", "02"])  # BIDS allows "sub-01" or the bare label
    (src / "sub-02_task-rest_run-1.npy").rename(src / "02_rest.npy")  # non-BIDS name: participant "02"
    ingest(src, "lab", cfg=FAST)
    manifest = open_cohort("lab").manifest.set_index("recording")
    assert manifest.loc["sub-01_task-rest_run-1", "participant"] == "01"
    assert manifest.loc["02_rest", ["participant", "condition"]].tolist() == ["02", "unknown"]


def test_nifti_bids_tree_round_trip_with_resampled_user_atlas(home, tmp_path):
    """fMRIPrep-like tree, user atlas TSV + a 1 mm label image resampled onto the 2 mm data grid."""
    src = tmp_path / "bids"
    known = bids_folder(src)
    atlas_tsv = write_atlas(tmp_path / "toy_atlas.tsv")
    label_image = write_label_image(tmp_path / "toy_labels_1mm.nii.gz", upsample=2)

    report = ingest(src, "fmriprep", atlas=atlas_tsv, atlas_image=label_image, cfg=FAST)

    cohort = open_cohort("fmriprep")
    assert_stored(cohort, known)  # masks, boldrefs, confounds, T1w-space series and sidecars were skipped
    assert set(cohort.manifest["participant"]) == {"sub-01", "sub-02"}
    assert set(cohort.manifest["condition"]) == {"rest"}
    assert cohort.manifest["source"].str.startswith("sub-0").all()
    assert any("skipped" in note for note in report.notes)


def test_a424_on_an_mni_2mm_image(home, tmp_path):
    """The shipped atlas parcellates an image on its own MNI 2 mm grid (91 × 109 × 91)."""
    a424 = load_atlas("A424")
    label_img = nib.load(a424.label_image)
    labels = np.rint(np.asarray(label_img.dataobj)).astype(np.int32)
    series = known_series(3, timepoints=6, parcels=a424.n_parcels)
    src = tmp_path / "mni"
    src.mkdir()
    nib.save(voxel_image(series, labels, label_img.affine, index=a424.index), src / "s01_rest.nii")

    ingest(src, "a424", cfg=dataclasses.replace(FAST, min_timepoints=6))

    cohort = open_cohort("a424")
    assert cohort.info["atlas"] == "A424" and cohort.n_parcels == 424
    assert_stored(cohort, {"s01_rest": series})


@pytest.mark.slow
def test_cifti_dtseries_on_the_a424_grayordinates(home, tmp_path):
    a424 = load_atlas("A424")
    dlabel = nib.load(a424.dlabel)
    brain_models = dlabel.header.get_axis(1)
    labels = np.rint(np.asarray(dlabel.dataobj)[0]).astype(np.int64)
    series = known_series(4, timepoints=8, parcels=a424.n_parcels)
    lut = np.random.default_rng(5).standard_normal((8, 425)).astype(np.float32)  # label 0: ignored noise
    lut[:, a424.index] = series
    axes = (nib.cifti2.SeriesAxis(start=0, step=0.72, size=8), brain_models)
    src = tmp_path / "hcp"
    src.mkdir()
    nib.save(nib.Cifti2Image(lut[:, labels], header=axes), src / "100307_rfMRI_REST1_LR_Atlas.dtseries.nii")

    ingest(src, "hcp", cfg=dataclasses.replace(FAST, min_timepoints=8))

    cohort = open_cohort("hcp")
    assert cohort.manifest.loc[0, "participant"] == "100307"
    assert_stored(cohort, {"100307_rfMRI_REST1_LR_Atlas": series})


@pytest.mark.slow
def test_cifti_grayordinates_are_matched_by_structure_not_position(tmp_path):
    """A series whose structures come in another order still parcellates; one without subcortex is refused."""
    a424 = load_atlas("A424")
    dlabel = nib.load(a424.dlabel)
    labels = np.rint(np.asarray(dlabel.dataobj)[0]).astype(np.int64)
    series = known_series(6, timepoints=5, parcels=a424.n_parcels)
    lut = np.zeros((5, 425), np.float32)
    lut[:, a424.index] = series
    data = lut[:, labels]
    parts = [(name, slc, axis) for name, slc, axis in dlabel.header.get_axis(1).iter_structures()]

    def dtseries(chosen, path):
        axis = chosen[0][2]
        for _, _, more in chosen[1:]:
            axis = axis + more
        columns = np.concatenate([np.arange(data.shape[1])[slc] for _, slc, _ in chosen])
        header = (nib.cifti2.SeriesAxis(start=0, step=0.72, size=5), axis)
        nib.save(nib.Cifti2Image(data[:, columns], header=header), path)
        return path

    reordered = dtseries(parts[::-1], tmp_path / "reordered.dtseries.nii")
    np.testing.assert_allclose(read_cifti(reordered, a424.dlabel, a424.index), series, rtol=1e-6)

    cortex = dtseries([p for p in parts if "CORTEX" in p[0]], tmp_path / "cortex.dtseries.nii")
    with pytest.raises(SourceError, match="64 of 424 atlas parcels have no voxel"):
        read_cifti(cortex, a424.dlabel, a424.index)


def test_reingest_replaces_the_cohort_and_adds_a_version(home, tmp_path):
    table_folder(tmp_path / "v1", seed=0)
    known2 = table_folder(tmp_path / "v2", participants=2, seed=1)
    first = ingest(tmp_path / "v1", "lab", cfg=FAST)
    second = ingest(tmp_path / "v2", "lab", cfg=FAST)
    assert_stored(open_cohort("lab"), known2)
    assert [v.md5 for v in versioning.versions(home)] == [second.version.md5, first.version.md5]
    assert not list((home / "data" / "cohorts").glob(".*"))  # no temporary or old folders left


def test_export_gives_the_stored_recordings_back(home, tmp_path):
    known = table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)
    out = export_cohort("lab", tmp_path / "export")
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest["recording"]) == sorted(known)
    for rec, series in known.items():
        np.testing.assert_allclose(np.load(out / f"{rec}.npy"), expected_stored(series), atol=2e-5)
    assert (out / "atlas.tsv").is_file() and (out / "participants.tsv").is_file()


def test_discover_ids_participants_conditions_and_reserved_names(tmp_path):
    for name in ["sub-01_task-rest_run-1.npy", "a/x_rest.csv", "b/x_rest.csv", "participants.tsv",
                 "atlas.tsv", "ground_truth.json", "ground_truth.npz", ".hidden.npy", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    sources, rejected, _ = discover(tmp_path)
    assert [(s.rel, s.recording, s.participant, s.condition) for s in sources] == [
        ("a/x_rest.csv", "x_rest", "x", "unknown"),
        ("b/x_rest.csv", "x_rest__2", "x", "unknown"),  # same stem elsewhere: still a unique id
        ("sub-01_task-rest_run-1.npy", "sub-01_task-rest_run-1", "sub-01", "rest"),
    ]
    assert [(r.path, r.rule) for r in rejected] == [("notes.txt", "unsupported_format")]


@pytest.mark.slow
def test_process_pool_matches_serial(home, tmp_path):
    table_folder(tmp_path / "src")
    serial = ingest(tmp_path / "src", "serial", cfg=FAST).manifest
    pooled = ingest(tmp_path / "src", "pooled", cfg=dataclasses.replace(FAST, workers=2)).manifest
    pd.testing.assert_frame_equal(serial, pooled)


@pytest.mark.slow
def test_ray_executor_matches_serial(home, tmp_path):
    table_folder(tmp_path / "src", participants=2)
    serial = ingest(tmp_path / "src", "serial", cfg=FAST).manifest
    ray_run = ingest(tmp_path / "src", "ray", cfg=dataclasses.replace(FAST, executor="ray", workers=2)).manifest
    pd.testing.assert_frame_equal(serial, ray_run)
