"""BrainLM: a masked autoencoder over fMRI parcel time series, readable top to bottom.

    signals (B, P, T) ──patchify──> tokens (B, P·N, S)      N = T / S patches per parcel, S = patch size
            ──embed──> patch + spatial(Fourier features of parcel XYZ) + temporal(patch index)
            ──mask──> keep a random (1 − ratio) share of tokens
            ──encode──> Transformer over [CLS] + visible tokens
            ──decode──> lighter Transformer over all tokens (mask tokens fill the gaps)
            ──loss──> MSE on the masked patches only

Tokens are (parcel, patch) pairs, so any parcel count works (the atlas only supplies centroids) and any window
that is a multiple of the patch size works (the temporal embedding is sinusoidal over patch index).
Every attention layer adds a learned relative-time bias that starts out favouring tokens of the same patch:
in fMRI a masked patch is predicted mostly from other parcels at the same timepoints, and without the bias the
model first sits on the zero prediction for hundreds of steps before it finds them. The spatial embedding maps
random Fourier features of the centroid (wavelengths 200 mm down to `fourier_mm`), which tell parcels apart
from the start; `spatial_embedding="mlp"` and `time_bias=False` give the paper's embedding and attention.
Attention runs through `scaled_dot_product_attention` (flash / memory-efficient kernels); weights are computed
explicitly only when asked for, for interpretability. This module needs torch alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from brainlm.config import ModelConfig


@dataclass
class BrainLMOutput:
    loss: Tensor  # masked-patch MSE (scalar)
    pred: Tensor  # (B, P, N, S) reconstruction of every patch
    mask: Tensor  # (B, P, N) 1 = masked (hidden from the encoder), 0 = visible
    cls: Tensor  # (B, D) encoder CLS embedding
    attentions: list[Tensor] | None = None  # per encoder layer (B, heads, 1 + visible, 1 + visible)


@dataclass
class BrainLMEmbedding:
    cls: Tensor  # (B, D) CLS embedding: the recording-level representation
    tokens: Tensor  # (B, P, N, D) one embedding per (parcel, patch) token
    attentions: list[Tensor] | None = None  # per encoder layer (B, heads, 1 + P·N, 1 + P·N); index 0 is CLS


# ------------------------------------------------------------------------------------------- blocks


TIME_BIAS_FREQUENCIES = 8  # cosine terms of the learned relative-time attention bias


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, time_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        # bias(Δn) = Σ_f c_hf cos(ω_f Δn) per head: a relative-time preference, added to the logits through
        # extra query/key channels so the fused attention kernels still apply.
        self.time_bias = nn.Parameter(torch.ones(heads, TIME_BIAS_FREQUENCIES)) if time_bias else None

    def forward(self, x: Tensor, need_weights: bool = False,
                time_features: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scale = 1 / math.sqrt(q.shape[-1])
        if self.time_bias is not None:
            # time_features (B, L, 2F): cos / sin of ω_f n per token (zeros for CLS). The extra channels add
            # Σ_f c_hf cos(ω_f (n_q − n_k)) · sqrt(head dim) to q·k, i.e. the bias itself after scaling.
            coef = self.time_bias.repeat(1, 2) / scale  # (H, 2F)
            tf = time_features[:, None].expand(B, self.heads, L, -1)
            q = torch.cat([q, tf * coef[None, :, None, :]], dim=-1)
            k = torch.cat([k, tf], dim=-1)
            v = F.pad(v, (0, tf.shape[-1]))  # same head size for every kernel; the padding is cut off below
        weights = None
        if need_weights:  # the explicit path, only for interpretability (O(L²) memory)
            weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                 scale=scale)
        out = out[..., : D // self.heads]
        return self.proj(out.transpose(1, 2).reshape(B, L, D)), weights


def time_bias_features(n_patches: int, batch: int, parcels: int, device: torch.device | None,
                       order: Tensor | None = None) -> Tensor:
    """(B, 1 + L, 2F) cos / sin of ω_f n for each token's patch index n (CLS first, zeros).

    Tokens are (parcel, patch) pairs in parcel-major order; `order` (B, K) selects / reorders them (the
    visible tokens of the encoder).
    """
    freq = math.pi * (torch.arange(TIME_BIAS_FREQUENCIES, device=device) + 0.5) / TIME_BIAS_FREQUENCIES
    n = torch.arange(n_patches, device=device).repeat(parcels)  # (L,) patch index of each token
    n = n.expand(batch, -1) if order is None else torch.gather(n.expand(batch, -1), 1, order)
    angle = n[..., None].float() * freq
    feats = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    return F.pad(feats, (0, 0, 1, 0))  # CLS: no time


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, time_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, time_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, need_weights: bool = False,
                time_features: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        a, weights = self.attn(self.norm1(x), need_weights, time_features)
        x = x + a
        return x + self.mlp(self.norm2(x)), weights


def sinusoidal(n: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(n, dim) fixed sin/cos embedding of positions 0..n-1: works for any window length."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    emb = torch.zeros(n, dim, device=device)
    emb[:, 0::2] = torch.sin(pos * freq)
    emb[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return emb


class FourierFeatures(nn.Module):
    """XYZ (mm) → [sin, cos](2π f·xyz) for fixed random directions, wavelengths log-spaced 200 mm → `shortest_mm`.

    Sharp enough to tell neighbouring parcels apart while staying a function of the centroid (any atlas). The
    frequencies come from a fixed seed and are saved with the weights.
    """

    def __init__(self, features: int, shortest_mm: float, longest_mm: float = 200.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        direction = torch.randn(features, 3, generator=g)
        direction /= direction.norm(dim=1, keepdim=True)
        wavelength = torch.exp(torch.empty(features).uniform_(math.log(shortest_mm), math.log(longest_mm),
                                                               generator=g))
        self.register_buffer("freq", 2 * math.pi * direction / wavelength[:, None])  # (F, 3) rad / mm

    def forward(self, coords: Tensor) -> Tensor:
        angle = coords @ self.freq.T
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class TokenEmbedding(nn.Module):
    """Where a token sits: spatial (parcel centroid) + temporal (sinusoidal over patch index).

    Spatial is an MLP on the centroid / coord_scale (the paper's) or a linear map of its random Fourier
    features; both are functions of the centroid alone, so any atlas works.
    """

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.coord_scale = cfg.coord_scale
        if cfg.spatial_embedding == "fourier":
            self.coord_scale = 1.0  # Fourier features take millimetres
            self.spatial = nn.Sequential(FourierFeatures(dim // 2, cfg.fourier_mm), nn.Linear(2 * (dim // 2), dim))
        else:
            self.spatial = nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))
        self.temporal_scale = nn.Parameter(torch.ones(dim))  # lets training weigh time against space

    def forward(self, coords: Tensor, n_patches: int) -> Tensor:
        """coords (B, P, 3) in MNI mm → (B, P, N, dim) position embedding."""
        space = self.spatial(coords / self.coord_scale)  # (B, P, D)
        time = sinusoidal(n_patches, space.shape[-1], coords.device).to(space.dtype) * self.temporal_scale
        return space[:, :, None, :] + time[None, None, :, :]


# -------------------------------------------------------------------------------------------- model


class BrainLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, Dd = cfg.hidden, cfg.decoder_hidden
        # encoder
        self.patch_embed = nn.Linear(cfg.patch_size, D)
        self.pos_embed = TokenEmbedding(D, cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.time_bias) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(D)
        # decoder: its own width and position embedding, so it can stay light
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = TokenEmbedding(Dd, cfg)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.dropout, cfg.time_bias) for _ in range(cfg.decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Start from predicting ~0 (the median of a robust-scaled series) rather than from noise of the
        # targets' own scale: the first steps then improve on the zero baseline instead of first climbing to it.
        nn.init.normal_(self.decoder_pred.weight, std=0.02)

    # ---- patches

    def patchify(self, signals: Tensor) -> Tensor:
        """(B, P, T) → (B, P, N, S)."""
        B, P, T = signals.shape
        S = self.cfg.patch_size
        if T % S:
            raise ValueError(f"window length {T} is not a multiple of patch_size {S}")
        return signals.reshape(B, P, T // S, S)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, P, N, S) → (B, P, T)."""
        B, P, N, S = patches.shape
        return patches.reshape(B, P, N * S)

    # ---- masking

    def random_masking(self, x: Tensor, ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the (1 − ratio) share of tokens with the smallest noise (MAE's per-sample shuffle).

        x (B, L, D); noise (B, L) in [0, 1) — pass it to make the mask deterministic.
        Returns visible tokens (B, K, D), mask (B, L) with 1 = masked, and ids_restore (B, L).
        """
        B, L, D = x.shape
        keep = int(round(L * (1 - ratio)))
        if noise is None and keep == L:  # nothing to mask: keep (parcel, patch) order
            noise = torch.arange(L, device=x.device, dtype=torch.float32).expand(B, L)
        elif noise is None:
            noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        return visible, torch.gather(mask, 1, ids_restore), ids_restore

    # ---- encoder / decoder

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor, need_weights: bool,
                    time_features: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        weights = []
        for blk in blocks:
            if self.cfg.activation_checkpointing and self.training and not need_weights:
                x, w = checkpoint(blk, x, False, time_features, use_reentrant=False)
            else:
                x, w = blk(x, need_weights, time_features)
            if w is not None:
                weights.append(w)
        return x, weights

    def forward_encoder(
        self, signals: Tensor, coords: Tensor, mask_ratio: float, noise: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Embed, mask, encode. Returns latent (B, 1 + K, D) with CLS first, mask (B, L), ids_restore, attentions."""
        patches = self.patchify(signals)
        B, P, N, S = patches.shape
        coords = self._batch_coords(coords, B)
        x = (self.patch_embed(patches) + self.pos_embed(coords, N)).reshape(B, P * N, -1)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        time_features = None
        if self.cfg.time_bias:
            ids_keep = torch.argsort(ids_restore, dim=1)[:, : x.shape[1] - 1]
            time_features = time_bias_features(N, B, P, x.device, ids_keep).to(x.dtype)
        x, weights = self._run_blocks(self.blocks, x, need_weights, time_features)
        return self.norm(x), mask, ids_restore, weights

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, coords: Tensor, n_patches: int) -> Tensor:
        """Latent (B, 1 + K, D) → prediction for every patch (B, L, S)."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))  # unshuffle
        tokens = tokens + self.decoder_pos_embed(self._batch_coords(coords, B), n_patches).reshape(B, L, -1)
        x = torch.cat([x[:, :1], tokens], dim=1)
        time_features = None
        if self.cfg.time_bias:
            time_features = time_bias_features(n_patches, B, L // n_patches, x.device).to(x.dtype)
        x, _ = self._run_blocks(self.decoder_blocks, x, False, time_features)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MSE over masked patches only; visible patches do not count. target/pred (B, L, S), mask (B, L)."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self, signals: Tensor, coords: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None,
        output_attentions: bool = False,
    ) -> BrainLMOutput:
        """signals (B, P, T) robust-scaled parcel series; coords (P, 3) or (B, P, 3) MNI mm centroids."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, weights = self.forward_encoder(signals, coords, ratio, noise, output_attentions)
        B, P, T = signals.shape
        N = T // self.cfg.patch_size
        pred = self.forward_decoder(latent, ids_restore, coords, N)
        target = self.patchify(signals).reshape(B, P * N, -1)
        loss = self.forward_loss(target, pred, mask)
        return BrainLMOutput(
            loss=loss, pred=pred.reshape(B, P, N, -1), mask=mask.reshape(B, P, N), cls=latent[:, 0],
            attentions=weights if output_attentions else None,
        )

    @torch.no_grad()
    def embed(self, signals: Tensor, coords: Tensor, output_attentions: bool = False) -> BrainLMEmbedding:
        """Unmasked encoding for downstream use: CLS, token embeddings and (optionally) every layer's attention.

        With nothing masked the visible tokens stay in (parcel, patch) order, so tokens reshape to (B, P, N, D).
        """
        latent, _, _, weights = self.forward_encoder(signals, coords, 0.0, None, output_attentions)
        B, P, T = signals.shape
        tokens = latent[:, 1:].reshape(B, P, T // self.cfg.patch_size, -1)
        return BrainLMEmbedding(cls=latent[:, 0], tokens=tokens, attentions=weights if output_attentions else None)

    @staticmethod
    def _batch_coords(coords: Tensor, batch: int) -> Tensor:
        return coords.expand(batch, -1, -1) if coords.dim() == 2 else coords


# ------------------------------------------------------------------------------------------ metrics


def masked_r2(target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
    """R² of the reconstruction over masked patches: 1 − SSE / SS around the masked targets' mean.

    target/pred (B, P, N, S) or (B, L, S); mask with the same leading shape, 1 = masked.
    """
    m = mask.bool()
    t, p = target.float()[m], pred.float()[m]
    ss_res = ((t - p) ** 2).sum()
    ss_tot = ((t - t.mean()) ** 2).sum().clamp(min=1e-12)
    return 1 - ss_res / ss_tot


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
