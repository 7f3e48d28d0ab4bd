"""Cohort versions with real DVC: push/pull against a local remote and an S3 endpoint (moto, real wire
protocol on 127.0.0.1), versions, checkout, lineage version, and no credentials in the repository."""

import shutil
import socket
import subprocess

import boto3
import numpy as np
import pytest
from fixtures_ingest import FAST, expected_stored, stored_checksums, table_folder

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
    (home / "data" / "cohorts" / "lab" / "manifest.csv").write_text("edited\n")
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

    wipe_local_copies(home)
    versioning.pull(home)
    assert_cohort("lab", known)
