"""bench/science.py runs end to end (a smoke run: tiny cohort, few steps) and prints every section's table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_science_bench_prints_forecast_clinical_and_network_tables():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "science.py"), "--quick", "--targets", "age"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "## Forecasting" in out and "## Clinical: age" in out and "brainlm vs var: MSE" in out
    for model in ("brainlm", "scratch", "lstm", "ode", "var", "ar1", "persistence", "ridge_fc", "svr_embedding"):
        assert f"\n{model} " in out, model
    networks = out[out.index("## Networks"):]
    for labels in ("yeo7:", "cole_anticevic:"):
        block = networks[networks.index(labels):]
        rows = [line.split()[0] for line in block.splitlines()[3:9]]
        assert rows == ["attention", "fc", "untrained", "coordinates", "chance", "planted"], block
