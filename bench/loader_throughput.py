"""Loader throughput alone: windows/s of the training DataLoader for several worker counts.

The training loader must never starve the GPU: the target is at least 5x the training rate. This times the
same pieces training uses (`open_cohort` + `brainlm.engine.RandomCrops` drawn by `StepSampler`: memory-mapped
random crops, one batch per step; a DataLoader with pinned memory on CUDA and persistent workers) and nothing
else: no model, no copy to the GPU.

By default it writes a throwaway cohort with the store's own writers (`brainlm.data.store`: random float32
parcels x time recordings; the values do not change read speed), because `brainlm ingest` needs Great
Expectations, DVC and nilearn, which a bare GPU machine lacks. `--cohort` times any stored cohort instead, e.g.
one from `brainlm synth` + `brainlm ingest`. The page cache is warm after the first pass: this measures the CPU
side (crop, copy, collate, pin), not a cold disk.

    PYTHONPATH=. python bench/loader_throughput.py --batch 64 --workers 0 1 2
    PYTHONPATH=. python bench/loader_throughput.py --train-json out/train.json   # compare with the train bench
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from brainlm.data import store
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.data.store import open_cohort
from brainlm.engine import RandomCrops, StepSampler

TARGET_RATIO = 5.0  # the issue: the loader alone at least 5x the training rate


def write_cohort(path: Path, recordings: int, parcels: int, timepoints: int, seed: int = 0) -> Path:
    """A stored cohort of random float32 parcels × time recordings, written by the store's own writers."""
    rng = np.random.default_rng(seed)
    atlas = load_atlas("A424")
    if parcels != atlas.n_parcels:  # any parcel count: a made-up atlas with random centroids
        atlas = Atlas(name=f"bench{parcels}", index=np.arange(1, parcels + 1),
                      names=[f"P{i + 1}" for i in range(parcels)],
                      coords=rng.uniform(-60, 60, (parcels, 3)).astype(np.float32))
    rows = []
    for r in range(recordings):
        participant, recording = f"sub-{r + 1:05d}", f"sub-{r + 1:05d}_task-rest_run-1"
        array = rng.standard_normal((parcels, timepoints), dtype=np.float32)  # robust-scaled data look like this
        store.write_recording(path, recording, array)
        rows.append(store.manifest_row(recording, participant, "rest", f"{recording}.npy", array))
    participants = pd.DataFrame({"participant_id": [row["participant"] for row in rows],
                                 "age": [30 + r % 40 for r in range(recordings)]})
    return store.write_cohort(path, pd.DataFrame(rows), atlas, participants, scaling="none (random bench data)")


def time_loader(dataset: RandomCrops, batch: int, workers: int, pin: bool, batches: int,
                warmup: int) -> dict[str, float]:
    """Windows/s over `batches` batches (steps), after `warmup` that start the workers and fill the cache."""
    loader = DataLoader(dataset, batch_size=batch, sampler=StepSampler(0, warmup + batches, batch),
                        num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        out = next(it)
    seconds = time.perf_counter() - t0
    if out.shape != (batch, dataset.cohort.n_parcels, dataset.window) or (pin and not out.is_pinned()):
        raise RuntimeError(f"unexpected batch: {tuple(out.shape)}, pinned={out.is_pinned()}")
    del it, loader  # stops the workers before the next configuration starts its own
    return {"windows_per_s": batches * batch / seconds, "ms_per_batch": seconds / batches * 1e3}


def training_rate(args: argparse.Namespace) -> tuple[float | None, str]:
    """The rate the loader must feed: --train-rate, or the fastest row of a pretrain_throughput JSON."""
    if args.train_rate is not None:
        return args.train_rate, "--train-rate"
    if args.train_json:
        rows = json.loads(Path(args.train_json).read_text())["results"]
        best = max(rows, key=lambda r: r["windows_per_s"])
        return best["windows_per_s"], f"{best['preset']} mask {best['mask']} in {args.train_json}"
    return None, ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", default=None, help="time this stored cohort (name or path) instead of a new one")
    p.add_argument("--recordings", type=int, default=256, help="recordings in the generated cohort")
    p.add_argument("--parcels", type=int, default=424)
    p.add_argument("--timepoints", type=int, default=490, help="TRs per generated recording")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="DataLoader worker counts (default: 0 1 2 4 ... up to the CPU count)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--pin-memory", choices=["auto", "yes", "no"], default="auto", help="auto: when CUDA is there")
    p.add_argument("--train-rate", type=float, default=None, help="training windows/s the loader must feed")
    p.add_argument("--train-json", default=None, help="or take it from pretrain_throughput.py --json output")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process, which collates when --workers is 0 (workers use 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.workers is None:
        cpus = os.cpu_count() or 1
        args.workers = [0] + [2**i for i in range(cpus.bit_length()) if 2**i <= cpus]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pin = torch.cuda.is_available() if args.pin_memory == "auto" else args.pin_memory == "yes"
    rate, rate_source = training_rate(args)
    with tempfile.TemporaryDirectory(prefix="brainlm-loader-bench-") as tmp:
        if args.cohort:
            cohort = open_cohort(args.cohort)
        else:
            t0 = time.perf_counter()
            cohort = open_cohort(write_cohort(Path(tmp) / "bench", args.recordings, args.parcels,
                                              args.timepoints))
            print(f"wrote a {args.recordings}-recording cohort ({args.parcels} parcels x {args.timepoints} TRs) "
                  f"in {time.perf_counter() - t0:.1f} s")
        dataset = RandomCrops(cohort, cohort.recording_ids, args.window, seed=0)
        print(f"random crops of {len(cohort.recording_ids)} recordings, {cohort.n_parcels} x {args.window} float32 "
              f"({cohort.n_parcels * args.window * 4 / 1e6:.2f} MB each); batch {args.batch}; pin_memory={pin}; "
              f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, 1-min load average {os.getloadavg()[0]:.1f}")
        print(f"{'workers':>7} {'windows/s':>10} {'ms/batch':>9} {'MB/s':>8}" + (f" {'x train':>8}" if rate else ""))
        results = []
        for workers in args.workers:
            r = {"workers": workers, "batch": args.batch, "pin_memory": pin,
                 **time_loader(dataset, args.batch, workers, pin, args.batches, args.warmup)}
            mb = r["windows_per_s"] * cohort.n_parcels * args.window * 4 / 1e6
            r["ratio_to_training"] = r["windows_per_s"] / rate if rate else None
            results.append(r)
            print(f"{workers:>7d} {r['windows_per_s']:>10.0f} {r['ms_per_batch']:>9.1f} {mb:>8.0f}"
                  + (f" {r['ratio_to_training']:>8.1f}" if rate else ""), flush=True)
    if rate:
        best = max(results, key=lambda r: r["windows_per_s"])
        verdict = "meets" if best["windows_per_s"] >= TARGET_RATIO * rate else "misses"
        print(f"training needs {rate:.1f} windows/s ({rate_source}); target {TARGET_RATIO:g}x = "
              f"{TARGET_RATIO * rate:.0f} windows/s; best {best['windows_per_s']:.0f} windows/s with "
              f"{best['workers']} workers {verdict} it")
    if args.json:
        Path(args.json).write_text(json.dumps({"train_rate": rate, "train_rate_source": rate_source,
                                               "results": results}, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
