"""The downstream checks on a synthetic cohort with planted dynamics and phenotypes (tests/fixtures_tasks.py,
DOWNSTREAM), with a tiny BrainLM pretrained once per session on subjects disjoint from the task cohort.

What holds is asserted: fine-tuned BrainLM forecasts far better than persistence; functional connectivity
recovers the planted age effect, and so does a linear probe on the pretrained encoder's embedding. What does not
hold at this budget is printed with its numbers and reported in bench/README.md as a loss, not asserted and not
marked as an expected failure: pretrained BrainLM forecasts no better than the same network from scratch (both
near predicting zero, far behind the ridge VAR), and the fine-tuned MLP head on the embedding recovers age worse
than the linear probe on the same embedding.
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


@pytest.mark.slow
def test_fine_tuned_brainlm_forecasts_better_than_persistence(tiny, one_thread):
    cfg = ForecastConfig(steps=100, models=("brainlm", "scratch", "persistence"))
    t = run_forecast(tiny.cohort(), BrainLMBackbone(tiny.model()), cfg, progress=print).table
    print(f"pretraining took {tiny.seconds:.0f} s ({tiny.val_vs_zero:.2f} × zero)\n{table_text(t)}")
    # measured: MSE 0.50-0.55 against 0.82 for persistence, whatever pretraining learned
    assert t.loc["brainlm", "mse"] < 0.8 * t.loc["persistence", "mse"], t

    brainlm, scratch = t.loc["brainlm"], t.loc["scratch"]
    # Not asserted, a loss (bench/README.md): measured with the default model (Fourier spatial embedding, time bias)
    # R² -0.003 against scratch's -0.002 (MSE 0.5532 both), both on predicting zero. Without the time bias, 1 of 4
    # pretraining seeds learned the continuation (R² 0.158 against -0.002), the other three did not (-0.002-0.006).
    print(f"pretrained against scratch: R² {brainlm['r2']:.3f} against {scratch['r2']:.3f}, MSE {brainlm['mse']:.4f} "
          f"against {scratch['mse']:.4f}")


@pytest.mark.slow
def test_clinical_models_recover_the_planted_age_effect(tiny, one_thread):
    """Age shifts two network couplings. Functional connectivity recovers it well; the pretrained encoder's
    connectivity-pooled embedding carries it too (linear probe). R² is over all out-of-fold predictions (folds of 8 subjects make each fold's own R²
    mostly noise)."""
    cfg = ClinicalConfig(target="age", folds=5, steps=100, encoder_lr_scale=0.0,
                         models=("brainlm", "ridge_embedding", "ridge_fc"), refit=False)
    t = run_clinical(tiny.cohort(), BrainLMBackbone(tiny.model()), cfg, progress=print).table
    print(table_text(t))
    assert t.loc["ridge_fc", "r2_pooled"] > 0.4, t  # measured 0.66-0.69

    # The linear probe on the frozen pretrained embedding: measured 0.18 with the default model (0.12 with the
    # paper's embedding and attention). The fine-tuned MLP head on the same embedding does worse (measured -0.04,
    # r 0.31): not asserted, a loss (bench/README.md).
    probe, head, r = t.loc["ridge_embedding", "r2_pooled"], t.loc["brainlm", "r2_pooled"], t.loc["brainlm", "pearson_r"]
    assert probe > 0.1, t
    print(f"age from the embedding: linear probe R² {probe:.3f}, fine-tuned head R² {head:.3f} (r {r:.2f})")
