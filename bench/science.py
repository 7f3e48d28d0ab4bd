"""What a pretrained BrainLM knows and how it compares, on a larger synthetic cohort, printed as tables.

Sections (`--sections`, default all):
    forecast   forecasting: BrainLM against every baseline on the same subjects
    clinical   clinical prediction of each `--targets` phenotype, the same way
    networks   network identification: kNN of parcels into the atlas's networks from the model's attention,
               against functional connectivity, an untrained model and the centroids (Yeo-7 and the 12
               Cole-Anticevic labels), with each label set's planted ceiling

One synthetic population (same networks, dynamics, phenotype effects) is split by subject: a pretraining cohort
and a disjoint task cohort, so no subject a section reads was seen in pretraining. BrainLM (`--preset`) is
pretrained on the pretraining cohort by the training engine itself (brainlm/engine.py: the launcher's loaders,
steps and evaluation, without Ray or MLflow: `train_in_process`), then every section runs on the task cohort through the same library
calls `brainlm evaluate` and `brainlm networks` make (without MLflow). Each section is one function returning its
text, listed in `SECTIONS`.

What the 12-network row means: the generator plants the Yeo-7 partition, so the parcels of one Yeo network share
one signal and nothing in the data separates, say, CAB-NP's Visual1 from Visual2 inside Yeo's Visual. The
`planted ceiling` printed beside each label set is the accuracy of the best classifier that knows each parcel's
planted network exactly (the majority label within each planted network); above it, a method must be using
anatomy (centroids), not the signals.

    PYTHONPATH=. .venv/bin/python bench/science.py                      # about 30 min on 2 busy CPU cores
    PYTHONPATH=. .venv/bin/python bench/science.py --quick              # a smoke run, a few minutes
    PYTHONPATH=. .venv/bin/python bench/science.py --sections networks --parcels 128 ...   # see bench/README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from brainlm.config import (
    ClinicalConfig,
    ForecastConfig,
    ModelConfig,
    NetworksConfig,
    SynthConfig,
    TrainConfig,
    preset,
)
from brainlm.data import store
from brainlm.data.atlas import Atlas, load_atlas
from brainlm.data.scaling import robust_scale
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import GroundTruth, load_ground_truth, synthesize
from brainlm.engine import train_in_process
from brainlm.model import BrainLM
from brainlm.tasks.clinical import run_clinical
from brainlm.tasks.common import BrainLMBackbone, table_markdown, table_text
from brainlm.tasks.forecast import run_forecast
from brainlm.tasks.networks import cohort_recordings, labelled_parcels, network_table

CPU = torch.device("cpu")
NETWORK_LABELS = ("yeo7", "cole_anticevic")


@dataclass
class Inputs:
    """What every section reads: the task cohort, the pretrained model, and what the generator planted."""

    cohort: Cohort
    model: BrainLM
    truth: GroundTruth


def store_cohort(src: Path, out: Path, participants: set[str]) -> Path:
    """The recordings of `participants` from a synthetic input folder, as a stored cohort (robust-scaled), written
    by the store's own writers."""
    rows = []
    for file in sorted(src.glob("sub-*.npy")):
        participant, condition = file.stem.split("_")[0], file.stem.split("_")[1].removeprefix("task-")
        if participant in participants:
            stored = robust_scale(np.load(file), axis=0).T.copy()  # parcels × time float32
            store.write_recording(out, file.stem, stored)
            rows.append(store.manifest_row(file.stem, participant, condition, file.name, stored))
    phenotypes = pd.read_csv(src / "participants.tsv", sep="\t", dtype={"participant_id": str})
    return store.write_cohort(out, pd.DataFrame(rows), load_atlas(src / "atlas.tsv"),
                              phenotypes[phenotypes["participant_id"].isin(participants)])


def cohorts(root: Path, cfg: SynthConfig, task_subjects: int) -> tuple[Cohort, Cohort, GroundTruth]:
    """(task cohort, pretraining cohort, ground truth) from one synthetic population, split by subject."""
    src = synthesize(root / "raw", cfg)
    people = pd.read_csv(src / "participants.tsv", sep="\t")["participant_id"].tolist()
    return (open_cohort(store_cohort(src, root / "task", set(people[:task_subjects]))),
            open_cohort(store_cohort(src, root / "pretrain", set(people[task_subjects:]))), load_ground_truth(src))


def pretrain(cohort: Cohort, model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[BrainLM, dict]:
    """The engine's pretraining in this process (`train_in_process`), printing every evaluation. Returns the model
    and its last held-out masked MSE / predicting zero's."""
    def show(m: dict[str, float]) -> None:
        print(f"  pretrain step {m['step']}/{train_cfg.steps}: val masked MSE {m['val_masked_mse']:.4f} "
              f"({m['val_masked_mse'] / m['val_zero_mse']:.3f} × predicting zero; spatial reference "
              f"{m['val_spatial_mse'] / m['val_zero_mse']:.3f} ×, temporal {m['val_temporal_mse'] / m['val_zero_mse']:.3f} ×)",
              flush=True)

    run = train_in_process(cohort, model_cfg, train_cfg, CPU, show)
    m = run.metrics
    return run.model, {"val_masked_mse_vs_zero": m["val_masked_mse"] / m["val_zero_mse"], "pretrain_seconds": run.seconds}


# ------------------------------------------------------------------------------------------- sections


def forecast_section(inputs: Inputs, args) -> str:
    cfg = ForecastConfig(steps=args.finetune_steps, seed=args.seed)
    result = run_forecast(inputs.cohort, BrainLMBackbone(inputs.model), cfg, progress=_quiet(args))
    t = result.table
    gap = t.loc["brainlm", "mse"] / t.loc["var", "mse"]
    return "\n".join([
        f"## Forecasting ({result.sizes['train_subjects']} training / {result.sizes['test_subjects']} test subjects, "
        f"{result.sizes['test_windows']} test windows; last {result.horizon} of {result.window} TRs)", "",
        table_text(t), "", table_markdown(t),
        f"brainlm vs var: MSE {t.loc['brainlm', 'mse']:.4f} vs {t.loc['var', 'mse']:.4f} ({gap:.2f}×), "
        f"R² {t.loc['brainlm', 'r2']:.3f} vs {t.loc['var', 'r2']:.3f}; "
        f"brainlm vs scratch: R² {t.loc['brainlm', 'r2']:.3f} vs {t.loc['scratch', 'r2']:.3f}",
    ])


def clinical_section(inputs: Inputs, args) -> str:
    parts, backbone = [], BrainLMBackbone(inputs.model)
    for target in args.targets:
        cfg = ClinicalConfig(target=target, folds=args.folds, steps=args.finetune_steps, seed=args.seed,
                             refit=False)
        result = run_clinical(inputs.cohort, backbone, cfg, progress=_quiet(args))
        table = result.table
        if args.paper_head:  # the paper's head on the CLS embedding, beside the connectivity-pooled one
            cls = run_clinical(inputs.cohort, backbone, dataclasses.replace(cfg, pooling="cls", models=("brainlm",)),
                               progress=_quiet(args)).table.rename(index={"brainlm": "brainlm_cls"})
            table = pd.concat([table, cls])
        parts += [f"## Clinical: {target} ({result.task}, {result.sizes['subjects']} subjects, "
                  f"{result.sizes['folds']}-fold CV; mean [95 % CI] across folds)", "", table_text(table), "",
                  table_markdown(table)]
    return "\n".join(parts)


def networks_section(inputs: Inputs, args) -> str:
    """kNN balanced accuracy of every method for each label set, beside chance and the planted ceiling."""
    cohort = inputs.cohort
    cfg = NetworksConfig(max_recordings=args.network_recordings, seed=args.seed)
    columns = [c for c in NETWORK_LABELS if c in cohort.atlas.networks]
    table = network_table(inputs.model, cohort_recordings(cohort, cfg), cohort.atlas, columns, cfg)
    planted = inputs.truth.parcel_networks(cohort.atlas.index)
    parts = [f"## Networks ({min(cfg.max_recordings, len(cohort.recording_ids))} recordings of the task cohort; "
             f"attention from the {cfg.source}, mean over blocks; kNN k={cfg.neighbours}, {cfg.folds} stratified "
             f"folds)"]
    for column in columns:
        rows = table[table["labels"] == column].set_index("method")[["accuracy", "balanced_accuracy"]]
        ceiling = planted_ceiling(cohort.atlas, column, planted)
        first = table[table["labels"] == column].iloc[0]
        rows.loc["chance"] = [first["chance_accuracy"], first["chance_balanced"]]
        rows.loc["planted ceiling"] = list(ceiling)
        parts += ["", f"{column}: {int(first['networks'])} networks, {int(first['parcels'])} labelled parcels",
                  table_text(rows, ".3f")]
    return "\n".join(parts)


def planted_ceiling(atlas: Atlas, column: str, planted: list[str]) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of predicting each planted network's majority label in `column`."""
    positions, labels, _, _ = labelled_parcels(atlas, column)
    truth = pd.DataFrame({"planted": [planted[p] for p in positions], "label": labels})
    majority = truth.groupby("planted")["label"].agg(lambda s: s.value_counts().index[0])
    predicted = truth["planted"].map(majority)
    return float((predicted == truth["label"]).mean()), float(balanced_accuracy_score(truth["label"], predicted))


SECTIONS: dict[str, Callable[[Inputs, argparse.Namespace], str]] = {
    "forecast": forecast_section,
    "clinical": clinical_section,
    "networks": networks_section,
}


def _quiet(args) -> Callable[[str], None]:
    return print if args.verbose else (lambda line: print(line, flush=True) if not line.startswith("  ") else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=100, help="task cohort subjects")
    p.add_argument("--pretrain-subjects", type=int, default=60)
    p.add_argument("--parcels", type=int, default=64)
    p.add_argument("--timepoints", type=int, default=600)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--targets", nargs="+", default=["age", "sex"])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--paper-head", action="store_true", help="also the CLS-pooled head (the paper's)")
    p.add_argument("--network-recordings", type=int, default=8, help="networks: recordings the features come from")
    p.add_argument("--quick", action="store_true", help="a smoke run: small cohort, few steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.pretrain_subjects, args.parcels, args.timepoints = 16, 8, 20, 300
        args.pretrain_steps, args.finetune_steps, args.folds, args.window = 20, 5, 2, 100
        args.network_recordings = 2
    torch.set_num_threads(args.threads)
    synth = SynthConfig(subjects=args.subjects + args.pretrain_subjects, timepoints=args.timepoints,
                        max_parcels=args.parcels, noise=args.noise, seed=args.seed)
    model_cfg = preset(args.preset, window=args.window, mask_ratio=0.5, decoder_hidden=64)
    train_cfg = TrainConfig(steps=args.pretrain_steps, eval_every=max(1, args.pretrain_steps // 5), lr=3e-3,
                            batch_size=16, warmup_steps=round(0.05 * args.pretrain_steps), val_fraction=0.1,
                            test_fraction=0.0, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        task, pre, truth = cohorts(Path(tmp), synth, args.subjects)
        print(f"# brainlm science bench: {args.subjects} task + {args.pretrain_subjects} pretraining subjects × "
              f"{synth.recordings_per_subject} recordings × {args.timepoints} TRs, {task.n_parcels} parcels, noise "
              f"{args.noise}; {args.preset} (window {args.window}, mask 0.5, decoder 64), {args.pretrain_steps} "
              f"pretraining and {args.finetune_steps} fine-tuning steps\n", flush=True)
        model, info = pretrain(pre, model_cfg, train_cfg)
        print(f"pretrained: val masked MSE {info['val_masked_mse_vs_zero']:.3f} × predicting zero "
              f"({info['pretrain_seconds']:.0f} s)\n", flush=True)
        for name in args.sections:
            start = time.perf_counter()
            text = SECTIONS[name](Inputs(task, model, truth), args)
            print(f"{text}\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
