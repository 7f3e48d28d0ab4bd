"""The root data.dvc pins exactly the cohort store `make demo` regenerates (synthetic input, demo ingest).

The synthetic generator writes the same bytes on every machine and the store holds nothing that varies from
run to run, so the demo cohort has one DVC md5 everywhere: the one committed in data.dvc.
"""

from pathlib import Path

import pytest
import yaml

from brainlm import pipelines
from brainlm.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DEMO_COHORT = "demo"  # flows.pretrain.DEFAULT_COHORT, the name `make demo` ingests under


@pytest.mark.slow
def test_the_demo_cohort_is_what_the_root_data_dvc_pins(home):
    settings = load_settings()
    src = pipelines.synthesize_demo(pipelines.demo_input_dir(DEMO_COHORT, settings))
    report = pipelines.ingest_cohort(src, DEMO_COHORT, settings)

    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    made = yaml.safe_load((home / "data.dvc").read_text())["outs"][0]
    assert made == pinned, (
        f"the demo cohort now hashes to {made['md5']} ({made['nfiles']} files, {made['size']} bytes) but the "
        f"root data.dvc pins {pinned['md5']}: if you changed the synthetic generator, the demo's settings or "
        f"the store format, run `make demo` in the checkout (it rewrites data.dvc) and commit data.dvc")
    assert report.version.md5 == pinned["md5"]
