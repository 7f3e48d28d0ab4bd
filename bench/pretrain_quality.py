"""Pretraining quality: a preset trained on a synthetic cohort for a fixed CPU budget, against the references.

Prints the learning curve — validation masked MSE after each `--eval-every` optimiser steps — beside the
`zero`, `spatial` and `temporal` references scored on exactly the same masks (`brainlm.references`), and the
final ratios model / zero and model / spatial (< 1 beats the reference). Validation is a fixed set of crops of
held-out subjects' recordings with fixed masks, so every point of the curve is comparable.

    PYTHONPATH=. python bench/pretrain_quality.py --preset tiny --seconds 600           # synthetic, 64 parcels
    PYTHONPATH=. python bench/pretrain_quality.py --cohort data/cohorts/demo --seconds 120   # a stored cohort

The budget is process CPU time spent in training steps (evaluation excluded), so other jobs on a shared
machine slow the wall clock but not the figures; wall time is printed too. The cohort is either a stored one
(`--cohort`) or, by default, synthesised with `brainlm.data.synthetic` (which needs scipy) into a temporary
folder and stored there in the cohort layout; `--subjects/--parcels/--timepoints/--recordings/--noise` set
its shape. Training draws random windows from the training recordings (in memory), `batch` per step, through
`brainlm.engine.train_step`, with the engine's AdamW, linear warmup and cosine decay over `--steps`, and
`brainlm.engine.evaluate` scores the model and the references.

Needs torch, numpy and pandas (the store reader); synthesising also scipy, `--plot` also matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from brainlm.config import SynthConfig, TrainConfig, preset
from brainlm.data.atlas import load_atlas
from brainlm.data.scaling import robust_scale
from brainlm.data.store import open_cohort
from brainlm.engine import MaskedWindows, build_optimizer, build_scheduler, evaluate, train_step
from brainlm.model import BrainLM, count_parameters
from brainlm.references import reference_predictors, training_covariance

REFERENCES = ("zero", "spatial", "temporal")


def synthetic_cohort(out: Path, cfg: SynthConfig) -> Path:
    """Synthesise `cfg` under out/raw and store it in the cohort layout at out/cohort (robust-scaled)."""
    from brainlm.data.synthetic import synthesize  # scipy: only when a cohort is synthesised

    raw = synthesize(out / "raw", cfg, overwrite=True)
    cohort = out / "cohort"
    (cohort / "recordings").mkdir(parents=True, exist_ok=True)
    rows = []
    for file in sorted(raw.glob("sub-*.npy")):
        stored = robust_scale(np.load(file), axis=0).T.copy()  # parcels × time, as ingest stores it
        np.save(cohort / "recordings" / file.name, stored)
        rows.append({"recording": file.stem, "participant": file.stem.split("_")[0],
                     "condition": file.stem.split("_")[1].removeprefix("task-"), "timepoints": stored.shape[1],
                     "parcels": stored.shape[0], "checksum": hashlib.sha256(stored.tobytes()).hexdigest(),
                     "source": file.name})
    pd.DataFrame(rows).to_csv(cohort / "manifest.csv", index=False)
    atlas = load_atlas(raw / "atlas.tsv")
    atlas.to_tsv(cohort / "atlas.tsv")
    pd.read_csv(raw / "participants.tsv", sep="\t").to_csv(cohort / "participants.tsv", sep="\t", index=False)
    (cohort / "cohort.json").write_text(json.dumps({"name": "synthetic", "atlas": atlas.name,
                                                    "n_parcels": atlas.n_parcels, "synth": dataclasses.asdict(cfg)}))
    return cohort


def parse_overrides(pairs: list[str]) -> dict:
    """FIELD=VALUE pairs → typed ModelConfig overrides."""
    from brainlm.config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a ModelConfig field")
        kind = type(fields[key].default)
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.cohort:
            cohort, synth = open_cohort(Path(args.cohort)), None
        else:
            synth = SynthConfig(subjects=args.subjects, timepoints=args.timepoints, max_parcels=args.parcels,
                                recordings_per_subject=args.recordings, noise=args.noise, seed=args.data_seed)
            cohort = open_cohort(synthetic_cohort(Path(tmp), synth))
        model_cfg = preset(args.preset, mask_ratio=args.mask, **args.set)
        split = cohort.split(args.val_fraction, args.test_fraction, seed=0)  # test recordings: unused
        if not split["val"]:
            raise SystemExit(f"{len(cohort.participants)} participants leave no validation subject: use more")
        train = [torch.from_numpy(np.array(cohort.recording(r))) for r in split["train"]]
        val_set = cohort.window_dataset(split["val"], model_cfg.window, args.val_crops, seed=1)
        val_windows = [val_set[i] for i in range(len(val_set))]  # in memory: the temporary folder goes
        val = DataLoader(MaskedWindows(val_windows, model_cfg.patch_size, seed=0), batch_size=32)
        coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32)
        refs = reference_predictors(training_covariance(cohort, split))
        shape = {"parcels": cohort.n_parcels, "train_recordings": len(train), "val_windows": len(val_set),
                 "participants": len(cohort.participants),
                 "timepoints": sorted({int(cohort.timepoints(r)) for r in cohort.recording_ids})}

    model = BrainLM(model_cfg)
    cpu = torch.device("cpu")
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch, steps=args.steps, warmup_steps=args.warmup).with_lr_for(model_cfg)
    optimizer = build_optimizer(model, cfg, cpu)
    scheduler = build_scheduler(optimizer, cfg)
    rng = np.random.default_rng(args.seed)

    def score(with_references: bool) -> dict[str, float]:
        return evaluate(model, val, coords, cpu, model_cfg.mask_ratio, refs if with_references else {})

    first = score(True)
    lines = {name: first[f"{name}_mse"] for name in REFERENCES}
    curve = [{"step": 0, "cpu_s": 0.0, "wall_s": 0.0, "model": first["masked_mse"], "r2": first["masked_r2"]}]
    print(f"{args.preset} ({count_parameters(model):,} parameters, mask {model_cfg.mask_ratio}) on "
          f"{'synthetic ' + str(synth) if synth else cohort.path}: {shape}")
    print(f"lr {cfg.lr:.2g} warmup {args.warmup} batch {args.batch} steps {args.steps} budget {args.seconds} CPU-s; "
          f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("references (masked MSE): " + "  ".join(f"{k} {v:.4f}" for k, v in lines.items()))
    print(f"{'step':>6} {'cpu_s':>7} {'wall_s':>7} {'model':>7} {'zero':>7} {'spatial':>7} {'temporal':>8} "
          f"{'/zero':>6} {'/spatial':>8} {'R2':>6}")

    def show(row: dict) -> None:
        print(f"{row['step']:6d} {row['cpu_s']:7.1f} {row['wall_s']:7.1f} {row['model']:7.4f} {lines['zero']:7.4f} "
              f"{lines['spatial']:7.4f} {lines['temporal']:8.4f} {row['model'] / lines['zero']:6.3f} "
              f"{row['model'] / lines['spatial']:8.3f} {row['r2']:6.3f}", flush=True)

    show(curve[0])
    cpu_s = wall_s = 0.0
    for step in range(1, args.steps + 1):
        picks = rng.integers(0, len(train), args.batch)
        starts = [int(rng.integers(0, train[i].shape[1] - model_cfg.window + 1)) for i in picks]
        batch = torch.stack([train[i][:, s : s + model_cfg.window] for i, s in zip(picks, starts, strict=True)])
        c0, w0 = time.process_time(), time.perf_counter()
        train_step(model, batch, coords, optimizer, scheduler, cfg, cpu)
        cpu_s += time.process_time() - c0
        wall_s += time.perf_counter() - w0
        out_of_time = cpu_s >= args.seconds
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            m = score(False)
            curve.append({"step": step, "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1),
                          "model": m["masked_mse"], "r2": m["masked_r2"]})
            show(curve[-1])
        if out_of_time:
            break
    last = curve[-1]
    summary = {"model/zero": last["model"] / lines["zero"], "model/spatial": last["model"] / lines["spatial"],
               "model/temporal": last["model"] / lines["temporal"], "r2": last["r2"], "steps": last["step"]}
    verdict = "beats" if last["model"] < lines["spatial"] else "does not beat"
    print(f"final after {last['step']} steps ({last['cpu_s']:.0f} CPU-s): model/zero {summary['model/zero']:.3f}  "
          f"model/spatial {summary['model/spatial']:.3f}  R² {last['r2']:.3f} — the model {verdict} the spatial "
          f"reference")
    return {"args": {k: v for k, v in vars(args).items() if k not in ("plot_from",)}, "model_config": dataclasses.asdict(model_cfg),
            "cohort": shape, "synth": dataclasses.asdict(synth) if synth else None, "references": lines,
            "reference_r2": {name: first[f"{name}_r2"] for name in REFERENCES}, "curve": curve, "final": summary}


def label(result: dict) -> str:
    """`<preset>` for the default model, `<preset> paper` for the paper's embedding and attention, + overrides."""
    args, cfg = result["args"], result["model_config"]
    paper = cfg["spatial_embedding"] == "mlp" and not cfg["time_bias"]
    rest = {k: v for k, v in args["set"].items() if k not in ("spatial_embedding", "time_bias", "decoder_heads")}
    return f"{args['preset']}{' paper' if paper else ''}" + "".join(f" {k}={v}" for k, v in rest.items())


def plot(results: list[dict], path: str) -> None:
    """One panel per cohort (and mask): model / zero against steps for each run, references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = {}
    for res in results:
        key = json.dumps([res["synth"] or res["args"]["cohort"], res["model_config"]["mask_ratio"]], sort_keys=True)
        panels.setdefault(key, []).append(res)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, runs in zip(axes[0], panels.values(), strict=True):
        refs = runs[0]["references"]
        zero = refs["zero"]
        for res in runs:
            ax.plot([r["step"] for r in res["curve"]], [r["model"] / zero for r in res["curve"]], ".-", ms=3,
                    label=label(res))
        for name, style in (("zero", ":"), ("spatial", "--"), ("temporal", "-.")):
            ax.axhline(refs[name] / zero, ls=style, color="C3" if name == "spatial" else "grey", lw=1, label=name)
        shape, synth = runs[0]["cohort"], runs[0]["synth"]
        noise = f", noise {synth['noise']}" if synth else ""
        ax.set_title(f"{shape['participants']} subj × {shape['timepoints'][0]} TRs, {shape['parcels']} parcels{noise},"
                     f" mask {runs[0]['model_config']['mask_ratio']}", fontsize=8)
        ax.set_xlabel("optimiser steps", fontsize=8)
        ax.set_ylim(0.3, 1.15)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation masked MSE / zero", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="ModelConfig overrides")
    p.add_argument("--mask", type=float, default=0.75, help="mask ratio (training and validation)")
    p.add_argument("--seconds", type=float, default=600.0, help="CPU budget for the training steps")
    p.add_argument("--steps", type=int, default=5000, help="schedule length (training stops at the budget)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's for the width)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup, in steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation points")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batches")
    p.add_argument("--cohort", default=None, help="a stored cohort folder instead of a synthetic one")
    p.add_argument("--subjects", type=int, default=24)
    p.add_argument("--recordings", type=int, default=2, help="recordings per subject")
    p.add_argument("--parcels", type=int, default=64, help="A424 parcels kept (network-balanced)")
    p.add_argument("--timepoints", type=int, default=300)
    p.add_argument("--noise", type=float, default=0.5, help="parcel noise relative to the network signal")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of participants for validation")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of participants held out, unused")
    p.add_argument("--val-crops", type=int, default=4, help="fixed validation windows per recording")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, help="also draw the curve into this PNG (needs matplotlib)")
    p.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                   help="only draw --plot from earlier --json outputs (no training)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.steps < 1 or args.eval_every < 1 or not 0 <= args.warmup < args.steps:
        p.error("--seconds must be > 0, --steps and --eval-every >= 1, and 0 <= --warmup < --steps")
    args.set = parse_overrides(args.set)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.plot_from:
        if not args.plot:
            raise SystemExit("--plot-from needs --plot PNG")
        plot([json.loads(Path(p).read_text()) for p in args.plot_from], args.plot)
        return None
    torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot([result], args.plot)
    return result


if __name__ == "__main__":
    main()
