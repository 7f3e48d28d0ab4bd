"""Pure pieces of the model: patches, masking, loss, configs."""

import dataclasses

import pytest
import torch

from brainlm.config import ModelConfig, TrainConfig, from_dict, preset, to_dict
from brainlm.model import BrainLM, masked_r2

CFG = preset("tiny")


def test_patchify_unpatchify_round_trip():
    model = BrainLM(CFG)
    x = torch.randn(3, 7, 200)
    patches = model.patchify(x)
    assert patches.shape == (3, 7, 10, 20)
    assert torch.equal(patches[0, 2, 3], x[0, 2, 60:80])  # patch n of parcel p is TRs [20n, 20n + 20)
    assert torch.equal(model.unpatchify(patches), x)


def test_patchify_rejects_window_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        BrainLM(CFG).patchify(torch.randn(1, 4, 210))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(window=210)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.75])
def test_masking_keeps_exactly_the_configured_share(ratio):
    model = BrainLM(CFG)
    x = torch.randn(4, 400, 8)
    visible, mask, ids_restore = model.random_masking(x, ratio)
    assert visible.shape == (4, round(400 * (1 - ratio)), 8)
    assert torch.all(mask.sum(dim=1) == 400 - visible.shape[1])
    # the visible tokens are exactly the unmasked ones
    for b in range(4):
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept, dim=0).values, torch.sort(visible[b], dim=0).values)


def test_same_noise_gives_same_mask_and_different_noise_differs():
    model = BrainLM(CFG)
    x = torch.randn(2, 100, 8)
    noise = torch.rand(2, 100)
    _, m1, _ = model.random_masking(x, 0.5, noise)
    _, m2, _ = model.random_masking(x, 0.5, noise.clone())
    _, m3, _ = model.random_masking(x, 0.5, torch.rand(2, 100))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


def test_loss_ignores_visible_patches():
    model = BrainLM(CFG)
    target = torch.randn(2, 50, 20)
    pred = torch.randn(2, 50, 20)
    mask = (torch.rand(2, 50) < 0.5).float()
    base = model.forward_loss(target, pred, mask)
    pred_changed_visible = pred.clone()
    pred_changed_visible[mask == 0] += 100.0
    assert torch.allclose(model.forward_loss(target, pred_changed_visible, mask), base)
    pred_changed_masked = pred.clone()
    pred_changed_masked[mask == 1] += 1.0
    assert model.forward_loss(target, pred_changed_masked, mask) > base
    expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert torch.allclose(base, expected)


def test_full_forward_loss_ignores_visible_reconstruction():
    """End to end: the forward pass's loss is the MSE over the masked patches alone, computed here by hand from
    its prediction (what reaches the encoder is tested in tests/model/test_masked_autoencoder.py)."""
    torch.manual_seed(0)
    model = BrainLM(CFG).eval()
    x, coords = torch.randn(2, 6, 200), torch.randn(6, 3) * 50
    noise = torch.rand(2, 60)
    out = model(x, coords, noise=noise)
    target = model.patchify(x)
    by_hand = ((out.pred - target) ** 2).mean(-1)[out.mask == 1].mean()
    assert torch.allclose(out.loss, by_hand, atol=1e-6)
    assert out.mask.sum().item() == 2 * 45  # 0.75 of 60 tokens, per sample


def test_masked_r2_perfect_and_mean_prediction():
    t = torch.randn(2, 30, 20)
    mask = torch.ones(2, 30)
    assert masked_r2(t, t, mask).item() == pytest.approx(1.0)
    assert masked_r2(t, torch.full_like(t, t.mean().item()), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_configs_round_trip_and_reject_unknown_keys():
    cfg = preset("13M", mask_ratio=0.5)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    tc = TrainConfig(steps=3, betas=(0.8, 0.9))
    assert from_dict(TrainConfig, to_dict(tc)) == tc
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(ModelConfig, {**to_dict(cfg), "hiden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert dataclasses.replace(cfg, mask_ratio=0.2).mask_ratio == 0.2
