"""Attention read-outs, network scoring and perturbation parts, on untrained tiny models (fast, no training)."""

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_cohort import make_cohort

from brainlm.config import NetworksConfig, PerturbConfig, preset
from brainlm.data.atlas import Atlas
from brainlm.data.store import open_cohort
from brainlm.errors import ConfigError
from brainlm.model import BrainLM
from brainlm.tasks.attention import AttentionError, attention_weights, cls_attention, untrained_like
from brainlm.tasks.common import TaskError, cut_windows, sample_recordings
from brainlm.tasks.networks import (
    NetworksError,
    feature_rows,
    identify_networks,
    labelled_parcels,
    parcel_attention,
    score_networks,
)
from brainlm.tasks.perturb import (
    PerturbError,
    drive,
    drive_signal,
    forecast,
    optimise_perturbation,
    predict_perturbation,
)

P, T = 6, 60  # parcels, window (3 patches of 20)
# One intra-op thread: the perturbation's many small backward passes run 15× slower on two busy cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return BrainLM(preset("tiny", window=T)).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, P, T, generator=g), torch.randn(P, 3, generator=g) * 50


def test_hooked_weights_are_the_models_own_attention(model, batch):
    signals, coords = batch
    reference = model.embed(signals, coords, output_attentions=True).attentions  # per block (B, H, L, L)
    with attention_weights(model.blocks, [0, 1], lambda w: w.clone()) as captured:
        cls = model.embed(signals, coords).cls
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(captured, reference, strict=True))
    assert torch.allclose(cls, model.embed(signals, coords).cls, atol=1e-6)  # the forward is unchanged
    assert not any(b.attn._forward_hooks or b.attn._forward_pre_hooks for b in model.blocks)  # hooks removed
    expected = reference[-1][:, :, 0, 1:].mean(1).reshape(2, P, 3)
    assert torch.allclose(cls_attention(model, signals, coords, layer=-1), expected, atol=1e-6)
    with pytest.raises(AttentionError, match="layer 5 does not exist"):
        cls_attention(model, signals, coords, layer=5)


def test_encoder_parcel_attention_matches_the_weights(model, batch):
    signals, coords = batch
    weights = torch.stack(model.embed(signals, coords, output_attentions=True).attentions).mean(0)
    a = weights[:, :, 1:, 1:].mean(1).reshape(2, P, 3, P, 3)
    cfg = NetworksConfig(source="encoder", layer=None, same_time=True)
    total, count = parcel_attention(model, signals, coords, cfg)
    expected = torch.diagonal(a, dim1=2, dim2=4).mean((0, -1)).double()  # same patch index, mean over batch
    assert torch.allclose(total / count, expected, atol=1e-6)


def test_decoder_parcel_attention_pairs_masked_queries_with_visible_keys(model, batch):
    signals, coords = batch
    cfg = NetworksConfig(source="decoder", layer=None, same_time=False, mask_draws=1)
    total, count = parcel_attention(model, signals, coords, cfg, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mask = model(signals, coords, noise=torch.rand(2, P * 3, generator=torch.Generator().manual_seed(0))).mask
    masked, visible = mask.sum(-1), (1 - mask).sum(-1)  # per window and parcel
    expected = (masked[:, :, None] * visible[:, None, :]).sum(0).double()
    assert torch.equal(count, expected)  # every (masked query of p, visible key of q) pair, nothing else
    assert torch.isfinite(total).all() and (total >= 0).all()


def test_windows_are_aligned_from_the_start():
    recording = np.arange(3 * 250, dtype=np.float32).reshape(3, 250)
    x = cut_windows(recording, 100)
    assert x.shape == (2, 3, 100) and x[1, 0, 0] == 100 and x[0, 2, 0] == 500
    assert cut_windows(recording, 100, max_windows=1).shape == (1, 3, 100)
    with pytest.raises(TaskError, match="shorter than the model's 300-TR window"):
        cut_windows(recording, 300)


def test_recording_samples_are_seeded_and_keep_their_order():
    ids = [f"r{i}" for i in range(10)]
    chosen = sample_recordings(ids, 4, seed=1)
    assert chosen == sample_recordings(ids, 4, seed=1) and len(chosen) == 4
    assert chosen == sorted(chosen, key=ids.index) and sample_recordings(ids, None, 1) == ids


# ------------------------------------------------------------------------------------------ networks


def _atlas(labels):
    n = len(labels)
    return Atlas(name="toy", index=np.arange(1, n + 1), names=[f"P{i}" for i in range(n)],
                 coords=np.random.default_rng(0).uniform(-50, 50, (n, 3)).astype(np.float32),
                 networks={"nets": labels})


def test_labelled_parcels_leave_out_unlabelled_and_single_parcel_networks():
    atlas = _atlas(["A", "A", "", "B", "B", "C", "", "A"])
    positions, labels, unlabelled, small = labelled_parcels(atlas, "nets")
    assert positions.tolist() == [0, 1, 3, 4, 7] and labels == ["A", "A", "B", "B", "A"]
    assert unlabelled == 2 and small == {"C": 1}
    with pytest.raises(NetworksError, match="unknown label column 'yeo7'; atlas toy has \\['nets'\\]"):
        labelled_parcels(atlas, "yeo7")
    with pytest.raises(NetworksError, match="too few labelled parcels"):
        labelled_parcels(_atlas(["A", "A", "", "B", ""]), "nets")


def test_knn_scores_separable_features_perfectly_on_shared_folds():
    labels = ["A"] * 6 + ["B"] * 6 + ["C"] * 3
    atlas = _atlas(labels)
    codes = np.repeat(np.eye(3), [6, 6, 3], axis=0)
    features = {"good": codes + 0.01 * np.random.default_rng(0).standard_normal(codes.shape),
                "noise": np.random.default_rng(1).standard_normal((15, 3))}
    result = score_networks(features, atlas, "nets", NetworksConfig(neighbours=3, folds=5))
    assert result.folds == 3  # the smallest network has 3 parcels
    assert result.scores["good"].accuracy == 1.0 and result.scores["good"].balanced_accuracy == 1.0
    assert np.array_equal(result.scores["good"].confusion, np.diag([6, 6, 3]))
    assert result.scores["noise"].balanced_accuracy < 0.8
    assert result.networks == ["A", "B", "C"] and result.chance_balanced == pytest.approx(1 / 3)
    assert result.table()["method"].tolist() == ["good", "noise"]


def test_feature_rows_ignore_the_diagonal_and_compare_shapes():
    m = np.array([[9.0, 1, 2], [1, 9, 3], [2, 3, 9]])
    rows = feature_rows(m)
    assert np.allclose(rows.mean(1), 0) and np.allclose(rows.std(1), 1)
    assert np.allclose(feature_rows(m * 10 + 5), rows)  # scale and offset do not matter
    assert np.allclose(feature_rows(np.diag([1.0, 2, 3]) + 0.5), 0)  # a diagonal alone carries nothing


def test_a_model_reads_an_atlas_it_never_saw(model, tmp_path):
    """The model knows parcels only by their centroids: 6-parcel training, a 12-parcel atlas of its own here."""
    cohort_path = make_cohort(tmp_path / "other", n_participants=3, parcels=12, timepoints=120)
    atlas = pd.read_csv(cohort_path / "atlas.tsv", sep="\t")
    atlas["lab_networks"] = ["A", "B", "C"] * 4
    atlas.to_csv(cohort_path / "atlas.tsv", sep="\t", index=False)
    result = identify_networks(model, open_cohort(cohort_path), NetworksConfig(labels="lab_networks", folds=2))
    assert result.column == "lab_networks" and len(result.labels) == 12
    assert set(result.scores) == {"attention", "fc", "untrained", "coordinates"}
    assert result.matrices["attention"].shape == (12, 12)


def test_untrained_reference_is_seeded_and_leaves_the_global_rng_alone(model):
    state = torch.random.get_rng_state()
    a, b = untrained_like(model, 3), untrained_like(model, 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.patch_embed.weight, model.patch_embed.weight)


# -------------------------------------------------------------------------------------- perturbation


def test_forecast_sees_everything_but_the_horizon(model, batch):
    signals, coords = batch
    base = forecast(model, signals, coords, horizon=1)
    assert base.shape == (2, P, 20)
    future = signals.clone()
    future[:, :, 40:] += 5.0  # the forecast patches are masked: changing them changes nothing
    assert torch.allclose(forecast(model, future, coords, 1), base, atol=1e-6)
    past = signals.clone()
    past[:, 0, :20] += 5.0
    # Small in an untrained model (its relative-time bias starts out favouring tokens of the same patch, here all
    # masked), but far above the exact zero of the masked future.
    assert (forecast(model, past, coords, 1) - base).abs().max() > 1e-6
    with pytest.raises(PerturbError, match="horizon must be between 1 and 2"):
        forecast(model, signals, coords, horizon=3)


def test_served_prediction_and_drive_report_forecast_changes(model, batch):
    signals, coords = batch
    zero = predict_perturbation(model, {"signals": signals.numpy(), "coords": coords.numpy(),
                                        "perturbation": np.zeros((P, T), np.float32)}, {"horizon": 2})
    assert zero["forecast"].shape == (2, P, 40) and np.allclose(zero["change"], 0)
    pushed = np.zeros((P, T), np.float32)
    pushed[2] = drive_signal("block", T, amplitude=2.0, period=20)
    moved = predict_perturbation(model, {"signals": signals.numpy(), "coords": coords.numpy(),
                                         "perturbation": pushed})
    assert moved["change"].shape == (2, P) and moved["change"].max() > 0
    result = drive(model, signals, coords, [2], drive_signal("block", T, 2.0, 20), horizon=1)
    assert result.driven.tolist() == [False, False, True, False, False, False]
    assert np.allclose(result.change, moved["change"].mean(0), rtol=0.5)  # rms over windows vs mean of rms
    assert result.parcels["driven"].tolist()[-1]  # driven parcels are listed last
    with pytest.raises(PerturbError, match="positions in \\[0, 6\\)"):
        drive(model, signals, coords, [9], np.zeros(T))


def test_perturbation_matches_the_target_sparsely_and_leaves_the_model_alone(model):
    g = torch.Generator().manual_seed(2)
    source = torch.randn(8, P, T, generator=g)
    target = source.clone()
    target[:, 3] += 1.0
    coords = torch.randn(P, 3, generator=g) * 50
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = []
    for sparsity in (0.0, 0.3, 1.0):
        cfg = PerturbConfig(mode="parcel_time", representation="cls", sparsity=sparsity, steps=60, lr=0.1)
        result = optimise_perturbation(model, source, target, coords, cfg, [f"P{i}" for i in range(P)])
        assert result.history[0] == pytest.approx(1.0) and result.loss_end < (0.3 if sparsity < 1 else 1.0)
        assert result.delta.shape == (P, T) and result.parcels["rank"].tolist() == list(range(1, P + 1))
        sizes.append(result.size)
    assert (sizes[0] > 0).all() and (sizes[2] == 0).sum() > (sizes[0] == 0).sum()  # the penalty zeroes parcels
    nothing = optimise_perturbation(model, source, target, coords, PerturbConfig(sparsity=100.0, steps=10))
    assert (nothing.size == 0).all() and nothing.loss_end == pytest.approx(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # frozen only while optimising
    with pytest.raises(ConfigError, match="PerturbConfig.mode = 'voxel': must be one of"):
        PerturbConfig(mode="voxel")
