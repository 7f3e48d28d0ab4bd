"""A lab's folder → a validated, versioned cohort (the writer side of the store).

    discover(src)          which files are recordings; participant, condition and recording id of each
    participants.tsv       read and validated (Great Expectations) before any file is parcellated
    process_source (pool)  per file: read → parcels (nilearn / CIFTI / table) → checks → robust scaling →
                           recordings/<id>.npy inside a temporary cohort folder beside the old one
    cross-file checks      duplicate data (checksum), recordings without a participants.tsv row
    validate               the cohort-to-be against the GX suites
    swap                   old → .NAME.old-*, new → NAME: a kill at any moment leaves a complete version
    version                dvc add data, git commit data.dvc (only where brainlm may commit), dvc push

The store gets only what is a function of the input (`brainlm.data.store` writes it), so the same folder
ingested twice is the same data version. What describes the run goes beside the store, under
`<home>/.brainlm/validation/<NAME>/`: the GX results and data docs and `rejected.csv` (path, rule, detail).

Bad input never passes silently: each failing file becomes a `Rejection` (path, rule, detail). Without
`skip_invalid` any rejection raises `IngestError` and the store is not touched; with it the valid files are
stored, cohort.json lists the rejected files with their rules, and the report lists the details.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.config import IngestConfig, Settings, load_settings
from brainlm.data import store
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.data.parcellate import SUFFIXES, SourceError, check_label_file, read_source, split_suffix
from brainlm.data.scaling import robust_scale
from brainlm.errors import BrainLMError

# Input folder names (the data contract), which happen to match the store's own file names.
PARTICIPANTS = "participants.tsv"
ATLAS_TSV = "atlas.tsv"
RESERVED_NAMES = {PARTICIPANTS, ATLAS_TSV}
REPORTS = "validation"  # <home>/.brainlm/validation/<cohort>/: the last ingest's GX results, docs, rejections
REJECTED_CSV = "rejected.csv"
RESERVED_SUFFIXES = (".json", ".npz")
BIDS_FUNC_SUFFIXES = ("_bold.nii.gz", "_bold.nii", ".dtseries.nii")  # fMRIPrep: skip masks, boldrefs, confounds
SCORE_COLUMNS = ("neuroticism", "pcl", "gad7", "phq9")  # phenotype scores that must be >= 0 when present
EXECUTORS = ("process", "ray")
# Test hook: seconds to sleep after each stored recording, so a test can kill an ingest mid-write.
PAUSE_ENV = "BRAINLM_TEST_INGEST_PAUSE"
_ENTITY = r"(?:^|_){}-([a-zA-Z0-9]+)"


class IngestError(BrainLMError):
    """An ingest that stored nothing; `report` lists every rejected file with its rule."""

    def __init__(self, message: str, report: IngestReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Rejection:
    path: str
    rule: str  # short stable identifier, e.g. non_finite, parcel_count, duplicate
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Source:
    """One input file that should become one stored recording."""

    path: Path
    rel: str  # path relative to SRC: the manifest's `source`
    kind: str  # nifti | cifti | table
    recording: str
    participant: str
    condition: str


@dataclass(frozen=True)
class Job:
    """What a worker needs to turn one source into a stored recording (picklable; no atlas object)."""

    source: Source
    index: np.ndarray  # atlas label values, in parcel order
    labels: str | None  # label image (NIfTI) or dlabel (CIFTI) path
    min_timepoints: int
    out_dir: str | None  # write recordings/<id>.npy here; None: return the array (Ray on another node)


@dataclass
class Outcome:
    source: Source
    rejection: Rejection | None = None
    stats: dict | None = None
    array: np.ndarray | None = None  # only when the job had no out_dir


@dataclass
class IngestReport:
    cohort: str
    src: Path
    path: Path | None = None  # the stored cohort; None when nothing was stored
    manifest: pd.DataFrame = field(default_factory=pd.DataFrame)
    rejected: list[Rejection] = field(default_factory=list)
    validation: object | None = None  # brainlm.data.validation.ValidationSummary
    version: object | None = None  # brainlm.data.versioning.Version
    new_version: bool = False  # this ingest changed the data version (the same input again changes nothing)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reports: Path | None = None  # the run report folder (GX results and docs, rejected.csv)

    def as_dict(self) -> dict:
        """Counts, the store and the data version: what a flow run keeps (no file names, which may name people)."""
        return {"cohort": self.cohort, "path": None if self.path is None else str(self.path),
                "recordings": len(self.manifest), "rejected": len(self.rejected),
                "data_version": None if self.version is None else self.version.tag, "new_version": self.new_version}

    def summary(self) -> str:
        """What the console shows: counts, rejected files with their rules, validation, DVC version."""
        stored = len(self.manifest)
        lines = [f"ingest {self.src} → cohort {self.cohort!r}: {stored} recording(s) stored, "
                 f"{len(self.rejected)} rejected ({self.seconds:.1f} s)"]
        lines += [f"  rejected {r}" for r in sorted(self.rejected, key=lambda r: r.path)]
        lines += [f"  note: {n}" for n in self.notes]
        if self.validation is not None:
            lines += [f"  validation {line}" for line in self.validation.lines()]
        if self.path is not None:
            lines.append(f"  stored at {self.path}")
        if self.reports is not None:
            lines.append(f"  run report {self.reports}")
        if self.version is not None:
            lines.append(f"  data version {self.version.md5} (git {(self.version.rev or 'not committed')[:13]})"
                         f"{'' if self.new_version else ', unchanged: the store already held this data'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ ingest


def ingest(
    src: str | Path,
    cohort: str,
    *,
    atlas: str | Path | None = None,
    atlas_image: str | Path | None = None,
    cfg: IngestConfig | None = None,
    settings: Settings | None = None,
) -> IngestReport:
    """Ingest the recordings under `src` as cohort `cohort` (replacing its previous version).

    atlas: "A424" or an atlas TSV; default SRC/atlas.tsv if present, else A424.
    atlas_image: the label image (NIfTI input) or dlabel (CIFTI input); default: the atlas's own.
    Raises IngestError (nothing stored) on rejected files without `cfg.skip_invalid`, on an invalid
    participants.tsv, when no file is valid, or when the stored data fails validation.
    """
    started = time.perf_counter()
    # Great Expectations and DVC take seconds to import: load them only when an ingest runs, so pool
    # workers (which import this module) and the CLI start fast.
    from brainlm.data import versioning
    from brainlm.data.validation import CohortValidator

    cfg = cfg or IngestConfig()
    settings = settings or load_settings()
    src = Path(src).resolve()
    _check_arguments(src, cohort, cfg)
    report = IngestReport(cohort=cohort, src=src)
    atlas_obj, labels = _resolve_atlas(src, atlas, atlas_image)

    versioning.ensure_repo(settings.home)
    with versioning.store_lock(settings.home):
        previous = versioning.current_md5(settings.home)
        settings.cohorts_dir.mkdir(parents=True, exist_ok=True)
        report.notes += _recover_leftovers(settings.cohorts_dir)
        final = settings.cohorts_dir / cohort
        tmp = settings.cohorts_dir / f".{cohort}.tmp-{uuid.uuid4().hex[:8]}"
        report.reports = report_dir(settings, cohort)
        if report.reports.exists():  # it describes the last ingest of this cohort: this one replaces it
            shutil.rmtree(report.reports)
        try:
            validator = CohortValidator(report.reports)
            report.manifest = _build(tmp, report, atlas_obj, labels, [atlas, atlas_image], cfg, validator)
            old = _swap_in(tmp, final)
        finally:
            _write_rejected(report)  # failed or not: the list of what was rejected, with the details
            shutil.rmtree(tmp, ignore_errors=True)  # a failed ingest leaves no half-built cohort behind
        participants = report.manifest["participant"].nunique()
        message = f"ingest cohort {cohort}: {len(report.manifest)} recordings of {participants} participants"
        report.version, note = _commit(settings.home, final, old, message)
        report.new_version = report.version.md5 != previous
        report.notes += [note] if note else []
        report.path = final
    if cfg.push:
        versioning.push(settings.home)
    report.seconds = time.perf_counter() - started
    return report


def report_dir(settings: Settings, cohort: str) -> Path:
    """Where the last ingest of `cohort` left its run report: GX results + data docs, rejected.csv."""
    return settings.state_dir / REPORTS / cohort


def _build(tmp: Path, report: IngestReport, atlas: Atlas, labels: str | None, exclude: list, cfg: IngestConfig,
           validator) -> pd.DataFrame:
    """The complete new cohort in `tmp`, validated; returns its manifest. Raises IngestError otherwise."""
    sources, report.rejected, notes = discover(report.src, exclude=exclude)
    report.notes += notes
    _check_label_files(sources, atlas, labels)
    participants = _read_participants(report.src, validator, report)
    sources = _join_participants(sources, participants, report)
    outcomes = _process_all(sources, atlas, labels, cfg, tmp)
    manifest, stats = _collect(outcomes, tmp, report)
    if report.rejected and not cfg.skip_invalid:
        raise IngestError(_message(report, hint=True), report)
    if manifest.empty:
        raise IngestError(_message(report) if report.rejected else f"no recordings found in {report.src}", report)
    _write_cohort(tmp, report, manifest, atlas, participants)
    ids = None if participants is None else participants["participant_id"].tolist()
    validator.recordings(stats, n_parcels=atlas.n_parcels, min_timepoints=cfg.min_timepoints, participants=ids)
    report.validation = validator.summary
    validator.build_docs()
    if not report.validation.success:
        lines = [f"ingest of {report.src} as cohort {report.cohort!r} stored nothing: the stored data failed "
                 "validation (a bug: the input checks should have caught this)"]
        raise IngestError("\n".join(lines + [f"  {line}" for line in report.validation.lines()]), report)
    return manifest


def _commit(home: Path, final: Path, old: Path | None, message: str):
    """Record the swapped-in cohort as a DVC version; if that fails, the previous version goes back.

    Returns (version, note): the note, when set, says that data.dvc changed but was not committed.
    """
    from brainlm.data import versioning

    try:
        recorded = versioning.record_version(home, message)
    except BaseException:  # not versioned (DVC failed, or interrupted): put the previous version back
        _swap_back(final, old)
        raise
    if old is not None:
        shutil.rmtree(old)
    return recorded


def _check_arguments(src: Path, cohort: str, cfg: IngestConfig) -> None:
    if not src.is_dir():
        raise BrainLMError(f"ingest source {src} is not a folder")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cohort):
        raise BrainLMError(f"cohort name {cohort!r}: use letters, digits, '.', '_' or '-' (no leading dot)")
    if cfg.executor not in EXECUTORS:
        raise BrainLMError(f"executor {cfg.executor!r}: choose one of {EXECUTORS}")
    if cfg.min_timepoints < 2:
        raise BrainLMError(f"min_timepoints must be at least 2, got {cfg.min_timepoints}")


def _resolve_atlas(src: Path, atlas: str | Path | None, atlas_image: str | Path | None) -> tuple[Atlas, str | None]:
    """The atlas (explicit, else SRC/atlas.tsv, else A424) and its label file, checked against each other."""
    spec = atlas if atlas is not None else (src / ATLAS_TSV if (src / ATLAS_TSV).is_file() else "A424")
    labels = None if atlas_image is None else Path(atlas_image).resolve()
    try:
        atlas_obj = load_atlas(spec)
        if labels is not None:
            check_label_file(labels, atlas_obj.index)
    except (OSError, ValueError) as e:  # a user's atlas files: one clear message, no traceback
        raise BrainLMError(f"atlas: {e}") from e
    return atlas_obj, None if labels is None else str(labels)


def _check_label_files(sources: list[Source], atlas: Atlas, labels: str | None) -> None:
    """NIfTI needs a label image and CIFTI a dlabel: say so once, before any file is read."""
    for kind, what in (("nifti", "a NIfTI label image"), ("cifti", "a CIFTI .dlabel.nii")):
        if any(s.kind == kind for s in sources) and _labels_for(kind, atlas, labels) is None:
            raise BrainLMError(f"{kind} input needs {what} whose values are the atlas's `index`: atlas "
                               f"{atlas.name} has none, pass one with --atlas-image")


def _labels_for(kind: str, atlas: Atlas, labels: str | None) -> str | None:
    """The label file a source kind needs: the user's if it fits the kind, else the atlas's own."""
    is_dlabel = labels is not None and labels.lower().endswith(".dlabel.nii")
    if kind == "nifti":
        own = atlas.label_image
        return labels if labels is not None and not is_dlabel else (str(own) if own else None)
    if kind == "cifti":
        own = atlas.dlabel
        return labels if is_dlabel else (str(own) if own else None)
    return None


# --------------------------------------------------------------------------------------- discovery


def discover(src: Path, exclude: Sequence[str | Path | None] = ()) -> tuple[list[Source], list[Rejection], list[str]]:
    """Recording files under `src` (sorted), files that cannot be recordings, and notes on skipped files.

    A BIDS / fMRIPrep tree (top-level `sub-*` folders) contributes only `func/*_bold.nii[.gz]` and
    `*.dtseries.nii`, volumes only in MNI space when a `space-` entity is given. Any other folder
    contributes every file but the reserved ones; a file of unknown type there is rejected.
    """
    src = Path(src)
    skip = {Path(p).resolve() for p in exclude if p is not None}
    bids = any(p.is_dir() and p.name.startswith("sub-") for p in src.iterdir())
    sources, rejected, skipped = [], [], []
    ids: dict[str, int] = {}
    for path in _walk(src):
        rel = path.relative_to(src).as_posix()
        if path.resolve() in skip or _reserved(path.name):
            continue
        stem, kind = split_suffix(path.name)
        if bids and not _bids_recording(path, kind):
            skipped.append(rel)
            continue
        if kind is None:
            rejected.append(Rejection(rel, "unsupported_format", f"not one of {list(SUFFIXES)}"))
            continue
        sources.append(Source(path, rel, kind, _unique_id(stem, ids), _participant(stem), _condition(stem)))
    notes = [f"skipped {len(skipped)} non-recording file(s) of the BIDS tree (e.g. {skipped[0]})"] if skipped else []
    return sources, rejected, notes


def _walk(src: Path) -> list[Path]:
    """Files under src sorted by relative path, without dot files or dot folders."""
    found = []
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / name for name in files if not name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def _reserved(name: str) -> bool:
    return name in RESERVED_NAMES or name.lower().endswith(RESERVED_SUFFIXES)


def _bids_recording(path: Path, kind: str | None) -> bool:
    """A BOLD series in a func/ folder; volumes must be in an MNI space when the name says which space."""
    if path.parent.name != "func" or not path.name.endswith(BIDS_FUNC_SUFFIXES):
        return False
    space = re.search(_ENTITY.format("space"), path.name)
    return kind == "cifti" or space is None or space.group(1).startswith("MNI")


def _participant(stem: str) -> str:
    """The BIDS `sub-` entity, else the file name up to the first '_'."""
    match = re.search(_ENTITY.format("sub"), stem)
    return f"sub-{match.group(1)}" if match else stem.split("_")[0]


def _condition(stem: str) -> str:
    match = re.search(_ENTITY.format("task"), stem)
    return match.group(1) if match else "unknown"


def _unique_id(stem: str, seen: dict[str, int]) -> str:
    """The file stem; a stem seen before (same name in another folder or format) gets `__2`, `__3`, ..."""
    seen[stem] = seen.get(stem, 0) + 1
    return stem if seen[stem] == 1 else f"{stem}__{seen[stem]}"


# ------------------------------------------------------------------------------------ participants


def _read_participants(src: Path, validator, report: IngestReport) -> pd.DataFrame | None:
    """SRC/participants.tsv, validated; a broken one stops the ingest (phenotypes are never guessed)."""
    path = src / PARTICIPANTS
    if not path.is_file():
        report.notes.append(f"no {PARTICIPANTS} in {src}: the cohort has no phenotypes")
        return None
    try:
        frame = pd.read_csv(path, sep="\t", dtype={"participant_id": str}, na_values=["n/a"])
    except (OSError, ValueError) as e:
        report.rejected.append(Rejection(PARTICIPANTS, "participants_schema", f"cannot read: {e}"))
        raise IngestError(_message(report), report) from e
    result = validator.participants(frame, score_columns=SCORE_COLUMNS)
    if not result.success:
        for failure in result.failures:
            rows = frame.iloc[failure.rows]["participant_id"].tolist() if failure.rows else []
            where = f" (participant_id {rows[:10]})" if rows else ""
            detail = f"{failure.expectation}({failure.column or ''}): {failure.detail}{where}"
            report.rejected.append(Rejection(PARTICIPANTS, "participants_schema", detail))
        report.validation = validator.summary
        raise IngestError(_message(report), report)
    if "participant_id" != frame.columns[0]:
        frame = frame[["participant_id", *[c for c in frame.columns if c != "participant_id"]]]
    return frame


def _join_participants(sources: list[Source], participants: pd.DataFrame | None, report: IngestReport) -> list[Source]:
    """Give each recording its participants.tsv id ("01" and "sub-01" match); reject those without a row."""
    if participants is None:
        return sources
    ids = {_bare(pid): pid for pid in participants["participant_id"]}
    kept = []
    for s in sources:
        pid = ids.get(_bare(s.participant))
        if pid is None:
            report.rejected.append(Rejection(
                s.rel, "no_participant_row", f"participant {s.participant!r} has no row in {PARTICIPANTS}"
            ))
        else:
            kept.append(Source(s.path, s.rel, s.kind, s.recording, pid, s.condition))
    return kept


def _bare(participant: str) -> str:
    return participant.removeprefix("sub-")


# --------------------------------------------------------------------------------------- per file


def _process_all(sources: list[Source], atlas: Atlas, labels: str | None, cfg: IngestConfig,
                 tmp: Path) -> list[Outcome]:
    # Ray tasks may run on other machines: they send arrays back instead of writing into `tmp`.
    out_dir = None if cfg.executor == "ray" else str(tmp)
    (tmp / store.RECORDINGS).mkdir(parents=True, exist_ok=True)
    jobs = [Job(s, atlas.index, _labels_for(s.kind, atlas, labels), cfg.min_timepoints, out_dir) for s in sources]
    return parallel_map(process_source, jobs, workers=cfg.workers, executor=cfg.executor)


def process_source(job: Job) -> Outcome:
    """One file: read as (time, parcels), check, scale, store as parcels × time float32."""
    source = job.source
    try:
        series = read_source(source.path, source.kind, job.index, job.labels)
        check_series(series, len(job.index), job.min_timepoints)
        stored = scale(series)
    except SourceError as e:
        return Outcome(source, rejection=Rejection(source.rel, e.rule, e.detail))
    except Exception as e:  # not a known input problem: a bug or an unforeseen format; name the file
        raise RuntimeError(f"{source.path}: unexpected {type(e).__name__} while ingesting: {e}") from e
    if job.out_dir is None:
        return Outcome(source, stats=recording_stats(stored), array=stored)
    return Outcome(source, stats=write_recording(stored, Path(job.out_dir), source.recording))


def check_series(series: np.ndarray, n_parcels: int, min_timepoints: int) -> None:
    """The input rules, in order: parcel count, length, finiteness (flat parcels: see `scale`)."""
    timepoints, parcels = series.shape
    if parcels != n_parcels:
        hint = " (is the file parcels × time? files must be time × parcels)" if timepoints == n_parcels else ""
        raise SourceError("parcel_count", f"{parcels} parcels (columns), the atlas has {n_parcels}{hint}")
    if timepoints < min_timepoints:
        raise SourceError("too_few_timepoints", f"{timepoints} timepoints, at least {min_timepoints} needed")
    finite = np.isfinite(series)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=0))
        raise SourceError(
            "non_finite",
            f"{finite.size - np.count_nonzero(finite)} NaN/inf values in parcel positions {bad[:20].tolist()}",
        )


def scale(series: np.ndarray) -> np.ndarray:
    """Robust scaling per parcel; the stored layout is C-contiguous parcels × time float32."""
    try:
        scaled = robust_scale(series, axis=0)
    except ValueError as e:  # zero IQR: a flat (or mostly constant) parcel cannot be scaled
        raise SourceError("flat_parcel", f"{e} (0-based positions in the atlas's parcel order)") from e
    return np.ascontiguousarray(scaled.T, dtype=np.float32)


def write_recording(stored: np.ndarray, cohort_dir: Path, recording: str) -> dict:
    """Store one recording and return the statistics of what is on disk (re-read memory-mapped)."""
    path = store.write_recording(cohort_dir, recording, stored)
    pause = float(os.environ.get(PAUSE_ENV, "0"))
    if pause:
        time.sleep(pause)
    return recording_stats(np.load(path, mmap_mode="r"))


def recording_stats(stored: np.ndarray) -> dict:
    """The per-recording row the GX suite checks, plus the manifest's checksum."""
    values = np.asarray(stored)
    q25, median, q75 = np.percentile(values, [25.0, 50.0, 75.0], axis=1)
    iqr = q75 - q25
    return {
        "parcels": int(values.shape[0]),
        "timepoints": int(values.shape[1]),
        "n_nonfinite": int(values.size - np.count_nonzero(np.isfinite(values))),
        "dtype": str(values.dtype),
        "median_abs_max": float(np.max(np.abs(median))),
        "iqr_min": float(iqr.min()),
        "iqr_max": float(iqr.max()),
        "checksum": store.checksum(values),
    }


def parallel_map(fn: Callable, items: Sequence, workers: int = 0, executor: str = "process") -> list:
    """`[fn(x) for x in items]`, in order: in-process (1 worker), a local process pool, or Ray tasks."""
    if not items:
        return []
    if executor == "ray":
        return _ray_map(fn, items, workers)
    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    # forkserver: never fork a parent that may hold threads (Prefect, GX); workers import only what they use.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * workers))))


def _ray_map(fn: Callable, items: Sequence, workers: int) -> list:
    """The same map as Ray tasks: joins $RAY_ADDRESS's cluster if set, else starts (and stops) a local one."""
    import ray

    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # the cluster decides resources
    elif started:
        # A local Ray reserves ~30 % of RAM in /dev/shm by default; results here are a few MB each.
        ray.init(num_cpus=workers or None, object_store_memory=2**30, include_dashboard=False,
                 log_to_driver=False)
    try:
        task = ray.remote(fn)
        return ray.get([task.remote(x) for x in items])
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------- cross-file checks


def _collect(outcomes: list[Outcome], tmp: Path, report: IngestReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest and stats of the valid recordings; rejections for failures and for duplicate data."""
    rows, first_with = [], {}
    for o in outcomes:
        if o.rejection is not None:
            report.rejected.append(o.rejection)
            continue
        checksum = o.stats["checksum"]
        if checksum in first_with:  # same stored bytes as an earlier file: a copy, not a new recording
            report.rejected.append(Rejection(o.source.rel, "duplicate", f"same data as {first_with[checksum]}"))
            store.recording_path(tmp, o.source.recording).unlink(missing_ok=True)
            continue
        first_with[checksum] = o.source.rel
        if o.array is not None:
            write_recording(o.array, tmp, o.source.recording)
        rows.append({"recording": o.source.recording, "participant": o.source.participant,
                     "condition": o.source.condition, **o.stats, "source": o.source.rel})
    columns = list(store.MANIFEST_COLUMNS)
    table = pd.DataFrame(rows, columns=[*columns, "n_nonfinite", "dtype", "median_abs_max", "iqr_min", "iqr_max"])
    from brainlm.data.validation import RECORDING_STATS

    return table[columns], table[list(RECORDING_STATS)]


def _message(report: IngestReport, hint: bool = False) -> str:
    lines = [f"ingest of {report.src} as cohort {report.cohort!r} stored nothing; "
             f"{len(report.rejected)} file(s) failed:"]
    lines += [f"  {r}" for r in sorted(report.rejected, key=lambda r: r.path)]
    if hint:
        lines.append("fix or remove these files, or pass --skip-invalid to ingest the valid files only")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ writing


def _write_cohort(tmp: Path, report: IngestReport, manifest: pd.DataFrame, atlas: Atlas,
                  participants: pd.DataFrame | None) -> None:
    """Everything but the recordings (already written by the workers) into the temporary cohort folder.

    cohort.json names the rejected files and their rules (relative paths: part of the data version); the
    details, which may quote absolute paths, go to the run report's rejected.csv.
    """
    rejected = [{"path": r.path, "rule": r.rule} for r in sorted(report.rejected, key=lambda r: r.path)]
    store.write_cohort(tmp, manifest, atlas, participants, name=report.cohort, n_rejected=len(rejected),
                       rejected=rejected)


def _write_rejected(report: IngestReport) -> None:
    report.reports.mkdir(parents=True, exist_ok=True)
    rows = [vars(r) for r in sorted(report.rejected, key=lambda r: r.path)]
    pd.DataFrame(rows, columns=["path", "rule", "detail"]).to_csv(report.reports / REJECTED_CSV, index=False)


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Replace `final` by the complete folder `tmp` with two renames; returns the old version's new path.

    Between the renames `final` is briefly absent; `_recover_leftovers` (run by the next ingest) renames a
    lone `.NAME.old-*` back, so a kill at any point leaves either the old or the new complete version.
    The caller removes the old version once the new one is committed (DVC ignores `.NAME.old-*`).
    """
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    return old if old.exists() else None


def _swap_back(final: Path, old: Path | None) -> None:
    """Undo `_swap_in`: the new version goes, the old one (if any) is NAME again."""
    discard = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    os.rename(final, discard)
    if old is not None:
        os.rename(old, final)
    shutil.rmtree(discard)


def _recover_leftovers(cohorts_dir: Path) -> list[str]:
    """Undo what an interrupted ingest left: restore a cohort caught between its renames, drop temp folders."""
    notes = []
    for path in sorted(cohorts_dir.glob(".*.old-*")):
        name = path.name[1:].rsplit(".old-", 1)[0]
        if not (cohorts_dir / name).exists():
            os.rename(path, cohorts_dir / name)
            notes.append(f"restored cohort {name} from an interrupted ingest")
    for path in sorted([*cohorts_dir.glob(".*.tmp-*"), *cohorts_dir.glob(".*.old-*")]):
        shutil.rmtree(path)
        notes.append(f"removed {path.name}, left by an interrupted ingest")
    return notes
