"""The cohort store: its on-disk layout, the writers every producer uses, and the reader.

This module owns the format. Ingest, the test fixtures and the benchmarks all write through
`write_recording` + `write_cohort`; training and export read through `open_cohort`.

    <cohorts_dir>/<NAME>/
        recordings/<recording_id>.npy    float32 parcels × time, C-contiguous (robust-scaled by ingest)
        manifest.csv     recording, participant, condition, timepoints, parcels, checksum, source
        atlas.tsv        the atlas used (index, name, x, y, z + label columns)
        participants.tsv phenotypes, participant_id first
        cohort.json      name, format, counts, atlas name, scaling (+ what the writer adds, e.g. rejections)

Every file is a function of the data alone: no timestamps, no absolute paths, no run reports. So the same
input always gives the same bytes, and the same DVC version. Recordings are opened with
`np.load(mmap_mode="r")`, so a training crop reads only its window from disk.

Imports numpy and pandas only (torch when a window is read; no Great Expectations, DVC, Prefect, MLflow or
Ray): the benchmarks use it on machines that have nothing else, and ingest's worker processes start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from brainlm.config import Settings, load_settings
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.errors import BrainLMError, ConfigError

if TYPE_CHECKING:
    import torch

RECORDINGS = "recordings"
MANIFEST = "manifest.csv"
ATLAS = "atlas.tsv"
PARTICIPANTS = "participants.tsv"
COHORT_JSON = "cohort.json"
REQUIRED_FILES = (MANIFEST, ATLAS, PARTICIPANTS, COHORT_JSON)
MANIFEST_COLUMNS = ("recording", "participant", "condition", "timepoints", "parcels", "checksum", "source")
STORE_FORMAT = 1  # cohort.json `format`: raise when the layout changes
ROBUST_SCALING = "robust: (x - median) / IQR per recording per parcel"
SPLITS = ("train", "val", "test")


class CohortError(BrainLMError):
    """A stored cohort is missing, incomplete, or cannot serve what was asked of it."""


@dataclass(frozen=True, eq=False)
class Cohort:
    """A stored cohort, opened read-only. Build one with `open_cohort`."""

    path: Path
    name: str
    manifest: pd.DataFrame
    atlas: Atlas
    phenotypes: pd.DataFrame
    info: dict  # cohort.json

    @property
    def n_parcels(self) -> int:
        return self.atlas.n_parcels

    @property
    def recording_ids(self) -> list[str]:
        return self.manifest["recording"].tolist()

    @property
    def participants(self) -> list[str]:
        """Participant ids with at least one recording, sorted."""
        return sorted(self.manifest["participant"].unique().tolist())

    def recording(self, recording_id: str) -> np.memmap:
        """The stored parcels × time float32 array, memory-mapped read-only (nothing is read until sliced)."""
        path = recording_path(self.path, recording_id)
        if recording_id not in self._timepoints:
            raise CohortError(f"cohort {self.path}: no recording {recording_id!r} in manifest.csv")
        if not path.is_file():
            raise CohortError(f"cohort {self.path}: {path} is listed in manifest.csv but missing; re-run "
                              f"`brainlm ingest` or `dvc pull` to restore the cohort")
        array = np.load(path, mmap_mode="r")
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != self.n_parcels:
            raise CohortError(f"cohort {self.path}: {path} is {array.dtype} {array.shape}; expected float32 "
                              f"({self.n_parcels} parcels, time)")
        return array

    def timepoints(self, recording_id: str) -> int:
        """Length of a recording in TRs, from the manifest (no file access)."""
        if recording_id not in self._timepoints:
            raise CohortError(f"cohort {self.path}: no recording {recording_id!r} in manifest.csv")
        return self._timepoints[recording_id]

    @cached_property
    def _timepoints(self) -> dict[str, int]:  # looked up for every crop: build once
        return dict(zip(self.manifest["recording"], self.manifest["timepoints"].astype(int), strict=True))

    def split(self, val_fraction: float = 0.1, test_fraction: float = 0.1,
              seed: int = 0) -> dict[str, list[str]]:
        """Recording ids for train / val / test, split by participant (no one is in two splits).

        Participants are ranked by a hash of (seed, participant id): deterministic across processes and
        machines, and adding participants later moves few existing ones between splits. With at least 3
        participants every split with a positive fraction gets at least one; with fewer, all go to train.
        """
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(f"split fractions must be in [0, 1) and sum below 1, got val={val_fraction}, "
                             f"test={test_fraction}")
        people = sorted(self.participants, key=lambda p: _rank(seed, p))
        n_val, n_test = _split_sizes(len(people), val_fraction, test_fraction)
        group = {p: "test" for p in people[:n_test]}
        group |= {p: "val" for p in people[n_test : n_test + n_val]}
        out: dict[str, list[str]] = {name: [] for name in SPLITS}
        for rec, person in zip(self.manifest["recording"], self.manifest["participant"], strict=True):
            out[group.get(person, "train")].append(rec)
        return out

    def window_dataset(self, recording_ids: list[str], window: int, crops_per_recording: int = 1,
                       seed: int = 0) -> WindowDataset:
        return WindowDataset(self, recording_ids, window, crops_per_recording, seed)


def open_cohort(name_or_path: str | os.PathLike, settings: Settings | None = None) -> Cohort:
    """Open a stored cohort by name (under `settings.cohorts_dir`) or by path.

    A plain name ("hcp") resolves under the store; a Path, or a string containing a path separator or
    starting with "." or "~", is taken as the cohort folder itself.
    """
    path = _resolve(name_or_path, settings)
    hint = f"create it with `brainlm ingest <folder> --cohort {path.name}`"
    if not path.is_dir():
        raise CohortError(f"no cohort at {path}: {hint}")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CohortError(f"cohort {path} is incomplete (no {', '.join(missing)}): the ingest did not "
                          f"finish; re-run `brainlm ingest` for it, or `dvc pull` if it lives on a remote")
    manifest = _read_manifest(path / MANIFEST)
    if manifest.empty:
        raise CohortError(f"cohort {path} has no recordings ({MANIFEST} is empty): {hint}")
    info = json.loads((path / COHORT_JSON).read_text())
    atlas = load_atlas(path / ATLAS)
    if info.get("atlas"):  # the TSV's file name is always "atlas"; cohort.json keeps the real one (e.g. A424)
        atlas = dataclasses.replace(atlas, name=str(info["atlas"]))
    wrong = manifest.loc[manifest["parcels"].astype(int) != atlas.n_parcels, "recording"].tolist()
    if wrong:
        raise CohortError(f"cohort {path}: recordings {wrong[:5]} do not have the atlas's {atlas.n_parcels} "
                          f"parcels")
    phenotypes = pd.read_csv(path / PARTICIPANTS, sep="\t", dtype={"participant_id": str})
    return Cohort(
        path=path,
        name=path.name,
        manifest=manifest,
        atlas=atlas,
        phenotypes=phenotypes,
        info=info,
    )


class WindowDataset:
    """Random `window`-TR crops of stored recordings: item i is a float32 tensor (parcels, window).

    A map-style dataset for torch's DataLoader (`__len__` + `__getitem__`); torch is imported when the first
    item is read, so writers of the store never load it.

    Item i crops recording `ids[i // crops_per_recording]` at an offset drawn from (seed, epoch, i), so a
    crop is reproducible, differs between items of the same recording, and changes when `set_epoch` moves
    to the next epoch. Only the crop is read from disk (memory-mapped slicing).
    """

    def __init__(self, cohort: Cohort, recording_ids: list[str], window: int, crops_per_recording: int = 1,
                 seed: int = 0):
        if window < 1 or crops_per_recording < 1:
            raise ConfigError(f"window and crops_per_recording must be >= 1, got {window} and "
                              f"{crops_per_recording}")
        short = [(r, cohort.timepoints(r)) for r in recording_ids if cohort.timepoints(r) < window]
        if short:
            raise CohortError(f"cohort {cohort.path}: recordings shorter than the {window}-TR window: "
                              f"{', '.join(f'{r} ({t} TRs)' for r, t in short[:5])}; drop them or use a "
                              f"shorter window")
        self.cohort = cohort
        self.recording_ids = list(recording_ids)
        self.window = window
        self.crops_per_recording = crops_per_recording
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of crops (call at the start of every epoch, like DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.recording_ids) * self.crops_per_recording

    def locate(self, i: int) -> tuple[str, int]:
        """(recording id, start TR) of item i in the current epoch."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} crops")
        recording_id = self.recording_ids[i // self.crops_per_recording]
        last_start = self.cohort.timepoints(recording_id) - self.window
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return recording_id, int(rng.integers(0, last_start + 1))

    def __getitem__(self, i: int) -> torch.Tensor:
        import torch

        recording_id, start = self.locate(i)
        crop = self.cohort.recording(recording_id)[:, start : start + self.window]
        return torch.from_numpy(np.array(crop, dtype=np.float32))


# ------------------------------------------------------------------------------------------- writing


def recording_path(cohort_dir: str | os.PathLike, recording_id: str) -> Path:
    return Path(cohort_dir) / RECORDINGS / f"{recording_id}.npy"


def checksum(stored: np.ndarray) -> str:
    """The manifest's checksum: sha256 of the stored array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()


def write_recording(cohort_dir: str | os.PathLike, recording_id: str, stored: np.ndarray) -> Path:
    """Save one recording, float32 parcels × time, as `recordings/<recording_id>.npy`; returns its path."""
    if stored.dtype != np.float32 or stored.ndim != 2:
        raise ValueError(f"recording {recording_id}: the store holds float32 parcels × time arrays, got "
                         f"{stored.dtype} {stored.shape}")
    path = recording_path(cohort_dir, recording_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(stored))
    return path


def manifest_row(recording: str, participant: str, condition: str, source: str, stored: np.ndarray) -> dict:
    """One manifest.csv row for a stored array (`source`: the input file, relative to the input folder)."""
    return {"recording": recording, "participant": participant, "condition": condition,
            "timepoints": int(stored.shape[1]), "parcels": int(stored.shape[0]), "checksum": checksum(stored),
            "source": source}


def write_cohort(cohort_dir: str | os.PathLike, manifest: pd.DataFrame, atlas: Atlas,
                 participants: pd.DataFrame | None = None, *, name: str | None = None,
                 scaling: str = ROBUST_SCALING, **info) -> Path:
    """Everything but the recordings (already written with `write_recording`); returns the cohort folder.

    `manifest` has the MANIFEST_COLUMNS, one row per recording; `participants` the phenotypes (without it,
    a table of the manifest's participant ids). `name` defaults to the folder's name (a writer building
    the cohort in a temporary folder passes the real one). `info` adds fields to cohort.json; like every
    file here they must be functions of the data, never of the run (no times, no absolute paths).
    """
    path = Path(cohort_dir)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest for {path} lacks column(s) {missing}; a manifest has {list(MANIFEST_COLUMNS)}")
    path.mkdir(parents=True, exist_ok=True)
    manifest[list(MANIFEST_COLUMNS)].to_csv(path / MANIFEST, index=False, lineterminator="\n")
    atlas.to_tsv(path / ATLAS)
    if participants is None:
        participants = pd.DataFrame({"participant_id": sorted(manifest["participant"].unique())})
    if participants.columns[0] != "participant_id":
        participants = participants[["participant_id", *[c for c in participants.columns if c != "participant_id"]]]
    participants.to_csv(path / PARTICIPANTS, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    cohort_info = {
        "name": name or path.name,
        "format": STORE_FORMAT,
        "n_recordings": len(manifest),
        "n_participants": int(manifest["participant"].nunique()),
        "n_parcels": atlas.n_parcels,
        "atlas": atlas.name,
        "scaling": scaling,
        **info,
    }
    (path / COHORT_JSON).write_text(json.dumps(cohort_info, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------- helpers


def _resolve(name_or_path: str | os.PathLike, settings: Settings | None) -> Path:
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or os.sep in text or "/" in text or text.startswith((".", "~")):
        return Path(text).expanduser().resolve()
    return (settings or load_settings()).cohorts_dir / text


def _read_manifest(path: Path) -> pd.DataFrame:
    ids = {c: str for c in ("recording", "participant", "condition", "checksum", "source")}
    try:
        manifest = pd.read_csv(path, dtype=ids, keep_default_na=False)
    except pd.errors.EmptyDataError as e:
        raise CohortError(f"{path} is empty (not even a header): re-run `brainlm ingest` for this "
                          f"cohort") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}; a manifest has {list(MANIFEST_COLUMNS)}")
    return manifest


def _rank(seed: int, participant: str) -> str:
    return hashlib.sha256(f"{seed}:{participant}".encode()).hexdigest()


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test): rounded shares, at least one each when asked for, always leaving one for train."""
    if n < 3:
        return 0, 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    while n_val + n_test > n - 1:  # rounding up can eat train; give back from the larger held-out split
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test
