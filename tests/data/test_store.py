"""The cohort store: its on-disk layout, clear errors, subject-level splits, and memory-mapped random crops."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import brainlm.data.store as store
from brainlm.config import load_settings
from brainlm.data.atlas import Atlas
from brainlm.data.store import CohortError, WindowDataset, open_cohort

PARCELS = 6


def write_store(path, participants=5, runs=2, timepoints=(60, 75)):
    """A stored cohort whose values encode their position: value = 1000·recording + 10·parcel + t / 1000."""
    rows = []
    for s in range(participants):
        for r in range(runs):
            n, length = len(rows), timepoints[r % len(timepoints)]
            recording = f"sub-{s + 1:02d}_task-rest_run-{r + 1}"
            array = 1000.0 * n + 10.0 * np.arange(PARCELS)[:, None] + np.arange(length) / 1000
            array = array.astype(np.float32)
            store.write_recording(path, recording, array)
            rows.append(store.manifest_row(recording, f"sub-{s + 1:02d}", "rest", f"{recording}.npy", array))
    atlas = Atlas(name="toy", index=np.arange(1, PARCELS + 1), names=[f"p{i}" for i in range(PARCELS)],
                  coords=np.zeros((PARCELS, 3), np.float32))
    phenotypes = pd.DataFrame({"participant_id": [f"sub-{s + 1:02d}" for s in range(participants)],
                               "age": np.arange(participants) + 30})
    return store.write_cohort(path, pd.DataFrame(rows), atlas, phenotypes, scaling="none (positions)")


def test_layout_on_disk_is_the_documented_one(tmp_path):
    """The format DESIGN.md documents, file by file: what any other tool reading a store relies on."""
    path = write_store(tmp_path / "toy", participants=2, runs=1)
    assert sorted(p.name for p in path.iterdir()) == ["atlas.tsv", "cohort.json", "manifest.csv",
                                                       "participants.tsv", "recordings"]
    array = np.load(path / "recordings" / "sub-01_task-rest_run-1.npy")
    assert array.dtype == np.float32 and array.shape == (PARCELS, 60) and array.flags.c_contiguous
    manifest = (path / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "recording,participant,condition,timepoints,parcels,checksum,source"
    assert manifest[1].startswith("sub-01_task-rest_run-1,sub-01,rest,60,6,")
    assert (path / "participants.tsv").read_text().splitlines()[0] == "participant_id\tage"
    assert (path / "atlas.tsv").read_text().startswith("index\tname\tx\ty\tz")
    info = json.loads((path / "cohort.json").read_text())
    assert info == {"name": "toy", "format": store.STORE_FORMAT, "n_recordings": 2, "n_participants": 2,
                    "n_parcels": PARCELS, "atlas": "toy", "scaling": "none (positions)"}


def test_same_data_writes_the_same_bytes(tmp_path):
    """Nothing that varies between runs (times, absolute paths) is in a store: the bytes depend on the data."""
    first, second = write_store(tmp_path / "a" / "toy"), write_store(tmp_path / "b" / "toy")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_store_imports_without_the_platform_tools():
    """bench/ writes and reads stores on machines with torch, numpy and pandas only; ingest's workers write
    through it and should not pay for importing torch."""
    heavy = ("great_expectations", "dvc", "prefect", "mlflow", "ray", "nilearn", "sklearn", "torch")
    code = ("import sys, brainlm.data.store; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def cohort(tmp_path):
    return open_cohort(write_store(tmp_path / "toy"))


def test_opens_by_path_and_by_name_under_the_store(home):
    path = write_store(load_settings().cohorts_dir / "toy")
    by_name, by_path = open_cohort("toy"), open_cohort(path)
    assert by_name.path == by_path.path == path.resolve()
    assert by_name.name == "toy" and by_name.n_parcels == PARCELS
    assert len(by_name.manifest) == 10 and by_name.phenotypes["participant_id"].iloc[0] == "sub-01"


def test_missing_cohort_names_the_path_and_what_to_run(home):
    with pytest.raises(CohortError, match="brainlm ingest") as info:
        open_cohort("nothing-here")
    assert str(load_settings().cohorts_dir / "nothing-here") in str(info.value)


def test_cohort_without_manifest_names_the_path(tmp_path):
    path = write_store(tmp_path / "half")
    (path / "manifest.csv").unlink()
    with pytest.raises(CohortError, match=r"incomplete \(no manifest.csv\)") as info:
        open_cohort(path)
    assert str(path) in str(info.value)


def test_cohort_with_zero_recordings_names_the_path(tmp_path):
    path = write_store(tmp_path / "empty")
    pd.read_csv(path / "manifest.csv").iloc[:0].to_csv(path / "manifest.csv", index=False)
    with pytest.raises(CohortError, match="has no recordings") as info:
        open_cohort(path)
    assert str(path) in str(info.value) and "brainlm ingest" in str(info.value)


def test_recording_is_a_read_only_memmap_of_parcels_by_time(cohort):
    array = cohort.recording("sub-01_task-rest_run-2")
    assert isinstance(array, np.memmap) and array.mode == "r"
    assert array.shape == (PARCELS, 75) and array.dtype == np.float32
    with pytest.raises(CohortError, match="no recording 'sub-99'"):
        cohort.recording("sub-99")


def test_split_is_subject_level_complete_and_deterministic(cohort):
    splits = cohort.split(val_fraction=0.2, test_fraction=0.2, seed=3)
    owner = dict(zip(cohort.manifest["recording"], cohort.manifest["participant"], strict=True))
    people = {name: {owner[r] for r in ids} for name, ids in splits.items()}
    assert all(people.values()), "every split gets someone when there are >= 3 participants"
    assert not (people["train"] & people["val"] or people["train"] & people["test"]
                or people["val"] & people["test"])
    assert sorted(sum(splits.values(), [])) == sorted(cohort.recording_ids)
    assert cohort.split(0.2, 0.2, seed=3) == splits
    assert any(cohort.split(0.2, 0.2, seed=s) != splits for s in range(4, 10))


@pytest.mark.parametrize("participants", [1, 2])
def test_split_with_fewer_than_three_participants_puts_all_in_train(tmp_path, participants):
    small = open_cohort(write_store(tmp_path / "small", participants=participants))
    splits = small.split(0.1, 0.1, seed=0)
    assert splits == {"train": small.recording_ids, "val": [], "test": []}


def test_split_rejects_fractions_that_leave_no_training_data(cohort):
    with pytest.raises(ValueError, match="sum below 1"):
        cohort.split(0.5, 0.5)


def test_crops_are_windows_of_the_stored_arrays(cohort):
    ids = cohort.recording_ids[:4]
    data = WindowDataset(cohort, ids, window=50, crops_per_recording=3, seed=7)
    assert len(data) == 12
    for i in range(len(data)):
        crop = data[i]
        recording, start = data.locate(i)
        assert recording == ids[i // 3]
        assert crop.dtype == torch.float32 and crop.shape == (PARCELS, 50)
        assert torch.equal(crop, torch.from_numpy(np.load(cohort.path / "recordings" / f"{recording}.npy")
                                                  [:, start : start + 50]))
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch.shape == (4, PARCELS, 50)


def test_crops_are_reproducible_and_change_with_the_epoch(cohort):
    data = cohort.window_dataset(cohort.recording_ids, window=20, crops_per_recording=4, seed=1)
    first = [data.locate(i)[1] for i in range(len(data))]
    fresh = WindowDataset(cohort, cohort.recording_ids, 20, 4, seed=1)
    assert first == [fresh.locate(i)[1] for i in range(len(data))]
    assert len(set(first[:4])) > 1, "crops of one recording differ"
    data.set_epoch(1)
    assert [data.locate(i)[1] for i in range(len(data))] != first


def test_recording_shorter_than_the_window_is_named(cohort):
    with pytest.raises(CohortError, match=r"sub-01_task-rest_run-1 \(60 TRs\)"):
        WindowDataset(cohort, ["sub-01_task-rest_run-1", "sub-01_task-rest_run-2"], window=70)


def test_crops_read_through_a_memmap(cohort, monkeypatch):
    modes = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(store.np, "load", spy)
    data = WindowDataset(cohort, cohort.recording_ids, window=30, crops_per_recording=2)
    for i in range(len(data)):
        data[i]
    assert modes and set(modes) == {"r"}
