"""Prefect flow `promote`: gated promotion, one library call (brainlm/promotion.py).

The challenger (a version of the pretrained model, default the one aliased challenger) is scored against the
champion and the reference predictors on the cohort's held-out participants, with the same windows and masks; it
becomes champion only if it wins by the margin, and its version records why either way (`gate.*` tags and its
description). Run it from the deployment `promote/default` that `make serve` serves:

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run promote/default -p cohort=demo --watch
"""

from __future__ import annotations

from prefect import flow, task

from brainlm import promotion
from brainlm.config import PromotionConfig, with_options
from flows.pretrain import STEP


@task(name="gate", **STEP)
def gate(cohort: str, version: int | None, cfg: PromotionConfig) -> promotion.GateDecision:
    return promotion.gate(cohort, version, cfg)


@flow(name="promote", log_prints=True, persist_result=True)
def promote(
    cohort: str,
    version: int | None = None,
    # PromotionConfig, field for field (None keeps its default)
    margin: float | None = None,
    split: str | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    eval_crops: int | None = None,
    mask_ratio: float | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict:
    """Promote `version` (default: the challenger) to champion only if it wins on `cohort`'s held-out participants.

    Every other parameter is a field of PromotionConfig (`brainlm promote --help` describes each).
    """
    options = {k: v for k, v in locals().items() if k not in ("cohort", "version")}
    decision = gate(cohort, version, with_options(PromotionConfig(), **options))
    print(decision.summary())
    return decision.as_dict()
