"""Atlases: the shipped A424, user TSVs, and clear errors for broken tables."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from brainlm.data.atlas import ATLAS_DIR, AtlasError, load_atlas

YEO7 = {
    "Visual", "Somatomotor", "Dorsal Attention", "Ventral Attention", "Limbic", "Frontoparietal", "Default",
}


def test_a424_is_the_shipped_424_parcel_atlas():
    atlas = load_atlas("A424")
    assert atlas.n_parcels == 424
    assert atlas.index.tolist() == list(range(1, 425))
    assert atlas.coords.dtype == np.float32 and atlas.coords.shape == (424, 3)
    assert np.isfinite(atlas.coords).all()
    assert np.abs(atlas.coords).max() < 120  # MNI mm, inside the head
    assert atlas.names[0] == "R_V1_ROI" and atlas.names[-1] == "Right_X"
    assert atlas.label_image is not None and atlas.label_image.is_file()
    assert atlas.dlabel is not None and atlas.dlabel.is_file()


def test_a424_networks_cover_cortex_and_name_the_rest_by_group():
    atlas = load_atlas("A424")
    yeo = atlas.networks["yeo7"]
    assert sum(bool(label) for label in yeo) == 360  # every Glasser cortical parcel, nothing else
    assert {label for label in yeo if label} == YEO7
    assert set(atlas.networks) == {"yeo7", "cole_anticevic"}
    counts = Counter(atlas.network_labels("yeo7"))
    assert counts["Subcortex"] == 36 and counts["Cerebellum"] == 28
    assert set(counts) == YEO7 | {"Subcortex", "Cerebellum"}


def test_a424_centroids_match_the_coordinates_file():
    """The two shipped sources of centroids agree (A424_Coordinates.dat comes straight from BrainLM)."""
    dat = np.loadtxt(ATLAS_DIR / "A424_Coordinates.dat")
    atlas = load_atlas("A424")
    assert np.array_equal(dat[:, 0].astype(int), atlas.index)
    assert np.allclose(dat[:, 1:], atlas.coords)


def _user_table() -> pd.DataFrame:
    return pd.DataFrame({
        "index": [10, 20, 30, 40],
        "name": ["a", "b", "c", "d"],
        "x": [-40.25, 40.5, 0.125, 12.0],
        "y": [-80.0, -20.0, 30.0, 10.0],
        "z": [0.0, 50.0, 10.0, -5.5],
        "yeo7": ["Visual", "Somatomotor", "Default", ""],
        "lobe": ["occipital", "parietal", "frontal", "frontal"],
    })


def test_user_tsv_loads_and_round_trips(tmp_path):
    path = tmp_path / "my_atlas.tsv"
    _user_table().to_csv(path, sep="\t", index=False)
    atlas = load_atlas(path)
    assert atlas.name == "my_atlas" and atlas.n_parcels == 4
    assert atlas.index.tolist() == [10, 20, 30, 40]
    assert np.allclose(atlas.coords[:, 0], [-40.25, 40.5, 0.125, 12.0])
    assert atlas.network_labels("yeo7") == ["Visual", "Somatomotor", "Default", "Unlabelled"]
    assert atlas.networks["lobe"][0] == "occipital"  # extra columns are kept as label columns
    assert atlas.label_image is None

    again = load_atlas(atlas.to_tsv(tmp_path / "copy" / "atlas.tsv"))
    assert again.index.tolist() == atlas.index.tolist() and again.names == atlas.names
    assert np.array_equal(again.coords, atlas.coords)
    assert again.networks == atlas.networks


def test_subset_keeps_original_indices_and_labels(tmp_path):
    atlas = load_atlas("A424")
    sub = atlas.subset([0, 100, 400])
    assert sub.n_parcels == 3
    assert sub.index.tolist() == [1, 101, 401]
    assert sub.network_labels("yeo7")[2] == "Cerebellum"
    assert np.array_equal(sub.coords, atlas.coords[[0, 100, 400]])
    assert sub.label_image == atlas.label_image  # indices unchanged, so the label image still applies
    written = load_atlas(sub.to_tsv(tmp_path / "sub.tsv"))
    assert written.network_labels("yeo7") == sub.network_labels("yeo7")


def test_unknown_network_column_is_named():
    with pytest.raises(KeyError, match="no network column 'yeo17'.*cole_anticevic"):
        load_atlas("A424").network_labels("yeo17")


@pytest.mark.parametrize(
    ("breakage", "rule"),
    [
        (lambda t: t.drop(columns=["y"]), r"missing required column\(s\) \['y'\]"),
        (lambda t: t.assign(index=[1, 2, 2, 3]), r"indices must be unique; repeated: \[2\]"),
        (lambda t: t.assign(z=[0.0, np.nan, 1.0, 2.0]), r"must be finite.*\[20\]"),
        (lambda t: t.assign(x=["1", "2", "left", "4"]), r"must be finite.*\[30\]"),
        (lambda t: t.assign(index=[1.5, 2, 3, 4]), r"'index' must hold integers"),
        (lambda t: t.assign(index=["1", "two", "3", "4"]), r"'index' must hold integers; data rows \[2\]"),
        (lambda t: t.iloc[:0], r"no parcels"),
    ],
    ids=["missing-column", "duplicate-index", "nan-coordinate", "text-coordinate", "fractional-index",
         "text-index", "no-rows"],
)
def test_bad_atlas_tsv_errors_name_the_file_and_rule(tmp_path, breakage, rule):
    path = tmp_path / "broken_atlas.tsv"
    breakage(_user_table()).to_csv(path, sep="\t", index=False)
    with pytest.raises(AtlasError, match=rule) as info:
        load_atlas(path)
    assert str(path) in str(info.value)


def test_missing_atlas_file_is_an_atlas_error(tmp_path):
    with pytest.raises(AtlasError, match="neither 'A424' nor an existing TSV"):
        load_atlas(tmp_path / "nope.tsv")
