"""bench/science.py networks runs on the CPU and prints its two tables (figures are not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_networks_section_prints_a_table_per_label_set():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "science.py"), "networks", "--parcels", "40",
                           "--subjects", "3", "--steps", "3", "--recordings", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for labels in ("yeo7:", "cole_anticevic:"):
        block = out[out.index(labels):]
        rows = [line.split()[0] for line in block.splitlines()[2:8]]
        assert rows == ["attention", "fc", "untrained", "coordinates", "chance", "planted"], block
