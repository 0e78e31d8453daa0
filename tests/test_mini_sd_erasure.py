"""The miniature's erased models (safe_denoiser/mini_sd/erasure): UCE's closed form, ESD's loss and the loader."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safe_denoiser.errors import FieldError
from safe_denoiser.mini_sd.erasure import load_erased_pipeline
from safe_denoiser.mini_sd.erasure.esd import (
    ESD_FILE,
    EsdSettings,
    esd_loss,
    esd_target,
    save_parameters,
    train_esd,
    trainable_names,
)
from safe_denoiser.mini_sd.erasure.uce import closed_form_edit
from safe_denoiser.mini_sd.loop import Optimisation, train_steps

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def _lstsq_reference(w0, keys, values, kept, lam, erase_scale, preserve_scale):  # type: ignore[no-untyped-def]
    """argmin_W es|W C^T - V^T|^2 + ps|W P^T - W0 P^T|^2 + lam|W - W0|^2 as one stacked least-squares problem."""
    d = w0.shape[1]
    a = torch.cat([erase_scale**0.5 * keys, preserve_scale**0.5 * kept, lam**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([erase_scale**0.5 * values, preserve_scale**0.5 * kept @ w0.T, lam**0.5 * w0.T])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T, torch.linalg.cond(a.T @ a)


@pytest.mark.parametrize("seed", range(8))
def test_uce_matches_a_float64_least_squares_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    out, d, n, m = 32, 64, 40, 120
    w0 = torch.randn(out, d, generator=gen, dtype=torch.float64) / d**0.5
    keys = torch.randn(n, d, generator=gen, dtype=torch.float64)
    values = torch.randn(n, out, generator=gen, dtype=torch.float64)
    kept = torch.randn(m, d, generator=gen, dtype=torch.float64)
    lam, erase_scale, preserve_scale = [0.1, 1.0, 10.0][seed % 3], 1.0 + seed % 2, 0.5 + seed % 3
    reference, cond = _lstsq_reference(w0, keys, values, kept, lam, erase_scale, preserve_scale)
    edited = closed_form_edit(w0, keys, values, kept, lam, erase_scale, preserve_scale)
    # Both solve the same problem in float64: each is within ~d * cond(A^T A) * eps of the exact W (normal equations
    # by Cholesky-like LU; SVD least squares is better still), relative to W's size.
    bound = 2 * d * float(cond) * EPS64 * float(reference.abs().max())
    assert float((edited - reference).abs().max()) <= bound
    # The float32 weight gets the float64 answer rounded once (plus the same solve error).
    edited32 = closed_form_edit(w0.float(), keys, values, kept, lam, erase_scale, preserve_scale)
    assert edited32.dtype == torch.float32
    assert float((edited32.double() - reference).abs().max()) <= EPS32 * float(reference.abs().max()) + bound
    assert float((edited - w0).abs().max()) > 1e3 * bound  # the edit did move W


def test_uce_without_concepts_leaves_the_weight_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(32, 64, generator=gen)
    empty = torch.zeros(0, 64)
    for lam in (1e-3, 0.1, 100.0):
        # (lam W) (lam I)^-1: exact up to one division and the float32 cast.
        alone = closed_form_edit(w0, empty, torch.zeros(0, 32), empty, lam)
        assert float((alone - w0).abs().max()) <= 2 * EPS32 * float(w0.abs().max())
        # Preserved prompts map onto W's own outputs: still W, up to the solve's rounding (cond of the Gram matrix).
        kept = torch.randn(50, 64, generator=gen)
        gram = lam * torch.eye(64, dtype=torch.float64) + kept.double().T @ kept.double()
        bound = 2 * 64 * float(torch.linalg.cond(gram)) * EPS64 * float(w0.abs().max()) + EPS32 * float(w0.abs().max())
        assert float((closed_form_edit(w0, empty, torch.zeros(0, 32), kept, lam) - w0).abs().max()) <= bound


def test_unknown_method_is_refused_naming_the_field_and_the_methods() -> None:
    with pytest.raises(FieldError, match=r"method must be one of esd, uce, got 'rece'"):
        load_erased_pipeline("rece")


@pytest.fixture(scope="module")
def base() -> Any:
    """The shipped miniature (read only: every test that trains works on a copy)."""
    from safe_denoiser.mini_sd.model_kind import load_pipeline

    return load_pipeline("ddim")


def test_esd_pipeline_differs_from_the_base_only_in_the_shipped_cross_attention(base: Any) -> None:
    shipped = load_file(str(ESD_FILE))
    assert shipped and all(".attn2." in f".{name}" for name in shipped)
    erased = load_erased_pipeline("esd", "ddim")
    base_state, erased_state = base.unet.state_dict(), erased.unet.state_dict()
    assert base_state.keys() == erased_state.keys()
    changed = {k for k in base_state if not torch.equal(base_state[k], erased_state[k])}
    assert changed and changed <= set(shipped)
    assert all(torch.equal(erased_state[k], v) for k, v in shipped.items())
    for part in ("text_encoder", "vae"):
        a, b = getattr(base, part).state_dict(), getattr(erased, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def _random_unet(seed: int) -> torch.nn.Module:
    """A random-weight UNet with cross-attention, small enough for a few training steps in a second."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet: torch.nn.Module = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    return unet.eval()


def _tiny_batch(unet: torch.nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config  # type: ignore[attr-defined]
    x_t = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    states = torch.randn(3, 77, cfg.cross_attention_dim, generator=gen)
    null = torch.randn(1, 77, cfg.cross_attention_dim, generator=gen)
    return x_t, torch.tensor(500), states, null


@pytest.mark.parametrize("eta", [1.0, 2.5])
def test_esd_loss_matches_its_formula_in_float64(eta: float) -> None:
    original = _random_unet(0)
    trained = copy.deepcopy(original)
    with torch.no_grad():  # a trained copy that differs from the original in its cross-attention
        for name in trainable_names(trained, "attn2"):
            trained.get_parameter(name).add_(0.05 * torch.randn_like(trained.get_parameter(name)))
    x_t, t, states, null = _tiny_batch(original, 1)
    loss = esd_loss(trained, original, x_t, t, states, null, eta)
    with torch.no_grad():
        o64, t64 = copy.deepcopy(original).double(), copy.deepcopy(trained).double()
        eps_u = o64(x_t.double(), t, encoder_hidden_states=null.double().expand(3, -1, -1)).sample
        eps_c = o64(x_t.double(), t, encoder_hidden_states=states.double()).sample
        pred = t64(x_t.double(), t, encoder_hidden_states=states.double()).sample
        error = pred - (eps_u - eta * (eps_c - eps_u))
        # delta: the float32 forward passes' largest deviation from float64, measured on the same inputs.
        delta = max(
            float((original(x_t, t, encoder_hidden_states=null.expand(3, -1, -1)).sample - eps_u).abs().max()),
            float((original(x_t, t, encoder_hidden_states=states).sample - eps_c).abs().max()),
            float((trained(x_t, t, encoder_hidden_states=states).sample - pred).abs().max()),
        )
    assert torch.allclose(esd_target(eps_c, eps_u, eta), eps_u - eta * (eps_c - eps_u), rtol=0, atol=0)
    # Per element the error e = pred - target is off by at most eps = delta (1 + |1 + eta| + |eta|); then
    # |mean(a^2) - mean(b^2)| <= rms(a - b) rms(a + b) <= eps (2 rms(b) + eps), plus float32 rounding of the mean.
    loss64 = float(error.square().mean())
    eps = delta * (1 + abs(1 + eta) + abs(eta))
    bound = eps * (2 * loss64**0.5 + eps) + error.numel() * EPS32 * loss64
    assert abs(float(loss.detach()) - loss64) <= bound
    assert loss64 > 100 * bound  # the check is not vacuous


def test_esd_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    original = _random_unet(1).requires_grad_(False)
    trained = copy.deepcopy(original)
    names = trainable_names(trained, "attn2")
    for name in names:
        trained.get_parameter(name).requires_grad_(True)
    x_t, t, states, null = _tiny_batch(original, 2)

    def loss_at(step: int) -> torch.Tensor:
        return esd_loss(trained, original, x_t, t, states, null, 1.0)

    result = train_steps([trained.get_parameter(n) for n in names], loss_at, Optimisation(30, 1e-2, warmup=0), "test")
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_train_esd_changes_only_cross_attention_and_is_deterministic(base: Any) -> None:
    pipe = base
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    settings = EsdSettings(steps=3, batch_size=2, sample_steps=4, prompts=8, scope="attn2-kv")
    first, _ = train_esd(pipe, settings)
    second, _ = train_esd(pipe, settings)
    assert sorted(first) == sorted(trainable_names(pipe.unet, "attn2-kv"))
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], before[k]) for k in first)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # the input UNet is untouched


def test_saved_esd_parameters_are_byte_identical_when_rewritten(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.attn2.to_k.weight": torch.randn(4, 8, generator=gen) for i in range(3)}
    shas = [save_parameters(tmp_path / f"{i}.safetensors", tensors, EsdSettings()) for i in range(3)]
    assert len(set(shas)) == 1
    assert all(torch.equal(load_file(str(tmp_path / "0.safetensors"))[k], v) for k, v in tensors.items())


def test_esd_name_captions_only_name_the_concept() -> None:
    """The default concept prompts (``captions="name"``) are training captions of the 8 that carry no style, stroke
    or attribute word, every frame of each name; ``captions="all"`` keeps the seeded draw of every caption."""
    from safe_denoiser.mini_sd import captions
    from safe_denoiser.mini_sd.erasure.prompts import drawn_captions

    names = EsdSettings().concept_prompts()
    style = {w for adjs in captions._ADJECTIVES.values() for w in adjs} | set(captions._STYLES) - {""}
    style |= {w for strokes in captions._STROKES.values() for phrase in strokes for w in phrase.split()}
    style -= {"a", "at", "in", "the", "to", "with"}  # the grammar words the stroke phrases share with names
    assert len(names) == 35 and set(names) <= set(captions.digit_captions(8))
    assert not any(set(t.split()) & style for t in names)
    assert all(any(noun in t for noun in ("eight", "8")) for t in names)
    # every caption of the 8 without a style word is one of them: the pool is the whole of "the name and nothing else"
    assert {t for t in captions.digit_captions(8) if not set(t.split()) & style} == set(names)
    assert EsdSettings(captions="all", prompts=256).concept_prompts() == drawn_captions((8,), 256, 0)
    assert EsdSettings(prompts=5, seed=3).concept_prompts() == EsdSettings(prompts=5, seed=3).concept_prompts()
    assert set(EsdSettings(prompts=5).concept_prompts()) <= set(names)


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"captions": "nouns"}, "captions must be 'name' or 'all'"), ({"prompts": 0}, "prompts must be a positive")],
)
def test_esd_settings_refuse_bad_values(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EsdSettings(**kwargs)
    with pytest.raises(ValueError, match=r"count must be 1\.\.35"):
        EsdSettings(prompts=36).concept_prompts()


@pytest.mark.parametrize(
    "flags,needle",
    [(["--captions", "x"], "captions must be 'name' or 'all', got 'x'"), (["--scope", "x"], "scope must be one of")],
)
def test_esd_command_refuses_bad_values_before_training(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad setting on the command line is a usage error (exit 2, the field named), not a traceback, and nothing is
    trained or written."""
    from safe_denoiser.mini_sd.erasure import esd

    with pytest.raises(SystemExit) as exc:
        esd.main([*flags, "--out", str(tmp_path / "esd.safetensors")])
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_erased_model_kinds_are_the_miniature_with_another_build() -> None:
    from safe_denoiser.mini_sd.model_kind import MINI_SD
    from safe_denoiser.models.registry import model_kind

    for method in ("esd", "uce"):
        kind = model_kind(f"mini-sd-{method}")
        same = dataclasses.replace(kind, name=MINI_SD.name, build=MINI_SD.build, description=MINI_SD.description)
        assert same == MINI_SD and kind.build is not MINI_SD.build and method.upper() in kind.description
