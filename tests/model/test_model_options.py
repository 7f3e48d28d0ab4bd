"""How position reaches attention: the relative-time attention bias and the Fourier spatial embedding (the
defaults), and the paper's MLP embedding with plain attention (the options that switch them off)."""

import math

import pytest
import torch

from brainlm.config import ModelConfig, from_dict, preset, to_dict
from brainlm.model import TIME_BIAS_FREQUENCIES, Attention, BrainLM, FourierFeatures, time_bias_features


def test_time_bias_adds_a_cosine_series_in_patch_distance_to_the_logits():
    torch.manual_seed(0)
    attn = Attention(16, 2, 0.0, time_bias=True)
    with torch.no_grad():
        attn.time_bias.uniform_(-1, 1)
    parcels, patches = 3, 4
    x = torch.randn(2, 1 + parcels * patches, 16)
    features = time_bias_features(patches, 2, parcels, None)
    out, weights = attn(x, need_weights=True, time_features=features)
    fast, _ = attn(x, time_features=features)  # the fused kernel path gives the same output
    assert torch.allclose(out, fast, atol=1e-6)

    q, k, _ = attn.qkv(x).view(2, x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
    n = torch.cat([torch.tensor([-1]), torch.arange(patches).repeat(parcels)])  # CLS, then parcel-major tokens
    freq = math.pi * (torch.arange(TIME_BIAS_FREQUENCIES) + 0.5) / TIME_BIAS_FREQUENCIES
    distance = (n[:, None] - n[None, :]).float()
    bias = (attn.time_bias[:, :, None, None] * torch.cos(freq[:, None, None] * distance)).sum(1)
    bias = bias.masked_fill((n[:, None] < 0) | (n[None, :] < 0), 0.0)  # no bias to or from CLS
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias, dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_time_bias_starts_out_preferring_tokens_of_the_same_patch():
    attn = Attention(16, 2, 0.0, time_bias=True)
    with torch.no_grad():  # no content: what is left is the bias
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
    x = torch.zeros(1, 1 + 5 * 10, 16)
    _, w = attn(x, need_weights=True, time_features=time_bias_features(10, 1, 5, None))
    n = torch.arange(10).repeat(5)
    same = (n[:, None] == n[None, :]).float()
    share_same_patch = (w[0, :, 1:, 1:] * same).sum(-1)
    assert share_same_patch.min() > 0.99  # 5 of 51 tokens share the patch, and get almost all the weight


def test_fourier_features_are_fixed_saved_and_tell_nearby_parcels_apart():
    a, b = FourierFeatures(32, 20.0), FourierFeatures(32, 20.0)
    assert torch.equal(a.freq, b.freq)  # from a fixed seed, not the global RNG
    model = BrainLM(preset("tiny"))
    assert "pos_embed.spatial.0.freq" in model.state_dict()  # the default embedding
    assert "pos_embed.spatial.0.freq" not in BrainLM(preset("tiny", spatial_embedding="mlp")).state_dict()
    wavelengths = 2 * math.pi / a.freq.norm(dim=1)
    assert 20.0 <= wavelengths.min() and wavelengths.max() <= 200.0
    coords = torch.tensor([[30.0, -20.0, 10.0], [38.0, -20.0, 10.0]])  # 8 mm apart
    fa = a(coords)
    assert fa.shape == (2, 64)
    assert torch.linalg.vector_norm(fa[0] - fa[1]) > 0.2 * torch.linalg.vector_norm(fa[0])


@pytest.mark.parametrize("spatial", ["fourier", "mlp"])
@pytest.mark.parametrize("time_bias", [True, False])
def test_options_keep_parcel_permutation_equivariance_and_any_shape(spatial, time_bias):
    torch.manual_seed(0)
    model = BrainLM(preset("tiny", spatial_embedding=spatial, time_bias=time_bias)).eval()
    B, P, T = 2, 9, 200
    x, coords, noise = torch.randn(B, P, T), torch.randn(P, 3) * 60, torch.rand(B, P, T // 20)
    perm = torch.randperm(P)
    out = model(x, coords, noise=noise.reshape(B, -1))
    out_p = model(x[:, perm], coords[perm], noise=noise[:, perm].reshape(B, -1))
    assert torch.allclose(out_p.pred, out.pred[:, perm], atol=1e-5)
    assert torch.allclose(out_p.cls, out.cls, atol=1e-5)
    longer = model(torch.randn(1, 5, 320), coords[:5])  # another parcel count, another window
    assert longer.pred.shape == (1, 5, 16, 20) and torch.isfinite(longer.loss)


def test_options_work_with_activation_checkpointing_and_explicit_attention():
    torch.manual_seed(0)
    x, coords, noise = torch.randn(2, 4, 200), torch.randn(4, 3) * 50, torch.rand(2, 40)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = BrainLM(preset("tiny", activation_checkpointing=ckpt)).train()
        model(x, coords, noise=noise).loss.backward()
        grads.append(model.blocks[0].attn.time_bias.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    model = BrainLM(preset("tiny")).eval()
    emb = model.embed(x, coords, output_attentions=True)
    assert torch.allclose(model.embed(x, coords).cls, emb.cls, atol=1e-5)


def test_option_fields_validate_and_round_trip():
    cfg = preset("tiny", time_bias=False, spatial_embedding="mlp", fourier_mm=15.0)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="spatial_embedding"):
        ModelConfig(spatial_embedding="learned")
    with pytest.raises(ValueError, match="fourier_mm"):
        ModelConfig(fourier_mm=0.0)
