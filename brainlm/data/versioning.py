"""Cohort versions with DVC: the one module that talks to DVC.

The brainlm home is a git + DVC project; `data/` (every cohort) is one DVC output, `data.dvc`, at its root.
A *version* is a state of `data/`, named by its DVC md5; ingest runs `dvc add data` and `dvc push`es to the
remote. Where brainlm may commit (see `may_commit`), it also commits `data.dvc` with a message naming the
cohort, and that commit is the version's git revision. `checkout(rev)` restores `data/` as it was at a commit,
from the local cache or else from the remote.

brainlm commits only into a git repository it created itself (marked `brainlm.commitVersions = true` in the
repository's own config when it runs `git init`; a user may set the same key) or into the repository that
`$BRAINLM_HOME` names explicitly. In any other repository (a code checkout, say) it versions, validates and
pushes the data but leaves git alone, and says in one line how to record the version.

One copy on disk: DVC's cache links files into the store (`cache.type = hardlink,copy`). After `dvc add`, each
stored file is a read-only hard link of its cache object, so store and cache share their bytes; only ingest
writes the store, and always into new files (a temporary folder swapped in), never into a linked one, and a
checkout replaces links rather than writing through them, so the cache cannot be corrupted by either. Copies
happen only where a hard link cannot be made (a cache on another filesystem); `footprint` shows which.

Configuration: the project-wide DVC settings live in the tracked `.dvc/config` and are written only when they
differ, so an ingest never rewrites tracked files with new bytes. The remote is machine-specific and goes to
the untracked `.dvc/config.local`: `$BRAINLM_DVC_REMOTE` (a directory, or `s3://bucket/prefix` with
`$BRAINLM_DVC_S3_ENDPOINT` for a custom endpoint), by default `<home>/.brainlm/dvc-remote`. S3 credentials come
only from the AWS credential chain (environment, ~/.aws, instance roles): nothing secret is ever written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.config_schema import RelPath
from dvc.exceptions import CheckoutError, DvcException
from dvc.repo import Repo

from brainlm.errors import BrainLMError

DATA_DVC = "data.dvc"
REMOTE_NAME = "brainlm"
REMOTE_ENV = "BRAINLM_DVC_REMOTE"
S3_ENDPOINT_ENV = "BRAINLM_DVC_S3_ENDPOINT"
HOME_ENV = "BRAINLM_HOME"
DEFAULT_REMOTE = ".brainlm/dvc-remote"  # relative to the home
COMMIT_KEY = "brainlm.commitVersions"  # in a repository's own .git/config: brainlm commits data versions there
# Half-built (`.NAME.tmp-*`) and replaced (`.NAME.old-*`) cohort folders never belong to a version.
DVCIGNORE = "/data/cohorts/.*\n"
# The tracked project settings (.dvc/config), the same on every machine. Hard links first: `dvc add` then
# links each new file into the cache instead of copying it (DVC links on add only when hardlink comes first).
CACHE_TYPES = "hardlink,copy"
PROJECT_CONFIG = {"core": {"analytics": "False"}, "cache": {"type": CACHE_TYPES}}
_GIT_IDENTITY = ("-c", "user.name=brainlm", "-c", "user.email=brainlm@localhost")
_SEP = "\x1f"


class VersioningError(BrainLMError):
    """A git or DVC step failed; the message says which and what to run to finish by hand."""


@dataclass(frozen=True)
class Version:
    """One state of `data/`: `md5` of the tracked directory, and the git commit that recorded it.

    `rev` is None when the current data.dvc was never committed; `dirty` when `data/` no longer matches
    data.dvc (edited by hand since the last ingest or checkout).
    """

    md5: str
    rev: str | None = None
    date: str | None = None
    message: str | None = None
    dirty: bool = False

    @property
    def tag(self) -> str:
        """The lineage tag value for a registered model: `<md5>@<rev>` (+ `-dirty`)."""
        return f"{self.md5}@{(self.rev or 'uncommitted')[:12]}{'-dirty' if self.dirty else ''}"


# ------------------------------------------------------------------------------------------ the repo


def ensure_repo(home: str | Path) -> Path:
    """Make `home` a git + DVC project with the configured remote (idempotent; tracked files change only
    when something is missing from them)."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / ".git").exists():
        _git(home, "init", "-q")
        _git(home, "config", COMMIT_KEY, "true")  # ours: data versions are committed here
    # Local state (MLflow DB, Ray results, run reports, the default DVC remote) is never part of the project.
    _append_line(home / ".gitignore", "/.brainlm/")
    if not (home / ".dvc").exists():
        with _quiet_dvc():
            Repo.init(str(home)).close()
    _append_line(home / ".dvcignore", DVCIGNORE.strip())
    with _repo(home) as repo:
        _set_config(repo, "repo", PROJECT_CONFIG)
        _set_config(repo, "local", {"core": {"remote": REMOTE_NAME},
                                    "remote": {REMOTE_NAME: remote_config(home)}})
    return home


def remote_config(home: Path) -> dict[str, str]:
    """The DVC remote section from the environment; never any credentials."""
    url = os.environ.get(REMOTE_ENV) or DEFAULT_REMOTE
    if url.startswith("s3://"):
        conf = {"url": url}
        if os.environ.get(S3_ENDPOINT_ENV):
            conf["endpointurl"] = os.environ[S3_ENDPOINT_ENV]
        return conf
    if "://" in url:
        raise ValueError(f"{REMOTE_ENV}={url!r}: use a directory or an s3:// URL")
    path = Path(url) if Path(url).is_absolute() else home / url
    path.mkdir(parents=True, exist_ok=True)
    # Saved relative to .dvc/ (DVC's RelPath), so a home can be moved or cloned with its remote beside it.
    return {"url": RelPath(str(path.resolve()))}


def may_commit(home: str | Path) -> bool:
    """Whether ingest commits data.dvc in `home`: a repository brainlm created (or the user marked with
    `git config brainlm.commitVersions true`), or the one `$BRAINLM_HOME` names explicitly."""
    home = Path(home).resolve()
    marked = _git(home, "config", "--bool", COMMIT_KEY, check=False).stdout.strip() == "true"
    chosen = bool(os.environ.get(HOME_ENV)) and Path(os.environ[HOME_ENV]).resolve() == home
    return marked or chosen


@contextlib.contextmanager
def store_lock(home: str | Path) -> Iterator[None]:
    """One writer at a time (ingest, checkout) per home: an exclusive flock on .brainlm/store.lock."""
    path = Path(home) / ".brainlm" / "store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ write a version


def record_version(home: str | Path, message: str) -> tuple[Version, str | None]:
    """`dvc add data`, and commit data.dvc where `may_commit` allows; on failure data.dvc is put back.

    Returns the version and, where brainlm may not commit and data.dvc changed, a one-line note saying how
    to record it. The same data gives the same data.dvc, so ingesting it again makes no new commit.
    """
    home = Path(home).resolve()
    pointer = home / DATA_DVC
    before = pointer.read_text() if pointer.exists() else None
    note = None
    try:
        with _repo(home) as repo:
            repo.add(str(home / "data"))
        if may_commit(home):
            paths = [DATA_DVC, ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"]
            _git(home, "add", "--", *paths)
            # Commit only our paths: anything else the user has staged in this repo stays staged.
            if _git(home, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode:
                _git(home, *_identity(home), "commit", "-q", "-m", message, "--", *paths)
        elif pointer.read_text() != before:
            note = (f"{DATA_DVC} changed but was not committed ({home} is a git repository brainlm did not "
                    f"create): commit it with `git -C {home} commit -m '{message}' {DATA_DVC}`, or set "
                    f"{HOME_ENV} to a data repository of your own")
    except (DvcException, VersioningError, OSError) as e:
        if before is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_text(before)
        raise VersioningError(f"could not record a new data version in {home}: {e}") from e
    return current_version(home, check_dirty=False), note


def push(home: str | Path) -> None:
    """`dvc push` of data.dvc to the default remote."""
    home = Path(home).resolve()
    try:
        with _repo(home) as repo:
            repo.push(targets=[str(home / DATA_DVC)])
    except DvcException as e:
        raise VersioningError(
            f"the data version is committed locally but `dvc push` to {_remote_url(home)} failed: {e}; "
            f"run `dvc push` in {home} once the remote is reachable"
        ) from e


def pull(home: str | Path) -> None:
    """`dvc pull` of data.dvc from the default remote (restores data/ when the local cache lacks it)."""
    home = Path(home).resolve()
    try:
        with _repo(home) as repo:
            repo.pull(targets=[str(home / DATA_DVC)], force=True)
    except DvcException as e:
        raise VersioningError(f"`dvc pull` from {_remote_url(home)} failed: {e}") from e


# ------------------------------------------------------------------------------------ read versions


def versions(home: str | Path | None = None) -> list[Version]:
    """Every commit that changed data.dvc, newest first."""
    home = _home(home)
    if not (home / ".git").exists():
        return []
    log = _git(home, "log", f"--format=%H{_SEP}%cI{_SEP}%s", "--", DATA_DVC).stdout
    out = []
    for line in log.splitlines():
        rev, date, message = line.split(_SEP, 2)
        md5 = _md5(_git(home, "show", f"{rev}:{DATA_DVC}", check=False).stdout)
        if md5 is not None:  # a commit that deleted data.dvc is not a version
            out.append(Version(md5=md5, rev=rev, date=date, message=message))
    return out


def current_md5(home: str | Path | None = None) -> str | None:
    """The md5 that data.dvc records in the working tree (None before the first ingest)."""
    pointer = _home(home) / DATA_DVC
    if not pointer.exists():
        return None
    md5 = _md5(pointer.read_text())
    if md5 is None:
        raise VersioningError(f"{pointer} has no output md5: is it a DVC pointer file?")
    return md5


def current_version(home: str | Path | None = None, check_dirty: bool = True) -> Version | None:
    """The data version in the working tree (None before the first ingest): for MLflow lineage tags."""
    home = _home(home)
    md5 = current_md5(home)
    if md5 is None:
        return None
    match = next((v for v in versions(home) if v.md5 == md5), Version(md5=md5))
    if check_dirty:
        with _repo(home) as repo:
            dirty = bool(repo.status(targets=[str(home / DATA_DVC)]))
        match = Version(md5=md5, rev=match.rev, date=match.date, message=match.message, dirty=dirty)
    return match


def checkout(rev: str, home: str | Path | None = None) -> Version:
    """Restore data/ (and data.dvc) as they were at commit `rev` (a hash prefix, tag or branch)."""
    home = _home(home)
    resolved = _git(home, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False).stdout.strip()
    known = {v.rev: v for v in versions(home)}
    if resolved not in known:
        listed = ", ".join(r[:12] for r in known) or "none yet"
        raise VersioningError(f"{rev!r} is not a data version in {home} (versions: {listed})")
    with store_lock(home):
        _git(home, "checkout", resolved, "--", DATA_DVC)
        try:
            with _repo(home) as repo:
                repo.checkout(targets=[str(home / DATA_DVC)], force=True)
        except CheckoutError:  # the local cache lacks some files of that version: fetch them
            pull(home)
    return known[resolved]


# -------------------------------------------------------------------------------------- footprint


@dataclass(frozen=True)
class Place:
    """One place where cohort bytes live: the store (`data/`), DVC's cache, or the remote.

    `size` is the apparent size of its files; `disk` the bytes the filesystem allocated for them (st_blocks),
    counting a file hard-linked from a place listed before it (`linked` files) only there. None for a remote
    that is not a local folder (S3: its objects' sizes are what it bills).
    """

    name: str
    location: str
    files: int
    size: int
    disk: int | None
    linked: int = 0


def footprint(home: str | Path | None = None) -> list[Place]:
    """Where the bytes of `home`'s cohorts live and how much each place takes: store, cache, remote."""
    home = _home(home)
    with _repo(home) as repo:
        cache = Path(repo.cache.local_cache_dir)
        remote = repo.cloud.get_remote(repo.config["core"]["remote"]) if repo.config["core"].get("remote") else None
        seen: set[tuple[int, int]] = set()
        places = [_local_place("store", home / "data", seen), _local_place("cache", cache, seen)]
        if remote is not None and remote.fs.protocol == "local":
            places.append(_local_place("remote", Path(remote.path), seen))
        elif remote is not None:
            # fsspec's find (one listing, sizes included) under DVC's filesystem wrapper
            objects = remote.fs.fs.find(remote.path, detail=True) if remote.fs.exists(remote.path) else {}
            places.append(Place("remote", f"{remote.fs.protocol}://{remote.path}", len(objects),
                                sum(int(info.get("size") or 0) for info in objects.values()), None))
    return places


def _local_place(name: str, root: Path, seen: set[tuple[int, int]]) -> Place:
    files = size = disk = linked = 0
    for path in _files(root):
        st = path.lstat()
        files += 1
        size += st.st_size
        if (st.st_dev, st.st_ino) in seen:
            linked += 1
        else:
            seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
    return Place(name, str(root), files, size, disk, linked)


def _files(root: Path) -> Iterable[Path]:
    for folder, _, names in os.walk(root):
        yield from (Path(folder) / n for n in names)


# ---------------------------------------------------------------------------------------- helpers


def _home(home: str | Path | None) -> Path:
    if home is None:
        from brainlm.config import load_settings

        return load_settings().home
    return Path(home).resolve()


@contextlib.contextmanager
def _repo(home: Path) -> Iterator[Repo]:
    with _quiet_dvc():
        repo = Repo(str(home))
        try:
            yield repo
        finally:
            repo.close()


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC logs CLI hints ("To track the changes with git, run: ...") that are wrong here: we do the git part."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _md5(pointer_text: str) -> str | None:
    """The output md5 recorded in a .dvc pointer file's text."""
    outs = (yaml.safe_load(pointer_text) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _remote_url(home: Path) -> str:
    with _repo(home) as repo:
        return repo.config["remote"][repo.config["core"]["remote"]]["url"]


def _identity(home: Path) -> tuple[str, ...]:
    """A fallback committer only where git has none configured (fresh CI machines, containers)."""
    configured = _git(home, "config", "user.email", check=False).stdout.strip()
    return () if configured else _GIT_IDENTITY


def _set_config(repo: Repo, level: str, wanted: dict) -> None:
    """Write `wanted` ({section: {key: value}}, remotes as {"remote": {name: {...}}}) into one config level,
    only if that level says otherwise: an unchanged file keeps its bytes."""
    current = repo.config.load_one(level)

    def differs(have: dict, want: dict) -> bool:
        return any(differs(have.get(k) or {}, v) if isinstance(v, dict) else str(have.get(k)) != str(v)
                   for k, v in want.items())

    if differs(current, wanted):
        with repo.config.edit(level) as conf:
            for section, values in wanted.items():
                for key, value in values.items():
                    conf[section][key] = value


def _append_line(path: Path, line: str) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    if line not in lines:
        path.write_text("\n".join([*lines, line]) + "\n")


def _git(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", "-C", str(home), *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise VersioningError(f"`git {' '.join(args)}` failed in {home}: {proc.stderr.strip()}")
    return proc
