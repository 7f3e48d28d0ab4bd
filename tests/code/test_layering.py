"""The layering rules of DESIGN.md ("one home per concern") hold: import-linter's contracts in pyproject.toml.

`make test` runs `lint-imports` before pytest; this test runs it too, so a plain `pytest` catches a broken rule.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_is_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports found a broken layering rule:\n{proc.stdout}\n{proc.stderr}"
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout, proc.stdout
