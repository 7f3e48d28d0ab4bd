"""Clinical prediction: one phenotype per subject, with subject-level K-fold cross-validation.

    targets     age          z-scored                       regression
                neuroticism  min-max                        regression
                pcl, gad7    log1p, then min-max            regression
                phq9         min-max (the score)            regression
                phq9_binary  phq9 >= 10 (moderate or worse)  classification
                sex          M = 1, F = 0                   classification
    transforms  fitted on each fold's training subjects only, stored with every model they belong to
    models      brainlm        an MLP head on the backbone's CLS (or mean-token) embedding, fine-tuned
                ridge_embedding, svr_embedding  ridge / SVR on the frozen backbone's pooled embeddings (mean
                               over a subject's windows): linear and kernel probes of what pretraining learned
                svr_fc, ridge_fc  on functional connectivity: upper triangle of the parcel correlations, Fisher z
    metrics     per fold, on the transformed scale: MSE, R², Pearson r (classification: balanced accuracy, AUC);
                the mean with a 95 % t-interval across folds

A subject's features average over its recordings (FC) or windows (embeddings, head predictions), so a subject
with more recordings does not weigh more. After cross-validation every model is refitted on all subjects
(transform included): that is the model that gets registered, with the cross-validated metrics.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from brainlm.baselines.clinical import (
    KernelModel,
    LinearModel,
    fc_features,
    fit_kernel_model,
    fit_linear_model,
)
from brainlm.config import CLINICAL_MODELS, ClinicalConfig
from brainlm.data.store import Cohort
from brainlm.engine import RandomCrops
from brainlm.tasks.common import (
    Labelled,
    Progress,
    TaskError,
    batched,
    check_backbone_fits,
    encoder_lr,
    fine_tuning,
    fit_steps,
    fixed_windows,
    mean_ci,
    r2_score,
    step_batches,
)

MODELS = CLINICAL_MODELS  # the table's rows, in this order
EMBEDDING_MODELS = ("ridge_embedding", "svr_embedding")
PHQ9_CUTOFF = 10  # PHQ-9 >= 10: moderate depression or worse, the usual screening cut-off

# target → (phenotype column, transform, task); the keys are ClinicalConfig's target choices (CLINICAL_TARGETS)
TARGETS: dict[str, tuple[str, str, str]] = {
    "age": ("age", "zscore", "regression"),
    "neuroticism": ("neuroticism", "minmax", "regression"),
    "pcl": ("pcl", "log1p_minmax", "regression"),
    "gad7": ("gad7", "log1p_minmax", "regression"),
    "phq9": ("phq9", "minmax", "regression"),
    "phq9_binary": ("phq9", "threshold", "classification"),
    "sex": ("sex", "male", "classification"),
}


# ------------------------------------------------------------------------------------------ targets


@dataclass
class TargetTransform:
    """The paper's transform of one target, with the parameters fitted on training subjects: y' = (f(y) − a) / b."""

    target: str
    kind: str  # zscore, minmax, log1p_minmax, threshold, male
    a: float = 0.0
    b: float = 1.0

    @property
    def task(self) -> str:
        return TARGETS[self.target][2]

    @classmethod
    def fit(cls, target: str, values: np.ndarray | pd.Series) -> TargetTransform:
        kind = TARGETS[target][1]
        if kind in ("threshold", "male"):
            return cls(target, kind)
        f = _raw(kind, np.asarray(values))
        if kind == "zscore":
            a, b = float(f.mean()), float(f.std())
        else:
            a, b = float(f.min()), float(f.max() - f.min())
        return cls(target, kind, a, b if b > 0 else 1.0)

    def transform(self, values: np.ndarray | pd.Series) -> np.ndarray:
        values = np.asarray(values)
        if self.kind == "threshold":
            return (values.astype(np.float64) >= PHQ9_CUTOFF).astype(np.float64)
        if self.kind == "male":
            return (values.astype(str) == "M").astype(np.float64)
        return (_raw(self.kind, values) - self.a) / self.b

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Back to the phenotype's own units (classification targets stay 0/1 scores)."""
        values = np.asarray(values, np.float64)
        if self.kind in ("threshold", "male"):
            return values
        f = values * self.b + self.a
        return np.expm1(f) if self.kind == "log1p_minmax" else f

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetTransform:
        return cls(**d)


def _raw(kind: str, values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.log1p(values) if kind == "log1p_minmax" else values


def supported_targets(cohort: Cohort, min_subjects: int = 6) -> list[str]:
    """Targets whose phenotype column the cohort has, known for at least `min_subjects` subjects with recordings."""
    ph = cohort.phenotypes.set_index(cohort.phenotypes["participant_id"].astype(str))
    people = [p for p in cohort.participants if p in ph.index]
    return [t for t, (column, _, _) in TARGETS.items()
            if column in ph.columns and ph.loc[people, column].notna().sum() >= min_subjects]


# ------------------------------------------------------------------------------------------ models


class ClinicalHead(nn.Module):
    """A backbone's pooled embedding → MLP → one value (regression) or one logit (classification)."""

    kind = "head"

    def __init__(self, backbone: nn.Module, pooling: str, hidden: int, n_parcels: int):
        super().__init__()
        self.backbone, self.pooling, self.hidden, self.n_parcels = backbone, pooling, hidden, n_parcels
        features = backbone.pooled_size(pooling, n_parcels)
        self.head = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, signals: Tensor, coords: Tensor) -> Tensor:
        return self.head(self.backbone.embed(signals, coords, self.pooling)).squeeze(-1)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.describe(), "pooling": self.pooling, "hidden": self.hidden,
                "n_parcels": self.n_parcels}


@dataclass
class ClinicalModel:
    """One registered clinical model: kind, JSON config (with the target transform), parameters."""

    name: str
    kind: str  # "head", "svr_embedding", "svr_fc", "ridge_fc"
    config: dict[str, Any]
    module: nn.Module | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    backbone_state: dict[str, Tensor] | None = None  # the frozen backbone an embedding model reads


@dataclass
class ClinicalResult:
    target: str
    task: str  # "regression" or "classification"
    table: pd.DataFrame  # one row per model: each metric's mean across folds with its 95 % interval (+ r2_pooled)
    fold_metrics: dict[str, list[dict[str, float]]]  # model → one dict per fold
    predictions: dict[str, np.ndarray]  # model → out-of-fold prediction per subject (transformed scale)
    truth: np.ndarray  # transformed target per subject, each with its own fold's transform
    fold_transforms: list[TargetTransform]
    fold_test_subjects: list[list[str]]  # in memory only: never logged
    fitted: dict[str, ClinicalModel]  # refitted on all subjects (empty with refit=False)
    sizes: dict[str, int]
    window: int  # TRs per window the models read


def run_clinical(cohort: Cohort, backbone: nn.Module, cfg: ClinicalConfig | None = None,
                 progress: Progress = print) -> ClinicalResult:
    """Cross-validate every model of `cfg.models` on `cfg.target`, then refit each on all subjects."""
    cfg = cfg or ClinicalConfig()
    check_backbone_fits(backbone, cohort)
    torch.manual_seed(cfg.seed)
    column, _, task = TARGETS[cfg.target]
    people, values = _labelled(cohort, column, cfg)
    recordings = {p: cohort.manifest.loc[cohort.manifest["participant"] == p, "recording"].tolist() for p in people}
    coords = torch.as_tensor(cohort.atlas.coords, dtype=torch.float32, device=cfg.device)
    progress(f"clinical prediction of {cfg.target} ({task}) on cohort {cohort.name}: {len(people)} subjects, "
             f"{cfg.folds}-fold cross-validation")

    # Features that involve no fitting, computed once: FC per subject, frozen embeddings per subject.
    windows = {p: fixed_windows(cohort, recordings[p], backbone.window, per_recording=cfg.windows_per_recording)
               for p in people}
    features: dict[str, np.ndarray] = {}
    if {"svr_fc", "ridge_fc"} & set(cfg.models):
        features["fc"] = np.stack([np.mean([fc_features(np.asarray(cohort.recording(r))) for r in recordings[p]],
                                           axis=0) for p in people])
    if set(EMBEDDING_MODELS) & set(cfg.models):
        frozen = backbone.to(cfg.device).eval()
        features["embedding"] = np.stack([
            batched(lambda x: frozen.embed(x, coords, cfg.pooling), windows[p].signals, cfg.batch_size,
                    cfg.device).mean(axis=0) for p in people])
        backbone.cpu()

    folds = _folds(people, values if task == "classification" else None, cfg)
    oof = {m: np.full(len(people), np.nan) for m in cfg.models}
    truth = np.full(len(people), np.nan)
    fold_metrics: dict[str, list[dict[str, float]]] = {m: [] for m in cfg.models}
    transforms = []
    for k, (train, test) in enumerate(folds):
        transform = TargetTransform.fit(cfg.target, values[train])  # training subjects only
        transforms.append(transform)
        y_train, y_test = transform.transform(values[train]), transform.transform(values[test])
        truth[test] = y_test
        progress(f"- fold {k + 1}/{len(folds)}: {len(train)} training, {len(test)} test subjects")
        for name in [m for m in MODELS if m in cfg.models]:
            model = _fit(name, backbone, cohort, [people[i] for i in train], y_train, features, train, recordings,
                         cfg, task, coords, transform, progress, tag=f"{name} f{k + 1}")
            oof[name][test] = _predict(model, features, test, [windows[people[i]] for i in test], coords, cfg)
            fold_metrics[name].append(_metrics(y_test, oof[name][test], task))

    fitted = {}
    if cfg.refit:
        progress("- refit on all subjects")
        transform = TargetTransform.fit(cfg.target, values)
        everyone = np.arange(len(people))
        fitted = {name: _fit(name, backbone, cohort, people, transform.transform(values), features, everyone,
                             recordings, cfg, task, coords, transform, progress, tag=f"{name} all")
                  for name in [m for m in MODELS if m in cfg.models]}
    table = _table(fold_metrics, task)
    if task == "regression":  # R² of all out-of-fold predictions together: steadier than small folds' mean
        table["r2_pooled"] = [r2_score(truth, oof[name]) for name in table.index]
    return ClinicalResult(target=cfg.target, task=task, table=table, fold_metrics=fold_metrics, predictions=oof,
                          truth=truth, fold_transforms=transforms, fold_test_subjects=[[people[i] for i in t]
                                                                                        for _, t in folds],
                          fitted=fitted, sizes={"subjects": len(people), "folds": len(folds)},
                          window=backbone.window)


def _labelled(cohort: Cohort, column: str, cfg: ClinicalConfig) -> tuple[list[str], np.ndarray]:
    """Participants with recordings and a known value of `column`, and those values."""
    ph = cohort.phenotypes.assign(participant_id=cohort.phenotypes["participant_id"].astype(str))
    if column not in ph.columns:
        raise TaskError(f"cohort {cohort.path}: participants.tsv has no {column!r} column (it has "
                        f"{[c for c in ph.columns if c != 'participant_id']})")
    ph = ph.set_index("participant_id")
    people = [p for p in cohort.participants if p in ph.index and pd.notna(ph.loc[p, column])]
    if len(people) < 2 * cfg.folds:
        raise TaskError(f"cohort {cohort.path}: {len(people)} subjects with a known {column}; {cfg.folds}-fold "
                        f"cross-validation needs at least {2 * cfg.folds}")
    return people, ph.loc[people, column].to_numpy()


def _folds(people: list[str], values: np.ndarray | None, cfg: ClinicalConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-level folds, in an order fixed by a hash of (seed, participant); stratified for classification."""
    from sklearn.model_selection import KFold, StratifiedKFold

    order = np.array(sorted(range(len(people)),
                            key=lambda i: hashlib.sha256(f"{cfg.seed}:{people[i]}".encode()).hexdigest()))
    if values is not None:
        labels = TargetTransform.fit(cfg.target, values).transform(values)[order]
        if min(np.bincount(labels.astype(int), minlength=2)) < cfg.folds:
            raise TaskError(f"{cfg.target}: fewer than {cfg.folds} subjects in a class; lower --folds")
        splits = StratifiedKFold(cfg.folds).split(order, labels)
    else:
        splits = KFold(cfg.folds).split(order)
    return [(np.sort(order[tr]), np.sort(order[te])) for tr, te in splits]


# ------------------------------------------------------------------------------------------- fitting


def _fit(name: str, backbone: nn.Module, cohort: Cohort, train_people: list[str], y: np.ndarray,
         features: dict[str, np.ndarray], rows: np.ndarray, recordings: dict[str, list[str]], cfg: ClinicalConfig,
         task: str, coords: Tensor, transform: TargetTransform, progress: Progress, tag: str) -> ClinicalModel:
    base = {"target": transform.to_dict(), "task_type": task}
    if name == "brainlm":
        head = _fine_tune(backbone, cohort, train_people, y, recordings, cfg, task, coords, progress, tag)
        return ClinicalModel(name, ClinicalHead.kind, {**base, **head.config()}, module=head,
                             params={"steps": cfg.steps, "lr": cfg.lr, "encoder_lr_scale": cfg.encoder_lr_scale,
                                     "pooling": cfg.pooling})
    source = "embedding" if name in EMBEDDING_MODELS else "fc"
    x = features[source][rows]
    if name.startswith("ridge"):
        model: KernelModel | LinearModel = fit_linear_model(x, y, task, cfg.ridge_alphas, cfg.seed)
    else:
        model = fit_kernel_model(x, y, task, cfg.svr_c, cfg.seed)
    config = {**base, **model.config()}
    state = None
    if name in EMBEDDING_MODELS:
        config |= {"backbone": backbone.describe(), "pooling": cfg.pooling}
        state = backbone.state_dict()
    return ClinicalModel(name, name, config, arrays=model.arrays(), params=model.config()["chosen"],
                         backbone_state=state)


def _fine_tune(backbone: nn.Module, cohort: Cohort, people: list[str], y: np.ndarray,
               recordings: dict[str, list[str]], cfg: ClinicalConfig, task: str, coords: Tensor,
               progress: Progress, tag: str) -> ClinicalHead:
    """The head (and, at `encoder_lr_scale`, the encoder) trained on random crops labelled with their subject's y."""
    head = ClinicalHead(copy.deepcopy(backbone), cfg.pooling, cfg.head_hidden, cohort.n_parcels).to(cfg.device)
    lr_scale = encoder_lr(head, cfg.encoder_lr_scale)
    label = {r: float(v) for p, v in zip(people, y, strict=True) for r in recordings[p]}
    crops = RandomCrops(cohort, list(label), backbone.window, cfg.seed)
    train_cfg = fine_tuning(cfg)
    loss = nn.BCEWithLogitsLoss() if task == "classification" else nn.MSELoss()

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        x, target = batch
        return loss(head(x.to(cfg.device), coords), target.to(cfg.device))

    fit_steps(tag, head, loss_fn, step_batches(Labelled(crops, label), train_cfg), train_cfg, cfg.device, progress,
              lr_scale)
    return head.cpu()


def _predict(model: ClinicalModel, features: dict[str, np.ndarray], rows: np.ndarray, windows: list,
             coords: Tensor, cfg: ClinicalConfig) -> np.ndarray:
    """One value per subject (transformed scale; a logit / decision value for classification)."""
    if model.module is not None:
        head = model.module.to(cfg.device).eval()
        out = np.array([batched(lambda x: head(x, coords), w.signals, cfg.batch_size, cfg.device).mean()
                        for w in windows])
        head.cpu()
        return out
    source = "embedding" if model.kind in EMBEDDING_MODELS else "fc"
    cls = LinearModel if model.kind.startswith("ridge") else KernelModel
    return cls.from_arrays(model.config, model.arrays).decision(features[source][rows])


# ------------------------------------------------------------------------------------------- metrics


def _metrics(y: np.ndarray, pred: np.ndarray, task: str) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if task == "classification":
        auc = roc_auc_score(y, pred) if len(np.unique(y)) == 2 else float("nan")
        return {"balanced_accuracy": float(balanced_accuracy_score(y, pred > 0)), "auc": float(auc)}
    r = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else float("nan")
    return {"mse": float(((y - pred) ** 2).mean()), "r2": r2_score(y, pred), "pearson_r": r}


def _table(fold_metrics: dict[str, list[dict[str, float]]], task: str) -> pd.DataFrame:
    names = ["balanced_accuracy", "auc"] if task == "classification" else ["r2", "pearson_r", "mse"]
    rows = {}
    for model, folds in fold_metrics.items():
        row = {}
        for metric in names:
            values = np.array([f[metric] for f in folds])
            if metric == "pearson_r":  # averaged as Fisher z, so the interval stays inside (−1, 1)
                mean, low, high = np.tanh(mean_ci(np.arctanh(np.clip(values, -0.999999, 0.999999))))
            else:
                mean, low, high = mean_ci(values)
            if metric in ("balanced_accuracy", "auc"):  # bounded scores: so is their interval
                low, high = max(low, 0.0), min(high, 1.0)
            elif metric == "mse":
                low = max(low, 0.0)
            row |= {metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        rows[model] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table
