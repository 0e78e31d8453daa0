"""A k-diffusion denoiser ``D(x, sigma)`` around an eps / v / x0 / flow model, with any guidance preset applied.

k-diffusion's samplers (Euler, Heun, DPM-Solver++, the ancestral ones: the samplers most UIs run) integrate on the
sigma path x = x0 + sigma eps and ask a denoiser for E[x0 | x] at each sigma. ``SafeKDenoiser`` maps (x, sigma) to
the network's own path and timestep, calls it, corrects its prediction with the preset at fixed x_t
(``core.step.path_correction``: Theorem 1's presets and the energy presets SGF and Shielded) and returns the
corrected denoised estimate. The network's paths (``core.paths``):

* ``"vp"`` (DDPM-trained eps / v / x0 models: SD-1.x, SD-2.x, SDXL): abar = 1 / (1 + sigma^2), input x sqrt(abar),
  timestep the training step whose sigma it is, log-sigma interpolated between steps as k-diffusion does;
* ``"flow"`` (rectified-flow velocity models: SD3, Flux): s = sigma / (1 + sigma), input x / (1 + sigma) =
  (1 - s) x0 + s eps, timestep 1000 s.

The reference preset cannot be applied here: it re-noises x_t with fresh noise and lets the scheduler step from the
new x_t, while a denoiser returns only E[x0 | x] and cannot change the sampler's x; its gate threshold is also
defined at a DDPM schedule's last timestep, which a k-diffusion sampler does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.guidance import EnergyGuidance, PredictionGuidance, SafeGuidance, TheoremGuidance
from safe_denoiser.core.parameterization import broadcast_to_sample
from safe_denoiser.core.paths import PREDICTIONS, GaussianPath, Prediction, flow_path, vp_path, x0_from_prediction
from safe_denoiser.core.step import StepRecord, path_correction
from safe_denoiser.errors import FieldError

__all__ = ["FLOW_TIMESTEPS", "ModelPath", "SafeKDenoiser"]

ModelPath = Literal["vp", "flow"]
FLOW_TIMESTEPS = 1000.0  # a rectified-flow network's timestep is 1000 s (diffusers' FlowMatch schedulers)


class SafeKDenoiser(nn.Module):
    """``D(x, sigma, **extra)`` for k-diffusion's samplers around ``model(x_in, t, **extra)`` (module docstring).

    Args:
        model: the network; returns its ``prediction`` for the input on its own path at timestep ``t`` (B,).
        prediction: "epsilon", "v_prediction", "sample" or "flow".
        path: "vp" (needs ``alphas_cumprod``, the training schedule) or "flow".
        banks: the preset's banks (``PreparedBanks``, or a negative bank to prepare), None without ``guidance``.
        guidance: any preset that corrects the prediction at fixed x_t, or None (the plain denoiser).
        reference: the reference bank that the odds preset reads, when ``banks`` is not prepared already.
        record: keep one ``(sigma, StepRecord)`` per call in ``records``.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        prediction: Prediction,
        path: ModelPath,
        banks: PreparedBanks | NegativeBank | Tensor | None = None,
        guidance: SafeGuidance | None = None,
        *,
        alphas_cumprod: Tensor | None = None,
        reference: NegativeBank | Tensor | None = None,
        record: bool = False,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise FieldError("prediction", f"one of {', '.join(PREDICTIONS)}", prediction, "SafeKDenoiser")
        if path not in ("vp", "flow"):
            raise FieldError("path", "'vp' or 'flow'", path, "SafeKDenoiser")
        if (path == "vp") != (alphas_cumprod is not None):
            raise ValueError("SafeKDenoiser: alphas_cumprod (the training schedule) is needed exactly for path='vp'")
        self.model, self.prediction, self.path = model, prediction, path
        self.guidance = _prediction_guidance(guidance)
        self.banks: PreparedBanks | None = None
        if self.guidance is not None:
            if banks is None:
                raise ValueError(f"SafeKDenoiser: the {self.guidance.preset} preset needs a bank")
            self.banks = PreparedBanks.prepare(banks, self.guidance, reference)
        ab = torch.empty(0) if alphas_cumprod is None else alphas_cumprod.detach().to(torch.float64)
        self.register_buffer("log_sigmas", ((1.0 - ab) / ab).sqrt().log(), persistent=False)
        self.record = record
        self.records: list[tuple[Tensor, StepRecord]] = []

    log_sigmas: Tensor

    @property
    def sigmas(self) -> Tensor:
        """The VP model's training sigmas, ascending (k-diffusion's ``sigma_min`` / ``sigma_max`` are the ends)."""
        return self.log_sigmas.exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) training timestep of ``sigma``: log-sigma interpolated between the two nearest steps."""
        if self.path == "flow":
            return FLOW_TIMESTEPS * sigma / (1.0 + sigma)
        log_sigmas = self.log_sigmas.to(device=sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (low + w).to(sigma.dtype)

    def model_path(self, sigma: Tensor) -> tuple[GaussianPath, float | Tensor]:
        """(the network's path at ``sigma`` (B,), the factor c with x_in = c x)."""
        if self.path == "vp":
            alpha_bar = 1.0 / (1.0 + sigma * sigma)
            return vp_path(alpha_bar), alpha_bar.sqrt()
        s = sigma / (1.0 + sigma)
        return flow_path(s), 1.0 - s

    def forward(self, x: Tensor, sigma: Tensor | float, **extra: Any) -> Tensor:
        """E[x0 | x] at ``sigma`` (a float or (B,)), corrected by the preset; ``extra`` goes to the network."""
        sigma_b = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        path, c = self.model_path(sigma_b)
        x_in = x * broadcast_to_sample(c, x)
        t = self.sigma_to_t(sigma_b)
        pred = self.model(x_in, t, **extra)
        if self.guidance is not None:
            assert self.banks is not None
            banks = self.banks if self.banks.device == x.device else self.banks.to(x.device)
            self.banks = banks
            pred, rec = path_correction(pred, x_in, path, self.prediction, t, banks, self.guidance)
            if self.record:
                self.records.append((sigma_b.detach().clone(), rec))
        return x0_from_prediction(x_in, pred, path, self.prediction)


def _prediction_guidance(guidance: SafeGuidance | None) -> PredictionGuidance | None:
    """The preset, refused with the reason when a denoiser cannot apply it (the reference preset)."""
    if guidance is None or isinstance(guidance, (TheoremGuidance, EnergyGuidance)):
        return guidance
    raise ValueError(
        f"SafeKDenoiser: the {guidance.preset} preset re-noises x_t with fresh noise inside the scheduler step (its"
        " gate threshold is defined at a DDPM schedule's last timestep); a denoiser D(x, sigma) returns only the"
        " denoised estimate and cannot change the sampler's x: use constant, mass, odds, sgf or shielded"
    )
