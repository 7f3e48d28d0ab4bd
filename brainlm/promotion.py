"""Gated promotion: a challenger becomes champion only when it wins the same held-out evaluation.

    gate(cohort, challenger=None, cfg)            `brainlm promote --gate` and the Prefect flow `promote`
        resolve    the challenger (a version, default the one aliased challenger) and the champion (may be none)
        hold out   the cohort's `cfg.split` participants (seeded and subject-level, as in pretraining); a model
                   pretrained on this cohort with another split is refused, since it may have trained on them
        score      both models on the same windows with the same masks (`engine.evaluate`): masked MSE, and
                   every reference predictor's (`references.reference_predictors`: zero, spatial from the
                   training participants' covariance, temporal) on exactly those masked patches
        decide     promote only if the challenger's masked MSE is at least `cfg.margin` (relative) below every
                   reference's and the champion's; with no champion yet, below the references'
        record     decision, reason, every score, margin, cohort, data version and the code's git commit as tags
                   (`gate.*`) and the description of the challenger's version; then, if it won, the production
                   alias moves to it

A worse model is never promoted, and the numbers that kept it out stay on its version.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import brainlm
from brainlm import engine, registry
from brainlm.config import ModelConfig, PromotionConfig, Settings, load_settings, to_dict
from brainlm.data.store import Cohort, open_cohort
from brainlm.errors import BrainLMError
from brainlm.references import Predictor, reference_predictors, training_covariance

TAG_PREFIX = "gate."
PROMOTED, REJECTED = "promoted", "not promoted"
CODE_PATHS = ("brainlm", "flows", "pyproject.toml", "constraints.txt")  # what `-dirty` in the code version covers


class GateError(BrainLMError):
    """The gate cannot compare the models fairly (no challenger, different windows, a leaked held-out set, ...)."""


@dataclass
class GateDecision:
    model: str  # the registered model's name
    challenger: str  # version numbers
    champion: str | None
    promoted: bool
    reason: str
    scores: dict[str, float]  # held-out masked MSE: "challenger", "champion", and each reference by name
    cohort: str
    data_version: str
    participants: int  # held out
    windows: int
    mask_ratio: float | None
    cfg: PromotionConfig
    code_version: str
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def tags(self) -> dict[str, str]:
        """What the challenger's version records (`gate.*`); numbers as MLflow shows them, full precision."""
        tags = {
            "decision": PROMOTED if self.promoted else REJECTED, "reason": self.reason,
            "champion_version": self.champion or "none", "margin": self.cfg.margin, "cohort": self.cohort,
            "data_version": self.data_version, "split": self.cfg.split, "seed": self.cfg.seed,
            "participants": self.participants, "windows": self.windows, "mask_ratio": self.mask_ratio,
            "code_version": self.code_version, "decided_at": self.decided_at,
            **{f"{name}_masked_mse": value for name, value in self.scores.items()},
        }
        return {TAG_PREFIX + k: str(v) for k, v in tags.items()}

    def summary(self) -> str:
        lines = [f"{self.model} version {self.challenger}: {self.reason}"]
        if self.scores:
            lines.append(f"  held-out masked MSE on cohort {self.cohort} (data version {self.data_version}), "
                         f"{self.cfg.split} split: {self.participants} participants, {self.windows} windows, "
                         f"mask ratio {self.mask_ratio}")
            lines += [f"    {name:<12} {value:.4f}" for name, value in self.scores.items()]
        lines.append(f"  margin {self.cfg.margin:g}, code {self.code_version}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "challenger": self.challenger, "champion": self.champion,
                "promoted": self.promoted, "reason": self.reason, "scores": self.scores, "cohort": self.cohort,
                "data_version": self.data_version, "participants": self.participants, "windows": self.windows,
                "mask_ratio": self.mask_ratio, "config": to_dict(self.cfg), "code_version": self.code_version,
                "decided_at": self.decided_at}


def gate(cohort: str | Path | Cohort, challenger: str | int | None = None, cfg: PromotionConfig | None = None, *,
         model: str | None = None, settings: Settings | None = None) -> GateDecision:
    """Score `challenger` (a version of `model`, default the pretrained model's challenger) against the champion
    and the references on `cohort`'s held-out participants; promote it if it wins by `cfg.margin`."""
    from brainlm.pipelines import check_cohort, check_no_participant_ids, data_version

    cfg = cfg or PromotionConfig()
    settings = registry.configure(settings or load_settings())
    name = model or settings.mlflow.pretrained_model
    if challenger is None:
        challenger = registry.alias_version(name, settings.mlflow.new_alias, settings=settings)
        if challenger is None:
            raise GateError(f"registered model {name!r} has no @{settings.mlflow.new_alias} version to gate "
                            f"({settings.tracking_uri()}): pretrain one, or name a version")
    challenger = str(challenger)
    champion = registry.alias_version(name, settings.mlflow.production_alias, settings=settings)
    opened = cohort if isinstance(cohort, Cohort) else open_cohort(cohort, settings)
    decision = GateDecision(
        model=name, challenger=challenger, champion=champion, promoted=False, reason="", scores={},
        cohort=opened.name, data_version=data_version(opened, settings) or registry.UNVERSIONED, participants=0,
        windows=0, mask_ratio=None, cfg=cfg, code_version=code_version(),
    )
    if champion == challenger:
        decision.reason = f"{REJECTED}: version {challenger} is already @{settings.mlflow.production_alias}"
        return decision  # nothing to compare, and the reason it was promoted stays on the version

    versions = {"challenger": challenger, **({"champion": champion} if champion else {})}
    networks = {role: registry.load_model(f"models:/{name}/{v}", settings=settings) for role, v in versions.items()}
    model_cfg = networks["challenger"][1]
    for role, (_, other) in networks.items():
        if (other.window, other.patch_size) != (model_cfg.window, model_cfg.patch_size):
            raise GateError(f"{name} versions {challenger} and {versions[role]} read different windows "
                            f"({model_cfg.window}/{model_cfg.patch_size} and {other.window}/{other.patch_size} "
                            f"TRs/patch): they cannot be scored on the same masked patches")
        check_cohort(opened, other)
    split = opened.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    held_out = held_out_recordings(opened, split, cfg)
    for version in versions.values():
        check_never_trained_on(opened, held_out, name, version, cfg, settings)
    predictors = reference_predictors(training_covariance(opened, split))  # never sees the held-out participants

    decision.mask_ratio = model_cfg.mask_ratio if cfg.mask_ratio is None else cfg.mask_ratio
    people = set(opened.manifest.set_index("recording").loc[held_out, "participant"])
    decision.participants = len(people)
    decision.windows = len(held_out) * cfg.eval_crops
    # The references are scored on the same masked patches in every call: the challenger's call scores them.
    results = {role: score(*networks[role], opened, held_out, cfg, decision.mask_ratio,
                           predictors if role == "challenger" else {}) for role in versions}
    decision.scores = {role: result["masked_mse"] for role, result in results.items()}
    references = list(predictors)
    decision.scores |= {r: results["challenger"][f"{r}_mse"] for r in references}
    decision.promoted, decision.reason = decide(decision.scores, references, champion, cfg.margin)

    tags = decision.tags()
    check_no_participant_ids(opened, tags)
    registry.annotate_version(name, challenger, tags, description=decision.summary(), settings=settings)
    if decision.promoted:
        registry.promote(name, challenger, settings=settings)
    return decision


def held_out_recordings(cohort: Cohort, split: dict[str, list[str]], cfg: PromotionConfig) -> list[str]:
    """The recordings of the participants the gate holds out: `cfg.split` of the cohort's seeded subject-level
    `split`."""
    recordings = split[cfg.split]
    if not recordings:
        raise GateError(f"cohort {cohort.path}: its {len(cohort.participants)} participants leave no {cfg.split} "
                        f"participants to hold out (val_fraction {cfg.val_fraction}, test_fraction "
                        f"{cfg.test_fraction}); at least 3 participants are needed")
    return recordings


def check_never_trained_on(cohort: Cohort, held_out: list[str], name: str, version: str, cfg: PromotionConfig,
                           settings: Settings) -> None:
    """Refuse a model that pretrained on this cohort with a split whose training part holds some of `held_out`.

    A model pretrained on another cohort is not checked here: the gate cannot see its participants. A model
    whose run did not record its split cannot be checked either, and is refused.
    """
    row = registry.model_version(f"models:/{name}/{version}", settings=settings)
    if row["cohort"] != cohort.name:
        return
    params = registry.run_params(row["run_id"], settings=settings) if row["run_id"] else {}
    keys = ("train.val_fraction", "train.test_fraction", "train.seed")
    if any(k not in params for k in keys):
        raise GateError(f"{name} version {version} pretrained on cohort {cohort.name} but its run records no split "
                        f"({', '.join(keys)}): the gate cannot tell whether it saw the held-out participants")
    val, test, seed = float(params[keys[0]]), float(params[keys[1]]), int(params[keys[2]])
    participant = dict(zip(cohort.manifest["recording"], cohort.manifest["participant"], strict=True))
    trained = {participant[r] for r in cohort.split(val, test, seed)["train"]}
    seen = trained & {participant[r] for r in held_out}
    if seen:
        raise GateError(f"{name} version {version} pretrained on {len(seen)} of the participants the gate holds out "
                        f"(its split: seed {seed}, val_fraction {val}, test_fraction {test}; the gate's: seed "
                        f"{cfg.seed}, val_fraction {cfg.val_fraction}, test_fraction {cfg.test_fraction}): gate "
                        f"with the model's split, or on a cohort it never saw")


@torch.no_grad()
def score(network: torch.nn.Module, model_cfg: ModelConfig, cohort: Cohort, recordings: list[str],
          cfg: PromotionConfig, mask_ratio: float, references: dict[str, Predictor]) -> dict[str, float]:
    """Masked MSE / R² of `network` and of each reference on fixed windows of `recordings` with fixed masks:
    `cfg.eval_crops` windows per recording and each window's mask noise are functions of `cfg.seed` alone."""
    windows = cohort.window_dataset(recordings, model_cfg.window, cfg.eval_crops, cfg.seed)
    loader = DataLoader(engine.MaskedWindows(windows, model_cfg.patch_size, cfg.seed), batch_size=cfg.batch_size)
    device = torch.device(cfg.device)
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=device)
    return engine.evaluate(network.to(device), loader, coords, device, mask_ratio, references)


def decide(scores: dict[str, float], references: list[str], champion: str | None,
           margin: float) -> tuple[bool, str]:
    """(promoted, reason): the challenger must be `margin` below every reference's and the champion's MSE."""
    rivals = {"predicting zero" if r == "zero" else f"the {r} reference": scores[r] for r in references}
    if champion is not None:
        rivals[f"champion version {champion}"] = scores["champion"]
    mine = scores["challenger"]
    beaten = {label: mse for label, mse in rivals.items() if mine <= (1 - margin) * mse}
    against = ", ".join(f"{label} ({mse:.4f})" for label, mse in rivals.items())
    if len(beaten) == len(rivals):
        first = "" if champion is not None else "first champion: "
        return True, f"{PROMOTED}: {first}held-out masked MSE {mine:.4f} is at least {margin:.1%} below {against}"
    lost = ", ".join(f"{label} ({mse:.4f})" for label, mse in rivals.items() if label not in beaten)
    return False, f"{REJECTED}: held-out masked MSE {mine:.4f} is not {margin:.1%} below {lost}"


def code_version() -> str:
    """The git commit of the code that runs (`-dirty` with uncommitted changes to it), or, for brainlm installed
    from a package (no git checkout around it), `brainlm <version>`."""
    root = Path(brainlm.__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)

    try:
        top = git("rev-parse", "--show-toplevel")
    except FileNotFoundError:  # no git on this machine
        return f"brainlm {brainlm.__version__} (git is not installed)"
    if top.returncode or Path(top.stdout.strip()).resolve() != root:
        return f"brainlm {brainlm.__version__} (not a git checkout)"
    commit = git("rev-parse", "HEAD").stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS).stdout.strip()
    return f"{commit}-dirty" if dirty else commit
