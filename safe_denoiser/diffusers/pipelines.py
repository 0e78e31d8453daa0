"""Stable Diffusion pipelines without a model hub: random-weight SD-1.4 for benchmarks, local loading.

* ``sd14_architecture_pipeline``: the SD-1.4 architecture (UNet ~860M, CLIP ViT-L/14 text tower, SD VAE) with
  random weights, for shape, export and speed work. ``sd14_unet`` builds only the UNet (``device="meta"`` counts
  parameters without allocating them).
* ``load_sd_pipeline``: a real pipeline from a local folder (safetensors only, never remote code), optionally with
  other UNet weights (ESD, RECE, ...) from a safetensors state dict.
* ``make_scheduler``: a scheduler by its short name in ``safe_denoiser.diffusers.scheduler_registry.SCHEDULERS``.
* ``seeded_weights``, ``clip_text_encoder``, ``assemble_sd_pipeline``: the parts the random-weight builders share
  (here and in ``safe_denoiser.testing``).

No builder downloads anything: every component comes from a config, and the CLIP tokenizer is built from a
byte-level vocabulary written to a temporary folder (no merges, so words split into characters; ids stay below
the text encoder's vocabulary size).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from safe_denoiser.diffusers.scheduler_registry import scheduler_class, scheduler_spec

__all__ = [
    "SD3_SCHEDULER_CONFIG",
    "SD14_SCHEDULER_CONFIG",
    "assemble_sd_pipeline",
    "clip_text_encoder",
    "load_sd_pipeline",
    "load_unet_weights",
    "make_scheduler",
    "sd14_architecture_pipeline",
    "sd14_unet",
    "sd14_unet_config",
    "seeded_weights",
    "tiny_clip_tokenizer",
]

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDM scheduler); other classes ignore the keys
# they do not know.
SD14_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

_SD14_VOCAB = 49408


# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def make_scheduler(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Any:
    """A diffusers scheduler by short name, from ``config`` (default: SD-1.4's; SD3's for flow matching) with
    ``overrides`` on top. ``prediction_type`` is dropped for flow matching (its model always predicts u = eps - x0)."""
    spec = scheduler_spec(name)
    cls = scheduler_class(name)
    if spec.kind == "flow":
        overrides.pop("prediction_type", None)
    base = dict((SD3_SCHEDULER_CONFIG if spec.kind == "flow" else SD14_SCHEDULER_CONFIG) if config is None else config)
    return cls.from_config(base, **overrides)


@contextmanager
def seeded_weights(seed: int) -> Iterator[None]:
    """Deterministic weight init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_level_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable characters standing for the 256 byte values."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def tiny_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> Any:
    """A CLIPTokenizer over the 256 byte-level characters (with and without ``</w>``) plus BOS/EOS: 514 ids.

    Built from vocab.json and merges.txt written to a temporary folder (the format every transformers version
    reads); EOS doubles as the padding token, as in SD-1.x, unless ``pad_token`` names another (SDXL's and SD3's
    CLIP-G pad with "!", which then is a special token, matched in prompts as it is there).
    """
    from transformers import CLIPTokenizer

    chars = _byte_level_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            folder, local_files_only=True, model_max_length=model_max_length, pad_token=pad_token
        )


def clip_text_encoder(tokenizer: Any, projection: bool = False, **config: Any) -> Any:
    """A CLIP text model (``projection``: with the text projection, as SDXL's second and SD3's encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output looks for this id
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
        **config,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def assemble_sd_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd14_unet_config() -> dict[str, Any]:
    """UNet2DConditionModel config of SD-1.4/1.5 (CompVis/stable-diffusion-v1-4 unet/config.json)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }


def sd14_unet(seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """The SD-1.4 UNet with random weights (~860M parameters, ~3.4 GB in fp32).

    ``device="meta"`` builds it without memory (for parameter counts and shape checks).
    """
    from diffusers import UNet2DConditionModel

    unet: Any
    with seeded_weights(seed), torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**sd14_unet_config())
    return unet.to(dtype=dtype).eval() if dtype is not None else unet.eval()


def sd14_architecture_pipeline(
    seed: int = 0,
    scheduler: str = "pndm",
    prediction_type: str = "epsilon",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A StableDiffusionPipeline with SD-1.4's architecture and random weights (no download, ~4.3 GB fp32).

    Text encoder: CLIP ViT-L/14 text tower (768 wide, 12 layers, 12 heads, MLP 3072, vocab 49408, 77 positions);
    VAE: SD's AutoencoderKL (128/256/512/512, 4 latent channels, scaling 0.18215). The tokenizer is the small
    byte-level one of ``tiny_clip_tokenizer``: prompts tokenise to characters, which is enough for timing.
    ``device="meta"`` builds every component without memory (for shapes and parameter counts).
    """
    from diffusers import AutoencoderKL

    sched = make_scheduler(scheduler, prediction_type=prediction_type)
    tokenizer = tiny_clip_tokenizer()
    meta = torch.device(device).type == "meta"  # shapes and parameter counts only, no memory
    unet = sd14_unet(seed, device="meta" if meta else None)
    vae: Any
    with seeded_weights(seed + 1), torch.device("meta" if meta else "cpu"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = clip_text_encoder(
            tokenizer,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            vocab_size=_SD14_VOCAB,
        )
    pipe = assemble_sd_pipeline(unet, vae.eval(), text_encoder, tokenizer, sched)
    return pipe if meta else pipe.to(device=device, dtype=dtype)


# ---- loading real weights from disk --------------------------------------------------------------------------

_FORBIDDEN_KWARGS = ("trust_remote_code", "custom_pipeline", "local_files_only", "use_safetensors")


def load_sd_pipeline(
    model_dir: str | os.PathLike[str],
    unet_weights: str | os.PathLike[str] | None = None,
    *,
    scheduler: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    pipeline_class: Any = None,
    **kwargs: Any,
) -> Any:
    """``StableDiffusionPipeline`` from a local diffusers folder (save_pretrained layout, safetensors weights).

    ``pipeline_class``: another diffusers pipeline class to load (SDXL, SD3, Flux: ``families.load_family``).

    Never downloads and never runs code from the folder. ``unet_weights``: a safetensors state dict of the same
    UNet architecture (ESD, RECE, ...), loaded with ``strict=True``. ``scheduler``: a short name of
    ``make_scheduler`` built from the folder's scheduler config. ``kwargs`` go to ``from_pretrained`` (e.g.
    ``safety_checker=None``). Raises FileNotFoundError / ValueError naming the path and what was expected.
    """
    from diffusers import StableDiffusionPipeline

    cls = StableDiffusionPipeline if pipeline_class is None else pipeline_class
    bad = sorted(k for k in kwargs if k in _FORBIDDEN_KWARGS)
    if bad:
        raise ValueError(f"load_sd_pipeline does not accept {bad}: it always loads local safetensors, no remote code")
    root = Path(model_dir)
    if not root.exists():
        raise FileNotFoundError(f"pipeline folder {str(root)!r} does not exist (expected a local diffusers folder)")
    if not root.is_dir():
        raise ValueError(f"pipeline path {str(root)!r} is a file; expected a diffusers pipeline folder")
    if not (root / "model_index.json").is_file():
        raise ValueError(
            f"{str(root)!r} has no model_index.json: expected a diffusers pipeline folder (save_pretrained layout"
            " with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        pipe = cls.from_pretrained(str(root), local_files_only=True, use_safetensors=True, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load a {cls.__name__} with safetensors weights from {str(root)!r}: {exc}") from exc
    if unet_weights is not None:
        net = getattr(pipe, "unet", None)
        load_unet_weights(net if net is not None else pipe.transformer, unet_weights)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe.to(device)


def _key_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_unet_weights(unet: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Replace a UNet's weights by a safetensors state dict (strict: same keys, same shapes).

    Pickled checkpoints (.pt/.ckpt/.bin) are never read: convert them to safetensors first.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"UNet weights {str(p)!r} do not exist (expected a .safetensors UNet state dict)")
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"UNet weights {str(p)!r} are not a readable safetensors file (expected a diffusers UNet state dict in"
            f" safetensors format; pickled .pt/.ckpt/.bin files are not read): {exc}"
        ) from exc
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_key_list(mismatched, 3)}")
        hint = ""
        if any(k.startswith("model.diffusion_model.") for k in unexpected):
            hint = " (the file looks like an original LDM/CompVis checkpoint: convert it to the diffusers layout)"
        raise ValueError(
            f"UNet weights {str(p)!r} do not match the UNet ({type(unet).__name__}, {len(expected)} tensors): "
            + "; ".join(parts)
            + hint
        )
    unet.load_state_dict(state, strict=True)
