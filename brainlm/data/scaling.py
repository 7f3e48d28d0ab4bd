"""Robust per-parcel scaling: (x − median) / IQR, the normalisation every stored recording gets.

Median and interquartile range instead of mean and standard deviation so that a few motion spikes do not
set a recording's scale. Pure numpy; callers add the recording's name to the errors.
"""

from __future__ import annotations

import numpy as np


def robust_scale(x: np.ndarray, axis: int) -> np.ndarray:
    """Scale a 2-D parcels/time array along `axis` (the time axis); returns float32 of the same shape.

    `axis=0` for time × parcels input files, `axis=1` for the stored parcels × time layout. Raises
    ValueError naming the parcel positions (along the other axis) that are not finite or have IQR 0:
    such a parcel is flat or mostly constant, and scaling it would divide by zero.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"robust_scale expects a 2-D parcels/time array, got shape {x.shape}")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis must be 0 or 1 for a 2-D array, got {axis}")
    data = x.astype(np.float64)
    not_finite = ~np.isfinite(data).all(axis=axis)
    if not_finite.any():
        raise ValueError(f"non-finite values (NaN/inf) in parcel positions {_positions(not_finite)}")
    q25, median, q75 = np.percentile(data, [25.0, 50.0, 75.0], axis=axis, keepdims=True)
    iqr = q75 - q25
    flat = np.squeeze(iqr == 0, axis=axis)
    if flat.any():
        raise ValueError(f"interquartile range is 0 for parcel positions {_positions(flat)} "
                         f"(constant or mostly constant signal)")
    return ((data - median) / iqr).astype(np.float32)


def _positions(mask: np.ndarray, limit: int = 20) -> str:
    """The flagged positions, shortened for long lists so an error message stays readable."""
    hits = np.flatnonzero(mask).tolist()
    more = f" ... ({len(hits)} in all)" if len(hits) > limit else ""
    return f"{hits[:limit]}{more}"
