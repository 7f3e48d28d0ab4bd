"""Forecasting references and the saved form of every task model: behaviour on data with a known answer."""

import numpy as np
import pytest
import torch
from fixtures_cohort import make_cohort

from brainlm.baselines.clinical import fc_features, fit_kernel_model, fit_linear_model
from brainlm.baselines.forecast import AR1, LSTMForecaster, ODEForecaster, Persistence, RidgeVAR
from brainlm.config import ForecastConfig, preset
from brainlm.data.store import open_cohort
from brainlm.engine import build_optimizer
from brainlm.model import BrainLM
from brainlm.tasks.common import BrainLMBackbone, encoder_lr, fine_tuning, fixed_windows
from brainlm.tasks.forecast import MODELS, BackboneForecaster, run_forecast
from brainlm.tasks.saved import CONFIG_FILE, WEIGHTS_FILE, load_task_model, save_task_model


def simulate_var(a: np.ndarray, steps: int, seed: int, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((a.shape[0], steps))
    for t in range(1, steps):
        x[:, t] = a @ x[:, t - 1] + noise * rng.standard_normal(a.shape[0])
    return x.astype(np.float32)


A = np.array([[0.6, 0.3, 0.0], [-0.2, 0.5, 0.2], [0.0, 0.4, 0.3]])


def test_ridge_var_recovers_a_planted_var_and_rolls_it_out():
    train = [simulate_var(A, 2000, seed) for seed in range(3)]
    val = simulate_var(A, 2000, 9)
    windows = np.stack([val[:, s : s + 40] for s in range(0, 1960, 40)])
    chosen, scores = RidgeVAR.select(train, windows[..., :30], windows[..., 30:], (1, 2, 3), (1e-4, 1e-2, 1.0))
    assert len(scores) == 9 and chosen.alpha < 1.0  # heavy ridge loses
    model = RidgeVAR(1, 1e-4).fit(train)
    assert np.allclose(model.weights[:3].T, A, atol=0.05) and np.allclose(model.weights[3], 0, atol=0.05)
    context = np.ones((2, 3, 5), np.float32)
    expected = [np.linalg.matrix_power(A, k) @ np.ones(3) for k in (1, 2, 3)]
    assert np.allclose(model.predict(context, 3)[0].T, expected, atol=0.05)  # rolled out step by step
    restored = RidgeVAR.from_arrays(model.config(), model.arrays())
    assert np.array_equal(restored.predict(context, 3), model.predict(context, 3))


def test_ar1_and_persistence():
    series = [simulate_var(np.diag([0.8, -0.5, 0.1]), 5000, 0)]
    ar1 = AR1().fit(series)
    assert np.allclose(ar1.a, [0.8, -0.5, 0.1], atol=0.03)
    context = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    assert np.array_equal(Persistence().predict(context, 2), np.repeat(context[..., -1:], 2, axis=-1))
    assert np.allclose(ar1.predict(context, 2)[0, :, 1], ar1.a * (ar1.a * context[0, :, -1] + ar1.c) + ar1.c)


@pytest.mark.parametrize("cls", [LSTMForecaster, ODEForecaster])
def test_sequence_models_start_as_persistence(cls):
    model = cls(5, 4)
    context = torch.randn(2, 5, 30)
    with torch.no_grad():
        out = model(context)
    assert out.shape == (2, 5, 4) and torch.allclose(out, context[..., -1:].expand(-1, -1, 4))


def test_brainlm_forecast_masks_exactly_the_last_patch_and_never_sees_the_future():
    torch.manual_seed(0)
    backbone = BrainLMBackbone(BrainLM(preset("tiny", window=60))).eval()
    coords = torch.randn(4, 3) * 50
    context = torch.randn(2, 4, 40)
    with torch.no_grad():
        first = backbone.forecast(context, coords)
        # the decoder's mask covers the last patch of every parcel and nothing else
        signals = torch.cat([context, torch.zeros(2, 4, 20)], dim=-1)
        noise = torch.zeros(2, 4, 3)
        noise[:, :, -1] = 1
        out = backbone.model(signals, coords, mask_ratio=1 / 3, noise=noise.reshape(2, 12))
    assert first.shape == (2, 4, 20)
    assert torch.equal(out.mask, noise)
    assert torch.allclose(out.pred[:, :, -1], first)


def test_fine_tuning_gives_the_pretrained_encoder_its_own_learning_rate_or_freezes_it():
    cfg = fine_tuning(ForecastConfig(lr=1e-3, weight_decay=0.01))
    module = BackboneForecaster(BrainLMBackbone(BrainLM(preset("tiny", window=40))))
    optimizer = build_optimizer(module, cfg, "cpu", encoder_lr(module, 0.1))
    group = {name: g for g in optimizer.param_groups for name, p in module.named_parameters()
             if any(p is q for q in g["params"])}
    assert len(group) == len(list(module.parameters()))  # every parameter trains
    for encoder in ("backbone.model.patch_embed.weight", "backbone.model.blocks.1.attn.qkv.weight"):
        assert (group[encoder]["lr"], group[encoder]["weight_decay"]) == (pytest.approx(1e-4), 0.01)
    assert group["backbone.model.cls_token"]["lr"] == pytest.approx(1e-4)
    assert group["backbone.model.cls_token"]["weight_decay"] == 0.0  # tokens are never decayed
    for decoder in ("backbone.model.decoder_blocks.0.mlp.0.weight", "backbone.model.decoder_pred.weight",
                    "backbone.model.mask_token"):
        assert group[decoder]["lr"] == pytest.approx(1e-3)

    frozen = BackboneForecaster(BrainLMBackbone(BrainLM(preset("tiny", window=40))))
    optimizer = build_optimizer(frozen, cfg, "cpu", encoder_lr(frozen, 0.0))
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in frozen.named_parameters():
        is_decoder = name.startswith(("backbone.model.decoder", "backbone.model.mask_token"))
        assert (id(p) in trained, p.requires_grad) == (is_decoder, is_decoder), name


def test_fc_features_are_fisher_z_of_the_upper_triangle():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 100))
    x[3] = 0.0  # a flat parcel: zeros, not NaN
    features = fc_features(x)
    corr = np.corrcoef(x[:3])
    assert features.shape == (6,) and np.all(np.isfinite(features))
    assert np.allclose(features[[0, 1, 3]], np.arctanh(corr[np.triu_indices(3, 1)]), atol=1e-5)
    assert np.allclose(features[[2, 4, 5]], 0)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_kernel_and_linear_models_match_scikit_learn_from_their_arrays(task):
    from sklearn.linear_model import Ridge, RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    y = x[:, 0] + 0.3 * rng.standard_normal(40)
    if task == "classification":
        y = (y > 0).astype(float)
    kernel = fit_kernel_model(x, y, task, (0.1, 1.0, 10.0), 0)
    linear = fit_linear_model(x, y, task, (0.1, 10.0), 0)
    svm = SVC(C=kernel.chosen["C"]) if task == "classification" else SVR(C=kernel.chosen["C"])
    ridge = (RidgeClassifier if task == "classification" else Ridge)(alpha=linear.chosen["alpha"])
    target = y.astype(int) if task == "classification" else y
    sk_kernel = make_pipeline(StandardScaler(), svm).fit(x, target)
    sk_linear = make_pipeline(StandardScaler(), ridge).fit(x, target)
    decide = (lambda m, z: m.decision_function(z)) if task == "classification" else (lambda m, z: m.predict(z))
    assert np.allclose(kernel.decision(x), decide(sk_kernel, x), atol=1e-4)
    assert np.allclose(linear.decision(x), decide(sk_linear, x), atol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_forecast_runs_for_any_parcel_count_and_recording_length(tmp_path):
    """7 parcels, recordings of 40 to 57 TRs, a 40-TR window: every model, the same test windows, saved and
    rebuilt from safetensors + JSON with the same predictions."""
    path = make_cohort(tmp_path / "c", n_participants=6, parcels=7, timepoints=57)
    cohort = open_cohort(path)
    backbone = BrainLMBackbone(BrainLM(preset("tiny", window=40)))
    cfg = ForecastConfig(steps=2, batch_size=4, eval_stride=10, var_lags=(1, 2),
                         var_alphas=(1e-3,), val_fraction=0.2, test_fraction=0.2)
    result = run_forecast(cohort, backbone, cfg, progress=lambda line: None)
    assert list(result.table.index) == list(MODELS)
    assert np.isfinite(result.table.to_numpy()).all()
    assert (result.window, result.horizon) == (40, 20) and result.per_parcel_r2["var"].shape == (7,)
    test_windows = fixed_windows(cohort, cohort.split(0.2, 0.2, 0)["test"], 40, stride=10)
    assert result.sizes["test_windows"] == len(test_windows.signals) == 2  # starts 0 and 10 of a 57-TR recording

    coords = np.asarray(cohort.atlas.coords, np.float32)
    context = test_windows.signals[:, :, :20]
    for name, fitted in result.fitted.items():
        folder = save_task_model("forecast", fitted, tmp_path / name, {"window": 40, "horizon": 20})
        predictor = load_task_model(folder / CONFIG_FILE, folder / WEIGHTS_FILE)
        got = predictor.predict({"context": context, "coords": coords})["forecast"]
        assert np.allclose(got, result.examples[name][: len(got)], atol=1e-5), name
