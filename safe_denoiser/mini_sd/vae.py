"""The miniature's ``AutoencoderKL``: 32 x 32 RGB in [-1, 1] to 4 x 8 x 8 latents (SD's factor-8 VAE, scaled down to
factor 4 for 32-pixel images), trained here on the generator split.

Loss: mean squared reconstruction error plus ``kl_weight`` times the mean per-latent-element KL to N(0, I) (SD used
a perceptual and a GAN loss and a 1e-6 KL; for upsampled 8 x 8 digits the squared error alone is sharp enough).
Images get a random shift of up to 2 pixels. ``scaling_factor`` is then set as SD's 0.18215 was: one over the
standard deviation of the latents (here: the posterior means of the whole generator split), so that the UNet sees
unit-variance latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from safe_denoiser.mini_sd.clip import random_shift
from safe_denoiser.mini_sd.data import IMAGE_SIZE, render_split
from safe_denoiser.mini_sd.loop import Optimisation, train_steps

__all__ = ["encode_means", "make_vae", "train_vae"]


def make_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def train_vae(
    opt: Optimisation, seed: int, batch_size: int = 64, kl_weight: float = 1e-4
) -> tuple[Any, dict[str, Any]]:
    """Train on the generator split; returns (VAE in eval mode with its scaling factor set, record)."""
    torch.manual_seed(seed)
    vae = make_vae().train()
    images = render_split("generator").images()
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> Tensor:
        idx = torch.randperm(images.shape[0], generator=gen)[:batch_size]
        x = random_shift(images[idx], gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        return torch.nn.functional.mse_loss(recon, x) + kl_weight * kl

    result = train_steps(vae.parameters(), loss_at, opt, "vae")
    vae.eval()
    latents = encode_means(vae, images)
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    heldout = render_split("eval").images()
    with torch.no_grad():
        recon = vae.decode(encode_means(vae, heldout)).sample
    return vae, {
        **result.summary(),
        "kl_weight": kl_weight,
        "scaling_factor": scaling,
        "latent_mean": round(float(latents.mean()), 5),
        "posterior_std_mean": round(float(_posterior_std(vae, images).mean()), 5),
        "heldout_reconstruction_mse": round(float(torch.nn.functional.mse_loss(recon, heldout)), 5),
        "parameters": sum(p.numel() for p in vae.parameters()),
    }


@torch.no_grad()
def encode_means(vae: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means (unscaled) of images (N, 3, 32, 32) in [-1, 1]."""
    return torch.cat(
        [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def _posterior_std(vae: Any, images: Tensor) -> Tensor:
    return vae.encode(images[:256]).latent_dist.std
