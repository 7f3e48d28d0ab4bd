"""The interpretation tasks as tracked runs: a registered model + a stored cohort → tables, figures, an MLflow run.

    run_networks(cohort, cfg)                              brainlm networks
    run_attention(cohort, column, groups | threshold, cfg)  brainlm attention
    run_perturb(cohort, column, (source, target), cfg)     brainlm perturb --by ...
    run_drive(cohort, parcels, signal, cfg)                brainlm perturb --drive ...
    register_perturbation_model(cohort, model_uri)         brainlm perturb --register

Each writes a report folder (TSV tables, PNG figures, summary.json) and logs the same files, its configuration
(params), its cohort, data version and the model it read (tags, as `brainlm evaluate` does) and its headline
numbers (metrics) to one run of the tasks experiment (`brainlm.evaluate.tracked_run`). What is written is per
parcel, per network or a count: never a recording or participant id. Params, tags, the run name and every text
file of the report are checked for the cohort's participant ids before they are logged. The computations are
the pure functions of brainlm/tasks/ (networks.py, attention.py, perturb.py, plots.py).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from brainlm import checkpoint, registry
from brainlm.config import AttentionConfig, NetworksConfig, PerturbConfig, Settings, load_settings, to_dict
from brainlm.data.store import Cohort, open_cohort
from brainlm.evaluate import TASK_REQUIREMENTS, load_pretrained, run_tags, tracked_run
from brainlm.model import BrainLM
from brainlm.tasks import attention, networks, perturb, plots
from brainlm.tasks.common import (
    BrainLMBackbone,
    check_backbone_fits,
    fixed_windows,
    sample_recordings,
    table_text,
)

PERTURBATION_MODEL = "brainlm-perturbation"  # registered name of the served perturbation model
TOP_PARCELS = 10  # parcels listed in the printed summaries


@dataclass
class TaskReport:
    """What a task run produced: its MLflow run, its report folder and the lines the CLI prints."""

    task: str
    run_id: str
    run_name: str
    folder: Path
    metrics: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    result: Any = None  # the task's own result object (NetworkResult, Contrast, ...)

    def summary(self) -> str:
        return "\n".join([*self.lines, f"report      {self.folder}", f"MLflow run  {self.run_id} ({self.run_name})"])


def default_model_uri(settings: Settings) -> str:
    """The production version of the pretrained model: models:/<pretrained_model>@<production_alias>."""
    return f"models:/{settings.mlflow.pretrained_model}@{settings.mlflow.production_alias}"


# ----------------------------------------------------------------------------------------- networks


def run_networks(cohort: str | Path, cfg: NetworksConfig | None = None, *, model_uri: str | None = None,
                 report_dir: str | Path | None = None, settings: Settings | None = None) -> TaskReport:
    """Network identification from attention, with the fc, untrained and coordinates references."""
    cfg = cfg or NetworksConfig()
    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    column = networks.label_column(opened.atlas, cfg.labels)  # a user mistake fails before MLflow is touched
    model, uri, lineage = _load(model_uri, opened, settings)
    params = {"networks": to_dict(cfg), "labels": column}
    with _reported("networks", opened, uri, lineage, params, report_dir, settings) as report:
        result = networks.identify_networks(model, opened, cfg)
        table = result.table()
        folder = report.folder
        table.to_csv(folder / "networks_table.tsv", sep="\t", index=False, float_format="%.4f")
        predictions = pd.DataFrame({"parcel": [opened.atlas.names[p] for p in result.positions],
                                    "network": result.labels,
                                    **{f"predicted_{m}": s.predicted for m, s in result.scores.items()}})
        predictions.to_csv(folder / "predictions.tsv", sep="\t", index=False)
        for name, score in result.scores.items():
            pd.DataFrame(score.confusion, index=result.networks, columns=result.networks).to_csv(
                folder / f"confusion_{name}.tsv", sep="\t")
        plots.confusion({m: s.confusion for m, s in result.scores.items()}, result.networks,
                        folder / "confusion.png", f"{opened.name}: parcels into {column} networks (kNN)")
        labels = [label.strip() for label in opened.atlas.networks[column]]
        plots.connectome(result.matrices["attention"], opened.atlas.coords, labels,
                         folder / "attention_connectome.png", f"attention ({cfg.source}), nodes by {column}")
        report.metrics.update({f"{m}_{k}": v for m, s in result.scores.items()
                               for k, v in (("accuracy", s.accuracy), ("balanced_accuracy", s.balanced_accuracy))})
        report.metrics.update({"chance_accuracy": result.chance_accuracy,
                               "chance_balanced_accuracy": result.chance_balanced,
                               "parcels": len(result.labels), "networks": len(result.networks),
                               "parcels_unlabelled": result.excluded_unlabelled})
        small = (f"; networks with one parcel left out: {sorted(result.excluded_small)}"
                 if result.excluded_small else "")
        report.lines = [
            f"network identification  cohort {opened.name}, labels {column}: {len(result.networks)} networks, "
            f"{len(result.labels)} parcels ({result.excluded_unlabelled} unlabelled left out{small})",
            f"kNN (k={cfg.neighbours}) on {result.folds} stratified folds; attention from the {cfg.source}, "
            f"layer {'mean' if cfg.layer is None else cfg.layer}",
            "",
            _text(table, ["method", "accuracy", "balanced_accuracy"]),
            f"chance: accuracy {result.chance_accuracy:.3f} (largest network), balanced accuracy "
            f"{result.chance_balanced:.3f}",
        ]
        report.result = result
    return report


# ---------------------------------------------------------------------------------------- attention


def run_attention(cohort: str | Path, column: str, groups: tuple[str, str] | None = None,
                  threshold: float | None = None, cfg: AttentionConfig | None = None, *,
                  model_uri: str | None = None, report_dir: str | Path | None = None,
                  settings: Settings | None = None) -> TaskReport:
    """CLS-attention maps of two groups of recordings and their permutation-tested contrast."""
    cfg = cfg or AttentionConfig()
    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    split = attention.split_groups(opened, column, groups, threshold)
    attention.network_labels_or_none(opened, cfg.networks)  # an unknown network column fails here, early
    model, uri, lineage = _load(model_uri, opened, settings)
    params = {"attention": to_dict(cfg), "groups": {"column": column, "a": split.names[0], "b": split.names[1]},
              "networks_column": attention.network_column(opened.atlas, cfg.networks)}
    with _reported("attention", opened, uri, lineage, params, report_dir, settings) as report:
        result, maps = attention.cls_contrast(model, opened, split, cfg)
        reference, _ = attention.cls_contrast(attention.untrained_like(model, cfg.seed), opened, split, cfg)
        folder = report.folder
        result.parcels.to_csv(folder / "contrast_parcels.tsv", sep="\t", index=False, float_format="%.6g")
        if not result.networks.empty:
            result.networks.to_csv(folder / "contrast_networks.tsv", sep="\t", index=False, float_format="%.6g")
            reference.networks.to_csv(folder / "contrast_networks_untrained.tsv", sep="\t", index=False,
                                      float_format="%.6g")
        coords = opened.atlas.coords
        a, b = split.names
        plots.glass_brain(maps.mass[split.in_a].mean(0), coords, folder / "cls_attention_group_a.png",
                          f"CLS attention: {a} (n={int(split.in_a.sum())} recordings)")
        plots.glass_brain(maps.mass[~split.in_a].mean(0), coords, folder / "cls_attention_group_b.png",
                          f"CLS attention: {b} (n={int((~split.in_a).sum())} recordings)")
        significant = result.parcels["p_fdr"].to_numpy() < cfg.alpha
        plots.glass_brain(result.parcels["statistic"].to_numpy(), coords, folder / "cls_contrast.png",
                          f"{a} vs {b}: {result.statistic} (large: FDR < {cfg.alpha:g})",
                          diverging=cfg.resolution == "recording", highlight=significant)
        report.metrics.update(result.counts)
        report.metrics.update({
            "parcels_fdr_significant": int(significant.sum()),
            "parcels_fwer_significant": int((result.parcels["p_fwer"] < cfg.alpha).sum()),
            "max_abs_statistic": float(result.parcels["statistic"].abs().max()),
        })
        if not result.networks.empty:
            report.metrics["networks_fdr_significant"] = int((result.networks["p_fdr"] < cfg.alpha).sum())
            report.metrics["untrained_networks_fdr_significant"] = int((reference.networks["p_fdr"] < cfg.alpha).sum())
        top = result.parcels.reindex(result.parcels["statistic"].abs().sort_values(ascending=False).index)
        counts = result.counts
        report.lines = [
            f"CLS-attention contrast  cohort {opened.name}: {a} vs {b} by {column!r} ({cfg.resolution} resolution, "
            f"layer {'mean' if cfg.layer is None else cfg.layer})",
            f"{a}: {counts['recordings_a']} recordings of {counts['participants_a']} participants; {b}: "
            f"{counts['recordings_b']} of {counts['participants_b']}; {counts['recordings_excluded']} recordings "
            f"in neither group",
            f"statistic: {result.statistic} ({a} − {b}); permutation test {result.scheme}, {cfg.permutations} "
            f"permutations; p_fdr: Benjamini-Hochberg, p_fwer: max-statistic",
        ]
        if not result.networks.empty:
            report.lines += ["", _text(result.networks, ["network", "parcels", "difference", "statistic", "p",
                                                         "p_fdr", "p_fwer"]),
                             "untrained model of the same architecture, strongest networks: "
                             + ", ".join(f"{n} ({v:.2f})" for n, v in
                                         zip(reference.networks["network"][:3], reference.networks["statistic"][:3],
                                             strict=False))]
        report.lines += ["", f"top {TOP_PARCELS} parcels",
                         _text(top.head(TOP_PARCELS), ["name", "network", "difference", "statistic", "p", "p_fdr",
                                                        "p_fwer"])]
        report.result = result
    return report


# ------------------------------------------------------------------------------------- perturbation


def run_perturb(cohort: str | Path, column: str, groups: tuple[str, str] | None = None,
                threshold: float | None = None, cfg: PerturbConfig | None = None, *, model_uri: str | None = None,
                report_dir: str | Path | None = None, settings: Settings | None = None) -> TaskReport:
    """The sparse input perturbation that makes source recordings look like target ones to the frozen model.

    `groups` is (source, target); with `threshold`, the source is `column<threshold` and the target the rest.
    """
    cfg = cfg or PerturbConfig()
    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    if threshold is not None:
        split = attention.split_groups(opened, column, None, threshold)
        source_in, (target, source) = ~split.in_a, split.names
    else:
        split = attention.split_groups(opened, column, groups, None)
        source_in, (source, target) = split.in_a, split.names
    labels = attention.network_labels_or_none(opened, cfg.networks)
    model, uri, lineage = _load(model_uri, opened, settings)
    params = {"perturb": to_dict(cfg), "groups": {"column": column, "source": source, "target": target},
              "networks_column": attention.network_column(opened.atlas, cfg.networks)}
    with _reported("perturb", opened, uri, lineage, params, report_dir, settings) as report:
        ids = np.array(split.recording_ids)
        source_windows = _windows(opened, ids[source_in].tolist(), model, cfg)
        target_windows = _windows(opened, ids[~source_in].tolist(), model, cfg)
        coords = torch.from_numpy(opened.atlas.coords)
        result = perturb.optimise_perturbation(model, source_windows, target_windows, coords, cfg,
                                               opened.atlas.names, labels)
        folder = report.folder
        result.parcels.to_csv(folder / "perturbation_parcels.tsv", sep="\t", index=False, float_format="%.6g")
        result.networks.to_csv(folder / "perturbation_networks.tsv", sep="\t", index=False, float_format="%.6g")
        np.save(folder / "perturbation.npy", result.delta.astype(np.float32))
        plots.glass_brain(result.size, opened.atlas.coords, folder / "perturbation.png",
                          f"perturbation {source} → {target} ({cfg.representation}): rms per parcel")
        touched = int((result.size > 0).sum())
        report.metrics.update({"matching_loss_start": result.loss_start, "matching_loss_end": result.loss_end,
                               "parcels_perturbed": touched, "source_windows": len(source_windows),
                               "target_windows": len(target_windows)})
        report.lines = [
            f"in-silico perturbation  cohort {opened.name}: {source} → {target} by {column!r}, matching the "
            f"{cfg.representation} ({cfg.mode}, sparsity {cfg.sparsity:g}, {cfg.steps} steps)",
            f"{len(source_windows)} source and {len(target_windows)} target windows; matching loss "
            f"{result.loss_start:.3f} → {result.loss_end:.3f}; {touched} of {len(result.size)} parcels perturbed",
        ]
        if not result.networks.empty:
            report.lines += ["", _text(result.networks, ["network", "parcels", "size", "share"])]
        report.lines += ["", f"top {TOP_PARCELS} parcels", _text(result.parcels.head(TOP_PARCELS),
                                                                ["rank", "name", "network", "size"])]
        report.result = result
    return report


def run_drive(cohort: str | Path, parcels: list[str], signal: str = "sine", amplitude: float = 1.0,
              period: float = 40.0, cfg: PerturbConfig | None = None, *, model_uri: str | None = None,
              report_dir: str | Path | None = None, settings: Settings | None = None) -> TaskReport:
    """Drive parcels (atlas names, or network names of the network column) with a signal; forecast changes."""
    cfg = cfg or PerturbConfig()
    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    labels = attention.network_labels_or_none(opened, cfg.networks)
    positions = _parcel_positions(opened, parcels, labels)
    model, uri, lineage = _load(model_uri, opened, settings)
    params = {"perturb": to_dict(cfg), "drive": {"parcels": parcels, "signal": signal, "amplitude": amplitude,
                                                 "period": period}}
    with _reported("drive", opened, uri, lineage, params, report_dir, settings) as report:
        x = _windows(opened, opened.recording_ids, model, cfg)
        wave = perturb.drive_signal(signal, model.cfg.window, amplitude, period)
        result = perturb.drive(model, x, torch.from_numpy(opened.atlas.coords), positions.tolist(), wave,
                               cfg.horizon, opened.atlas.names, labels)
        folder = report.folder
        result.parcels.to_csv(folder / "drive_parcels.tsv", sep="\t", index=False, float_format="%.6g")
        result.networks.to_csv(folder / "drive_networks.tsv", sep="\t", index=False, float_format="%.6g")
        plots.glass_brain(result.change, opened.atlas.coords, folder / "drive_change.png",
                          f"forecast change, driving {len(positions)} parcel(s) with a {signal} (large: driven)",
                          highlight=result.driven)
        undriven = result.change[~result.driven]
        report.metrics.update({"driven_parcels": len(positions), "windows": len(x),
                               "mean_change_undriven": float(undriven.mean()) if undriven.size else 0.0})
        report.lines = [
            f"driven forecast  cohort {opened.name}: {len(positions)} parcel(s) driven with a {signal} "
            f"(amplitude {amplitude:g}, period {period:g} TRs); forecast of the last {cfg.horizon} patch(es) "
            f"over {len(x)} windows",
        ]
        if not result.networks.empty:
            report.lines += ["", "forecast change of the other parcels, by network",
                             _text(result.networks, ["network", "parcels", "change"])]
        report.lines += ["", f"top {TOP_PARCELS} undriven parcels",
                         _text(result.parcels.head(TOP_PARCELS), ["name", "network", "change"])]
        report.result = result
    return report


def register_perturbation_model(cohort: str | Path, model_uri: str | None = None,
                                settings: Settings | None = None):
    """Register the model's weights as `brainlm-perturbation` (served by serving_perturbation.py); alias challenger.

    Like every registered model it carries the brainlm code it runs and names only index packages. The input
    example is noise (never a participant's data) over the cohort's parcels and centroids.
    """
    settings = settings or load_settings()
    opened = open_cohort(cohort, settings)
    model, uri, lineage = _load(model_uri, opened, settings)
    rng = np.random.default_rng(0)
    P, T = opened.atlas.n_parcels, model.cfg.window
    example = {"signals": rng.standard_normal((1, P, T), dtype=np.float32),
               "coords": opened.atlas.coords.astype(np.float32),
               "perturbation": np.zeros((P, T), dtype=np.float32)}
    example["perturbation"][0] = perturb.drive_signal("sine", T)
    output = perturb.predict_perturbation(model, example, {"horizon": 1})
    run_name = registry.unique_run_name("perturbation-model", opened.name)
    tags = run_tags("perturbation-model", opened, lineage, settings)
    params = {"model": to_dict(model.cfg), "model_uri": uri}
    with tracked_run(opened, run_name, params, tags, settings) as run_id, tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / checkpoint.MODEL_FILE
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        return registry.log_model(
            run_id, weights, to_dict(model.cfg), registered_model_name=PERTURBATION_MODEL, input_example=example,
            output_example=output, metrics={}, tags=tags, code=registry.SERVING_PERTURBATION_CODE,
            pip_requirements=TASK_REQUIREMENTS, params={"horizon": 1}, settings=settings,
        )


# ------------------------------------------------------------------------------------------ helpers


def _load(model_uri: str | None, cohort: Cohort, settings: Settings) -> tuple[BrainLM, str, dict[str, str]]:
    """(model, its URI, lineage tags): the registered model (default: the champion), checked to fit the cohort."""
    registry.configure(settings)
    uri = model_uri or default_model_uri(settings)
    model, lineage = load_pretrained(uri, settings)
    check_backbone_fits(BrainLMBackbone(model), cohort)  # every recording fills a window
    return model, uri, lineage


@contextlib.contextmanager
def _reported(task: str, cohort: Cohort, model_uri: str, lineage: dict[str, str], params: dict[str, Any],
              report_dir: str | Path | None, settings: Settings) -> Iterator[TaskReport]:
    """A tracked run around a task; when the task completes, its report folder is checked and logged with it."""
    from brainlm.pipelines import check_no_participant_ids
    run_name = registry.unique_run_name(task, cohort.name)
    folder = Path(report_dir) if report_dir else settings.home / "reports" / run_name
    params = {**params, "model_uri": model_uri, "cohort": cohort.name}
    with tracked_run(cohort, run_name, params, run_tags(task, cohort, lineage, settings), settings) as run_id:
        folder.mkdir(parents=True, exist_ok=True)
        report = TaskReport(task=task, run_id=run_id, run_name=run_name, folder=folder)
        yield report
        (folder / "summary.json").write_text(json.dumps(
            {"task": task, "cohort": cohort.name, "model": model_uri, "params": params, "metrics": report.metrics},
            indent=2, default=str) + "\n")
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in {".tsv", ".json", ".txt"}:
                check_no_participant_ids(cohort, {path.name: path.read_text()})
        registry.log_metrics(run_id, report.metrics, step=0, settings=settings)
        registry.log_artifacts(run_id, folder, settings=settings)


def _windows(cohort: Cohort, ids: list[str], model: BrainLM, cfg: PerturbConfig) -> torch.Tensor:
    """The first `cfg.max_windows` windows of a seeded sample of `cfg.max_recordings` of the recordings `ids`."""
    chosen = sample_recordings(ids, cfg.max_recordings, cfg.seed)
    return torch.from_numpy(fixed_windows(cohort, chosen, model.cfg.window, max_windows=cfg.max_windows).signals)


def _parcel_positions(cohort: Cohort, parcels: list[str], labels: list[str] | None) -> np.ndarray:
    """Atlas rows of the named parcels; a network name of the network column stands for all its parcels."""
    names = cohort.atlas.names
    rows: list[int] = []
    for item in parcels:
        if item in names:
            rows.append(names.index(item))
        elif labels and item in labels:
            rows += [i for i, label in enumerate(labels) if label == item]
        else:
            networks_hint = f" or a network ({sorted(set(labels) - {''})})" if labels else ""
            raise perturb.PerturbError(f"unknown parcel {item!r}: give atlas parcel names (e.g. {names[:3]})"
                                       f"{networks_hint}")
    return np.unique(rows)


def _text(table: pd.DataFrame, columns: list[str]) -> str:
    """`columns` of a table as aligned text, the first as row names: 3 decimals, p-values and differences in 3
    significant digits."""
    return table_text(table[columns].set_index(columns[0]), ".3f",
                      {c: ".3g" for c in ("p", "p_fdr", "p_fwer", "difference")})
