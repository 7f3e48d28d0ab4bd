"""Every `brainlm` command run the way the README shows it: the console script in a subprocess.

One brainlm home walks the README's sequence once (module fixture): presets → synth → ingest → a second ingest →
data versions → data checkout (back to the first version) → data export → pretrain → promote --gate → promote →
models → evaluate → networks → attention → perturb.
Each test then checks what one command printed and the state it left (files, data versions, MLflow runs, registry
aliases), read back with the library from the same home.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from brainlm import registry
from brainlm.config import PRESETS, load_settings
from brainlm.data import versioning
from brainlm.data.store import open_cohort
from brainlm.model import BrainLM, count_parameters

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BRAINLM = Path(sys.executable).parent / "brainlm"  # `.venv/bin/brainlm`, the README's command
COHORT = "lab"
SYNTH = ["--subjects", "6", "--timepoints", "240", "--max-parcels", "20"]
PRETRAIN = ["--steps", "2", "--eval-every", "2", "--batch-size", "4", "--workers", "1", "--eval-crops", "1"]
PRETRAINED = "brainlm-pretrained"
EVALUATE = ["--task", "forecast", "--cohort", COHORT, "--model", f"models:/{PRETRAINED}@champion", "--steps", "2",
            "--models", "brainlm", "var", "persistence"]
INTERPRET = [["networks", "--max-recordings", "2"],
             ["attention", "--by", "condition", "--groups", "task", "rest", "--permutations", "99"],
             ["perturb", "--drive", "Visual", "--max-recordings", "2"]]


@dataclass
class Session:
    """What the README's sequence printed (command → stdout) and the state between its steps."""

    home: Path
    work: Path
    out: dict[str, str] = field(default_factory=dict)
    first: versioning.Version | None = None  # the data version the first ingest made
    first_checksums: dict[str, str] = field(default_factory=dict)  # the cohort's manifest after it
    second: versioning.Version | None = None


def checksums(cohort_path: Path) -> dict[str, str]:
    manifest = pd.read_csv(cohort_path / "manifest.csv")
    return dict(zip(manifest["recording"], manifest["checksum"], strict=True))


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    assert BRAINLM.is_file(), f"{BRAINLM} is missing: install the package (make install) to get the console script"
    home, work = tmp_path_factory.mktemp("cli_home"), tmp_path_factory.mktemp("cli_work")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", versioning.REMOTE_ENV)}
    # This checkout's code, whatever the console script's environment has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["BRAINLM_HOME"] = str(home)
    s = Session(home=home, work=work)

    def brainlm(key: str, *args: str) -> str:
        proc = subprocess.run([str(BRAINLM), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"brainlm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        s.out[key] = proc.stdout
        return proc.stdout

    brainlm("presets", "presets")
    brainlm("synth", "synth", str(work / "src"), *SYNTH)
    brainlm("versions before", "data", "versions")
    brainlm("ingest", "ingest", str(work / "src"), "--cohort", COHORT)
    [s.first] = versioning.versions(home)
    s.first_checksums = checksums(home / "data" / "cohorts" / COHORT)
    brainlm("synth 2", "synth", str(work / "src2"), "--subjects", "4", "--timepoints", "240", "--max-parcels", "20",
            "--seed", "1")
    brainlm("ingest 2", "ingest", str(work / "src2"), "--cohort", COHORT)
    s.second = versioning.versions(home)[0]
    brainlm("versions", "data", "versions")
    brainlm("checkout", "data", "checkout", s.first.rev[:8])
    brainlm("export", "data", "export", "--cohort", COHORT, "--out", str(work / "export"))
    brainlm("pretrain", "pretrain", "--cohort", COHORT, "--preset", "tiny", *PRETRAIN)
    brainlm("gate", "promote", "--gate", "--cohort", COHORT)
    brainlm("promote", "promote", "brainlm-pretrained", "1", "--alias", "champion")
    brainlm("models", "models")
    brainlm("evaluate", "evaluate", *EVALUATE)
    for command in INTERPRET:  # the champion by default, as the README shows them
        brainlm(command[0], *command, "--cohort", COHORT, "--report", str(work / "reports" / command[0]))
    return s


def test_presets_prints_every_preset_with_its_parameter_count(session):
    rows = {line.split()[0]: line.split()[1] for line in session.out["presets"].splitlines()[1:]}
    expected = {}
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            expected[name] = f"{count_parameters(BrainLM(cfg)) / 1e6:.2f}M"
    assert rows == expected


def test_synth_writes_an_input_folder_in_the_data_contract(session):
    src = session.work / "src"
    assert str(src) in session.out["synth"]
    recordings = sorted(src.glob("sub-*.npy"))
    assert len(recordings) == 6 * 2  # two recordings per subject
    assert all(np.load(f).shape == (240, 20) for f in recordings)  # time × parcels
    assert len(pd.read_csv(src / "participants.tsv", sep="\t")) == 6
    assert len(pd.read_csv(src / "atlas.tsv", sep="\t")) == 20
    assert (src / "ground_truth.json").is_file() and (src / "ground_truth.npz").is_file()


def test_ingest_stores_validates_and_versions_the_cohort(session):
    assert "no cohort versions yet" in session.out["versions before"]
    out = session.out["ingest"]
    assert f"cohort {COHORT!r}: 12 recording(s) stored, 0 rejected" in out
    assert f"data version {session.first.md5}" in out
    assert len(session.first_checksums) == 12
    assert session.first.message and COHORT in session.first.message
    assert f"cohort {COHORT!r}: 8 recording(s) stored" in session.out["ingest 2"]  # 4 subjects × 2 recordings
    assert session.second.md5 != session.first.md5


def test_data_versions_lists_every_version_newest_first(session):
    lines = session.out["versions"].splitlines()
    assert [line.split()[0] for line in lines] == [session.second.rev[:10], session.first.rev[:10]]
    assert session.second.md5 in lines[0] and session.first.md5 in lines[1]


def test_data_checkout_restores_the_earlier_version(session):
    assert f"data/ restored to version {session.first.rev[:8]}" in session.out["checkout"]
    # The cohort the first ingest stored is back, and it is what the store now calls its current version.
    assert checksums(session.home / "data" / "cohorts" / COHORT) == session.first_checksums
    current = versioning.current_version(session.home)
    assert (current.rev, current.md5, current.dirty) == (session.first.rev, session.first.md5, False)


def test_data_export_writes_the_stored_recordings_back_out(session):
    out_dir = session.work / "export"
    assert str(out_dir) in session.out["export"]
    cohort = open_cohort(session.home / "data" / "cohorts" / COHORT)
    exported = pd.read_csv(out_dir / "manifest.csv")
    assert sorted(exported["recording"]) == sorted(cohort.recording_ids)
    for recording in cohort.recording_ids:
        np.testing.assert_array_equal(np.load(out_dir / f"{recording}.npy"), np.asarray(cohort.recording(recording)))
    assert (out_dir / "atlas.tsv").read_text() == (cohort.path / "atlas.tsv").read_text()
    assert (out_dir / "participants.tsv").is_file()


def test_pretrain_trains_for_the_steps_asked_and_registers_a_challenger(session):
    from mlflow import MlflowClient

    out = session.out["pretrain"]
    assert "registered brainlm-pretrained version 1 @challenger" in out
    assert "trained     2 optimiser steps, 8 windows" in out
    settings = load_settings(session.home)
    [version] = registry.list_models(PRETRAINED, settings=settings)
    run = MlflowClient(settings.tracking_uri()).get_run(version["run_id"])
    assert run.info.status == "FINISHED" and f"MLflow run {run.info.run_id}" in out
    assert (run.data.params["train.steps"], run.data.params["train.batch_size"]) == ("2", "4")
    assert (version["cohort"], version["preset"]) == (COHORT, "tiny")


def test_the_registered_version_carries_the_stores_current_data_version(session):
    """Lineage: ingest → pretrain → the version's data tag names the data it trained on (here the checked-out
    first version, not the latest ingest)."""
    current = versioning.current_version(session.home)
    settings = load_settings(session.home)
    [version] = registry.list_models(PRETRAINED, settings=settings)
    assert version["data_version"] == current.tag
    assert version["data_version"] != versioning.Version(md5=session.second.md5, rev=session.second.rev).tag
    from mlflow import MlflowClient

    run = MlflowClient(settings.tracking_uri()).get_run(version["run_id"])
    assert run.data.tags[registry.DATA_VERSION_TAG] == current.tag
    assert f"data version {current.tag}" in session.out["pretrain"]


def test_promote_gate_scores_the_challenger_on_held_out_participants_and_records_why(session):
    """Two optimiser steps do not beat predicting zero by the margin: the gate says so, with the numbers, and
    leaves the alias where it was; the decision and its evidence stay on the version."""
    settings = load_settings(session.home)
    tags = MlflowClient(settings.tracking_uri()).get_model_version(PRETRAINED, "1").tags
    out = session.out["gate"]
    assert out.startswith(f"brainlm-pretrained version 1: {tags['gate.reason']}")
    assert "predicting zero" in out and f"cohort {COHORT}" in out
    assert tags["gate.data_version"] == versioning.current_version(session.home).tag
    promoted = tags["gate.decision"] == "promoted"
    assert promoted == (float(tags["gate.challenger_masked_mse"]) <= 0.99 * float(tags["gate.zero_masked_mse"]))


def test_promote_moves_the_champion_alias_to_the_version(session):
    assert "brainlm-pretrained version 1 is now @champion" in session.out["promote"]
    [version] = registry.list_models(PRETRAINED, settings=load_settings(session.home))
    assert version["aliases"] == ["challenger", "champion"]


def test_models_shows_versions_aliases_runs_and_data_versions(session):
    [version] = registry.list_models(PRETRAINED, settings=load_settings(session.home))
    [line] = session.out["models"].splitlines()  # before `evaluate` registered its models
    assert line.startswith(f"brainlm-pretrained v1  aliases=challenger,champion  run={version['run_id']}  "
                           f"data={version['data_version']}  ")
    assert "val_masked_mse=" in line and "step=2" in line


def test_evaluate_prints_the_comparison_and_registers_every_model_with_its_lineage(session):
    """The forecast comparison of the champion against two baselines: one row per model, each registered with
    the pretrained version it came from and the store's current data version."""
    out = session.out["evaluate"]
    table = out[out.index("\nmodel ") + 1:].splitlines()
    assert table[0].split()[:3] == ["model", "mse", "r2"]
    assert [line.split()[0] for line in table[2:5]] == ["brainlm", "var", "persistence"]
    settings = load_settings(session.home)
    current = versioning.current_version(session.home)
    for name in ("brainlm-forecast", "baseline-forecast-var", "baseline-forecast-persistence"):
        [version] = registry.list_models(name, settings=settings)
        assert f"registered as {name}/1" in out and version["aliases"] == ["challenger"]
        assert (version["cohort"], version["data_version"]) == (COHORT, current.tag)
        assert {"mse", "r2"} <= set(version["metrics"])
    from mlflow import MlflowClient

    tags = MlflowClient(settings.tracking_uri()).get_model_version("brainlm-forecast", "1").tags
    assert tags["pretrained_model"] == f"{PRETRAINED}/1"


def test_interpretation_commands_print_their_tables_and_track_runs_with_their_lineage(session):
    """networks, attention and perturb on the champion: each prints its table and report folder and leaves a
    finished run in the tasks experiment, tagged with the pretrained version and the data version it read."""
    assert session.out["networks"].splitlines()[3].split() == ["method", "accuracy", "balanced_accuracy"]
    assert "task vs rest by 'condition'" in session.out["attention"]
    assert "parcel(s) driven with a sine" in session.out["perturb"]
    from mlflow import MlflowClient

    settings = load_settings(session.home)
    client = MlflowClient(settings.tracking_uri())
    experiment = client.get_experiment_by_name(settings.mlflow.tasks_experiment)
    runs = {r.data.tags["task"]: r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags["task"] in ("networks", "attention", "drive")}
    assert set(runs) == {"networks", "attention", "drive"}
    current = versioning.current_version(session.home)
    for task, run in runs.items():
        command = "perturb" if task == "drive" else task
        assert run.info.status == "FINISHED" and run.info.run_id in session.out[command]
        assert run.data.tags["pretrained_model"] == f"{PRETRAINED}/1"
        assert run.data.tags[registry.DATA_VERSION_TAG] == current.tag
        assert (session.work / "reports" / command / "summary.json").is_file()
