"""Source files → (time, parcels) float arrays, one column per atlas parcel in the atlas's order.

Three kinds of input:
- 4D NIfTI volumes: nilearn's NiftiLabelsMasker, mean per label, with the atlas label image resampled
  (nearest neighbour) to the image's grid;
- CIFTI dense time series (`*.dtseries.nii`): mean per label of a CIFTI dlabel over matching grayordinates;
- parcel tables already in time × parcels: `.npy`, `.csv`, `.tsv` (a header row is optional).

Every failure is a `SourceError` with a short, stable rule name, so ingest can report the file and the rule.
Label values in a label image / dlabel are the atlas TSV's `index` column.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

# Suffix → kind, longest suffix first (".dtseries.nii" before ".nii").
SUFFIXES: dict[str, str] = {
    ".dtseries.nii": "cifti",
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".npy": "table",
    ".csv": "table",
    ".tsv": "table",
}
# What a corrupt or truncated image raises when its header or (gzipped) data is read.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


class SourceError(Exception):
    """A source file that cannot become a parcel series; `rule` is a short stable identifier."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


def split_suffix(path: str | Path) -> tuple[str, str | None]:
    """(stem, kind) of a file name: "sub-01_bold.nii.gz" → ("sub-01_bold", "nifti"); kind None if unknown."""
    name = Path(path).name
    for suffix, kind in SUFFIXES.items():
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], kind
    return Path(name).stem, None


def read_source(path: str | Path, kind: str, index: np.ndarray, labels: str | Path | None) -> np.ndarray:
    """One source file as float (time, parcels); `labels` is the label image (nifti) or dlabel (cifti)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError("unreadable", "not a readable file (a broken link or a directory?)")
    try:
        with path.open("rb"):
            pass
    except OSError as e:  # permissions
        raise SourceError("unreadable", str(e)) from e
    if kind == "table":
        return read_table(path)
    if labels is None:
        raise ValueError(f"{kind} input needs an atlas label file; ingest checks this before reading")
    if kind == "nifti":
        return read_nifti(path, labels, index)
    if kind == "cifti":
        return read_cifti(path, labels, index)
    raise ValueError(f"unknown source kind {kind!r}; known: {sorted(set(SUFFIXES.values()))}")


# ------------------------------------------------------------------------------------ parcel tables


def read_table(path: Path) -> np.ndarray:
    """A time × parcels table from .npy / .csv / .tsv as float64."""
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = _read_delimited(path)
    except (OSError, ValueError, EOFError) as e:  # bad magic, truncated, unparsable cells, bad encoding
        raise SourceError("unreadable", f"cannot read {path.suffix} table: {e}") from e
    if not np.issubdtype(values.dtype, np.number):
        raise SourceError("unreadable", f"values of dtype {values.dtype} are not numbers")
    if values.ndim != 2:
        raise SourceError("not_2d", f"shape {values.shape}; a time × parcels table is needed")
    return values.astype(np.float64, copy=False)


def _read_delimited(path: Path) -> np.ndarray:
    """CSV/TSV with or without a header row: a header is a first line that is not all numbers."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n").split(sep)
    header = 0 if not all(_is_number(cell) for cell in first) else None
    frame = pd.read_csv(path, sep=sep, header=header, dtype=np.float64)
    return frame.to_numpy()


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ NIfTI


def read_nifti(path: Path, label_image: str | Path, index: np.ndarray) -> np.ndarray:
    """Mean signal per atlas label of a 4D image, the label image resampled to the image's grid."""
    from nilearn.image.resampling import BoundingBoxError
    from nilearn.maskers import NiftiLabelsMasker  # 2 s import: only workers that see NIfTI pay it

    try:
        img = nib.load(path)
    except _READ_ERRORS as e:
        raise SourceError("corrupt_nifti", f"cannot read the NIfTI header: {e}") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise SourceError("corrupt_nifti", f"{type(img).__name__} is not a NIfTI volume")
    if img.ndim != 4:
        raise SourceError("not_4d", f"image shape {img.shape}; a 4D (x, y, z, time) series is needed")
    try:
        data = img.get_fdata(dtype=np.float32)
    except _READ_ERRORS as e:  # truncated gzip stream, short file
        raise SourceError("corrupt_nifti", f"cannot read the image data: {e}") from e

    try:
        labels = labels_on_grid(str(label_image), img.shape[:3], img.affine.tobytes())
    except BoundingBoxError as e:  # the image's field of view and the atlas's do not meet at all
        raise SourceError("atlas_no_overlap", f"{e}: is the image in the atlas's (MNI) space?") from e
    _check_coverage(np.unique(labels), index, where="image grid")
    # nilearn replaces non-finite voxels by 0 (with a warning): refuse them inside the atlas instead.
    _check_finite(data, labels > 0, axis=-1, what="voxels inside the atlas")

    masker = NiftiLabelsMasker(
        labels_img=nib.Nifti1Image(labels, img.affine), strategy="mean", resampling_target="data",
        standardize=None,  # raw means: robust scaling happens later, per parcel, for every input kind
    )
    series = masker.fit_transform(nib.Nifti1Image(data, img.affine))
    region_ids = [int(v) for k, v in masker.region_ids_.items() if k != "background"]
    column = {label: i for i, label in enumerate(region_ids)}
    return series[:, [column[int(i)] for i in index]].astype(np.float64)


@functools.lru_cache(maxsize=8)
def labels_on_grid(label_image: str, shape: tuple[int, ...], affine: bytes) -> np.ndarray:
    """The label image resampled (nearest) to a data grid, as int32; cached per grid in each worker."""
    from nilearn.image import resample_img

    target = np.frombuffer(affine, dtype=np.float64).reshape(4, 4)
    resampled = resample_img(
        nib.load(label_image),
        target_affine=target,
        target_shape=shape,
        interpolation="nearest",
        force_resample=False,  # already on the data's grid (A424 on MNI 2 mm): nothing to resample
        copy_header=True,
    )
    return np.rint(np.asarray(resampled.dataobj)).astype(np.int32)


# ------------------------------------------------------------------------------------------ CIFTI


def read_cifti(path: Path, dlabel: str | Path, index: np.ndarray) -> np.ndarray:
    """Mean signal per atlas label of a CIFTI dense time series, labels from a CIFTI dlabel."""
    try:
        img = nib.load(path)
    except _READ_ERRORS as e:
        raise SourceError("corrupt_cifti", f"cannot read the CIFTI header: {e}") from e
    if not isinstance(img, nib.Cifti2Image):
        raise SourceError("corrupt_cifti", f"{type(img).__name__} is not a CIFTI-2 file")
    axes = [img.header.get_axis(i) for i in range(img.ndim)]
    if not (
        len(axes) == 2
        and isinstance(axes[0], nib.cifti2.SeriesAxis)
        and isinstance(axes[1], nib.cifti2.BrainModelAxis)
    ):
        kinds = [type(a).__name__ for a in axes]
        raise SourceError("not_dtseries", f"axes {kinds}; a dense time series (Series × BrainModel) is needed")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)  # (time, grayordinates)
    except _READ_ERRORS as e:
        raise SourceError("corrupt_cifti", f"cannot read the data: {e}") from e

    label_axis, label_values = _load_dlabel(str(dlabel))
    labels = grayordinate_labels(axes[1], label_axis, label_values)
    _check_coverage(np.unique(labels), index, where="grayordinates")
    _check_finite(data, labels > 0, axis=0, what="grayordinates inside the atlas")
    return _label_means(data, labels, index)


@functools.lru_cache(maxsize=4)
def _load_dlabel(dlabel: str) -> tuple[nib.cifti2.BrainModelAxis, np.ndarray]:
    img = nib.load(dlabel)
    return img.header.get_axis(1), np.rint(np.asarray(img.dataobj)[0]).astype(np.int64)


def grayordinate_labels(
    data_axis: nib.cifti2.BrainModelAxis, label_axis: nib.cifti2.BrainModelAxis, label_values: np.ndarray
) -> np.ndarray:
    """The dlabel's label for each grayordinate of `data_axis` (0 where the dlabel has none).

    Grayordinates are matched by (structure, vertex) on surfaces and (structure, voxel) in volumes, so a
    series on a subset or another ordering of the dlabel's grayordinates still parcellates correctly.
    """
    if data_axis == label_axis:  # the usual case: both on the same 91k grayordinates
        return label_values
    for name, n in data_axis.nvertices.items():
        if label_axis.nvertices.get(name, n) != n:
            raise SourceError(
                "atlas_no_overlap",
                f"{name} has {n} vertices, the dlabel's mesh has {label_axis.nvertices[name]}",
            )
    if data_axis.volume_mask.any() and label_axis.volume_mask.any() and not (
        data_axis.volume_shape == label_axis.volume_shape and np.allclose(data_axis.affine, label_axis.affine)
    ):
        raise SourceError("atlas_no_overlap", "the series' voxel grid differs from the dlabel's")
    names = {name: i for i, name in enumerate(sorted(set(data_axis.name) | set(label_axis.name)))}
    data_keys, label_keys = _grayordinate_keys(data_axis, names), _grayordinate_keys(label_axis, names)
    order = np.argsort(label_keys)
    pos = np.clip(np.searchsorted(label_keys[order], data_keys), 0, len(order) - 1)
    found = label_keys[order][pos] == data_keys
    return np.where(found, label_values[order][pos], 0)


def _grayordinate_keys(axis: nib.cifti2.BrainModelAxis, names: dict[str, int]) -> np.ndarray:
    """One int64 per grayordinate: structure id in the high bits, vertex or flat voxel index below."""
    local = axis.vertex.astype(np.int64)
    if axis.volume_mask.any():
        local[axis.volume_mask] = np.ravel_multi_index(axis.voxel[axis.volume_mask].T, axis.volume_shape)
    structure = np.array([names[n] for n in axis.name], dtype=np.int64)
    return (structure << 40) | local


def _label_means(data: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(time, P) mean over the grayordinates of each label, via one sparse averaging matrix."""
    from scipy import sparse

    column = {int(label): p for p, label in enumerate(index)}
    keep = np.flatnonzero(np.isin(labels, index))
    cols = np.array([column[int(label)] for label in labels[keep]], dtype=np.int64)
    counts = np.bincount(cols, minlength=len(index))
    average = sparse.csr_matrix(
        (1.0 / counts[cols], (keep, cols)), shape=(data.shape[1], len(index)), dtype=np.float64
    )
    return np.asarray(average.T.dot(data.T).T)


# ----------------------------------------------------------------------------------- shared checks


def _check_coverage(present: np.ndarray, index: np.ndarray, where: str) -> None:
    """Every atlas parcel must have at least one voxel / grayordinate in the data."""
    missing = np.setdiff1d(index, present)
    if missing.size == len(index):
        raise SourceError("atlas_no_overlap", f"no atlas label falls on the {where}: is it in the atlas's space?")
    if missing.size:
        shown = missing[:20].tolist()
        raise SourceError(
            "atlas_no_overlap",
            f"{missing.size} of {len(index)} atlas parcels have no voxel on the {where}: indices {shown}",
        )


def _check_finite(data: np.ndarray, inside: np.ndarray, axis: int, what: str) -> None:
    """No NaN/inf in the atlas's voxels / grayordinates (`inside` masks the non-time axes of `data`)."""
    if np.isfinite(data.sum(dtype=np.float64)):  # one pass, no copy: the usual, clean case
        return
    finite = np.isfinite(data).all(axis=axis)
    bad = int(np.count_nonzero(inside & ~finite))
    if bad:
        raise SourceError("non_finite", f"NaN/inf values in {bad} {what}")


def check_label_file(labels: str | Path, index: np.ndarray) -> None:
    """An atlas label image / dlabel must carry exactly the atlas TSV's indices (0 = background)."""
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"atlas label file {path} does not exist")
    try:
        if path.name.lower().endswith(".dlabel.nii"):
            values = _load_dlabel(str(path))[1]
        else:
            values = np.rint(np.asarray(nib.load(path).dataobj)).astype(np.int64)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read atlas label file {path}: {e}") from e
    values = np.unique(values)
    values = values[values != 0]
    extra, missing = np.setdiff1d(values, index), np.setdiff1d(index, values)
    if extra.size or missing.size:
        raise ValueError(
            f"atlas label file {path}: its label values must be the atlas TSV's `index`; "
            f"labels not in the TSV: {extra[:20].tolist()}, TSV indices without voxels: {missing[:20].tolist()}"
        )
