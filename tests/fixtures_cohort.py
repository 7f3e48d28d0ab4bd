"""Stored cohorts for tests, written by hand to the contract in DESIGN.md ("Stored cohort").

`make_cohort` writes a small cohort whose signals have real structure (so a model can learn something):
each recording is a few smooth latent oscillations (damped AR(2) processes, periods of tens of TRs) that every
parcel reads through a loading that varies smoothly with the parcel's centroid, plus a little white noise.
`store_folder` turns a synthetic input folder (`brainlm.data.synthetic.synthesize`) into a stored cohort the
same way. Neither replaces `brainlm.data.ingest`: no validation, no DVC, just the files the reader needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.data.atlas import Atlas, load_atlas
from brainlm.data.scaling import robust_scale

LATENTS = 4  # smooth latent signals shared by all parcels of a recording
NOISE = 0.2  # white noise relative to a unit-variance latent mixture


def make_cohort(
    path: str | Path,
    n_participants: int = 8,
    parcels: int = 16,
    timepoints: int = 240,
    seed: int = 0,
    recordings_per_participant: int = 1,
) -> Path:
    """Write a stored cohort of `n_participants` × `recordings_per_participant` recordings; return its folder."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(-60, 60, (parcels, 3)).astype(np.float32)
    atlas = Atlas(name="fixture", index=np.arange(1, parcels + 1), names=[f"P{i + 1}" for i in range(parcels)],
                  coords=coords)
    loadings = _smooth_loadings(coords, rng)  # (parcels, LATENTS): a cohort-wide spatial layout
    recordings, rows = {}, []
    for s in range(n_participants):
        participant = f"sub-{s + 1:04d}"
        for r in range(recordings_per_participant):
            latent = np.stack([_oscillation(timepoints, rng) for _ in range(LATENTS)], axis=1)  # (T, K)
            series = latent @ loadings.T + NOISE * rng.standard_normal((timepoints, parcels))
            recording = f"{participant}_task-rest_run-{r + 1}"
            recordings[recording] = series
            rows.append({"recording": recording, "participant": participant, "condition": "rest"})
    phenotypes = pd.DataFrame({
        "participant_id": [f"sub-{s + 1:04d}" for s in range(n_participants)],
        "age": rng.integers(20, 70, n_participants),
        "sex": rng.choice(["F", "M"], n_participants),
    })
    return write_cohort(path, recordings, pd.DataFrame(rows), atlas, phenotypes)


def store_folder(src: str | Path, path: str | Path) -> Path:
    """A synthetic input folder (time × parcels `.npy`, atlas.tsv, participants.tsv) as a stored cohort."""
    src = Path(src)
    recordings, rows = {}, []
    for file in sorted(src.glob("sub-*.npy")):
        participant, condition = file.stem.split("_")[0], file.stem.split("_")[1].removeprefix("task-")
        recordings[file.stem] = np.load(file)
        rows.append({"recording": file.stem, "participant": participant, "condition": condition})
    phenotypes = pd.read_csv(src / "participants.tsv", sep="\t")
    return write_cohort(path, recordings, pd.DataFrame(rows), load_atlas(src / "atlas.tsv"), phenotypes)


def write_cohort(path: str | Path, recordings: dict[str, np.ndarray], manifest: pd.DataFrame, atlas: Atlas,
                 phenotypes: pd.DataFrame) -> Path:
    """The store layout: robust-scaled parcels × time recordings, manifest, atlas, phenotypes, cohort.json.

    `recordings` maps recording id → time × parcels array (the input layout); `manifest` has one row per
    recording with `recording, participant, condition`.
    """
    path = Path(path)
    (path / "recordings").mkdir(parents=True, exist_ok=True)
    rows = []
    for row in manifest.to_dict("records"):
        stored = robust_scale(recordings[row["recording"]], axis=0).T.copy()  # parcels × time float32
        np.save(path / "recordings" / f"{row['recording']}.npy", stored)
        rows.append({**row, "timepoints": stored.shape[1], "parcels": stored.shape[0],
                     "checksum": hashlib.sha256(stored.tobytes()).hexdigest(), "source": f"{row['recording']}.npy"})
    pd.DataFrame(rows).to_csv(path / "manifest.csv", index=False)
    atlas.to_tsv(path / "atlas.tsv")
    phenotypes.to_csv(path / "participants.tsv", sep="\t", index=False)
    (path / "cohort.json").write_text(json.dumps({
        "name": path.name, "created": "2024-01-01T00:00:00+00:00", "n_recordings": len(rows),
        "n_participants": int(manifest["participant"].nunique()), "n_parcels": atlas.n_parcels,
        "atlas": atlas.name, "scaling": "robust (x - median) / IQR per parcel", "brainlm_version": "test",
    }, indent=2))
    return path


def _oscillation(timepoints: int, rng: np.random.Generator) -> np.ndarray:
    """A damped AR(2) process with a random period of 15–60 TRs, unit variance: smooth, predictable."""
    period, damping = rng.uniform(15, 60), 0.97
    a1, a2 = 2 * damping * np.cos(2 * np.pi / period), -damping**2
    burn = 200  # start from the stationary distribution, not from zero
    x = np.zeros(timepoints + burn)
    e = rng.standard_normal(timepoints + burn)
    for t in range(2, timepoints + burn):
        x[t] = a1 * x[t - 1] + a2 * x[t - 2] + e[t]
    x = x[burn:]
    return (x - x.mean()) / x.std()


def _smooth_loadings(coords: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(parcels, LATENTS) loadings that vary smoothly over space: Gaussian bumps around random centres."""
    centres = rng.uniform(-60, 60, (LATENTS, 3))
    d2 = ((coords[:, None, :] - centres[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * 40.0**2)) + 0.2
