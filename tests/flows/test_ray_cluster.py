"""Pretraining on a Ray cluster of two nodes, and losing one of them mid-run.

The cluster is started the way it is on two machines: `ray start --head` and, separately, `ray start --address`
for a worker node (tests/servers.py; here both on this machine, so they share the filesystem that holds the
cohort and the checkpoints, as a cluster shares its storage). `RAY_ADDRESS` makes `launcher.fit` join that
cluster instead of starting Ray of its own. Two Ray Train workers, one CPU each, fill both nodes.

Fault: once the first checkpoint is recorded, every process of the worker node is killed (SIGKILL by PID, as
if the machine died) and a replacement node joins (as an autoscaler or Kubernetes would start one). Ray Train
restarts the worker group from the last checkpoint and finishes: the step counter and the training windows
run on from the checkpoint, and the evaluations before the loss are kept.
"""

import json
import time
from pathlib import Path

import pytest
from fixtures_cohort import make_cohort
from servers import ray_cluster, wait_for

from brainlm import checkpoint
from brainlm.config import TrainConfig, load_settings, preset
from brainlm.launcher import fit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = preset("tiny", window=60, mask_ratio=0.5)
# Two failures allowed: losing the node is one; a restart that Ray places on the lost node before the head has
# declared it dead (a few seconds of missed health checks) fails too, and is retried from the same checkpoint.
TRAIN = TrainConfig(steps=9, eval_every=3, batch_size=4, lr=3e-3, num_workers=2, cpus_per_worker=1, max_failures=2)
RUN = "two-nodes"


def recorded_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has recorded for the run (the one a restart resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    if not latest:
        return None
    return checkpoint.read_state(run_dir / latest["checkpoint_dir_name"])["step"]


def test_training_survives_losing_a_worker_node(tmp_path, monkeypatch, home):
    cohort = make_cohort(tmp_path / "cohort", n_participants=10, parcels=16, timepoints=240)
    storage = tmp_path / "ray"
    seen, lost = [], {}

    with ray_cluster(head_cpus=1, worker_cpus=1) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)

        def on_evaluation(metrics):
            seen.append(metrics)
            if lost:
                return
            # Kill once Ray Train has recorded this evaluation's checkpoint: a restart must resume from it.
            lost["checkpoint_step"] = wait_for(lambda: recorded_checkpoint_step(storage / RUN), "checkpoint", 60)
            lost["at_step"] = metrics["step"]
            lost["pids"] = cluster.workers[0].kill()
            lost["time"] = time.monotonic()
            cluster.add_worker(cpus=1)  # the replacement node

        result = fit(cohort, MODEL, TRAIN, settings=load_settings(), run_name=RUN, storage_path=storage,
                     on_evaluation=on_evaluation)
        result_time = time.monotonic()

    assert lost and len(lost["pids"]) >= 2, lost  # the node's `ray start` and at least its raylet
    resumed = lost["checkpoint_step"]
    print(f"\nworker node ({len(lost['pids'])} processes) killed at step {lost['at_step']}; checkpoint recorded: "
          f"step {resumed}; training finished {result_time - lost['time']:.0f} s later")
    assert resumed in (3, 6)  # a checkpoint recorded before the loss, not the end of the run
    steps = [h["step"] for h in result.history]
    assert steps == [3, 6, 9]  # the step counter runs on: no step repeated, none skipped
    # Evaluations up to the checkpoint come from the first worker group; the rest from the restarted one,
    # which began at that checkpoint's step, not at 0.
    assert [h["resumed_from"] for h in result.history] == [0 if s <= resumed else resumed for s in steps]
    windows_per_step = TRAIN.batch_size * TRAIN.num_workers
    assert [h["windows"] for h in result.history] == [s * windows_per_step for s in steps]
    assert result.history[0] == seen[0]  # the first group's evaluation, carried over in the checkpoint

    state = checkpoint.read_state(result.checkpoint_dir)
    assert state["step"] == 9 and result.metrics["steps"] == 9
    for key in ("train_loss", "val_masked_mse", "val_zero_mse"):
        assert result.metrics[key] == result.metrics[key], key  # present and not NaN
