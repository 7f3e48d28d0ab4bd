"""Ingest at scale: time, peak memory and disk footprint (store, DVC cache, remote) per cohort size.

For each size N it writes N parcel-table recordings (`.npy`, time × parcels float32, A424's 424 parcels by
default) plus participants.tsv into a fresh folder, runs the whole `brainlm ingest` (discover, read, scale,
validate with Great Expectations, store, `dvc add`, commit, `dvc push` to the default local remote) in a fresh
brainlm home in a child process, and measures that home with `brainlm.data.versioning.footprint`: bytes each
place holds and the disk blocks it allocates, hard links counted once.

    .venv/bin/python bench/ingest_footprint.py                          # 50 and 200 recordings
    .venv/bin/python bench/ingest_footprint.py --recordings 100 500 2000 --dir /big/disk
    .venv/bin/python bench/ingest_footprint.py --code ../other-checkout  # ingest with another checkout's code

`--code DIR` runs the ingest with the brainlm package of another checkout (e.g. an older commit) while the
footprint is measured the same way, which gives a before / after table for a change to ingest or versioning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from brainlm.data.atlas import Atlas
from brainlm.data.versioning import footprint

REPO = Path(__file__).resolve().parents[1]

# Runs in the child, against whichever brainlm is on its PYTHONPATH: only the ingest's public API.
CHILD = """
import json, resource, sys, time
from pathlib import Path
import brainlm
from brainlm.config import IngestConfig, load_settings
from brainlm.data.ingest import ingest
src, home, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
report = ingest(src, "bench", cfg=IngestConfig(workers=workers), settings=load_settings(home))
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "stored": len(report.manifest), "peak_rss_mb": peak / 1024,
                  "code": str(Path(brainlm.__file__).parent.parent)}))
"""


def write_inputs(folder: Path, recordings: int, parcels: int, timepoints: int, seed: int = 0) -> int:
    """N random recordings (one per participant), participants.tsv and, unless A424, atlas.tsv; returns bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    if parcels != 424:  # any parcel count: a made-up atlas beside the files (ingest reads SRC/atlas.tsv)
        Atlas(name=f"bench{parcels}", index=np.arange(1, parcels + 1), names=[f"P{i + 1}" for i in range(parcels)],
              coords=rng.uniform(-60, 60, (parcels, 3)).astype(np.float32)).to_tsv(folder / "atlas.tsv")
    ids = [f"sub-{r + 1:05d}" for r in range(recordings)]
    for pid in ids:
        np.save(folder / f"{pid}_task-rest_run-1.npy", rng.standard_normal((timepoints, parcels), dtype=np.float32))
    pd.DataFrame({"participant_id": ids, "age": [20 + r % 60 for r in range(recordings)]}).to_csv(
        folder / "participants.tsv", sep="\t", index=False)
    return sum(p.stat().st_size for p in folder.iterdir())


def run_one(n: int, args: argparse.Namespace, root: Path) -> dict:
    src, home = root / f"src-{n}", root / f"home-{n}"
    input_bytes = write_inputs(src, n, args.parcels, args.timepoints)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAINLM_", "MLFLOW_TRACKING_URI"))}
    env["PYTHONPATH"] = str(Path(args.code).resolve() if args.code else REPO)
    # cwd outside any checkout: `python -c` puts the cwd first on sys.path, before PYTHONPATH.
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(home), str(args.workers)], env=env,
                          cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ingest of {n} recordings failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    code = result.pop("code")
    if Path(code) != Path(env["PYTHONPATH"]):
        raise SystemExit(f"the ingest ran {code}'s brainlm, not {env['PYTHONPATH']}'s")
    if result["stored"] != n:
        raise SystemExit(f"ingest stored {result['stored']} of {n} recordings")
    places = {p.name: p for p in footprint(home)}
    row = {"recordings": n, **result, "recordings_per_s": n / result["seconds"], "input_bytes": input_bytes}
    for name in ("store", "cache", "remote"):
        row[f"{name}_bytes"], row[f"{name}_disk"] = places[name].size, places[name].disk
    if not args.keep:  # the next size needs the disk
        shutil.rmtree(src)
        shutil.rmtree(home)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recordings", type=int, nargs="+", default=[50, 200], help="cohort sizes to ingest")
    p.add_argument("--parcels", type=int, default=424)
    p.add_argument("--timepoints", type=int, default=490)
    p.add_argument("--workers", type=int, default=0, help="ingest processes (0 = one per core)")
    p.add_argument("--code", default=None, help="ingest with the brainlm package in this checkout")
    p.add_argument("--dir", default=None, help="where the inputs and homes go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the inputs and homes")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    mb = 1e6
    print(f"{args.parcels} parcels x {args.timepoints} TRs float32 per recording "
          f"({args.parcels * args.timepoints * 4 / mb:.2f} MB); code: {args.code or REPO}; {os.cpu_count()} CPUs, "
          f"1-min load average {os.getloadavg()[0]:.1f}")
    print("sizes in MB; 'disk' = blocks allocated, a file hard-linked from a place to its left counted there only")
    print(f"{'recordings':>10} {'seconds':>8} {'rec/s':>6} {'peak MB':>8} {'input':>8} {'store':>8} {'store disk':>10} "
          f"{'cache':>8} {'cache disk':>10} {'remote':>8} {'remote disk':>11} {'total disk':>10}")
    rows = []
    root_dir = Path(args.dir) if args.dir else None
    if root_dir:
        root_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="brainlm-ingest-footprint-", dir=root_dir))
    try:
        for n in args.recordings:
            r = run_one(n, args, tmp)
            rows.append(r)
            total = r["store_disk"] + r["cache_disk"] + (r["remote_disk"] or 0)
            print(f"{n:>10} {r['seconds']:>8.1f} {r['recordings_per_s']:>6.1f} {r['peak_rss_mb']:>8.0f} "
                  f"{r['input_bytes'] / mb:>8.1f} {r['store_bytes'] / mb:>8.1f} {r['store_disk'] / mb:>10.1f} "
                  f"{r['cache_bytes'] / mb:>8.1f} {r['cache_disk'] / mb:>10.1f} {r['remote_bytes'] / mb:>8.1f} "
                  f"{(r['remote_disk'] or 0) / mb:>11.1f} {total / mb:>10.1f}", flush=True)
    finally:
        if args.keep:
            print(f"inputs and homes kept in {tmp}")
        else:
            shutil.rmtree(tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
