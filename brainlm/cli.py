"""`brainlm ...`: each subcommand is a thin call into the library.

Imports are lazy so `brainlm presets` answers in a second instead of loading Ray, MLflow and nilearn.
Expected failures (bad input, missing cohort, unknown preset) print one clear message and exit non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_presets(args: argparse.Namespace) -> None:
    import torch

    from brainlm.config import PRESETS
    from brainlm.model import BrainLM, count_parameters

    print(f"{'preset':<7} {'params':>9}  {'hidden×layers (heads)':<22} {'decoder':<14} window/patch")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # count without allocating 650M parameters
            n = count_parameters(BrainLM(cfg))
        enc = f"{cfg.hidden}×{cfg.layers} ({cfg.heads})"
        dec = f"{cfg.decoder_hidden}×{cfg.decoder_layers}"
        print(f"{name:<7} {n / 1e6:>8.2f}M  {enc:<22} {dec:<14} {cfg.window}/{cfg.patch_size}")


def cmd_synth(args: argparse.Namespace) -> None:
    from brainlm.config import SynthConfig
    from brainlm.data.synthetic import synthesize

    cfg = SynthConfig(
        subjects=args.subjects, timepoints=args.timepoints, parcels_from=args.parcels_from,
        max_parcels=args.max_parcels, seed=args.seed,
    )
    out = synthesize(Path(args.out), cfg, overwrite=args.overwrite)
    print(f"synthetic cohort written to {out} (ingest it with: brainlm ingest {out} --cohort NAME)")


def cmd_ingest(args: argparse.Namespace) -> None:
    from brainlm.config import IngestConfig
    from brainlm.data.ingest import ingest

    cfg = IngestConfig(
        min_timepoints=args.min_timepoints, skip_invalid=args.skip_invalid, workers=args.workers,
        push=not args.no_push, executor=args.executor,
    )
    report = ingest(Path(args.src), args.cohort, atlas=args.atlas, atlas_image=args.atlas_image, cfg=cfg)
    print(report.summary())


def cmd_data_versions(args: argparse.Namespace) -> None:
    from brainlm.data.versioning import versions

    rows = versions()
    if not rows:
        print("no cohort versions yet: run `brainlm ingest SRC --cohort NAME` first")
    for v in rows:
        print(f"{v.rev[:10]}  {v.date}  {v.md5}  {v.message}")


def cmd_data_checkout(args: argparse.Namespace) -> None:
    from brainlm.data.versioning import checkout

    checkout(args.rev)
    print(f"data/ restored to version {args.rev}")


def cmd_data_export(args: argparse.Namespace) -> None:
    from brainlm.data.export import export_cohort

    out = export_cohort(args.cohort, Path(args.out))
    print(f"cohort {args.cohort} exported to {out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from brainlm.config import TrainConfig, preset
    from brainlm.pipelines import pretrain, with_overrides

    # Options left unset keep the preset's / TrainConfig's value (the same rule the Prefect flow uses).
    model_cfg = with_overrides(preset(args.preset), mask_ratio=args.mask_ratio)
    train_cfg = with_overrides(
        TrainConfig(), epochs=args.epochs, batch_size=args.batch_size, num_workers=args.workers,
        use_gpu=args.gpu or None, lr=args.lr, seed=args.seed,
    )
    result = pretrain(args.cohort, model_cfg, train_cfg, preset_name=args.preset)
    print(result.summary())


def cmd_models(args: argparse.Namespace) -> None:
    from brainlm.registry import list_models

    rows = list_models()
    if not rows:
        print("no registered models yet: run `brainlm pretrain --cohort NAME` (or `make demo`) first")
    for m in rows:
        aliases = ",".join(m["aliases"]) or "-"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(m["metrics"].items()))
        print(f"{m['name']} v{m['version']}  aliases={aliases}  run={m['run_id']}  data={m.get('data_version') or '-'}"
              f"  {metrics}")


def cmd_promote(args: argparse.Namespace) -> None:
    from brainlm.registry import promote

    promote(args.name, args.version, alias=args.alias)
    print(f"{args.name} version {args.version} is now @{args.alias}")


def _layer(text: str) -> int | None:
    """--layer: a block index (negative counts from the end) or "mean" for the average over blocks."""
    return None if text == "mean" else int(text)


def cmd_networks(args: argparse.Namespace) -> None:
    from brainlm.config import NetworksConfig
    from brainlm.tasks.runs import run_networks

    cfg = NetworksConfig(
        labels=args.labels, source=args.source, layer=args.layer, neighbours=args.neighbours, folds=args.folds,
        max_recordings=args.max_recordings, max_windows=args.max_windows, seed=args.seed,
    )
    print(run_networks(args.cohort, cfg, model_uri=args.model, report_dir=args.report).summary())


def cmd_attention(args: argparse.Namespace) -> None:
    from brainlm.config import AttentionConfig
    from brainlm.tasks.runs import run_attention

    cfg = AttentionConfig(layer=args.layer, resolution=args.resolution, max_windows=args.max_windows,
                          permutations=args.permutations, alpha=args.alpha, networks=args.networks, seed=args.seed)
    groups = tuple(args.groups) if args.groups else None
    report = run_attention(args.cohort, args.by, groups, args.threshold, cfg, model_uri=args.model,
                           report_dir=args.report)
    print(report.summary())


def cmd_perturb(args: argparse.Namespace) -> None:
    from brainlm.config import PerturbConfig
    from brainlm.errors import ConfigError
    from brainlm.tasks.runs import register_perturbation_model, run_drive, run_perturb

    cfg = PerturbConfig(
        mode=args.mode, representation=args.representation, sparsity=args.sparsity, steps=args.steps, lr=args.lr,
        horizon=args.horizon, max_recordings=args.max_recordings, max_windows=args.max_windows,
        networks=args.networks, seed=args.seed,
    )
    if args.drive:
        parcels = [p.strip() for p in args.drive.split(",") if p.strip()]
        report = run_drive(args.cohort, parcels, args.signal, args.amplitude, args.period, cfg,
                           model_uri=args.model, report_dir=args.report)
        print(report.summary())
    elif args.by:
        if args.threshold is None and not (args.source and args.target):
            raise ConfigError("--by needs --source A --target B (two values of the column) or --threshold X")
        groups = (args.source, args.target) if args.threshold is None else None
        report = run_perturb(args.cohort, args.by, groups, args.threshold, cfg, model_uri=args.model,
                             report_dir=args.report)
        print(report.summary())
    elif not args.register:
        raise ConfigError("brainlm perturb needs --by COLUMN --source A --target B, --drive PARCELS, or --register")
    if args.register:
        version = register_perturbation_model(args.cohort, args.model)
        print(f"registered {version.name} version {version.version} @challenger (serving: brainlm/serving_perturbation.py)")


def build_parser() -> argparse.ArgumentParser:
    # The interpretation commands' defaults come from their configs (brainlm.config imports nothing heavy).
    from brainlm.config import AttentionConfig, NetworksConfig, PerturbConfig

    p = argparse.ArgumentParser(prog="brainlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="model presets with their parameter counts").set_defaults(fn=cmd_presets)

    s = sub.add_parser("synth", help="write a synthetic cohort with known ground truth")
    s.add_argument("out")
    s.add_argument("--subjects", type=int, default=40)
    s.add_argument("--timepoints", type=int, default=300)
    s.add_argument("--parcels-from", default="A424", help='"A424" or an atlas TSV (index,name,x,y,z,...)')
    s.add_argument("--max-parcels", type=int, default=None, help="keep a network-balanced subset of parcels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a synthetic cohort already in OUT")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("ingest", help="validate, scale, store and version a lab's recordings")
    s.add_argument("src")
    s.add_argument("--cohort", required=True)
    s.add_argument("--atlas", default=None, help="atlas TSV (default: SRC/atlas.tsv if present, else A424)")
    s.add_argument("--atlas-image", default=None, help="label image (NIfTI) or CIFTI dlabel for image input")
    s.add_argument("--min-timepoints", type=int, default=200)
    s.add_argument("--skip-invalid", action="store_true", help="ingest the valid files, report the rest")
    s.add_argument("--workers", type=int, default=0, help="parallel parcellation processes (0 = one per core)")
    s.add_argument("--executor", choices=("process", "ray"), default="process",
                   help="parcellate in a local process pool, or as Ray tasks (on $RAY_ADDRESS's cluster if set)")
    s.add_argument("--no-push", action="store_true", help="do not push the new version to the DVC remote")
    s.set_defaults(fn=cmd_ingest)

    d = sub.add_parser("data", help="cohort versions (DVC)").add_subparsers(dest="data_command", required=True)
    d.add_parser("versions", help="list cohort versions").set_defaults(fn=cmd_data_versions)
    s = d.add_parser("checkout", help="restore data/ to a version")
    s.add_argument("rev")
    s.set_defaults(fn=cmd_data_checkout)
    s = d.add_parser("export", help="write a stored cohort back out as .npy files + manifest.csv")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_data_export)

    s = sub.add_parser("pretrain", help="pretrain BrainLM on a stored cohort (Ray Train) and register it")
    s.add_argument("--cohort", required=True)
    s.add_argument("--preset", default="tiny")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    s.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--mask-ratio", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(fn=cmd_pretrain)

    sub.add_parser("models", help="registered models: versions, aliases, metrics, runs").set_defaults(fn=cmd_models)

    s = sub.add_parser("promote", help="move a registry alias (e.g. champion) to a model version")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--alias", default="champion")
    s.set_defaults(fn=cmd_promote)

    model_help = "registered model, e.g. models:/brainlm-pretrained@champion (the default)"
    s = sub.add_parser("networks", help="classify parcels into atlas networks from the model's attention (kNN)")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--cohort", required=True)
    s.add_argument("--labels", default=None, help="atlas network column (default: yeo7, else the first)")
    s.add_argument("--source", choices=("decoder", "encoder"), default=NetworksConfig.source,
                   help="decoder: masked tokens' attention to visible ones; encoder: nothing masked")
    s.add_argument("--layer", type=_layer, default=NetworksConfig.layer, help='block index, or "mean" (default) over blocks')
    s.add_argument("--neighbours", type=int, default=NetworksConfig.neighbours)
    s.add_argument("--folds", type=int, default=NetworksConfig.folds)
    s.add_argument("--max-recordings", type=int, default=NetworksConfig.max_recordings, help="a seeded sample of recordings")
    s.add_argument("--max-windows", type=int, default=NetworksConfig.max_windows, help="windows per recording, from its start")
    s.add_argument("--seed", type=int, default=NetworksConfig.seed)
    s.add_argument("--report", default=None, help="report folder (default: reports/<run name>)")
    s.set_defaults(fn=cmd_networks)

    s = sub.add_parser("attention", help="CLS-attention maps of two groups and their permutation-tested contrast")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--cohort", required=True)
    s.add_argument("--by", required=True, help="manifest column (condition) or phenotype column (e.g. phq9)")
    s.add_argument("--groups", nargs=2, metavar=("A", "B"), default=None, help="two values; the contrast is A − B")
    s.add_argument("--threshold", type=float, default=None, help="numeric split: column>=X against column<X")
    s.add_argument("--layer", type=_layer, default=AttentionConfig.layer, help='block index, or "mean" (default) over blocks')
    s.add_argument("--resolution", choices=("recording", "time"), default=AttentionConfig.resolution,
                   help="recording: attention mass per parcel; time: per parcel and time point (designs locked "
                        "to the recording start, e.g. a block task)")
    s.add_argument("--permutations", type=int, default=AttentionConfig.permutations)
    s.add_argument("--alpha", type=float, default=AttentionConfig.alpha)
    s.add_argument("--networks", default=None, help='atlas column for network tests (default: yeo7; "" for none)')
    s.add_argument("--max-windows", type=int, default=AttentionConfig.max_windows, help="windows per recording, from its start")
    s.add_argument("--seed", type=int, default=AttentionConfig.seed)
    s.add_argument("--report", default=None, help="report folder (default: reports/<run name>)")
    s.set_defaults(fn=cmd_attention)

    s = sub.add_parser("perturb", help="in-silico perturbation with the model frozen; serve it as a model")
    s.add_argument("--model", default=None, help=model_help)
    s.add_argument("--cohort", required=True)
    s.add_argument("--by", default=None, help="column whose two groups are the source and the target")
    s.add_argument("--source", default=None, help="value of --by whose recordings are perturbed")
    s.add_argument("--target", default=None, help="value of --by whose representation is matched")
    s.add_argument("--threshold", type=float, default=None, help="numeric split: column<X → column>=X")
    s.add_argument("--mode", choices=("parcel_time", "parcel"), default=PerturbConfig.mode)
    s.add_argument("--representation", choices=("reconstruction", "forecast", "cls"),
                   default=PerturbConfig.representation,
                   help="matched: masked-patch predictions under fixed masks, the forecast of the last patches, "
                        "or the CLS embedding")
    s.add_argument("--sparsity", type=float, default=PerturbConfig.sparsity)
    s.add_argument("--steps", type=int, default=PerturbConfig.steps)
    s.add_argument("--lr", type=float, default=PerturbConfig.lr)
    s.add_argument("--horizon", type=int, default=PerturbConfig.horizon, help="patches forecast at the end of each window")
    s.add_argument("--drive", default=None, help="comma-separated parcel names or network names to drive")
    s.add_argument("--signal", choices=("sine", "block", "constant"), default="sine")
    s.add_argument("--amplitude", type=float, default=1.0)
    s.add_argument("--period", type=float, default=40.0, help="TRs per cycle of the driving signal")
    s.add_argument("--max-recordings", type=int, default=PerturbConfig.max_recordings, help="per group (drive: in all)")
    s.add_argument("--max-windows", type=int, default=PerturbConfig.max_windows, help="windows per recording, from its start")
    s.add_argument("--networks", default=None, help='atlas column to rank networks (default: yeo7; "" for none)')
    s.add_argument("--seed", type=int, default=PerturbConfig.seed)
    s.add_argument("--register", action="store_true", help="register the model as brainlm-perturbation (served)")
    s.add_argument("--report", default=None, help="report folder (default: reports/<run name>)")
    s.set_defaults(fn=cmd_perturb)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from brainlm.errors import BrainLMError

    try:
        args.fn(args)
    except BrainLMError as e:  # expected, user-facing failures: one clear message, no traceback
        print(f"brainlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
