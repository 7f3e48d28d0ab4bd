"""Parcellation atlases: parcel indices, names, MNI centroids and network labels.

The model never sees voxels: it sees parcels, and needs each parcel's centroid for its spatial embedding.
So an atlas here is a table (`index, name, x, y, z` + optional label columns) and, for NIfTI input, a label
image. A424 (Glasser cortex + Brainnetome subcortex + cerebellum) ships inside the package; any other atlas
comes as a TSV with the same columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.errors import BrainLMError

ATLAS_DIR = Path(__file__).parent / "atlases"
REQUIRED_COLUMNS = ("index", "name", "x", "y", "z")
GROUP_COLUMN = "group"  # anatomical group (e.g. cortex / subcortex / cerebellum): names unlabelled parcels
UNLABELLED = "Unlabelled"

# The shipped A424 files (provenance in atlases/README.md).
_A424_PARCELS = "A424_parcels.tsv"
_A424_NETWORKS = "A424_networks.tsv"
_A424_NETWORK_COLUMNS = ("yeo7", "cole_anticevic")
_A424_LABEL_IMAGE = "A424+2mm.nii.gz"
_A424_DLABEL = "A424.dlabel.nii"


class AtlasError(BrainLMError, ValueError):
    """An atlas that does not exist or breaks a rule of the atlas table."""


@dataclass(frozen=True, eq=False)
class Atlas:
    """One parcellation. Row p of every field describes the same parcel; `index` is its label value.

    `networks` maps a partition name (e.g. "yeo7") to one label per parcel, "" where the partition does not
    cover the parcel. `groups` (optional) is each parcel's anatomical group; it names the unlabelled parcels.
    """

    name: str
    index: np.ndarray  # (P,) int64 label values in the label image
    names: list[str]
    coords: np.ndarray  # (P, 3) float32 MNI mm centroids
    networks: dict[str, list[str]] = field(default_factory=dict)
    label_image: Path | None = None
    dlabel: Path | None = None
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.index)
        if len(self.names) != n or self.coords.shape != (n, 3):
            raise AtlasError(
                f"atlas {self.name}: {n} indices, {len(self.names)} names, coords {self.coords.shape}; "
                f"expected {n} names and coords ({n}, 3)"
            )
        columns = {**self.networks, **({GROUP_COLUMN: self.groups} if self.groups else {})}
        for column, labels in columns.items():
            if len(labels) != n:
                raise AtlasError(f"atlas {self.name}: column {column!r} has {len(labels)} labels for {n} "
                                 f"parcels")

    @property
    def n_parcels(self) -> int:
        return len(self.index)

    def network_labels(self, column: str = "yeo7") -> list[str]:
        """Each parcel's label in partition `column`; unlabelled parcels get their anatomical group.

        The group name is the first word of the `group` value, capitalised ("subcortex_brainnetome" →
        "Subcortex"), so A424's 64 non-cortical parcels become "Subcortex" and "Cerebellum". Without group
        information an unlabelled parcel is "Unlabelled".
        """
        if column not in self.networks:
            raise KeyError(f"atlas {self.name} has no network column {column!r}; it has "
                           f"{sorted(self.networks)}")
        groups = self.groups or [""] * self.n_parcels
        labels = self.networks[column]
        return [label or _group_name(group) for label, group in zip(labels, groups, strict=True)]

    def subset(self, positions, name: str | None = None) -> Atlas:
        """The atlas restricted to the parcels at `positions` (row positions, in the order given).

        Indices stay the original label values, so the label image still applies unchanged.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= self.n_parcels)):
            raise IndexError(f"atlas {self.name}: positions must be 1-D within [0, {self.n_parcels})")
        if len(np.unique(pos)) != len(pos):
            raise AtlasError(f"atlas {self.name}: subset positions repeat a parcel")
        pick = pos.tolist()
        return dataclasses.replace(
            self,
            name=name or self.name,
            index=self.index[pos].copy(),
            names=[self.names[p] for p in pick],
            coords=self.coords[pos].copy(),
            networks={column: [labels[p] for p in pick] for column, labels in self.networks.items()},
            groups=[self.groups[p] for p in pick] if self.groups else None,
        )

    def to_frame(self) -> pd.DataFrame:
        """The atlas as the TSV table: `index, name, x, y, z`, then `group` and the network columns."""
        frame = pd.DataFrame({"index": self.index, "name": self.names})
        frame[["x", "y", "z"]] = self.coords
        if self.groups:
            frame[GROUP_COLUMN] = self.groups
        for column, labels in self.networks.items():
            frame[column] = labels
        return frame

    def to_tsv(self, path: str | Path) -> Path:
        """Write the atlas table; `load_atlas(path)` reads the same parcels, coordinates and labels back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_csv(path, sep="\t", index=False)
        return path


def load_atlas(spec: str | Path = "A424") -> Atlas:
    """"A424" (the shipped default) or a path to an atlas TSV with columns `index, name, x, y, z`.

    Any further column is kept as a label column (`networks`), except `group`, which names the anatomical
    group of unlabelled parcels. Empty cells mean "not labelled".
    """
    if str(spec).upper() == "A424":
        return _load_a424()
    path = Path(spec)
    if not path.is_file():
        raise AtlasError(f"atlas {spec!r} is neither 'A424' nor an existing TSV file")
    return _atlas_from_frame(_read_table(path), name=path.stem, source=path)


def _load_a424() -> Atlas:
    """Merge the shipped parcel table (names, groups, centroids) with its network table (Yeo-7, CAB-NP)."""
    parcels = _read_table(ATLAS_DIR / _A424_PARCELS)
    parcels = parcels.rename(columns={"x_mni": "x", "y_mni": "y", "z_mni": "z"})
    networks = _read_table(ATLAS_DIR / _A424_NETWORKS)
    if not parcels["index"].astype(int).equals(networks["index"].astype(int)):
        raise AtlasError(f"{ATLAS_DIR}: {_A424_PARCELS} and {_A424_NETWORKS} list different parcel indices")
    frame = parcels[[*REQUIRED_COLUMNS, GROUP_COLUMN]].copy()
    for column in _A424_NETWORK_COLUMNS:
        frame[column] = networks[column].to_numpy()
    atlas = _atlas_from_frame(frame, name="A424", source=ATLAS_DIR / _A424_PARCELS)
    return dataclasses.replace(
        atlas, label_image=ATLAS_DIR / _A424_LABEL_IMAGE, dlabel=ATLAS_DIR / _A424_DLABEL
    )


def _read_table(path: Path) -> pd.DataFrame:
    """Every cell as a string ("" when empty): labels stay labels, numbers are parsed where needed."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _atlas_from_frame(frame: pd.DataFrame, name: str, source: Path) -> Atlas:
    """Validate an atlas table and build the Atlas; every error names the file and the rule it breaks."""
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise AtlasError(
            f"atlas {source}: missing required column(s) {missing}; an atlas TSV needs "
            f"{list(REQUIRED_COLUMNS)} (tab-separated, one row per parcel), found {list(frame.columns)}"
        )
    if frame.empty:
        raise AtlasError(f"atlas {source}: no parcels (the table has a header but no rows)")
    index = _numeric(frame["index"], source, "index")
    if not np.all(index == np.round(index)):
        raise AtlasError(f"atlas {source}: column 'index' must hold integers")
    index = index.astype(np.int64)
    dupes = sorted({int(i) for i in index[pd.Series(index).duplicated().to_numpy()]})
    if dupes:
        raise AtlasError(f"atlas {source}: parcel indices must be unique; repeated: {dupes[:10]}")
    coords = np.stack([_numeric(frame[c], source, c) for c in "xyz"], axis=1)
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))
    if bad.size:
        raise AtlasError(
            f"atlas {source}: coordinates x, y, z must be finite numbers (MNI mm); "
            f"parcel indices {index[bad][:10].tolist()} are not"
        )
    extra = [c for c in frame.columns if c not in REQUIRED_COLUMNS]
    return Atlas(
        name=name,
        index=index,
        names=frame["name"].str.strip().tolist(),
        coords=coords.astype(np.float32),
        networks={c: frame[c].str.strip().tolist() for c in extra if c != GROUP_COLUMN},
        groups=frame[GROUP_COLUMN].str.strip().tolist() if GROUP_COLUMN in frame.columns else None,
    )


def _numeric(column: pd.Series, source: Path, name: str) -> np.ndarray:
    """A column as float64; unparsable cells become NaN (coordinates) or an error (indices)."""
    values = pd.to_numeric(column.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    if name == "index" and np.isnan(values).any():
        rows = (np.flatnonzero(np.isnan(values))[:10] + 1).tolist()
        raise AtlasError(f"atlas {source}: column 'index' must hold integers; data rows {rows} do not")
    return values


def _group_name(group: str) -> str:
    word = group.strip().split("_")[0]
    return word.capitalize() if word else UNLABELLED
