"""Stored cohorts for tests, written through the store's own writers (`brainlm.data.store`).

`make_cohort` writes a small cohort whose signals have real structure (so a model can learn something):
each recording is a few smooth latent oscillations (damped AR(2) processes, periods of tens of TRs) that every
parcel reads through a loading that varies smoothly with the parcel's centroid, plus a little white noise.
It does not replace `brainlm.data.ingest`: no validation, no DVC, just the files the reader needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.data import store
from brainlm.data.atlas import Atlas
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


def write_cohort(path: str | Path, recordings: dict[str, np.ndarray], manifest: pd.DataFrame, atlas: Atlas,
                 phenotypes: pd.DataFrame) -> Path:
    """Robust-scale each time × parcels input and store the cohort (`manifest`: recording, participant,
    condition per row)."""
    rows = []
    for row in manifest.to_dict("records"):
        stored = robust_scale(recordings[row["recording"]], axis=0).T.copy()  # parcels × time float32
        store.write_recording(path, row["recording"], stored)
        rows.append(store.manifest_row(**row, source=f"{row['recording']}.npy", stored=stored))
    return store.write_cohort(path, pd.DataFrame(rows), atlas, phenotypes)


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
