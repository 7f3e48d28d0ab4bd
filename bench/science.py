"""The full downstream comparison on a larger synthetic cohort: forecasting and clinical prediction, every model
against its baselines on the same subjects, printed as tables.

One synthetic population (same dynamics, same phenotype effects) is split by subject: a pretraining cohort and a
disjoint task cohort, so no subject a task tests on was seen in pretraining. BrainLM (`--preset`) is pretrained
on the pretraining cohort by the training engine itself (brainlm/engine.py: the launcher's loaders, steps and
evaluation, without Ray or MLflow), then every task runs on the task cohort through the same library calls
`brainlm evaluate` makes (without MLflow). Each task is one function returning its table, so more
sections (e.g. network classification) are added as more functions in `SECTIONS`.

    PYTHONPATH=. .venv/bin/python bench/science.py                      # about 30 min on 2 busy CPU cores
    PYTHONPATH=. .venv/bin/python bench/science.py --quick              # a smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainlm.config import ClinicalConfig, ForecastConfig, ModelConfig, SynthConfig, TrainConfig, preset
from brainlm.data import store
from brainlm.data.atlas import load_atlas
from brainlm.data.scaling import robust_scale
from brainlm.data.store import Cohort, open_cohort
from brainlm.data.synthetic import synthesize
from brainlm.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    evaluation_steps,
    make_loaders,
    train_steps,
)
from brainlm.model import BrainLM
from brainlm.tasks.clinical import run_clinical
from brainlm.tasks.common import BrainLMBackbone, table_markdown, table_text
from brainlm.tasks.forecast import run_forecast

CPU = torch.device("cpu")


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


def cohorts(root: Path, cfg: SynthConfig, task_subjects: int) -> tuple[Cohort, Cohort]:
    """(task cohort, pretraining cohort) from one synthetic population, split by subject."""
    src = synthesize(root / "raw", cfg)
    people = pd.read_csv(src / "participants.tsv", sep="\t")["participant_id"].tolist()
    return (open_cohort(store_cohort(src, root / "task", set(people[:task_subjects]))),
            open_cohort(store_cohort(src, root / "pretrain", set(people[task_subjects:]))))


def pretrain(cohort: Cohort, model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[BrainLM, dict]:
    """The engine's pretraining without Ray: its loaders, steps and evaluation points (every `eval_every` steps,
    on held-out subjects' fixed masks). Returns the model and its last held-out masked MSE / predicting zero's."""
    torch.manual_seed(train_cfg.seed)
    model = BrainLM(model_cfg)
    optimizer = build_optimizer(model, train_cfg, CPU)
    scheduler = build_scheduler(optimizer, train_cfg)
    loaders = make_loaders(cohort, model_cfg, train_cfg, CPU)
    batches, coords = iter(loaders.train), torch.as_tensor(cohort.atlas.coords)
    step, seconds = 0, 0.0
    for stop in evaluation_steps(0, train_cfg):
        _, took = train_steps(model, batches, stop - step, coords, optimizer, scheduler, train_cfg, CPU)
        step, seconds = stop, seconds + took
        m = evaluate(model, loaders.val, coords, CPU, model_cfg.mask_ratio)
        print(f"  pretrain step {step}/{train_cfg.steps}: val masked MSE {m['masked_mse']:.4f} "
              f"({m['masked_mse'] / m['zero_mse']:.3f} × predicting zero)", flush=True)
    return model.eval(), {"val_masked_mse_vs_zero": m["masked_mse"] / m["zero_mse"], "pretrain_seconds": seconds}


# ------------------------------------------------------------------------------------------- sections


def forecast_section(cohort: Cohort, backbone, args) -> str:
    cfg = ForecastConfig(steps=args.finetune_steps, seed=args.seed)
    result = run_forecast(cohort, backbone, cfg, progress=_quiet(args))
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


def clinical_section(cohort: Cohort, backbone, args) -> str:
    parts = []
    for target in args.targets:
        cfg = ClinicalConfig(target=target, folds=args.folds, steps=args.finetune_steps, seed=args.seed,
                             refit=False)
        result = run_clinical(cohort, backbone, cfg, progress=_quiet(args))
        table = result.table
        if args.paper_head:  # the paper's head on the CLS embedding, beside the connectivity-pooled one
            cls = run_clinical(cohort, backbone, dataclasses.replace(cfg, pooling="cls", models=("brainlm",)),
                               progress=_quiet(args)).table.rename(index={"brainlm": "brainlm_cls"})
            table = pd.concat([table, cls])
        parts += [f"## Clinical: {target} ({result.task}, {result.sizes['subjects']} subjects, "
                  f"{result.sizes['folds']}-fold CV; mean [95 % CI] across folds)", "", table_text(table), "",
                  table_markdown(table)]
    return "\n".join(parts)


SECTIONS: dict[str, Callable[[Cohort, object, argparse.Namespace], str]] = {
    "forecast": forecast_section,
    "clinical": clinical_section,
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
    p.add_argument("--quick", action="store_true", help="a smoke run: small cohort, few steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.pretrain_subjects, args.parcels, args.timepoints = 16, 8, 20, 300
        args.pretrain_steps, args.finetune_steps, args.folds, args.window = 20, 5, 2, 100
    torch.set_num_threads(args.threads)
    synth = SynthConfig(subjects=args.subjects + args.pretrain_subjects, timepoints=args.timepoints,
                        max_parcels=args.parcels, noise=args.noise, seed=args.seed)
    model_cfg = preset(args.preset, window=args.window, mask_ratio=0.5, decoder_hidden=64)
    train_cfg = TrainConfig(steps=args.pretrain_steps, eval_every=max(1, args.pretrain_steps // 5), lr=3e-3,
                            batch_size=16, warmup_steps=round(0.05 * args.pretrain_steps), val_fraction=0.1,
                            test_fraction=0.0, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        task, pre = cohorts(Path(tmp), synth, args.subjects)
        print(f"# brainlm science bench: {args.subjects} task + {args.pretrain_subjects} pretraining subjects × "
              f"{synth.recordings_per_subject} recordings × {args.timepoints} TRs, {task.n_parcels} parcels, noise "
              f"{args.noise}; {args.preset} (window {args.window}, mask 0.5, decoder 64), {args.pretrain_steps} "
              f"pretraining and {args.finetune_steps} fine-tuning steps\n", flush=True)
        model, info = pretrain(pre, model_cfg, train_cfg)
        print(f"pretrained: val masked MSE {info['val_masked_mse_vs_zero']:.3f} × predicting zero "
              f"({info['pretrain_seconds']:.0f} s)\n", flush=True)
        for name in args.sections:
            start = time.perf_counter()
            text = SECTIONS[name](task, BrainLMBackbone(model), args)
            print(f"{text}\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
