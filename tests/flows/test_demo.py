"""`make demo` as a newcomer runs it: the demo flow in a never-used home that is a git checkout.

The flow runs in a subprocess exactly as the Makefile starts it (`python -m flows.demo` with PREFECT_HOME under
a `.brainlm/` that does not exist yet), on this working tree's code, in a temporary git repository holding what
a checkout tracks for the demo (data.dvc, the DVC config, the ignore files, mlflow.yaml).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brainlm import registry
from brainlm.config import load_settings

REPO = Path(__file__).resolve().parents[2]
CHECKOUT_FILES = ("data.dvc", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "mlflow.yaml")
# Settings a developer's shell may carry that would point the demo somewhere else than the fresh home.
FOREIGN_ENV = ("BRAINLM_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "BRAINLM_DVC_REMOTE",
               "BRAINLM_DVC_S3_ENDPOINT", "BRAINLM_MLFLOW_CONFIG", "RAY_ADDRESS")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_demo_flow_in_a_fresh_checkout_completes_and_leaves_its_git_history_alone(tmp_path):
    checkout = tmp_path / "checkout"
    for name in CHECKOUT_FILES:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, checkout / name)
    git(checkout, "init", "-q")
    git(checkout, "add", "-A")
    git(checkout, "-c", "user.name=dev", "-c", "user.email=dev@localhost", "commit", "-q", "-m", "checkout")
    log_before = git(checkout, "log", "--format=%H %s")
    pointer_before = (checkout / "data.dvc").read_bytes()

    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(checkout / ".brainlm" / "prefect")}
    proc = subprocess.run([sys.executable, "-m", "flows.demo", "--steps", "4"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "brainlm demo finished" in output

    [model] = registry.list_models(settings=load_settings(checkout))
    assert (model["version"], model["aliases"], model["cohort"]) == ("1", ["challenger"], "demo")
    # The cohort is the one data.dvc pins, so the data version names the checkout's own commit of data.dvc.
    assert model["data_version"].split("@")[1] == git(checkout, "rev-parse", "HEAD").strip()[:12]

    assert git(checkout, "status", "--porcelain", "--untracked-files=all") == "", (
        "the demo changed tracked files or left untracked ones; if data.dvc changed, the demo cohort no longer "
        "matches it: see tests/data/test_demo_cohort.py")
    assert git(checkout, "log", "--format=%H %s") == log_before
    assert (checkout / "data.dvc").read_bytes() == pointer_before
