"""Get data back out of the store: each recording as a parcels × time `.npy`, plus manifest, atlas, phenotypes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from brainlm.config import Settings
from brainlm.data.store import open_cohort


def export_cohort(cohort: str | Path, out: str | Path, settings: Settings | None = None) -> Path:
    """Write `out/<recording>.npy` (float32 parcels × time, as stored) and `out/manifest.csv`.

    `atlas.tsv` and `participants.tsv` are copied too, so the folder is complete without brainlm.
    """
    stored = open_cohort(cohort, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for recording in stored.recording_ids:
        np.save(out / f"{recording}.npy", np.asarray(stored.recording(recording)))
    stored.manifest.to_csv(out / "manifest.csv", index=False)
    for name in ("atlas.tsv", "participants.tsv"):
        shutil.copyfile(stored.path / name, out / name)
    return out
