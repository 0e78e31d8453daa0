"""Pipeline builders (no download), local loading with clear errors, scheduler names, the model-kind registry."""

from __future__ import annotations

import re
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
)
from safe_denoiser.diffusers.safe_scheduler import SUPPORTED_SCHEDULERS
from safe_denoiser.diffusers.scheduler_registry import DEMO_SCHEDULERS, SCHEDULERS, scheduler_class
from safe_denoiser.models import PLUGINS_ENV, ClassLabels, ModelConfig, ModelKind, model_kind, model_kind_names
from safe_denoiser.testing import tiny_sd_pipeline

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


# ---- the model-kind registry ------------------------------------------------------------------------------------
def test_the_demo_registers_through_its_entry_point_and_test_kinds_are_not_user_facing() -> None:
    from importlib.metadata import entry_points

    (point,) = [p for p in entry_points(group="safe_denoiser.model_kinds") if p.name == "demo"]
    assert point.value == "safe_denoiser.demo.model_kind:DEMO"
    names = model_kind_names()
    assert {"demo", "sd", "sdxl", "sd3", "flux", "sd14-random"} <= set(names)
    assert not [n for n in names if n.startswith("tiny-")]  # registered (conftest imports safe_denoiser.testing)...
    assert {"tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"} <= set(model_kind_names(include_testing=True))
    with pytest.raises(ValueError, match=r"model\.model must be one of .*, got 'tiny-sdx'") as info:
        model_kind("tiny-sdx")
    assert "tiny-sd," not in str(info.value)  # ...but never offered to users


def test_generic_modules_do_not_import_the_demo_or_the_test_pipelines() -> None:
    root = Path(__file__).resolve().parents[1] / "safe_denoiser"
    generic = [*(root / "models").glob("*.py"), *(root / "lightning").glob("*.py"), *(root / "diffusers").glob("*.py")]
    upward = re.compile(r"^\s*(from|import) safe_denoiser\.(demo|testing)\b", re.MULTILINE)
    assert generic
    for path in generic:
        assert not upward.search(path.read_text(encoding="utf-8")), path.name


def test_the_demo_kind_says_which_labels_it_takes() -> None:
    """One home for the demo's labels: the kind's ``ClassLabels`` (digits, the null class, the super-classes), the
    labels its UNet embeds."""
    from safe_denoiser.demo.digits import NULL_CLASS, SUPER_CLASSES
    from safe_denoiser.demo.pipeline import DigitsPipeline

    labels = model_kind("demo").labels
    assert labels is not None and labels.null == NULL_CLASS
    assert labels.count == DigitsPipeline.from_bundled().num_labels == 11 + len(SUPER_CLASSES)
    assert [labels.parse(v, "label") for v in ("0", " 9", "11", 12)] == [0, 9, 11, 12]
    for bad, shown in (("13", "13"), ("-1", "-1"), ("a cat", "'a cat'")):
        with pytest.raises(ValueError, match=rf"label must be one of 0-12 \(10: no class, .*\), got {shown}$"):
            labels.parse(bad, "label")


def test_a_plug_in_kind_registers_and_conflicts_are_refused() -> None:
    from safe_denoiser.models.registry import register_model_kind

    def build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
        return tiny_sd_pipeline(seed=seed, scheduler=scheduler)

    def shape(pipe: Any, height: int | None, width: int | None) -> tuple[int, ...]:
        return (4, 16, 16)

    kind = register_model_kind(ModelKind("test-plugin", build, shape, user_facing=False))
    assert model_kind("test-plugin") is kind
    assert ModelConfig(model="test-plugin").sample_shape(None) == (4, 16, 16)
    with pytest.raises(ValueError, match="registered twice with different definitions"):
        register_model_kind(ModelKind("test-plugin", build, shape, description="another"))
    with pytest.raises(ValueError, match="class-conditional kinds"):
        ModelKind("bad", build, shape, inputs="class-conditional")
    assert ClassLabels(3, 2).describe() == "0-2 (2: no class)"


def test_a_subprocess_gets_the_test_kinds_from_the_plugins_variable(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = "from safe_denoiser.models import model_kind; print(model_kind('tiny-sd').name)"
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert without.returncode != 0 and "model.model must be one of" in without.stderr
    env[PLUGINS_ENV] = "safe_denoiser.testing"
    with_plugins = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert with_plugins.returncode == 0 and with_plugins.stdout.strip() == "tiny-sd", with_plugins.stderr[-2000:]
    env[PLUGINS_ENV] = "no_such_module_here"
    broken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert f"{PLUGINS_ENV} names the module 'no_such_module_here', which cannot be imported" in broken.stderr
