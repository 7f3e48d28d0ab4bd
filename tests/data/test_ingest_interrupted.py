"""An ingest killed mid-write (SIGKILL, a real subprocess) leaves the previous version readable and intact."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from fixtures_ingest import FAST, expected_stored, pointer, stored_checksums, table_folder

from brainlm.data import versioning
from brainlm.data.ingest import PAUSE_ENV, ingest
from brainlm.data.store import open_cohort


@pytest.mark.slow
def test_killed_ingest_leaves_the_previous_version(home, tmp_path):
    old = table_folder(tmp_path / "v1", seed=0)
    ingest(tmp_path / "v1", "lab", cfg=FAST)
    cohorts = home / "data" / "cohorts"
    before_pointer, before = pointer(home), stored_checksums(cohorts / "lab")
    table_folder(tmp_path / "v2", participants=4, seed=1)

    # A second ingest that sleeps after each stored recording; kill it once it is writing.
    script = textwrap.dedent(f"""
        from brainlm.config import IngestConfig
        from brainlm.data.ingest import ingest
        ingest({str(tmp_path / "v2")!r}, "lab", cfg=IngestConfig(workers=1))
    """)
    env = {**os.environ, "BRAINLM_HOME": str(home), PAUSE_ENV: "30"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: list(cohorts.glob(".lab.tmp-*/recordings/*.npy")), proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no pool worker survives either
        proc.wait()
    assert list(cohorts.glob(".lab.tmp-*")), "the kill should have left a half-built cohort beside the old one"

    # The old version is untouched: same DVC pointer, same files, readable through the store reader.
    assert pointer(home) == before_pointer
    cohort = open_cohort("lab")
    assert stored_checksums(cohort.path) == before
    for rec, series in old.items():
        np.testing.assert_allclose(np.asarray(cohort.recording(rec)), expected_stored(series), atol=2e-5)
    assert len(versioning.versions(home)) == 1

    # The next ingest clears the leftovers and completes.
    report = ingest(tmp_path / "v2", "lab", cfg=FAST)
    assert any("interrupted ingest" in note for note in report.notes)
    assert sorted(p.name for p in cohorts.iterdir()) == ["lab"]
    assert len(versioning.versions(home)) == 2


def _wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"ingest exited ({proc.returncode}) before writing: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no recording written within {timeout} s")
        time.sleep(0.1)
