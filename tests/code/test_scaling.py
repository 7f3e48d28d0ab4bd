"""Robust per-parcel scaling: median 0, IQR 1, and errors that name the broken parcels."""

import numpy as np
import pytest

from brainlm.data.scaling import robust_scale


@pytest.mark.parametrize("axis", [0, 1])
def test_each_parcel_has_median_zero_and_iqr_one(axis):
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 30.0, (200, 7)) * rng.uniform(0.5, 2.0, 7)  # time × parcels, per-parcel scale
    if axis == 1:
        x = x.T  # parcels × time
    scaled = robust_scale(x, axis=axis)
    assert scaled.dtype == np.float32 and scaled.shape == x.shape
    q25, median, q75 = np.percentile(scaled, [25, 50, 75], axis=axis)
    assert np.allclose(median, 0.0, atol=1e-5)
    assert np.allclose(q75 - q25, 1.0, atol=1e-5)


def test_a_spike_does_not_set_the_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (300, 1))
    spiked = x.copy()
    spiked[10] = 1e4  # one motion spike
    assert np.allclose(robust_scale(x, axis=0)[20:], robust_scale(spiked, axis=0)[20:], atol=0.05)


def test_zero_iqr_names_the_parcel_positions():
    x = np.random.default_rng(2).normal(size=(50, 6))
    x[:, 2] = 5.0  # a flat parcel
    x[:40, 4] = 1.0  # mostly constant: IQR 0 even though not all values are equal
    with pytest.raises(ValueError, match=r"interquartile range is 0 for parcel positions \[2, 4\]"):
        robust_scale(x, axis=0)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        robust_scale(x.T, axis=1)


def test_non_finite_values_name_the_parcel_positions():
    x = np.random.default_rng(3).normal(size=(50, 4))
    x[7, 1] = np.nan
    x[9, 3] = np.inf
    with pytest.raises(ValueError, match=r"non-finite values .* positions \[1, 3\]"):
        robust_scale(x, axis=0)


def test_rejects_arrays_that_are_not_parcels_by_time():
    with pytest.raises(ValueError, match="2-D"):
        robust_scale(np.zeros(10), axis=0)
