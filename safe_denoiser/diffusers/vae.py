"""Encoding images into a diffusers VAE's latent space for a negative bank."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from safe_denoiser.core.bank import BankError, l2_normalize_positions

__all__ = ["load_vae", "vae_encoder"]


def load_vae(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """An ``AutoencoderKL`` from a local folder: a VAE folder, or a pipeline folder with a ``vae/`` subfolder."""
    from diffusers import AutoencoderKL

    root = Path(model_dir)
    if not root.is_dir():
        raise BankError(f"--vae {str(root)!r} is not a local folder (no downloads: pass a folder on disk)")
    sub = root / "vae"
    folder = sub if (sub / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise BankError(f"--vae {str(root)!r} has no config.json (nor vae/config.json): not a diffusers VAE folder")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BankError(f"--vae {str(root)!r}: cannot load an AutoencoderKL with safetensors weights: {exc}") from exc
    return vae.to(device).eval()


def vae_encoder(
    vae: Any,
    latent: Literal["mean", "sample"] = "mean",
    l2_normalize: bool = False,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> latents * scaling_factor (mean or a sample of the posterior).

    ``latent="sample"`` with ``l2_normalize=True`` reproduces the reference code's bank.
    """
    if latent not in ("mean", "sample"):
        raise BankError(f"latent must be 'mean' or 'sample', got {latent!r}")
    scaling = float(getattr(vae.config, "scaling_factor", 1.0))
    param = next(vae.parameters())

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        z = dist.mean if latent == "mean" else dist.sample(generator)
        z = z * scaling
        return l2_normalize_positions(z) if l2_normalize else z

    return encode
