"""`brainlm ...`: each subcommand is a thin call into the library.

Imports are lazy so `brainlm presets` answers in a second instead of loading Ray, MLflow and nilearn.
Expected failures (bad input, missing cohort, unknown preset, a value out of range) print one line naming
what is wrong (the option, for a bad option) and exit non-zero; anything else is a bug and keeps its traceback.
`brainlm pretrain`'s options are generated from the configs (`brainlm.config.run_options`), so every
TrainConfig field is an option and its default is the config's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

# Shorter names for two TrainConfig options (the field's own name works as well).
OPTION_ALIASES = {"num_workers": "--workers", "use_gpu": "--gpu"}


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
    from brainlm.hooks import CohortVersioned, cohort_versioned

    cfg = IngestConfig(
        min_timepoints=args.min_timepoints, skip_invalid=args.skip_invalid, workers=args.workers,
        push=not args.no_push, executor=args.executor,
    )
    report = ingest(Path(args.src), args.cohort, atlas=args.atlas, atlas_image=args.atlas_image, cfg=cfg)
    print(report.summary(), flush=True)
    event = CohortVersioned.from_report(report)
    if event is not None:  # a new version: tell the installed hooks (e.g. a Prefect server that re-evaluates)
        for line in cohort_versioned(event):
            print(f"  {line}")


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


def cmd_data_du(args: argparse.Namespace) -> None:
    from brainlm.data.versioning import footprint

    places = footprint()
    print(f"{'place':<7} {'files':>7} {'size':>10} {'on disk':>10}  location")
    for p in places:
        disk = "-" if p.disk is None else _size(p.disk)
        shared = f"  ({p.linked} files are hard links of the ones above: no extra bytes)" if p.linked else ""
        print(f"{p.name:<7} {p.files:>7} {_size(p.size):>10} {disk:>10}  {p.location}{shared}")
    local = sum(p.disk for p in places if p.disk is not None)
    print(f"on this machine: {_size(local)} (size: what the files hold; on disk: blocks allocated, each "
          f"hard-linked file counted once)")


def _size(n: float) -> str:
    """Bytes in decimal units: 950 B, 3.7 MB, 1.6 GB."""
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def cmd_data_export(args: argparse.Namespace) -> None:
    from brainlm.data.export import export_cohort

    out = export_cohort(args.cohort, Path(args.out))
    print(f"cohort {args.cohort} exported to {out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from brainlm.config import run_configs, run_options

    # Options left unset (None) keep the preset's / TrainConfig's value, as in the Prefect flow.
    model_cfg, train_cfg = run_configs(args.preset, **{name: getattr(args, name) for name in run_options()})
    from brainlm.pipelines import pretrain  # only now: loads Ray, MLflow and DVC

    result = pretrain(args.cohort, model_cfg, train_cfg, preset_name=args.preset)
    print(result.summary())


def cmd_models(args: argparse.Namespace) -> None:
    from brainlm.config import load_settings
    from brainlm.registry import list_models

    rows = list_models(settings=load_settings())
    if not rows:
        print("no registered models yet: run `brainlm pretrain --cohort NAME` (or `make demo`) first")
    for m in rows:
        aliases = ",".join(m["aliases"]) or "-"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(m["metrics"].items()))
        print(f"{m['name']} v{m['version']}  aliases={aliases}  run={m['run_id']}  data={m.get('data_version') or '-'}"
              f"  {metrics}")


def cmd_promote(args: argparse.Namespace) -> None:
    from brainlm.config import PromotionConfig, load_settings, with_options
    from brainlm.errors import ConfigError

    options = [f.name for f in dataclasses.fields(PromotionConfig)]  # every field is a --gate option
    if args.gate:
        # Options left unset (None) keep PromotionConfig's value, as in the Prefect flow `promote`.
        cfg = with_options(PromotionConfig(), **{name: getattr(args, name) for name in options})
        if args.cohort is None:
            raise ConfigError("--gate needs --cohort: the cohort whose held-out participants score the models")
        if args.alias is not None:
            raise ConfigError("--alias: the gate moves the production alias only (no --alias with --gate)")
        from brainlm.promotion import gate  # only now: loads MLflow and torch

        decision = gate(args.cohort, args.version, cfg, model=args.name)
        print(decision.summary())
        return
    given = [f"--{name.replace('_', '-')}" for name in ("cohort", *options) if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --gate")
    if args.name is None or args.version is None:
        raise ConfigError("promote NAME VERSION moves an alias by hand; --gate --cohort NAME decides by evaluation")
    from brainlm.registry import promote

    alias = args.alias or "champion"
    promote(args.name, args.version, alias=alias, settings=load_settings())
    print(f"{args.name} version {args.version} is now @{alias}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from brainlm.config import ClinicalConfig, ForecastConfig, with_options
    from brainlm.errors import ConfigError

    # Options left unset (None) keep the task config's value; only the asked task's config is built.
    options = {"steps": args.steps, "seed": args.seed, "models": args.models, "device": "cuda" if args.gpu else None}
    if args.task == "forecast":
        clinical_only = [f"--{name}" for name in ("target", "folds", "pooling") if getattr(args, name) is not None]
        if clinical_only:
            raise ConfigError(f"{', '.join(clinical_only)}: only for --task clinical")
        configs = {"forecast_cfg": with_options(ForecastConfig(), **options)}
    else:
        configs = {"clinical_cfg": with_options(ClinicalConfig(), target=args.target, folds=args.folds,
                                                pooling=args.pooling, **options)}
    from brainlm.evaluate import evaluate  # only now: loads MLflow and DVC

    result = evaluate(args.task, args.cohort, args.model, **configs)
    print()
    print(result.summary())


def cmd_networks(args: argparse.Namespace) -> None:
    from brainlm.config import NetworksConfig, with_options

    cfg = with_options(NetworksConfig(), **_config_options(args, NetworksConfig))
    from brainlm.interpret import run_networks  # only now: loads MLflow

    print(run_networks(args.cohort, cfg, model_uri=args.model, report_dir=args.report).summary())


def cmd_attention(args: argparse.Namespace) -> None:
    from brainlm.config import AttentionConfig, with_options

    cfg = with_options(AttentionConfig(), **_config_options(args, AttentionConfig))
    from brainlm.interpret import run_attention

    groups = tuple(args.groups) if args.groups else None
    print(run_attention(args.cohort, args.by, groups, args.threshold, cfg, model_uri=args.model,
                        report_dir=args.report).summary())


def cmd_perturb(args: argparse.Namespace) -> None:
    from brainlm.config import PerturbConfig, with_options
    from brainlm.errors import ConfigError

    cfg = with_options(PerturbConfig(), **_config_options(args, PerturbConfig))
    if args.by and args.threshold is None and not (args.source and args.target):
        raise ConfigError("--by needs --source A --target B (two values of the column) or --threshold X")
    if not (args.by or args.drive or args.register):
        raise ConfigError("brainlm perturb needs --by COLUMN --source A --target B, --drive PARCELS, or --register")
    from brainlm.interpret import register_perturbation_model, run_drive, run_perturb

    if args.drive:
        parcels = [p.strip() for p in args.drive.split(",") if p.strip()]
        print(run_drive(args.cohort, parcels, args.signal, args.amplitude, args.period, cfg, model_uri=args.model,
                        report_dir=args.report).summary())
    elif args.by:
        groups = (args.source, args.target) if args.threshold is None else None
        print(run_perturb(args.cohort, args.by, groups, args.threshold, cfg, model_uri=args.model,
                          report_dir=args.report).summary())
    if args.register:
        version = register_perturbation_model(args.cohort, args.model)
        print(f"registered {version.name} version {version.version} @challenger (serving: "
              f"brainlm/serving_perturbation.py)")


def _config_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of config `cls` as the command's options set them (None: keep the config's value)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `brainlm pretrain: error: argument --lr: invalid float value: 'x'`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_options(parser: argparse.ArgumentParser, cls: type, fields: dict[str, dataclasses.Field],
                       default_note: str | None = None) -> None:
    """One option per config field: `--batch-size N` for `batch_size`, typed from the field's annotation.

    Every option defaults to None (= keep the config's value); the help shows the field's description,
    allowed range and default (`default_note` instead, e.g. "the preset's"; a field whose default is None says
    in its description what leaving it unset means).
    """
    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        hint = hints[name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        names = [OPTION_ALIASES[name]] if name in OPTION_ALIASES else []
        names.append("--" + name.replace("_", "-"))
        default = default_note or _shown(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        allowed = f.metadata.get("within") or (f.metadata.get("choices") and "/".join(f.metadata["choices"]))
        notes = [*([f"default {default}"] if default != "None" else []), *([f"allowed {allowed}"] if allowed else [])]
        help_text = f"{f.metadata.get('help', '')}" + (f" ({', '.join(notes)})" if notes else "")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            kwargs |= {"nargs": len(items), "type": items[0], "metavar": "X"}
        else:
            kwargs |= {"type": hint, "metavar": "N" if hint is int else "X"}
        parser.add_argument(*names, **kwargs)


def _interpretation_parser(sub: argparse._SubParsersAction, name: str, cls: type, help_text: str,
                           description: str) -> argparse.ArgumentParser:
    """An interpretation command: the cohort, the model, the report folder, and one option per field of `cls`."""
    s = sub.add_parser(name, help=help_text, description=f"{description} Tracked in MLflow with a report folder.")
    s.add_argument("--cohort", required=True, help="a stored cohort's name (or its folder)")
    s.add_argument("--model", default=None,
                   help="models:/NAME@ALIAS or models:/NAME/VERSION (default: models:/brainlm-pretrained@champion)")
    s.add_argument("--report", default=None, help="report folder (default: reports/<run name> in the brainlm home)")
    add_config_options(s.add_argument_group(name), cls, {f.name: f for f in dataclasses.fields(cls)})
    return s


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest → the option that sets it (its first spelling), for naming an option in an error."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def build_parser() -> argparse.ArgumentParser:
    from brainlm.config import (
        CLINICAL_MODELS,
        CLINICAL_TARGETS,
        FORECAST_MODELS,
        POOLINGS,
        PRESETS,
        TASKS,
        AttentionConfig,
        ModelConfig,
        NetworksConfig,
        PerturbConfig,
        PromotionConfig,
        TrainConfig,
        run_options,
    )

    p = Parser(prog="brainlm", description=__doc__.splitlines()[0])
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
    d.add_parser("du", help="where the cohort bytes live (store, DVC cache, remote) and how much each "
                 "takes").set_defaults(fn=cmd_data_du)
    s = d.add_parser("export", help="write a stored cohort back out as .npy files + manifest.csv")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_data_export)

    s = sub.add_parser("pretrain", help="pretrain BrainLM on a stored cohort (Ray Train) and register it",
                       description="Pretrain BrainLM on a stored cohort with Ray Train and register the result. "
                                   "Training runs for --steps optimiser steps; every --eval-every steps it is "
                                   "evaluated, checkpointed and logged to MLflow.")
    s.add_argument("--cohort", required=True, help="a stored cohort's name (or its folder)")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    options = run_options()
    model_fields = {k: f for k, f in options.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    add_config_options(s.add_argument_group("model (changes to the preset)"), ModelConfig, model_fields,
                       default_note="the preset's")
    add_config_options(s.add_argument_group("training"), TrainConfig,
                       {k: f for k, f in options.items() if k not in model_fields})
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("evaluate", help="forecasting or clinical prediction: BrainLM against its baselines on the "
                                        "same subjects, each model logged and registered",
                       description="Fine-tune the model and fit every baseline on the same subject-level split, "
                                   "print one row per model, log every model to MLflow and register it.")
    s.add_argument("--task", choices=TASKS, required=True)
    s.add_argument("--cohort", required=True, help="a stored cohort's name (or its folder)")
    s.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, or a folder with a released BrainLM checkpoint")
    s.add_argument("--target", choices=CLINICAL_TARGETS, default=None, help="clinical: the phenotype (default age)")
    s.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"a subset of the comparison (default all: forecast {' '.join(FORECAST_MODELS)}; "
                        f"clinical {' '.join(CLINICAL_MODELS)})")
    s.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimiser steps of each neural model (clinical: per fold)")
    s.add_argument("--folds", type=int, default=None, metavar="K", help="clinical: cross-validation folds")
    s.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="clinical: how the head reads the encoder's tokens (default connectivity)")
    s.add_argument("--gpu", action="store_true", default=None, help="fine-tune on the GPU")
    s.add_argument("--seed", type=int, default=None, metavar="N")
    s.set_defaults(fn=cmd_evaluate)

    s = _interpretation_parser(sub, "networks", NetworksConfig,
                               "classify parcels into atlas networks from the model's attention (kNN)",
                               "Classify the cohort's parcels into an atlas's networks by kNN on the model's "
                               "parcel-to-parcel attention, beside functional connectivity, an untrained model and "
                               "the centroids.")
    s.set_defaults(fn=cmd_networks)

    s = _interpretation_parser(sub, "attention", AttentionConfig,
                               "CLS-attention maps of two groups and their permutation-tested contrast",
                               "Each recording's CLS attention over parcels; two groups from a manifest or phenotype "
                               "column, contrasted per parcel and per network with permutations of participants "
                               "(FDR and FWER corrected), beside an untrained model's contrast.")
    s.add_argument("--by", required=True, help="manifest column (condition) or phenotype column (e.g. phq9)")
    s.add_argument("--groups", nargs=2, metavar=("A", "B"), default=None, help="two values; the contrast is A − B")
    s.add_argument("--threshold", type=float, default=None, help="numeric split: column>=X against column<X")
    s.set_defaults(fn=cmd_attention)

    s = _interpretation_parser(sub, "perturb", PerturbConfig,
                               "in-silico perturbation with the model frozen; serve it as a model",
                               "The sparse perturbation of source recordings that makes the frozen model represent "
                               "them as the target group (--by), or the forecast change when parcels are driven "
                               "with a signal (--drive); --register serves the model as brainlm-perturbation.")
    s.add_argument("--by", default=None, help="column whose two groups are the source and the target")
    s.add_argument("--source", default=None, help="value of --by whose recordings are perturbed")
    s.add_argument("--target", default=None, help="value of --by whose representation is matched")
    s.add_argument("--threshold", type=float, default=None, help="numeric split: column<X → column>=X")
    s.add_argument("--drive", default=None, help="comma-separated parcel names or network names to drive")
    s.add_argument("--signal", choices=("sine", "block", "constant"), default="sine")
    s.add_argument("--amplitude", type=float, default=1.0)
    s.add_argument("--period", type=float, default=40.0, help="TRs per cycle of the driving signal")
    s.add_argument("--register", action="store_true", help="register the model as brainlm-perturbation (served)")
    s.set_defaults(fn=cmd_perturb)

    sub.add_parser("models", help="registered models: versions, aliases, metrics, runs").set_defaults(fn=cmd_models)

    s = sub.add_parser("promote", help="move a registry alias (e.g. champion) to a model version, by hand or gated",
                       description="By hand: point --alias (default champion) at NAME VERSION. With --gate: score "
                                   "the challenger (VERSION, default the one aliased challenger) against the "
                                   "champion and the reference predictors on the cohort's held-out participants, "
                                   "promote it only if it wins by the margin, and record why on its version.")
    s.add_argument("name", nargs="?", default=None, help="registered model (gate: default brainlm-pretrained)")
    s.add_argument("version", nargs="?", default=None, help="its version (gate: default the @challenger one)")
    s.add_argument("--alias", default=None, help="the alias to move by hand (default champion)")
    s.add_argument("--gate", action="store_true", help="promote only if the held-out evaluation says so")
    s.add_argument("--cohort", default=None, help="gate: the stored cohort that scores the models")
    add_config_options(s.add_argument_group("gate"), PromotionConfig,
                       {f.name: f for f in dataclasses.fields(PromotionConfig)})
    s.set_defaults(fn=cmd_promote)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from brainlm.errors import BrainLMError, ConfigError

    try:
        args.fn(args)
    except BrainLMError as e:  # expected, user-facing failures: one clear message, no traceback
        message = " ".join(str(e).split())  # one line, whatever the message holds
        options = _option_names(_subparser(parser, args))
        if isinstance(e, ConfigError) and e.field in options and getattr(args, e.field, None) is not None:
            message = f"{options[e.field]} {_shown(e.value)}: {e.rule}"  # the user's option, not the field
        print(f"brainlm {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser whose options `args` came from (e.g. `brainlm data export`'s)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _subparser(action.choices[getattr(args, action.dest)], args)
    return parser


def _shown(value: Any) -> str:
    """A value as it was typed on the command line: `0.9 1.2` for a pair."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


if __name__ == "__main__":
    sys.exit(main())
