"""Released BrainLM checkpoints (ViTMAE format) as task backbones, so labs with those weights can compare them.

The released models are Hugging Face `ViTMAEForPreTraining` checkpoints (`save_pretrained` layout: config.json
+ model.safetensors) that read a recording as an image:

    424 A424 parcels, sorted by centroid y (stable) ──> rows        200 TRs ──> columns
    values / 5.6430855, repeated over 3 channels, padded with −1 to a 432 × 432 image, 16 × 16 patches

so a 200-TR window sits in the middle columns, and the reconstruction is read back from the same pixels (mean
over the 3 channels, rows put back in the cohort's parcel order, × 5.6430855). Forecasting masks every patch
column that overlaps the last `FORECAST_HORIZON` TRs; the encoder sees only the columns before them.

Needs the optional Hugging Face dependency (`pip install 'brainlm[hf]'`); without it, loading says so in one line.
Weights are read from safetensors, or from `pytorch_model.bin` with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainlm.errors import BrainLMError

VALUE_SCALE = 5.6430855  # the released models' input scaling of robust-scaled values
PAD_VALUE = -1.0
N_PARCELS = 424  # A424
WINDOW = 200
FORECAST_HORIZON = 20
IMAGE_SIZES = {16: 432, 14: 434}  # patch size → padded image side, as the released models were trained


class ReleasedModelError(BrainLMError):
    """A folder that is not a readable released BrainLM checkpoint, or the optional dependency is missing."""


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ReleasedModelError("reading a released BrainLM (ViTMAE) checkpoint needs the optional Hugging Face "
                                 "dependency: pip install 'brainlm[hf]'") from e
    return transformers


def is_released_checkpoint(path: str | Path) -> bool:
    """A local folder holding a Hugging Face config.json (what `--model DIR` means)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_released(directory: str | Path) -> ViTMAEBackbone:
    """A released ViTMAE-format BrainLM checkpoint folder as a task backbone (weights loaded, eval mode)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ReleasedModelError(f"{directory} has no config.json: not a Hugging Face save_pretrained folder")
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") != "vit_mae":
        raise ReleasedModelError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, expected 'vit_mae' "
                                 f"(a released BrainLM ViTMAE checkpoint)")
    backbone = ViTMAEBackbone.from_description({"type": ViTMAEBackbone.kind, "hf_config": hf_config})
    state = _read_weights(directory)
    missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    # position embeddings are fixed sin-cos tables some checkpoints leave out; anything else must match
    missing = [k for k in missing if not k.endswith(("position_embeddings", "decoder_pos_embed"))]
    if missing or unexpected:
        raise ReleasedModelError(f"{directory}: weights do not fit the config (missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]})")
    return backbone.eval()


def _read_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path))
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)  # tensors only, no code
    raise ReleasedModelError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


class ViTMAEBackbone(nn.Module):
    """A released ViTMAE BrainLM behind the task backbone interface (see brainlm/tasks/common.py)."""

    kind = "vitmae"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        if cfg.patch_size not in IMAGE_SIZES or cfg.num_channels != 3:
            raise ReleasedModelError(f"unsupported ViTMAE layout: patch size {cfg.patch_size}, {cfg.num_channels} "
                                     f"channels (released BrainLM models use 16 × 16 patches over 3 channels)")
        side = IMAGE_SIZES[cfg.patch_size]
        image = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        if image != side:
            raise ReleasedModelError(f"image size {image} does not match the {side} × {side} padded layout of "
                                     f"{cfg.patch_size}-pixel patches")
        self.side, self.patch = side, cfg.patch_size
        self.window, self.horizon, self.n_parcels = WINDOW, FORECAST_HORIZON, N_PARCELS
        self.embed_dim = cfg.hidden_size

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> ViTMAEBackbone:
        transformers = _transformers()
        config = transformers.ViTMAEConfig.from_dict(dict(description["hf_config"]))
        return cls(transformers.ViTMAEForPreTraining(config))

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "hf_config": self.model.config.to_dict()}

    @staticmethod
    def is_encoder(name: str) -> bool:
        return name.startswith("model.vit.")

    # ---- layout

    def _offsets(self, parcels: int, timepoints: int) -> tuple[int, int]:
        return (self.side - parcels) // 2, (self.side - timepoints) // 2

    def to_image(self, signals: Tensor, coords: Tensor) -> Tensor:
        """(B, P, T) robust-scaled → (B, 3, side, side): rows sorted by centroid y, / VALUE_SCALE, padded with −1."""
        B, P, T = signals.shape
        top, left = self._offsets(P, T)
        x = signals[:, _y_order(coords)] / VALUE_SCALE
        x = F.pad(x, (left, self.side - T - left, top, self.side - P - top), value=PAD_VALUE)
        return x[:, None].expand(B, 3, self.side, self.side)

    def from_image(self, image: Tensor, coords: Tensor, parcels: int, timepoints: int) -> Tensor:
        """The inverse of `to_image` for a reconstruction: channel mean, crop, rows back, × VALUE_SCALE."""
        top, left = self._offsets(parcels, timepoints)
        x = image.mean(dim=1)[:, top : top + parcels, left : left + timepoints] * VALUE_SCALE
        return x[:, torch.argsort(_y_order(coords))]

    @contextlib.contextmanager
    def _masking(self, ratio: float) -> Iterator[None]:
        """ViTMAE keeps int(L · (1 − config.mask_ratio)) tokens; set the ratio for one call."""
        before = self.model.config.mask_ratio
        self.model.config.mask_ratio = ratio
        try:
            yield
        finally:
            self.model.config.mask_ratio = before

    # ---- the backbone interface

    def forecast(self, context: Tensor, coords: Tensor) -> Tensor:
        B, P, _ = context.shape
        T = self.window
        signals = torch.cat([context, context.new_zeros(B, P, self.horizon)], dim=-1)
        image = self.to_image(signals, coords)
        _, left = self._offsets(P, T)
        grid = self.side // self.patch
        first, last = (left + T - self.horizon) // self.patch, (left + T - 1) // self.patch
        noise = torch.zeros(B, grid, grid, device=context.device)
        noise[:, :, first : last + 1] = 1.0  # every token of the columns that overlap the horizon is masked
        n_masked = grid * (last + 1 - first)
        with self._masking((n_masked - 0.5) / grid**2):  # int() then keeps exactly grid² − n_masked tokens
            out = self.model.vit(pixel_values=image, noise=noise.reshape(B, -1))
            logits = self.model.decoder(out.last_hidden_state, out.ids_restore).logits
        pred = self.from_image(self.model.unpatchify(logits), coords, P, T)
        return pred[..., T - self.horizon :]

    def embed(self, signals: Tensor, coords: Tensor, pooling: str) -> Tensor:
        """Pooled as `brainlm.tasks.common.pool`; the spatial groups are the image's patch rows."""
        from brainlm.tasks.common import pool

        with self._masking(0.0):
            out = self.model.vit(pixel_values=self.to_image(signals, coords))
        # ViTMAE shuffles tokens even when it keeps them all: put them back in row-major patch order
        tokens = torch.gather(out.last_hidden_state[:, 1:], 1,
                              out.ids_restore[:, :, None].expand(-1, -1, out.last_hidden_state.shape[-1]))
        latent = torch.cat([out.last_hidden_state[:, :1], tokens], dim=1)
        return pool(latent, pooling, self.side // self.patch)

    def pooled_size(self, pooling: str, n_parcels: int) -> int:
        from brainlm.tasks.common import pooled_size

        return pooled_size(pooling, self.embed_dim, self.side // self.patch)


def _y_order(coords: Tensor) -> Tensor:
    """Parcel rows sorted by centroid y (anterior–posterior), ties kept in atlas order, as the released models."""
    return torch.argsort(coords[:, 1], stable=True)
