"""Cohort versions with real DVC: push/pull against a local remote and an S3 endpoint (moto, real wire
protocol on 127.0.0.1), versions, checkout, lineage version, and no credentials in the repository."""

import hashlib
import shutil
import socket
import subprocess

import boto3
import numpy as np
import pytest
from fixtures_ingest import FAST, expected_stored, stored_checksums, table_folder

from brainlm.cli import main
from brainlm.data import versioning
from brainlm.data.ingest import ingest
from brainlm.data.store import open_cohort
from brainlm.data.versioning import VersioningError

SECRET = "sEcReT-not-in-any-file"


def assert_cohort(name, known):
    cohort = open_cohort(name)
    assert sorted(cohort.recording_ids) == sorted(known)
    for rec, series in known.items():
        np.testing.assert_allclose(np.asarray(cohort.recording(rec)), expected_stored(series), atol=2e-5)


def wipe_local_copies(home):
    """Lose the workspace data and the DVC cache: only the remote still has the bytes."""
    shutil.rmtree(home / "data")
    shutil.rmtree(home / ".dvc" / "cache")


def test_push_and_pull_through_the_local_remote(home, tmp_path):
    known = table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)
    remote = home / ".brainlm" / "dvc-remote"
    assert any(remote.rglob("*")), "ingest pushes to the default local remote"
    before = stored_checksums(home / "data" / "cohorts" / "lab")

    wipe_local_copies(home)
    versioning.pull(home)

    assert stored_checksums(home / "data" / "cohorts" / "lab") == before
    assert_cohort("lab", known)


@pytest.mark.slow
def test_versions_checkout_and_current_version(home, tmp_path):
    v1 = table_folder(tmp_path / "v1", seed=0)
    v2 = table_folder(tmp_path / "v2", participants=2, seed=1)
    first = ingest(tmp_path / "v1", "lab", cfg=FAST).version
    second = ingest(tmp_path / "v2", "lab", cfg=FAST).version

    listed = versioning.versions(home)
    assert [v.rev for v in listed] == [second.rev, first.rev]
    assert all("cohort lab" in v.message and v.date for v in listed)

    restored = versioning.checkout(first.rev[:8], home)
    assert restored.md5 == first.md5
    assert_cohort("lab", v1)
    assert versioning.current_version(home).rev == first.rev  # lineage names the commit that made this data

    shutil.rmtree(home / ".dvc" / "cache")  # the next checkout must fetch from the remote
    versioning.checkout(second.rev, home)
    assert_cohort("lab", v2)
    current = versioning.current_version(home)
    assert (current.md5, current.rev, current.dirty) == (second.md5, second.rev, False)
    assert current.tag == f"{second.md5}@{second.rev[:12]}"

    with pytest.raises(VersioningError, match="not a data version"):
        versioning.checkout("0123abc", home)


def test_hand_edited_data_is_dirty(home, tmp_path):
    table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)
    manifest = home / "data" / "cohorts" / "lab" / "manifest.csv"
    manifest.unlink()  # stored files are read-only links into the cache: an edit replaces the file
    manifest.write_text("edited\n")
    version = versioning.current_version(home)
    assert version.dirty and version.tag.endswith("-dirty")


def test_ingest_commits_only_its_own_files(home, tmp_path):
    """A user's staged work in the same repository is neither committed nor unstaged."""
    subprocess.run(["git", "init", "-q", str(home)], check=True)
    (home / "notes.txt").write_text("mine")
    subprocess.run(["git", "-C", str(home), "add", "notes.txt"], check=True)
    table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)
    committed = subprocess.run(["git", "-C", str(home), "show", "--name-only", "--format=", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert "data.dvc" in committed and "notes.txt" not in committed
    staged = subprocess.run(["git", "-C", str(home), "diff", "--cached", "--name-only"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert staged == ["notes.txt"]


def disk_blocks(*roots):
    """512-byte blocks allocated for the files under `roots`, each inode counted once (hard links share)."""
    inodes = {}
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            st = path.stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_blocks
    return sum(inodes.values())


def file_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_store_and_cache_hold_one_copy_across_versions_and_checkouts(home, tmp_path, capsys):
    """The store's files are read-only hard links of DVC's cache objects: one copy on disk, not two."""
    table_folder(tmp_path / "v1", seed=0)
    table_folder(tmp_path / "v2", participants=2, seed=1)
    first = ingest(tmp_path / "v1", "lab", cfg=FAST).version
    store, cache = home / "data", home / ".dvc" / "cache"
    v1_bytes = file_bytes(store)
    store_blocks, both_blocks = disk_blocks(store), disk_blocks(store, cache)
    assert store_blocks > 0 and both_blocks < 1.2 * store_blocks, (store_blocks, both_blocks)
    recordings = list((store / "cohorts" / "lab" / "recordings").iterdir())
    assert recordings and all(p.stat().st_nlink == 2 and not p.stat().st_mode & 0o222 for p in recordings)
    [store_place, cache_place, remote_place] = versioning.footprint(home)
    assert cache_place.linked == store_place.files and cache_place.disk < 0.2 * store_place.disk
    assert remote_place.size >= store_place.size  # the default local remote is a real copy (a backup)

    second = ingest(tmp_path / "v2", "lab", cfg=FAST).version
    v2_bytes = file_bytes(store)
    versioning.checkout(first.rev, home)
    assert file_bytes(store) == v1_bytes
    versioning.checkout(second.rev, home)
    assert file_bytes(store) == v2_bytes
    assert disk_blocks(store, cache) < 1.2 * (disk_blocks(store) + store_blocks)  # two versions, one copy each
    assert main(["data", "du"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["store", "cache", "remote"]
    assert "hard links of the ones above" in out

    objects = [p for p in (cache / "files" / "md5").rglob("*") if p.is_file() and p.suffix != ".dir"]
    assert objects and all(hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name for p in objects), (
        "a cache object no longer holds the bytes its name hashes: something wrote through a link")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_same_input_twice_is_one_version_and_one_commit(home, tmp_path):
    table_folder(tmp_path / "src")
    first = ingest(tmp_path / "src", "lab", cfg=FAST)
    second = ingest(tmp_path / "src", "lab", cfg=FAST)
    assert (second.version.md5, second.version.rev) == (first.version.md5, first.version.rev)
    assert len(versioning.versions(home)) == 1
    assert git(home, "rev-list", "--count", "HEAD").strip() == "1"
    assert git(home, "status", "--porcelain", "--untracked-files=all") == ""


def test_ingest_never_commits_into_a_repository_it_did_not_create(tmp_path, monkeypatch):
    """A code checkout the user stands in: data is stored, versioned and pushed, git history is untouched;
    naming the repository in BRAINLM_HOME makes it the user's data repository, where versions are commits."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "README.md").write_text("code\n")
    git(checkout, "init", "-q")
    git(checkout, "add", "README.md")
    git(checkout, "-c", "user.name=dev", "-c", "user.email=dev@localhost", "commit", "-q", "-m", "code")
    monkeypatch.delenv("BRAINLM_HOME", raising=False)
    monkeypatch.chdir(checkout)
    table_folder(tmp_path / "v1", seed=0)

    report = ingest(tmp_path / "v1", "lab", cfg=FAST)

    assert git(checkout, "log", "--format=%s") == "code\n"
    assert report.version.rev is None and (checkout / "data.dvc").is_file()
    [note] = [n for n in report.notes if "data.dvc" in n]
    assert "not committed" in note and "BRAINLM_HOME" in note and "git -C" in note
    assert any((checkout / ".brainlm" / "dvc-remote").rglob("*.dir")), "still pushed"

    monkeypatch.setenv("BRAINLM_HOME", str(checkout))
    known = table_folder(tmp_path / "v2", participants=2, seed=1)
    report = ingest(tmp_path / "v2", "lab", cfg=FAST)
    assert git(checkout, "log", "--format=%s").splitlines() == [report.version.message, "code"]
    assert report.version.message == "ingest cohort lab: 4 recordings of 2 participants"
    assert_cohort("lab", known)


def test_remote_settings_stay_out_of_tracked_files(home, tmp_path, monkeypatch):
    """The remote is machine-specific (.dvc/config.local); ingest never rewrites a tracked file."""
    table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)
    tracked = {name: (home / name).read_bytes() for name in git(home, "ls-files").split()}
    assert "remote" not in tracked[".dvc/config"].decode()

    elsewhere = tmp_path / "shared-remote"
    monkeypatch.setenv(versioning.REMOTE_ENV, str(elsewhere))
    table_folder(tmp_path / "src2", participants=2, seed=3)
    ingest(tmp_path / "src2", "lab", cfg=FAST)

    changed = [name for name, data in tracked.items() if (home / name).read_bytes() != data]
    assert changed == ["data.dvc"]  # the new version, and nothing else
    assert any(elsewhere.rglob("*.dir")) and "shared-remote" in (home / ".dvc" / "config.local").read_text()


def test_remote_url_must_be_a_directory_or_s3(home, monkeypatch):
    monkeypatch.setenv(versioning.REMOTE_ENV, "https://example.org/store")
    with pytest.raises(ValueError, match="s3://"):
        versioning.ensure_repo(home)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 (real HTTP), a bucket, and credentials only in the environment."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="brainlm-data")
    yield endpoint
    server.stop()


@pytest.mark.slow
def test_push_and_pull_through_s3(home, tmp_path, monkeypatch, s3_endpoint):
    monkeypatch.setenv(versioning.REMOTE_ENV, "s3://brainlm-data/cohorts")
    monkeypatch.setenv(versioning.S3_ENDPOINT_ENV, s3_endpoint)
    known = table_folder(tmp_path / "src")
    ingest(tmp_path / "src", "lab", cfg=FAST)

    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="brainlm-data", Prefix="cohorts/")
    assert listed["KeyCount"] > 0 and all(o["Key"].startswith("cohorts/files/md5/") for o in listed["Contents"])
    repo_text = "".join(p.read_text(errors="replace") for p in (home / ".dvc").glob("config*"))
    assert "s3://brainlm-data/cohorts" in repo_text and SECRET not in repo_text and "testing" not in repo_text
    assert "s3://" not in (home / ".dvc" / "config").read_text()  # machine settings: config.local only
    remote = versioning.footprint(home)[-1]
    assert (remote.name, remote.location, remote.disk) == ("remote", "s3://brainlm-data/cohorts", None)
    assert remote.files == listed["KeyCount"] and remote.size >= versioning.footprint(home)[0].size

    wipe_local_copies(home)
    versioning.pull(home)
    assert_cohort("lab", known)
