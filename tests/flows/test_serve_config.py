"""What `make serve` serves (flows/serve.py), built without a server: the four deployments with their defaults, and
a serve config (BRAINLM_SERVE_CONFIG) that changes parameters, switches the nightly evaluation on and the
re-evaluation automation off, or names a parameter the flow does not have."""

import pytest

from brainlm.config import ServeConfig, load_serve_config
from brainlm.errors import ConfigError


def test_serve_offers_four_deployments_and_a_serve_config_changes_them(tmp_path):
    from flows.serve import deployments

    ingest, pretrain, evaluate, promote = deployments(ServeConfig())
    assert [(d.flow_name, d.name) for d in (ingest, pretrain, evaluate, promote)] == [
        ("ingest", "default"), ("pretrain", "default"), ("evaluate", "default"), ("promote", "default")]
    assert pretrain.parameters["cohort"] == "demo" and pretrain.parameters["preset"] == "tiny"
    assert pretrain.entrypoint.endswith("flows/pretrain.py:pretrain")
    [nightly] = evaluate.schedules
    assert (nightly.schedule.cron, nightly.active) == ("0 3 * * *", False)  # defined, paused
    [trigger] = evaluate.triggers
    assert trigger.expect == {"brainlm.cohort.versioned"} and set(trigger.parameters) == {"cohort", "data_version"}
    assert not ingest.schedules and not promote.triggers

    path = tmp_path / "serve.yaml"
    path.write_text("evaluate:\n  parameters: {targets: [age], steps: 5}\n  active: true\nreevaluate: false\n")
    _, _, evaluate, _ = deployments(load_serve_config(path))
    assert evaluate.parameters == {"cohort": "demo", "targets": ["age"], "steps": 5}
    assert evaluate.schedules[0].active and not evaluate.triggers

    path.write_text("promote:\n  parameters: {margn: 0.1}\n")
    with pytest.raises(ConfigError, match=r"promote has no parameters \['margn'\]"):
        deployments(load_serve_config(path))
    path.write_text("evaluate:\n  schedule: nightly\n")
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_serve_config(path)
