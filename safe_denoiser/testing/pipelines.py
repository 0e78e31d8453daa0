"""Random-weight tiny pipelines of every supported family, for tests and benchmarks: not product model kinds.

Each builder keeps its family's structure at toy size, with the parts the safe denoiser depends on exactly as in the
real models (seeded, no hub, CPU milliseconds per step):

* SD (``tiny_sd_pipeline``): UNet (32, 64) with 16 x 16 latents, a two-block VAE (images 32 x 32), CLIP 32 wide;
* SDXL: two CLIP text encoders (the second with projection), added time/text conditioning, a UNet on 4-channel
  latents, VAE scaling 0.13025, an Euler scheduler with SDXL-base's config (DPM++ and every other VP/sigma sampler
  by name);
* SD3: an MMDiT (``SD3Transformer2DModel``, 2x2 patches inside the transformer) on 16-channel latents, VAE
  scaling 1.5305 and shift 0.0609, ``FlowMatchEulerDiscreteScheduler`` with shift 3 (SD3-medium's); the second
  CLIP tokenizer pads with "!" (a special token) as SD3's ``tokenizer_2`` does, the first with its EOS; T5 only with
  ``t5=True`` (without it the pipeline feeds zeros in its place, as diffusers allows);
* Flux: ``FluxTransformer2DModel`` on 16-channel latents packed into 2x2 patches (the scheduler steps (B, h w / 4,
  64) tokens), VAE scaling 0.3611 and shift 0.1159, CLIP + T5 text encoders, guidance embedding, and the
  scheduler with Flux-dev's dynamic shifting (mu from the image's token count).

Every tiny VAE has two blocks (downscale 2), so a 16 x 16 image has 8 x 8 latents. The CLIP tokenizers are the
byte-level ``tiny_clip_tokenizer``; T5's is ``tiny_t5_tokenizer``, a real SentencePiece Unigram model (``t5.py``).
"""

from __future__ import annotations

from typing import Any

from safe_denoiser.diffusers.families import FLUX_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG
from safe_denoiser.diffusers.pipelines import (
    assemble_sd_pipeline,
    clip_text_encoder,
    make_scheduler,
    seeded_weights,
    tiny_clip_tokenizer,
)
from safe_denoiser.diffusers.scheduler_registry import scheduler_spec
from safe_denoiser.testing.t5 import tiny_t5_tokenizer

__all__ = [
    "TINY_FAMILIES",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux")
_TINY_VOCAB = 1000  # text-encoder vocabulary of the tiny pipelines (diffusers' dummy CLIP uses 1000)


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim", prediction_type: str = "epsilon") -> Any:
    """A random-weight SD pipeline small enough for unit tests (CPU, milliseconds per step).

    UNet: block_out_channels (32, 64), 1 layer per block, cross-attention dim 32, 16x16 latents; VAE with two
    blocks (downscale factor 2, so images are 32x32 by default); CLIP text model 32 wide, 2 layers. Same seed,
    same weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sched = make_scheduler(scheduler, prediction_type=prediction_type)
    tokenizer = tiny_clip_tokenizer()
    unet: Any
    vae: Any
    with seeded_weights(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=32,
        )
        text_encoder = clip_text_encoder(
            tokenizer,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            layer_norm_eps=1e-5,
            vocab_size=_TINY_VOCAB,
        )
    return assemble_sd_pipeline(unet, vae.eval(), text_encoder, tokenizer, sched)


def _vae(latent_channels: int, scaling: float, shift: float | None) -> Any:
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=shift is None,  # SD3 and Flux VAEs have no quant convs
        use_post_quant_conv=shift is None,
    )
    return vae.eval()


_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def _clip(tokenizer: Any, projection: bool) -> Any:
    extra = {"projection_dim": 32} if projection else {}
    return clip_text_encoder(tokenizer, projection, layer_norm_eps=1e-5, vocab_size=_TINY_VOCAB, **_CLIP, **extra)


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "euler", prediction_type: str = "epsilon") -> Any:
    """A random-weight ``StableDiffusionXLPipeline`` for unit tests (module docstring)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if scheduler_spec(scheduler).kind == "flow":
        raise ValueError(f"SDXL samples on the VP path: scheduler {scheduler!r} is a flow-matching one")
    sched = make_scheduler(scheduler, SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type)
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    unet: Any
    with seeded_weights(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids and the pooled text embedding
            cross_attention_dim=64,  # the two encoders' hidden states, concatenated
        )
        vae = _vae(4, 0.13025, None)
        te, te2 = _clip(tok, False), _clip(tok2, True)
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet.eval(),
        scheduler=sched,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5(tokenizer: Any, width: int) -> Any:
    """A T5 encoder ``width`` wide whose vocabulary covers ``tokenizer``'s ids (its pieces and sentinels)."""
    from transformers import T5Config, T5EncoderModel

    if len(tokenizer) > _TINY_VOCAB:
        raise ValueError(f"the tiny T5 tokenizer has {len(tokenizer)} ids, more than the encoder's {_TINY_VOCAB}")
    config = T5Config(
        vocab_size=_TINY_VOCAB,
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0, t5: bool = False) -> Any:
    """A random-weight ``StableDiffusion3Pipeline`` for unit tests (module docstring); ``shift``: the sigma shift;
    ``t5``: with the third text encoder (``tiny_t5_tokenizer`` and a T5 encoder 64 wide), made after the other
    weights so that they are the same with and without it."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    sched = make_scheduler("flow_euler", {"num_train_timesteps": 1000, "shift": shift})
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")  # CLIP-G pads with "!", as in SD3
    tok3 = tiny_t5_tokenizer() if t5 else None
    transformer: Any
    with seeded_weights(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,  # the CLIP embeddings (32 + 32) are padded to T5's width
            pooled_projection_dim=64,  # the two pooled projections, concatenated
            pos_embed_max_size=16,
        )
        vae = _vae(16, 1.5305, 0.0609)
        te, te2 = _clip(tok, True), _clip(tok2, True)
        te3 = _t5(tok3, 64) if tok3 is not None else None  # joint_attention_dim: T5's width
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=sched,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, dynamic_shifting: bool = True) -> Any:
    """A random-weight ``FluxPipeline`` for unit tests (module docstring); ``dynamic_shifting=False``: shift 3."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    sched = make_scheduler("flow_euler", {**FLUX_SCHEDULER_CONFIG, "use_dynamic_shifting": dynamic_shifting})
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer(model_max_length=512)
    transformer: Any
    with seeded_weights(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's width
            pooled_projection_dim=32,  # CLIP's pooled output
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(4, 4, 8),
        )
        vae = _vae(16, 0.3611, 0.1159)
        te = _clip(tok, False)
        t5 = _t5(tok2, 32)  # joint_attention_dim: T5's width
    pipe: Any = FluxPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str, seed: int = 0, scheduler: str | None = None) -> Any:
    """The tiny pipeline of a family ("sd", "sdxl", "sd3", "flux"); ``scheduler`` for the VP families."""
    if family == "sd":
        return tiny_sd_pipeline(seed=seed, scheduler=scheduler or "ddim")
    if family == "sdxl":
        return tiny_sdxl_pipeline(seed=seed, scheduler=scheduler or "euler")
    if scheduler not in (None, "flow_euler"):
        raise ValueError(f"{family} samples with flow matching: scheduler must be 'flow_euler', got {scheduler!r}")
    if family == "sd3":
        return tiny_sd3_pipeline(seed=seed)
    if family == "flux":
        return tiny_flux_pipeline(seed=seed)
    raise ValueError(f"unknown model family {family!r}: expected one of {sorted(TINY_FAMILIES)}")
