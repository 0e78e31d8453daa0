"""The miniature's ``UNet2DConditionModel``: SD-1.x's denoiser, scaled down, on 4 x 8 x 8 latents.

Blocks (32, 64, 64) at 8 / 4 / 2, one ResNet per block, cross-attention on the frozen CLIP text tower's last
hidden states (77 x 64) in the two finer blocks, as SD's UNet attends to CLIP ViT-L's. Trained as SD was: DDPM,
1,000 steps, SD's scaled-linear betas (0.00085 .. 0.012), epsilon prediction, MSE on the noise, captions replaced by
"" with probability ``caption_dropout`` for classifier-free guidance (``captions_per_image`` grammar captions per
image, drawn and encoded once). The latents are the VAE's posterior means of
the generator split times its scaling factor. An EMA of the weights is what gets saved.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from safe_denoiser.mini_sd.clip import CaptionedImages
from safe_denoiser.mini_sd.data import MAX_TOKENS
from safe_denoiser.mini_sd.loop import Optimisation, train_steps
from safe_denoiser.mini_sd.vae import encode_means

__all__ = ["SCHEDULER_CONFIG", "assemble_pipeline", "make_unet", "train_unet"]

# SD-1.4's noise schedule (CompVis/stable-diffusion-v1-4 scheduler_config.json), for DDPM and DDIM alike.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}


def make_unet(text_width: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=4,
        norm_num_groups=16,
    )


@torch.no_grad()
def _text_states(text_encoder: Any, tokenizer: Any, texts: list[str]) -> Tensor:
    """What ``StableDiffusionPipeline.encode_prompt`` gives the UNet: last hidden states at 77 tokens."""
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    out: Tensor = text_encoder(ids)[0]
    return out


def _caption_pool(data: CaptionedImages, text_encoder: Any, tokenizer: Any, rng: random.Random, k: int) -> Tensor:
    """(N, k, 77, width): ``k`` grammar captions per image, encoded once (the text tower is frozen, and encoding
    a fresh batch of captions every step cost a quarter of the step)."""
    texts = [c.text for _ in range(k) for c in data.captions(rng, list(range(len(data.labels))))]
    states = torch.cat([_text_states(text_encoder, tokenizer, texts[i : i + 512]) for i in range(0, len(texts), 512)])
    return states.view(k, len(data.labels), MAX_TOKENS, -1).transpose(0, 1).contiguous()


def train_unet(
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    opt: Optimisation,
    seed: int,
    batch_size: int = 64,
    caption_dropout: float = 0.1,
    captions_per_image: int = 8,
) -> tuple[Any, dict[str, Any]]:
    """Train on the generator split's latents; returns (EMA UNet in eval mode, record)."""
    from diffusers import DDPMScheduler

    data = CaptionedImages.of("generator")
    latents = encode_means(vae, data.images) * float(vae.config.scaling_factor)
    alphas_cumprod = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod
    text_encoder.requires_grad_(False).eval()
    pool = _caption_pool(data, text_encoder, tokenizer, random.Random(seed), captions_per_image)
    null = _text_states(text_encoder, tokenizer, [""])
    torch.manual_seed(seed)
    unet = make_unet(int(text_encoder.config.hidden_size)).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> Tensor:
        idx = torch.randperm(latents.shape[0], generator=gen)[:batch_size]
        which = torch.randint(0, captions_per_image, (idx.shape[0],), generator=gen)
        drop = torch.rand(idx.shape[0], generator=gen) < caption_dropout
        states = torch.where(drop.view(-1, 1, 1), null, pool[idx, which])
        x0 = latents[idx]
        t = torch.randint(0, alphas_cumprod.shape[0], (idx.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=states).sample, noise)

    result = train_steps(unet.parameters(), loss_at, opt, "unet", ema=(unet, ema))
    return ema.eval(), {
        **result.summary(),
        "caption_dropout": caption_dropout,
        "captions_per_image": captions_per_image,
        "batch_size": batch_size,
        "latent_std": round(float(latents.std()), 5),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "weights": "EMA",
    }


def assemble_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """The ``StableDiffusionPipeline`` (DDIM scheduler with SD's schedule; no safety checker)."""
    from diffusers import DDIMScheduler

    from safe_denoiser.diffusers.pipelines import assemble_sd_pipeline

    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    return assemble_sd_pipeline(unet, vae.eval(), text_encoder.eval(), tokenizer, scheduler)
