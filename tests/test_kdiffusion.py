"""``SafeKDenoiser`` driven by the ``k-diffusion`` package's own samplers (Euler, Heun, DPM-Solver++(2M), Euler
ancestral) on the 2-D toy, the mixture's exact posterior mean playing an eps / v / x0 / flow network.

Checks: the plain wrapper is k-diffusion's own DDPM denoiser (``DiscreteEpsDDPMDenoiser``); zero strength leaves
every sample bit for bit; every denoiser call of a guided run equals its preset recomputed independently in float64
from the call's (x, sigma) (Theorem 1 with a direct softmax over the bank, SGF and SPELL by their formulas), within
a float32 bound; the reference preset is refused with its reason.

k-diffusion's package ``__init__`` imports its training stack (torchvision, CLIP, wandb, ...); the samplers need
none of it, so ``_kdiffusion`` loads ``k_diffusion.sampling`` and ``k_diffusion.external`` with a stand-in for the
one unused torchvision import.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from safe_denoiser.core.guidance import (
    ConstantGuidance,
    MassGuidance,
    OddsGuidance,
    ReferenceGuidance,
    SafeGuidance,
    SGFGuidance,
    ShieldedGuidance,
)
from safe_denoiser.core.kdiffusion import SafeKDenoiser
from safe_denoiser.core.paths import flow_path, prediction_from_x0, vp_path
from safe_denoiser.demo.toy import alphas_cumprod, default_mixture

MIXTURE = default_mixture()
SAMPLERS = ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"]
STEPS = 12


@pytest.fixture(scope="module")
def kd() -> types.SimpleNamespace:
    if importlib.util.find_spec("k_diffusion") is None:
        pytest.fail(
            "k-diffusion is not installed: the Makefile installs it (pip install --no-deps k-diffusion==0.1.1.post1)"
        )
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.submodule_search_locations is not None
    saved = {
        k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith(("k_diffusion.", "torchvision"))
    }
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    if importlib.util.find_spec("torchvision") is None:  # k_diffusion.utils imports it for image helpers only
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:
        for name in [k for k in sys.modules if k == "k_diffusion" or k.startswith(("k_diffusion.", "torchvision"))]:
            del sys.modules[name]
        sys.modules.update(saved)
    return types.SimpleNamespace(sampling=sampling, external=external)


ABAR = alphas_cumprod().float()
LOG_SIGMAS = ((1 - ABAR.double()) / ABAR.double()).sqrt().log()


def _sigma_of_t(t: Tensor) -> Tensor:
    """The training schedule's sigma at a fractional timestep: log-sigma interpolated (written out independently)."""
    lo = t.double().floor().clamp(0, len(LOG_SIGMAS) - 2)
    w = t.double() - lo
    return ((1 - w) * LOG_SIGMAS[lo.long()] + w * LOG_SIGMAS[lo.long() + 1]).exp()


class ToyNetwork(nn.Module):
    """E_data[x0 | x_t] of the 2-D mixture, as the ``prediction`` of a network on the ``path`` ("vp" or "flow")."""

    def __init__(self, prediction: str, path: str) -> None:
        super().__init__()
        self.prediction, self.path = prediction, path

    def forward(self, x_in: Tensor, t: Tensor) -> Tensor:
        if not bool((t == t[0]).all()):  # one timestep per row (k-diffusion's samplers pass one per batch)
            return torch.cat([self(x_in[i : i + 1], t[i : i + 1]) for i in range(len(t))])
        x0 = _exact_x0(x_in.double(), t.double(), self.path).to(x_in.dtype)
        path = _path(t.double(), self.path)
        level = torch.full((len(x_in),), float(path.level), dtype=x_in.dtype)
        return prediction_from_x0(x_in, x0, type(path)(path.kind, level), self.prediction)  # type: ignore[arg-type]


def _path(t: Tensor, kind: str) -> Any:
    """The network's path at the batch's (one) timestep."""
    if kind == "vp":
        return vp_path(float(1.0 / (1.0 + _sigma_of_t(t[:1]).square())))
    return flow_path(float(t[0]) / 1000.0)


def _exact_x0(x_in: Tensor, t: Tensor, kind: str) -> Tensor:
    """E_data[x0 | x_in] in float64 on the network's path at timestep t (one t per batch)."""
    return MIXTURE.posterior_mean(x_in.double(), _path(t, kind))


class Recorder(nn.Module):
    """Every call of the wrapped denoiser: (x, sigma, denoised)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        out = self.inner(x, sigma, **extra)
        self.calls.append((x.detach().clone(), sigma.detach().clone(), out.detach().clone()))
        return out


def _bank(n: int = 64, seed: int = 3) -> Tensor:
    return MIXTURE.sample(n, part="unsafe", generator=torch.Generator().manual_seed(seed)).float()


def _reference_bank() -> Tensor:
    return MIXTURE.sample(160, part="safe", generator=torch.Generator().manual_seed(4)).float()


def _denoiser(guidance: SafeGuidance | None, prediction: str = "epsilon", path: str = "vp") -> SafeKDenoiser:
    net = ToyNetwork(prediction, path)
    ref = _reference_bank() if guidance is not None and guidance.needs_reference_bank else None
    ab = ABAR if path == "vp" else None
    return SafeKDenoiser(
        net, prediction, path, _bank() if guidance else None, guidance, alphas_cumprod=ab, reference=ref
    )  # type: ignore[arg-type]


def _sample(kd: types.SimpleNamespace, name: str, model: nn.Module, seed: int = 0, n: int = 256) -> Tensor:
    sigmas = kd.sampling.get_sigmas_karras(STEPS, 0.03, 14.0, device="cpu")
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    torch.manual_seed(seed)  # the ancestral sampler's noise
    return kd.sampling.__dict__[name](model, x, sigmas, disable=True)


# ---- the plain wrapper is k-diffusion's own DDPM denoiser ---------------------------------------------------------
def test_plain_wrapper_is_kdiffusions_discrete_denoiser(kd: types.SimpleNamespace) -> None:
    net = ToyNetwork("epsilon", "vp")
    theirs = kd.external.DiscreteEpsDDPMDenoiser(net, ABAR, quantize=False)
    ours = SafeKDenoiser(net, "epsilon", "vp", alphas_cumprod=ABAR)
    sigma = torch.tensor([0.05, 0.4, 1.0, 3.0, 14.0])
    torch.testing.assert_close(ours.sigma_to_t(sigma.double()), theirs.sigma_to_t(sigma).double(), rtol=1e-5, atol=1e-4)
    x = torch.randn(5, 2) * (1 + sigma[:, None] ** 2).sqrt()
    torch.testing.assert_close(ours(x, sigma), theirs(x, sigma), rtol=1e-5, atol=1e-5)


# ---- zero strength: bit for bit; a preset with strength moves the samples ------------------------------------------
ZERO = [
    ConstantGuidance(beta=0.0),
    SGFGuidance(mmd_scale=0.0, window=(0.0, 1000.0)),
    ShieldedGuidance(overcompensation=0.0),
    ShieldedGuidance(radius=1e-6),  # no bank item that close: sparse, nothing to do
    OddsGuidance(window=(2000.0, 3000.0)),
]
ACTING = [ConstantGuidance(beta=1.0), SGFGuidance(window=(0.0, 1000.0)), ShieldedGuidance(radius=1.0)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_zero_strength_is_bit_exact_and_strength_acts(kd: types.SimpleNamespace, name: str) -> None:
    base = _sample(kd, name, _denoiser(None))
    for guidance in ZERO:
        assert torch.equal(_sample(kd, name, _denoiser(guidance)), base), (name, guidance)
    for guidance in ACTING:
        moved = _sample(kd, name, _denoiser(guidance))
        assert (moved - base).abs().max() > 1e-2, (name, guidance)


# ---- each call equals its preset recomputed in float64 -------------------------------------------------------------
def _theorem64(x: Tensor, sigma: Tensor, guidance: Any, x0: Tensor) -> Tensor:
    """x0 + beta (x0 - E_unsafe), E_unsafe by a direct float64 softmax over the bank at the VP sample."""
    ab = 1.0 / (1.0 + sigma.square())
    x_vp, bank = x / (1 + sigma.square()).sqrt()[:, None], _bank().double()
    log_w = -(x_vp[:, None] - ab.sqrt()[:, None, None] * bank[None]).square().sum(-1) / (2 * (1 - ab))[:, None]
    e_unsafe = torch.softmax(log_w, dim=1) @ bank
    log_mass = torch.logsumexp(log_w, dim=1) - math.log(len(bank))
    if isinstance(guidance, ConstantGuidance):
        beta = torch.full_like(ab, guidance.beta)
    elif isinstance(guidance, MassGuidance):
        beta = guidance.beta_per_mass * log_mass.exp()
    else:
        ref = _reference_bank().double()
        log_r = -(x_vp[:, None] - ab.sqrt()[:, None, None] * ref[None]).square().sum(-1) / (2 * (1 - ab))[:, None]
        prior = math.log(len(bank) / len(ref))  # Z_u / Z_s from the banks' sizes (a safe reference bank)
        log_beta = prior + log_mass - (torch.logsumexp(log_r, dim=1) - math.log(len(ref)))
        beta = log_beta.clamp(max=guidance.log_beta_max).exp()
    return x0 + beta[:, None] * (x0 - e_unsafe)


def _energy64(guidance: Any, x0: Tensor, t: Tensor) -> Tensor:
    bank = _bank().double()
    diff = x0[:, None] - bank[None]
    d2 = diff.square().sum(-1)
    if isinstance(guidance, SGFGuidance):
        h = d2.sort(dim=1).values[:, guidance.bandwidth_rank - 1 : guidance.bandwidth_rank] / (2 * math.log(20.0))
        w = (
            guidance.mmd_scale
            * (-d2 / (2 * h)).exp()
            * ((t >= guidance.window[0]) & (t <= guidance.window[1]))[:, None]
        )
    else:
        d = d2.sqrt()
        w = guidance.overcompensation * (guidance.radius - d).clamp_min(0) / d
    return x0 + (w[..., None] * diff).sum(1)


CHECKED = [
    ConstantGuidance(beta=0.8),
    MassGuidance(beta_per_mass=4.0),
    OddsGuidance(),
    SGFGuidance(window=(300.0, 1000.0), mmd_scale=0.5),
    ShieldedGuidance(radius=0.8),
]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_call_is_the_preset_in_float64(kd: types.SimpleNamespace, name: str, prediction: str) -> None:
    worst = 0.0
    for guidance in CHECKED:
        rec = Recorder(_denoiser(guidance, prediction))
        _sample(kd, name, rec, n=64)
        assert len(rec.calls) >= STEPS
        for x, sigma, denoised in rec.calls:
            x64, s64 = x.double(), sigma.double().expand(len(x))
            x_vp = x64 / (1 + s64.square()).sqrt()[:, None]
            t = rec.inner.sigma_to_t(s64)
            x0 = _exact_x0(x_vp, t, "vp")
            in_window = (t >= guidance.window[0]) & (t <= guidance.window[1])
            if isinstance(guidance, (SGFGuidance, ShieldedGuidance)):
                want = _energy64(guidance, x0, t)
            else:
                want = torch.where(in_window[:, None], _theorem64(x64, s64, guidance, x0), x0)
            # float32 network and correction: errors ~ u32 (|x0| + |change| + |x| sigma) (the first term), and a
            # softmax whose logits carry 16 u32 (|x_vp| + |y|)^2 / (1 - abar), moving E_unsafe by that times the
            # bank's spread (~1) and the change by beta times it (the second term; |y| <= 2 on the toy)
            change = (want - x0).norm(dim=1)
            logit = 16 * 2.0**-24 * (x_vp.norm(dim=1) + 2) ** 2 * (1 + s64.square()) / s64.square()
            bound = 1e-4 * (1 + x64.norm(dim=1) * (1 + s64) + change) + logit * (1 + change)
            err = (denoised.double() - want).norm(dim=1)
            worst = max(worst, float((err / bound).max()))
    assert worst <= 1.0, worst


def test_flow_network_is_corrected_on_its_own_path(kd: types.SimpleNamespace) -> None:
    """A rectified-flow velocity network: the corrected denoised estimate is the float64 preset at its x0."""
    guidance = SGFGuidance(window=(0.0, 1000.0), mmd_scale=0.5)
    rec = Recorder(_denoiser(guidance, "flow", "flow"))
    _sample(kd, "sample_euler", rec, n=32)
    for x, sigma, denoised in rec.calls:
        s = sigma.double().expand(len(x)) / (1 + sigma.double().expand(len(x)))
        x_in = x.double() * (1 - s)[:, None]
        x0 = _exact_x0(x_in, 1000 * s, "flow")
        want = _energy64(guidance, x0, 1000 * s)
        assert float((denoised.double() - want).norm(dim=1).max()) <= 1e-4 * (1 + float(x.norm(dim=1).max()))


def test_reference_preset_and_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"the reference preset re-noises x_t .* use constant, mass, odds, sgf or"):
        SafeKDenoiser(ToyNetwork("epsilon", "vp"), "epsilon", "vp", _bank(), ReferenceGuidance(), alphas_cumprod=ABAR)
    with pytest.raises(ValueError, match=r"SafeKDenoiser\.prediction must be one of"):
        SafeKDenoiser(ToyNetwork("epsilon", "vp"), "eps", "vp", alphas_cumprod=ABAR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"alphas_cumprod .* exactly for path='vp'"):
        SafeKDenoiser(ToyNetwork("flow", "flow"), "flow", "flow", alphas_cumprod=ABAR)
    with pytest.raises(ValueError, match=r"the sgf preset needs a bank"):
        SafeKDenoiser(ToyNetwork("epsilon", "vp"), "epsilon", "vp", None, SGFGuidance(), alphas_cumprod=ABAR)
