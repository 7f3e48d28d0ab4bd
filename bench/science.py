"""Science figures: what a pretrained BrainLM knows, against the synthetic cohort's planted answers.

    PYTHONPATH=. .venv/bin/python bench/science.py networks                       # defaults below
    PYTHONPATH=. .venv/bin/python bench/science.py networks --parcels 424 --steps 3000

Section `networks`. A synthetic cohort (`brainlm.data.synthetic`: Yeo-7 networks planted on A424 parcels, plus
one group each for the subcortex and the cerebellum) is written to a temporary folder and robust-scaled as the
store does; a tiny BrainLM is pretrained on it (self-supervised, a plain torch loop, no labels); then parcels are
classified by kNN into the atlas's networks from four feature sets on the same folds (`brainlm.tasks.networks`):
the model's attention, functional connectivity, the untrained model's attention, and the centroids. Printed for
the Yeo-7 labels and for the 12 Cole-Anticevic (CAB-NP) labels.

What the 12-network row means here: the generator plants the Yeo-7 partition, so the parcels of one Yeo network
share one signal and nothing in the data separates, say, CAB-NP's Visual1 from Visual2 inside Yeo's Visual. The
`planted ceiling` printed beside each label set is the accuracy of the best classifier that knows each parcel's
planted network exactly (the majority 12-network label within each planted network); above it, a method must be
using anatomy (centroids), not the signals.

Needs torch, numpy, pandas, scipy and scikit-learn only (no Ray, Prefect, MLflow).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from brainlm.config import NetworksConfig, SynthConfig, TrainConfig, preset
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.data.scaling import robust_scale
from brainlm.data.synthetic import load_ground_truth, synthesize
from brainlm.model import BrainLM
from brainlm.tasks.networks import labelled_parcels, network_table
from brainlm.train import build_optimizer, lr_lambda, train_step

LABELS = ("yeo7", "cole_anticevic")


def pretrain(recordings: list[np.ndarray], coords: np.ndarray, model: BrainLM, cfg: TrainConfig,
             steps: int) -> float:
    """`steps` optimiser steps on random window crops of parcels × time `recordings`; returns the last loss."""
    data = [torch.from_numpy(r) for r in recordings]
    centroids = torch.from_numpy(coords)
    window = model.cfg.window
    optimizer = build_optimizer(model, cfg, "cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(0, len(data), (cfg.batch_size,), generator=generator).tolist()
        batch = []
        for r in rows:
            start = int(torch.randint(0, data[r].shape[1] - window + 1, (1,), generator=generator))
            batch.append(data[r][:, start : start + window])
        loss = train_step(model, torch.stack(batch), centroids, optimizer, scheduler, cfg, torch.device("cpu"))
    return float(loss)


def planted_ceiling(atlas: Atlas, column: str, planted: list[str]) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of predicting each planted network's majority label in `column`."""
    positions, labels, _, _ = labelled_parcels(atlas, column)
    truth = pd.DataFrame({"planted": [planted[p] for p in positions], "label": labels})
    majority = truth.groupby("planted")["label"].agg(lambda s: s.value_counts().index[0])
    predicted = truth["planted"].map(majority)
    return float((predicted == truth["label"]).mean()), float(balanced_accuracy_score(truth["label"], predicted))


def networks(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    synth = SynthConfig(subjects=args.subjects, timepoints=args.timepoints, seed=args.seed,
                        max_parcels=None if args.parcels >= load_atlas("A424").n_parcels else args.parcels)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = synthesize(Path(tmp), synth)
        truth = load_ground_truth(folder)
        atlas = load_atlas(folder / "atlas.tsv")
        recordings = [robust_scale(np.load(folder / f"{r['recording']}.npy"), axis=0).T.copy()
                      for r in truth.info["recordings"]]
        synthesised = time.perf_counter() - started

    model_cfg = preset("tiny", window=args.window, decoder_hidden=64)
    train_cfg = TrainConfig(lr=args.lr, batch_size=args.batch, warmup_fraction=0.05, seed=args.seed)
    torch.manual_seed(args.seed)
    model = BrainLM(model_cfg)
    started = time.perf_counter()
    loss = pretrain(recordings, atlas.coords, model, train_cfg, args.steps)
    trained = time.perf_counter() - started
    zero = float(np.mean([np.mean(r**2) for r in recordings]))

    cfg = NetworksConfig(max_recordings=args.recordings, seed=args.seed)
    chosen = np.random.default_rng(args.seed).choice(len(recordings), min(args.recordings, len(recordings)),
                                                     replace=False)
    started = time.perf_counter()
    table = network_table(model.eval(), lambda: (recordings[i] for i in sorted(chosen)), atlas, list(LABELS), cfg)
    scored = time.perf_counter() - started

    planted = truth.parcel_networks(atlas.index)
    print(f"networks: synthetic cohort, {len(recordings)} recordings x {atlas.n_parcels} parcels x "
          f"{args.timepoints} TRs (seed {args.seed}); tiny BrainLM (window {args.window}, decoder 64) pretrained "
          f"{args.steps} steps, batch {args.batch}, lr {args.lr:g}: last loss {loss:.3f} (predicting zero: "
          f"{zero:.3f})")
    print(f"features from {len(chosen)} recordings; attention: {cfg.source}, layer "
          f"{'mean' if cfg.layer is None else cfg.layer}; kNN k={cfg.neighbours}, {cfg.folds} stratified folds")
    print(f"time: synthesise {synthesised:.0f} s, pretrain {trained:.0f} s, features + kNN {scored:.0f} s "
          f"({args.threads} thread(s))")
    for column in LABELS:
        rows = table[table["labels"] == column]
        ceiling = planted_ceiling(atlas, column, planted)
        print(f"\n{column}: {int(rows['networks'].iloc[0])} networks, {int(rows['parcels'].iloc[0])} labelled "
              f"parcels")
        print(f"{'method':<16}{'accuracy':>9}{'balanced_accuracy':>19}")
        for _, row in rows.iterrows():
            print(f"{row['method']:<16}{row['accuracy']:>9.3f}{row['balanced_accuracy']:>19.3f}")
        print(f"{'chance':<16}{rows['chance_accuracy'].iloc[0]:>9.3f}{rows['chance_balanced'].iloc[0]:>19.3f}")
        print(f"{'planted ceiling':<16}{ceiling[0]:>9.3f}{ceiling[1]:>19.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = parser.add_subparsers(dest="section", required=True)
    s = sections.add_parser("networks", help="network identification table (Yeo-7 and 12-network labels)")
    s.add_argument("--parcels", type=int, default=128, help="A424 parcels kept (network-balanced); 424 = all")
    s.add_argument("--subjects", type=int, default=24, help="two recordings each, one rest and one task")
    s.add_argument("--timepoints", type=int, default=300)
    s.add_argument("--window", type=int, default=100, help="model window in TRs (a multiple of 20)")
    s.add_argument("--steps", type=int, default=1200)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--recordings", type=int, default=8, help="recordings the features are computed from")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=networks)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
