"""The downstream checks on a synthetic cohort with planted dynamics and phenotypes (tests/fixtures_tasks.py,
DOWNSTREAM), with a tiny BrainLM pretrained once per session on subjects disjoint from the task cohort.

Each test first asserts what holds whatever pretraining learned (fine-tuned BrainLM forecasts far better than
persistence; functional connectivity recovers the planted age effect), then the claims about pretraining itself:
pretrained BrainLM forecasts better than the same network from scratch, and its embedding carries the age effect.
At this CI budget those depend on whether pretraining picked up the temporal continuation of a parcel's own series
(measured over 11 pretraining runs of 600-1000 steps, several seeds, mask 0.5 or 0.75, lr 1e-3 or 3e-3: in 4,
with R² over scratch +0.05 to +0.09 after 200 fine-tuning steps, against -0.01 to +0.02 in the others). When they do not hold the test is reported as an expected failure with the numbers (`pytest -ra`
lists them), never as a pass.
"""

import pytest
from fixtures_tasks import DOWNSTREAM

from brainlm.config import ClinicalConfig, ForecastConfig
from brainlm.tasks.clinical import run_clinical
from brainlm.tasks.common import BrainLMBackbone, table_text
from brainlm.tasks.forecast import run_forecast


@pytest.fixture(scope="module")
def tiny(pretrained):
    return pretrained(DOWNSTREAM)


def pretraining_fell_short(pretrained, claim: str, numbers: str) -> None:
    pytest.xfail(f"{claim} does not hold at the CI pretraining budget ({pretrained.val_vs_zero:.2f} × the zero "
                 f"reference's held-out masked MSE): {numbers}")


@pytest.mark.slow
def test_pretrained_brainlm_forecasts_better_than_scratch_and_persistence(tiny, one_thread):
    cfg = ForecastConfig(steps=100, models=("brainlm", "scratch", "persistence"))
    t = run_forecast(tiny.cohort(), BrainLMBackbone(tiny.model()), cfg, progress=print).table
    print(f"pretraining took {tiny.seconds:.0f} s ({tiny.val_vs_zero:.2f} × zero)\n{table_text(t)}")
    # measured: MSE 0.50-0.55 against 0.82 for persistence, whatever pretraining learned
    assert t.loc["brainlm", "mse"] < 0.8 * t.loc["persistence", "mse"], t

    brainlm, scratch = t.loc["brainlm"], t.loc["scratch"]
    # measured after a pretraining that learned the continuation: R² 0.054 against -0.001, MSE 0.522 against 0.552
    # (200 steps: 0.105 against 0.010); after one that did not: R² 0.021 against 0.010
    if not (brainlm["r2"] > scratch["r2"] + 0.04 and brainlm["mse"] < 0.96 * scratch["mse"]):
        pretraining_fell_short(tiny, "pretrained BrainLM forecasting better than scratch",
                               f"R² {brainlm['r2']:.3f} against {scratch['r2']:.3f}, MSE {brainlm['mse']:.4f} "
                               f"against {scratch['mse']:.4f}")


@pytest.mark.slow
def test_clinical_models_recover_the_planted_age_effect(tiny, one_thread):
    """Age shifts two network couplings. Functional connectivity recovers it well; the pretrained encoder's
    connectivity-pooled embedding carries it too (linear probe), and the fine-tuned MLP head on that embedding
    recovers it, weakly. R² is over all out-of-fold predictions (folds of 8 subjects make each fold's own R²
    mostly noise)."""
    cfg = ClinicalConfig(target="age", folds=5, steps=100, encoder_lr_scale=0.0,
                         models=("brainlm", "ridge_embedding", "ridge_fc"), refit=False)
    t = run_clinical(tiny.cohort(), BrainLMBackbone(tiny.model()), cfg, progress=print).table
    print(table_text(t))
    assert t.loc["ridge_fc", "r2_pooled"] > 0.4, t  # measured 0.66-0.69

    # measured: 0.20 (probe) and 0.10 (head) after a pretraining run that forecast well, 0.12 and -0.01 after one
    # that did not
    probe, head, r = t.loc["ridge_embedding", "r2_pooled"], t.loc["brainlm", "r2_pooled"], t.loc["brainlm", "pearson_r"]
    if not (probe > 0.1 and head > 0.05 and r > 0.1):
        pretraining_fell_short(tiny, "the pretrained embedding recovering age",
                               f"pooled R² {probe:.3f} (linear probe), {head:.3f} (fine-tuned head, r {r:.2f})")
