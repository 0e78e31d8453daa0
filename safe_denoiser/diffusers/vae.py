"""Encoding images into a diffusers VAE's latent space for a negative bank.

The bank lives where the pipeline's scheduler steps: z = (latent - shift_factor) * scaling_factor, the inverse of
what every pipeline does before decoding (SD-1.x/SDXL: no shift; SD3: 1.5305 and 0.0609; Flux: 0.3611 and 0.1159;
the factors are read from the VAE's config). Flux steps these latents packed into 2x2 patches; the bank file holds
them unpacked (C, h, w) and ``attach`` packs them (``safe_denoiser.diffusers.bank_layout.sample_space_bank``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from safe_denoiser.core.bank import BankError, l2_normalize_positions

__all__ = ["latent_factors", "load_vae", "vae_encoder"]


def load_vae(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """An ``AutoencoderKL`` from a local folder: a VAE folder, or a pipeline folder with a ``vae/`` subfolder."""
    from diffusers import AutoencoderKL

    root = Path(model_dir)
    if not root.is_dir():
        raise BankError(f"VAE folder {str(root)!r} is not a local folder (no downloads: pass a folder on disk)")
    sub = root / "vae"
    folder = sub if (sub / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise BankError(f"VAE folder {str(root)!r} has no config.json (nor vae/config.json): not a diffusers VAE")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BankError(f"VAE folder {str(root)!r}: cannot load an AutoencoderKL (safetensors): {exc}") from exc
    return vae.to(device).eval()


def latent_factors(vae: Any) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor or None) from the VAE's config."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(getattr(vae.config, "scaling_factor", 1.0)), (None if shift is None else float(shift))


def vae_encoder(
    vae: Any,
    latent: Literal["mean", "sample"] = "mean",
    l2_normalize: bool = False,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> (latents - shift_factor) * scaling_factor (posterior mean or a sample).

    ``latent="sample"`` with ``l2_normalize=True`` reproduces the reference code's bank.
    """
    if latent not in ("mean", "sample"):
        raise BankError(f"latent must be 'mean' or 'sample', got {latent!r}")
    scaling, shift = latent_factors(vae)
    param = next(vae.parameters())

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        z = dist.mean if latent == "mean" else dist.sample(generator)
        z = z * scaling if shift is None else (z - shift) * scaling
        return l2_normalize_positions(z) if l2_normalize else z

    return encode
