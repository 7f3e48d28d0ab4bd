"""Model behaviour: presets, equivariance, embeddings and attention."""

import pytest
import torch

from brainlm.config import PRESETS, preset
from brainlm.model import BrainLM, count_parameters


@pytest.mark.parametrize("name,target", [("13M", 13e6), ("111M", 111e6), ("650M", 650e6)])
def test_preset_parameter_counts_within_ten_percent(name, target):
    with torch.device("meta"):
        model = BrainLM(PRESETS[name])
    n = count_parameters(model)
    assert abs(n - target) / target <= 0.10, f"{name}: {n / 1e6:.1f}M parameters"


def test_tiny_preset_is_tiny():
    assert count_parameters(BrainLM(PRESETS["tiny"])) < 1e6


def test_permuting_parcels_with_their_centroids_permutes_the_output():
    torch.manual_seed(0)
    model = BrainLM(preset("tiny")).eval()
    B, P, T = 2, 9, 200
    N = T // 20
    x, coords = torch.randn(B, P, T), torch.randn(P, 3) * 60
    noise = torch.rand(B, P, N)
    perm = torch.randperm(P)
    out = model(x, coords, noise=noise.reshape(B, -1))
    out_p = model(x[:, perm], coords[perm], noise=noise[:, perm].reshape(B, -1))
    assert torch.equal(out_p.mask, out.mask[:, perm])
    assert torch.allclose(out_p.pred, out.pred[:, perm], atol=1e-5)
    assert torch.allclose(out_p.loss, out.loss, atol=1e-6)
    assert torch.allclose(out_p.cls, out.cls, atol=1e-5)


@pytest.mark.parametrize("parcels,window", [(5, 40), (424, 200), (17, 320)])
def test_any_parcel_count_and_window_multiple_of_patch(parcels, window):
    model = BrainLM(preset("tiny", window=window)).eval()
    x, coords = torch.randn(1, parcels, window), torch.randn(parcels, 3)
    out = model(x, coords)
    assert out.pred.shape == (1, parcels, window // 20, 20)
    assert torch.isfinite(out.loss)


def test_embed_gives_cls_tokens_and_per_layer_attention():
    model = BrainLM(preset("tiny")).eval()
    x, coords = torch.randn(2, 6, 200), torch.randn(6, 3)
    emb = model.embed(x, coords, output_attentions=True)
    cfg = model.cfg
    assert emb.cls.shape == (2, cfg.hidden)
    assert emb.tokens.shape == (2, 6, 10, cfg.hidden)
    assert len(emb.attentions) == cfg.layers
    L = 1 + 6 * 10
    for w in emb.attentions:
        assert w.shape == (2, cfg.heads, L, L)
        assert torch.allclose(w.sum(-1), torch.ones(2, cfg.heads, L), atol=1e-5)
    # the explicit attention path computes the same thing as SDPA
    assert torch.allclose(model.embed(x, coords).cls, emb.cls, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x, coords, noise = torch.randn(2, 4, 200), torch.randn(4, 3), torch.rand(2, 40)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = BrainLM(preset("tiny", activation_checkpointing=ckpt)).train()
        model(x, coords, noise=noise).loss.backward()
        grads.append(model.patch_embed.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
