"""Pipeline builders (no download), local loading with clear errors, scheduler names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from safe_denoiser.diffusers.pipelines import (
    load_sd_pipeline,
    make_scheduler,
    sd14_architecture_pipeline,
    sd14_unet,
    tiny_clip_tokenizer,
    tiny_sd_pipeline,
)
from safe_denoiser.diffusers.safe_scheduler import SUPPORTED_SCHEDULERS
from safe_denoiser.diffusers.scheduler_registry import DEMO_SCHEDULERS, SCHEDULERS, scheduler_class

HW = 16


@pytest.fixture(scope="module")
def saved(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sample(pipe: Any) -> Tensor:
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=HW,
        width=HW,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_make_scheduler_names_and_errors() -> None:
    import diffusers

    for name, spec in SCHEDULERS.items():
        assert SUPPORTED_SCHEDULERS[spec.class_name] == spec.kind  # the safe denoiser supports every listed one
        if spec.kind == "flow":  # flow matching: no betas or prediction type to configure
            assert type(make_scheduler(name)) is getattr(diffusers, spec.class_name)
            continue
        s = make_scheduler(name, prediction_type="v_prediction")
        assert type(s) is getattr(diffusers, spec.class_name) and s.config.prediction_type == "v_prediction"
        assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    assert make_scheduler("Euler-A").__class__.__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("pndm").config.skip_prk_steps  # SD-1.4's own scheduler config
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_scheduler("heun")
    # The demo offers a subset of the same names (no sigma-form samplers).
    assert set(DEMO_SCHEDULERS) <= set(SCHEDULERS) and "euler" not in DEMO_SCHEDULERS
    assert scheduler_class("dpmpp", DEMO_SCHEDULERS) is diffusers.DPMSolverMultistepScheduler
    with pytest.raises(ValueError, match=r"unknown scheduler 'euler': expected one of \['ddim', 'ddpm', 'dpmpp'\]"):
        scheduler_class("euler", DEMO_SCHEDULERS)


def test_tiny_pipeline_is_seeded_and_leaves_the_global_rng_alone(pipe: Any) -> None:
    state = torch.random.get_rng_state()
    same, other = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1, scheduler="euler", prediction_type="v_prediction")
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(pipe.unet.state_dict().values(), same.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)
    assert type(other.scheduler).__name__ == "EulerDiscreteScheduler"
    assert other.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert sample(pipe).shape == (1, 4, HW // 2, HW // 2)


def test_tiny_tokenizer() -> None:
    tok = tiny_clip_tokenizer()
    ids = tok(["a photo of a cat", "x" * 500], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(tok) == 514 and tok.model_max_length == 77
    assert all(len(row) == 77 and row[0] == tok.bos_token_id and max(row) < 514 for row in ids)
    assert ids[0][-1] == tok.pad_token_id == tok.eos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "a photo of a cat"


def test_sd14_architecture_on_meta_device() -> None:
    pipe = sd14_architecture_pipeline(device="meta")
    unet = pipe.unet
    assert next(unet.parameters()).device.type == "meta"

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(unet) == 859_520_964  # SD-1.4/1.5's UNet
    assert count(pipe.text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert count(pipe.vae) == 83_653_863  # SD's AutoencoderKL
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == 0.18215
    assert count(sd14_unet(device="meta")) == count(unet)
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == (320, 640, 1280, 1280) and cfg.cross_attention_dim == 768
    assert cfg.in_channels == 4 and cfg.sample_size == 64 and cfg.layers_per_block == 2


def test_save_and_load_roundtrip(pipe: Any, saved: Path) -> None:
    loaded = load_sd_pipeline(saved, safety_checker=None)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(loaded), sample(pipe))
    assert type(load_sd_pipeline(saved, scheduler="euler").scheduler).__name__ == "EulerDiscreteScheduler"


def test_swapped_unet_weights(pipe: Any, saved: Path, tmp_path: Path) -> None:
    other = tiny_sd_pipeline(seed=7)
    weights = tmp_path / "esd-unet.safetensors"
    save_file({k: v.contiguous() for k, v in other.unet.state_dict().items()}, str(weights))
    loaded = load_sd_pipeline(saved, unet_weights=weights)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.unet.conv_in.weight, other.unet.conv_in.weight)
    swapped = sample(loaded)
    assert not torch.equal(swapped, sample(pipe))
    pipe.unet, original = other.unet, pipe.unet  # same text encoder and VAE, other UNet: same samples
    try:
        assert torch.equal(swapped, sample(pipe))
    finally:
        pipe.unet = original


def test_loading_errors_name_the_path(pipe: Any, saved: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist"):
        load_sd_pipeline(missing)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"file\.txt.*is a file"):
        load_sd_pipeline(tmp_path / "file.txt")
    with pytest.raises(ValueError, match=r"no model_index\.json"):
        load_sd_pipeline(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_sd_pipeline(saved, trust_remote_code=True)
    pickled = tmp_path / "pickled"
    pipe.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors"):
        load_sd_pipeline(pickled)

    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_sd_pipeline(saved, unet_weights=tmp_path / "missing.safetensors")
    garbage = tmp_path / "unet.ckpt"
    torch.save({"state_dict": {}}, garbage)
    with pytest.raises(ValueError, match=r"unet\.ckpt.*not a readable safetensors"):
        load_sd_pipeline(saved, unet_weights=garbage)

    state = {k: v.contiguous() for k, v in pipe.unet.state_dict().items()}
    cases = {
        "missing keys: conv_in.bias": {k: v for k, v in state.items() if k != "conv_in.bias"},
        "unexpected keys: extra.weight": {**state, "extra.weight": torch.zeros(1)},
        r"shape mismatches: conv_in.weight: file \(1,\)": {**state, "conv_in.weight": torch.zeros(1)},
        "original LDM": {f"model.diffusion_model.{k}": v for k, v in state.items()},
    }
    for i, (message, tensors) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=f"bad{i}.safetensors.*{message}"):
            load_sd_pipeline(saved, unet_weights=path)
