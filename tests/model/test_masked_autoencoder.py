"""The masked autoencoder's defining property: masked input never reaches the encoder, and only it is scored.

With the mask fixed (the same noise), changing the signal inside masked patches leaves the encoder's output (CLS
+ visible tokens) and every prediction unchanged, and changes the loss, whose targets they are. Changing the
signal inside one visible patch changes the encoder's output.
"""

import torch

from brainlm.config import preset
from brainlm.model import BrainLM

B, P, T = 2, 6, 200
CFG = preset("tiny")  # mask ratio 0.75, patches of 20 TRs: 10 patches per parcel


def setup():
    torch.manual_seed(0)
    model = BrainLM(CFG).eval()
    x, coords = torch.randn(B, P, T), torch.randn(P, 3) * 50
    noise = torch.rand(B, P * CFG.patches_per_parcel)
    return model, x, coords, noise


def encode(model, x, coords, noise):
    with torch.no_grad():
        latent, mask, _, _ = model.forward_encoder(x, coords, CFG.mask_ratio, noise)
        return latent, mask, model(x, coords, noise=noise)


def in_patches(mask: torch.Tensor) -> torch.Tensor:
    """A (B, P·N) token mask as a (B, P, T) mask over timepoints."""
    return mask.reshape(B, P, -1, 1).expand(-1, -1, -1, CFG.patch_size).reshape(B, P, T).bool()


def test_masked_input_never_reaches_the_encoder_but_changes_the_loss():
    model, x, coords, noise = setup()
    latent, mask, out = encode(model, x, coords, noise)
    assert latent.shape == (B, 1 + round(P * CFG.patches_per_parcel * (1 - CFG.mask_ratio)), CFG.hidden)

    masked = in_patches(mask)
    changed = torch.where(masked, x + 5 * torch.randn_like(x), x)
    latent2, mask2, out2 = encode(model, changed, coords, noise)

    assert torch.equal(mask2, mask)
    torch.testing.assert_close(latent2, latent, rtol=0, atol=1e-6)  # CLS and every visible token
    torch.testing.assert_close(out2.pred, out.pred, rtol=0, atol=1e-6)  # the decoder sees only the latent
    assert out2.loss > out.loss + 1.0  # the masked patches are the targets


def test_a_visible_patch_reaches_the_encoder():
    model, x, coords, noise = setup()
    latent, mask, _ = encode(model, x, coords, noise)
    b, token = 0, int((mask[0] == 0).nonzero()[0])
    visible = torch.zeros(B, P * CFG.patches_per_parcel)
    visible[b, token] = 1
    changed = torch.where(in_patches(visible), x + 5 * torch.randn_like(x), x)
    latent2, mask2, _ = encode(model, changed, coords, noise)

    assert torch.equal(mask2, mask)
    assert not torch.allclose(latent2[b], latent[b], atol=1e-3)
    torch.testing.assert_close(latent2[1 - b], latent[1 - b], rtol=0, atol=1e-6)  # the other window is untouched
