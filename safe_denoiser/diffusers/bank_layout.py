"""The bank in the space of the sample a diffusers pipeline's scheduler steps (``sample_space_bank``).

A bank file holds what ``safe-denoiser bank build`` writes: images encoded by the pipeline's VAE, (N, C, h, w). Most
pipelines step latents of that layout; Flux steps packed 2x2 patches, so its bank is packed with the pipeline's own
``_pack_latents`` (packing permutes coordinates: kernel distances and the correction are those of the unpacked
latents). ``attach`` and the exporter lay banks out here, so a bundle's graph holds what ``attach`` would use.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from safe_denoiser.core.bank import NegativeBank

__all__ = ["denoiser_network", "in_sample_space", "sample_space_bank"]


def _bank_tensor(bank: NegativeBank | Tensor) -> Tensor:
    if isinstance(bank, NegativeBank):
        return bank.data
    if isinstance(bank, Tensor):
        return NegativeBank.from_tensor(bank).data  # validates: float, (N, ...), non-empty, finite
    raise TypeError(f"bank must be a NegativeBank or a tensor, got {type(bank).__name__}")


def denoiser_network(pipe: Any) -> Any:
    """The pipeline's denoising network: the UNet (SD-1.x/2.x, SDXL) or the transformer (SD3, Flux); or None."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


def sample_space_bank(pipe: Any, bank: NegativeBank | Tensor, what: str = "bank") -> Tensor:
    """The bank in the space of the sample that ``pipe``'s scheduler steps, checked against the denoiser's input.

    Flux (a pipeline with ``_pack_latents``) steps packed latents (B, h w / 4, 4 C): a bank of unpacked latents
    (N, C, h, w), the layout ``safe-denoiser bank build`` writes, is packed with the pipeline's own function; a bank
    already packed (N, L, 4 C) is taken as it is. Other pipelines step (B, C, h, w) latents.
    """
    data = _bank_tensor(bank)
    channels = getattr(getattr(denoiser_network(pipe), "config", None), "in_channels", None)
    pack = getattr(type(pipe), "_pack_latents", None)
    if pack is not None and channels is not None:
        if data.dim() == 4 and 4 * data.shape[1] == channels:
            n, c, h, w = data.shape
            if h % 2 or w % 2:
                raise ValueError(f"{what} latents {tuple(data.shape[1:])}: height and width must be even (2x2 patches)")
            return pack(data, n, c, h, w)
        if data.dim() == 3 and data.shape[2] == channels:
            return data
        raise ValueError(
            f"{what} items have shape {tuple(data.shape[1:])}; {type(pipe).__name__} steps packed latents: expected"
            f" unpacked ({channels // 4}, h, w) latents (packed at attach) or packed (h w / 4, {channels})"
        )
    if channels is not None and data.shape[1] != channels:
        raise ValueError(
            f"{what} items have {data.shape[1]} channels (shape {tuple(data.shape[1:])}) but the"
            f" pipeline's {type(denoiser_network(pipe)).__name__} samples {channels}-channel latents"
        )
    return data


def in_sample_space(pipe: Any, bank: NegativeBank | Tensor, what: str) -> NegativeBank | Tensor:
    """``sample_space_bank``, keeping a ``NegativeBank`` (and its cached norms) whole when no repacking is needed."""
    data = sample_space_bank(pipe, bank, what)
    return bank if isinstance(bank, NegativeBank) and data is bank.data else data
