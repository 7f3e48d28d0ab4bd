"""Input folders for the ingest tests, written with the real formats (nibabel NIfTI / CIFTI, npy, csv, tsv).

Holds no tests: the builders here are shared by tests/data/ (ingest, bad input, versioning).
Every recording is made from known parcel series, so a test can compare what ingest stored with
`robust_scale(known)` exactly (up to float32 rounding).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainlm.config import IngestConfig, load_settings
from brainlm.data.atlas import Atlas
from brainlm.data.scaling import robust_scale

PARCELS = 16
INDEX = np.arange(1, PARCELS + 1) * 3  # non-contiguous label values: columns must follow the TSV, not 1..P
TIMEPOINTS = 220
GRID = (10, 10, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -10.0
FAST = IngestConfig(workers=1, push=True)  # in-process: no pool start-up in tiny tests


def known_series(seed: int, timepoints: int = TIMEPOINTS, parcels: int = PARCELS) -> np.ndarray:
    """(time, parcels) float32: a shared slow wave plus parcel noise, around parcel-specific baselines."""
    rng = np.random.default_rng(seed)
    wave = np.sin(np.linspace(0, 12, timepoints))[:, None]
    x = 100 + 10 * rng.standard_normal(parcels) + wave * rng.uniform(0.5, 2, parcels) + rng.standard_normal(
        (timepoints, parcels)
    )
    return x.astype(np.float32)


def expected_stored(series: np.ndarray) -> np.ndarray:
    """What the store must hold for a (time, parcels) input: robust-scaled parcels × time float32."""
    return robust_scale(series.astype(np.float64), axis=0).T


def write_atlas(path: Path, index: np.ndarray = INDEX) -> Path:
    rng = np.random.default_rng(1)
    atlas = Atlas(name="toy", index=index, names=[f"P{i}" for i in index],
                  coords=rng.uniform(-60, 60, (len(index), 3)).astype(np.float32),
                  networks={"yeo7": ["Visual", "Default"] * (len(index) // 2)})
    return atlas.to_tsv(path)


def write_participants(folder: Path, ids: list[str], **columns) -> Path:
    """participants.tsv with plausible phenotypes; `columns` replace whole columns."""
    n = len(ids)
    frame = pd.DataFrame({
        "participant_id": ids,
        "age": np.linspace(20, 70, n).round(),
        "sex": (["F", "M"] * n)[:n],
        "neuroticism": np.arange(n) % 48,
        "pcl": np.arange(n) % 80,
        "gad7": np.arange(n) % 21,
        "phq9": np.arange(n) % 27,
    })
    for name, values in columns.items():
        frame[name] = values
    path = folder / "participants.tsv"
    frame.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def table_folder(folder: Path, participants: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A folder of parcel tables (npy, csv with header, tsv without) + atlas.tsv + participants.tsv.

    Returns recording id → the known (time, parcels) series.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_atlas(folder / "atlas.tsv")
    ids = [f"sub-{s + 1:02d}" for s in range(participants)]
    write_participants(folder, ids)
    known = {}
    for s, pid in enumerate(ids):
        for r, fmt in enumerate(["npy", "csv" if s % 2 else "tsv"]):
            stem = f"{pid}_task-{'rest' if r == 0 else 'nback'}_run-1"
            known[stem] = known_series(seed * 100 + 10 * s + r)
            write_table(folder / f"{stem}.{fmt}", known[stem])
    return known


def write_table(path: Path, series: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, series)
    elif path.suffix == ".csv":  # with a header row
        pd.DataFrame(series, columns=[f"p{i}" for i in INDEX[: series.shape[1]]]).to_csv(path, index=False)
    else:  # .tsv without a header
        np.savetxt(path, series, delimiter="\t", fmt="%.9g")
    return path


def block_labels(grid: tuple[int, int, int] = GRID, index: np.ndarray = INDEX) -> np.ndarray:
    """16 box-shaped parcels filling the grid: x and y halves × 4 slabs in z."""
    x, y, z = np.indices(grid)
    block = (x * 2 // grid[0]) + 2 * (y * 2 // grid[1]) + 4 * (z * 4 // grid[2])
    return index[block].astype(np.int16)


def write_label_image(path: Path, upsample: int = 1) -> Path:
    """The block parcellation as a NIfTI label image, optionally on a finer grid covering the same space.

    With upsample=2 the image has 1 mm voxels whose centres straddle the data's 2 mm voxel centres, so the
    nearest-neighbour resampling to the data grid must recover exactly the data-grid blocks.
    """
    labels = block_labels()
    affine = AFFINE.copy()
    if upsample > 1:
        for axis in range(3):
            labels = np.repeat(labels, upsample, axis=axis)
        affine[:3, :3] /= upsample
        affine[:3, 3] -= (AFFINE[0, 0] - affine[0, 0]) / 2
    nib.save(nib.Nifti1Image(labels, affine), path)
    return path


def voxel_image(series: np.ndarray, labels: np.ndarray, affine: np.ndarray = AFFINE,
                index: np.ndarray = INDEX) -> nib.Nifti1Image:
    """A 4D image whose every voxel carries its parcel's series (background voxels: noise)."""
    lut = np.random.default_rng(7).standard_normal((series.shape[0], int(labels.max()) + 1)).astype(np.float32)
    lut[:, index] = series
    return nib.Nifti1Image(np.moveaxis(lut[:, labels], 0, -1), affine)


def bids_folder(folder: Path, participants: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """An fMRIPrep-like derivatives tree: MNI bold series plus the files ingest must skip."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.8.0"}')
    ids = [f"sub-{s + 1:02d}" for s in range(participants)]
    write_participants(folder, ids)
    labels = block_labels()
    known = {}
    for s, pid in enumerate(ids):
        func = folder / pid / "ses-1" / "func"
        func.mkdir(parents=True)
        stem = f"{pid}_ses-1_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold"
        known[stem] = known_series(seed * 100 + s)
        nib.save(voxel_image(known[stem], labels), func / f"{stem}.nii.gz")
        # What fMRIPrep writes beside it, none of which is a recording:
        nib.save(nib.Nifti1Image((labels > 0).astype(np.uint8), AFFINE),
                 func / f"{pid}_ses-1_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
        nib.save(nib.Nifti1Image(np.ones(GRID, np.float32), AFFINE),
                 func / f"{pid}_ses-1_task-rest_space-MNI152NLin2009cAsym_boldref.nii.gz")
        nib.save(voxel_image(known_series(99), labels),
                 func / f"{pid}_ses-1_task-rest_space-T1w_desc-preproc_bold.nii.gz")  # native space
        pd.DataFrame({"csf": np.zeros(5)}).to_csv(func / f"{pid}_ses-1_task-rest_desc-confounds_timeseries.tsv",
                                                  sep="\t", index=False)
        (func / f"{stem}.json").write_text('{"RepetitionTime": 2.0}')
    return known


def stored_checksums(cohort_dir: Path) -> dict[str, str]:
    """sha256 of every stored array's bytes, recomputed from disk (what manifest.csv must say)."""
    return {p.stem: hashlib.sha256(np.ascontiguousarray(np.load(p)).tobytes()).hexdigest()
            for p in sorted((cohort_dir / "recordings").glob("*.npy"))}


def manifest_checksums(cohort) -> dict[str, str]:
    return dict(zip(cohort.manifest["recording"], cohort.manifest["checksum"], strict=True))


def pointer(home: Path) -> str | None:
    """data.dvc's text, with the store's DVC hash (None before the first ingest)."""
    pointer = home / "data.dvc"
    return pointer.read_text() if pointer.exists() else None


def copy_home(base: Path, dest: Path) -> Path:
    """A private copy of a prepared brainlm home (git repo, DVC cache and local remote included)."""
    shutil.copytree(base, dest, symlinks=True)
    return dest


def settings_for(home: Path):
    return load_settings(home)
