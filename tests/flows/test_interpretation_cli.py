"""`brainlm networks | attention | perturb` end to end on a real MLflow store.

A registered model (the session's tiny pretrained model, aliased champion) and a stored synthetic cohort go in;
each command prints its table, writes its report folder, and leaves a finished run in the tasks experiment with
the same files as artifacts. `perturb --register` serves the model as `brainlm-perturbation`, which MLflow loads
from code + safetensors and answers a perturbation spec. Nothing MLflow stores names a participant.
"""

import pickle
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_tasks import INTERPRETATION, register_pretrained
from mlflow import MlflowClient

from brainlm.cli import main
from brainlm.config import load_settings
from brainlm.data.store import open_cohort

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
COHORT = "synthetic"


@pytest.fixture
def stored(home, pretrained):
    """The task cohort of the interpretation setup, stored in this test's brainlm home."""
    settings = load_settings()
    shutil.copytree(pretrained(INTERPRETATION).cohort_path, settings.cohorts_dir / COHORT)
    return settings, open_cohort(COHORT)


@pytest.fixture
def registered(stored, pretrained):
    """The pretrained checkpoint registered as brainlm-pretrained v1 @champion."""
    settings, cohort = stored
    register_pretrained(pretrained(INTERPRETATION), settings, alias=settings.mlflow.production_alias)
    return settings, cohort


def _refuse_pickles(*args, **kwargs):
    raise AssertionError("a pickle was read while loading the served perturbation model")


def _rows(text: str, first_words: tuple[str, ...]) -> dict[str, list[float]]:
    """Table rows of printed output whose first word is one of `first_words`: word → its numbers."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in first_words:
            rows[words[0]] = [float(w) for w in words[1:] if re.fullmatch(r"-?[\d.]+(e-?\d+)?", w)]
    return rows


def test_interpretation_commands_report_and_track_without_participant_ids(registered, capsys, tmp_path, monkeypatch,
                                                                          assert_no_participant_ids):
    settings, cohort = registered
    champion = f"models:/{settings.mlflow.pretrained_model}@champion"

    assert main(["networks", "--cohort", COHORT, "--labels", "yeo7", "--max-recordings", "4",
                 "--report", str(tmp_path / "networks")]) == 0  # the model defaults to the champion
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "accuracy", "balanced_accuracy"]
    rows = _rows(out, ("attention", "fc", "untrained", "coordinates"))
    assert set(rows) == {"attention", "fc", "untrained", "coordinates"}
    assert all(len(v) == 2 and 0 <= min(v) <= max(v) <= 1 for v in rows.values())
    table = pd.read_csv(tmp_path / "networks" / "networks_table.tsv", sep="\t")
    assert np.allclose(table.set_index("method").loc["fc"].to_numpy(), rows["fc"], atol=1e-3)
    assert {"confusion.png", "attention_connectome.png", "predictions.tsv", "confusion_attention.tsv",
            "summary.json"} <= {p.name for p in (tmp_path / "networks").iterdir()}

    assert main(["attention", "--model", champion, "--cohort", COHORT, "--by", "condition", "--groups", "task",
                 "rest", "--resolution", "time", "--permutations", "199", "--max-windows", "1",
                 "--report", str(tmp_path / "attention")]) == 0
    out = capsys.readouterr().out
    assert "task vs rest by 'condition'" in out and "within participants" in out
    networks = pd.read_csv(tmp_path / "attention" / "contrast_networks.tsv", sep="\t")
    assert len(networks) == 9 and {"statistic", "p", "p_fdr", "p_fwer"} <= set(networks.columns)
    assert main(["attention", "--cohort", COHORT, "--by", "phq9", "--threshold", "10", "--permutations", "99",
                 "--max-windows", "1"]) == 0
    assert "between participants" in capsys.readouterr().out

    assert main(["perturb", "--cohort", COHORT, "--by", "condition", "--source", "rest", "--target", "task",
                 "--steps", "20", "--max-recordings", "4", "--register", "--report", str(tmp_path / "perturb")]) == 0
    out = capsys.readouterr().out
    assert "rest → task" in out and "registered brainlm-perturbation version 1" in out
    assert np.load(tmp_path / "perturb" / "perturbation.npy").shape == (cohort.n_parcels, 100)
    assert main(["perturb", "--cohort", COHORT, "--drive", "Visual", "--max-recordings", "4"]) == 0
    visual = sum(label == "Visual" for label in cohort.atlas.networks["yeo7"])
    assert f"{visual} parcel(s) driven with a sine" in capsys.readouterr().out

    client = MlflowClient(settings.tracking_uri())
    experiment = client.get_experiment_by_name(settings.mlflow.tasks_experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["task"] for r in runs) == ["attention", "attention", "drive", "networks", "perturb",
                                                         "perturbation-model"]
    assert all(r.info.status == "FINISHED" for r in runs)
    networks_run = next(r for r in runs if r.data.tags["task"] == "networks")
    assert networks_run.data.metrics["fc_accuracy"] == pytest.approx(rows["fc"][0], abs=1e-3)
    assert networks_run.data.params["labels"] == "yeo7" and networks_run.data.params["model_uri"] == champion
    assert networks_run.data.tags["pretrained_model"] == f"{settings.mlflow.pretrained_model}/1"
    assert {"confusion.png", "networks_table.tsv"} <= {a.path for a in client.list_artifacts(networks_run.info.run_id)}

    # MLflow's own loader resolves `models:/` against the process-wide URI, which the registry leaves unset.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    with monkeypatch.context() as patched:  # the served model is code + safetensors: no pickle is read
        for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
            patched.setattr(module, name, _refuse_pickles)
        served = mlflow.pyfunc.load_model("models:/brainlm-perturbation@challenger")
    signals = np.random.default_rng(0).standard_normal((2, cohort.n_parcels, 100)).astype(np.float32)
    spec = np.zeros((cohort.n_parcels, 100), np.float32)
    answer = served.predict({"signals": signals, "coords": cohort.atlas.coords, "perturbation": spec},
                            params={"horizon": 2})
    assert answer["forecast"].shape == (2, cohort.n_parcels, 40) and np.allclose(answer["change"], 0)
    spec[:8] = 2.0  # any parcels
    moved = served.predict({"signals": signals, "coords": cohort.atlas.coords, "perturbation": spec})
    assert moved["change"].shape == (2, cohort.n_parcels) and moved["change"].max() > 0

    # Self-sufficient like every registered model: the brainlm code it runs travels inside it, and its
    # requirements are pinned index packages (pandas for the perturbation tables).
    files = Path(mlflow.artifacts.download_artifacts("models:/brainlm-perturbation@challenger",
                                                     dst_path=str(tmp_path / "served")))
    requirements = (files / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements) and not any(r.startswith("brainlm") for r in requirements)
    assert {"torch", "pandas", "mlflow"} <= {r.split("==")[0] for r in requirements}, requirements
    assert (files / "code" / "brainlm" / "tasks" / "perturb.py").is_file()

    assert_no_participant_ids(settings, cohort.participants)


def test_user_mistakes_are_one_line_errors(stored, capsys):
    """Each mistake is refused before any model is loaded (none is registered here), in one line."""
    settings, cohort = stored
    atlas = pd.read_csv(cohort.path / "atlas.tsv", sep="\t", dtype=str, keep_default_na=False)
    atlas["sparse"] = ["Visual"] * 3 + [""] * (len(atlas) - 3)  # a lab's column that labels one network only
    atlas.to_csv(cohort.path / "atlas.tsv", sep="\t", index=False)
    for argv, message in [
        (["networks", "--labels", "nope"], "unknown label column 'nope'; atlas"),
        (["networks", "--labels", "sparse"], "too few labelled parcels in column 'sparse'"),
        (["attention", "--by", "mood"], "unknown group column 'mood'"),
        (["attention", "--by", "condition", "--groups", "task", "sleep"],
         "unknown group 'sleep' in column 'condition'"),
        (["attention", "--by", "participant"], "unknown group column 'participant'"),
        (["perturb", "--by", "condition"], "--by needs --source A --target B"),
        (["perturb", "--drive", "V9"], "unknown parcel 'V9'"),
    ]:
        assert main([argv[0], "--cohort", COHORT, *argv[1:]]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
