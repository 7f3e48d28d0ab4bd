"""Ingest throughput: recordings/s for NIfTI → parcels, serial vs a process pool (optionally Ray).

Times the per-file stage of `brainlm ingest` and nothing else: read the 4D image (gzip included), resample
the atlas to its grid (cached per grid in each worker), NiftiLabelsMasker mean per parcel, checks, robust
scaling, and the write of the stored parcels × time array. Validation (GX) and versioning (DVC) run once
per ingest, not per file, and are left out.

The images are synthetic, on the shipped A424 MNI 2 mm grid (91 × 109 × 91) by default: every voxel
carries its parcel's series plus noise. Both runs must store identical bytes (checked).

    .venv/bin/python bench/ingest_throughput.py --files 8 --timepoints 60 --workers 2
    .venv/bin/python bench/ingest_throughput.py --executor ray
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from brainlm.data.atlas import load_atlas
from brainlm.data.ingest import Job, Source, parallel_map, process_source


def write_images(folder: Path, files: int, timepoints: int, suffix: str) -> tuple[list[Path], object]:
    """`files` 4D images on the A424 label grid; returns their paths and the atlas."""
    atlas = load_atlas("A424")
    label_img = nib.load(atlas.label_image)
    labels = np.rint(np.asarray(label_img.dataobj)).astype(np.int32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(files):
        lut = 100 + rng.standard_normal((timepoints, int(labels.max()) + 1)).astype(np.float32)
        data = np.moveaxis(lut[:, labels], 0, -1)
        data += 0.1 * rng.standard_normal(data.shape, dtype=np.float32)
        path = folder / f"sub-{i:03d}_task-rest_bold{suffix}"
        nib.save(nib.Nifti1Image(data, label_img.affine), path)
        paths.append(path)
    return paths, atlas


def run(paths: list[Path], atlas, out: Path, workers: int, executor: str, timepoints: int) -> tuple[float, float, list]:
    """Wall and this process's CPU seconds for the per-file stage, and the stored checksums (to compare runs)."""
    (out / "recordings").mkdir(parents=True)
    jobs = [
        Job(Source(p, p.name, "nifti", p.name.split(".")[0], p.name.split("_")[0], "rest"),
            atlas.index, str(atlas.label_image), timepoints, None if executor == "ray" else str(out))
        for p in paths
    ]
    start, cpu = time.perf_counter(), time.process_time()
    outcomes = parallel_map(process_source, jobs, workers=workers, executor=executor)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    failed = [o.rejection for o in outcomes if o.rejection is not None]
    if failed:
        raise SystemExit(f"benchmark inputs were rejected: {failed}")
    return seconds, cpu, [o.stats["checksum"] for o in outcomes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--timepoints", type=int, default=60)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel run's worker count")
    p.add_argument("--executor", choices=["process", "ray"], default="process", help="parallel run's executor")
    p.add_argument("--uncompressed", action="store_true", help=".nii instead of .nii.gz (no gunzip cost)")
    args = p.parse_args()

    suffix = ".nii" if args.uncompressed else ".nii.gz"
    with tempfile.TemporaryDirectory(prefix="brainlm-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        t0 = time.perf_counter()
        paths, atlas = write_images(tmp / "src", args.files, args.timepoints, suffix)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
        print(f"inputs: {args.files} × 91×109×91×{args.timepoints} float32 {suffix} ({size:.0f} MiB each on disk), "
              f"A424 ({atlas.n_parcels} parcels); written in {time.perf_counter() - t0:.1f} s; "
              f"{os.cpu_count()} CPU cores")
        serial, serial_cpu, serial_sums = run(paths, atlas, tmp / "serial", 1, "process", args.timepoints)
        parallel, _, parallel_sums = run(paths, atlas, tmp / "parallel", args.workers, args.executor,
                                         args.timepoints)
        if serial_sums != parallel_sums:
            raise SystemExit("serial and parallel runs stored different bytes")
        label = f"{args.executor}, {args.workers} workers"
        print(f"serial   (1 worker, in-process): {args.files / serial:6.2f} recordings/s  ({serial:.1f} s; "
              f"{serial_cpu / args.files:.2f} CPU s per recording, first-file imports included)")
        print(f"parallel ({label}): {args.files / parallel:6.2f} recordings/s  ({parallel:.1f} s, "
              f"{serial / parallel:.2f}× serial; includes pool start-up)")
        # Shared machines: a load above the core count means other work took CPU from both runs.
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
