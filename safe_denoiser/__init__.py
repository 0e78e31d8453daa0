"""safe-denoiser: training-free safe denoisers for diffusion models (Kim et al., NeurIPS 2025).

The core is pure tensor math (``kernel``, ``correction``, ``step``); ``NegativeBank`` holds the unsafe
datapoints; adapters for diffusers and Lightning build on those.
"""

from .bank import BankError, NegativeBank, l2_normalize_positions
from .config import SafeGuidance
from .correction import cfg_combine, safe_eps, safe_x0
from .diffusers_adapter import SafeScheduler, StepTrace, attach, detach
from .kernel import KernelEstimate, kernel_estimate, kernel_log_mass, unsafe_posterior_mean
from .mixture import GaussianMixture
from .parameterization import (
    alpha_bar_from_sigma,
    eps_from_v,
    eps_from_x0,
    eps_from_x0_sigma,
    sigma_from_alpha_bar,
    v_from_eps,
    x0_from_eps,
    x0_from_eps_sigma,
    x0_from_v,
)
from .sld import SLDConfig, SLDUNet, attach_sld, detach_sld, sld_guidance
from .step import StepRecord, reference_correction, reference_threshold, theorem_correction

__version__ = "0.1.0"

__all__ = [
    "BankError",
    "GaussianMixture",
    "KernelEstimate",
    "NegativeBank",
    "SLDConfig",
    "SLDUNet",
    "SafeGuidance",
    "SafeScheduler",
    "StepRecord",
    "StepTrace",
    "alpha_bar_from_sigma",
    "attach",
    "attach_sld",
    "cfg_combine",
    "detach",
    "detach_sld",
    "eps_from_v",
    "eps_from_x0",
    "eps_from_x0_sigma",
    "kernel_estimate",
    "kernel_log_mass",
    "l2_normalize_positions",
    "reference_correction",
    "reference_threshold",
    "safe_eps",
    "safe_x0",
    "sigma_from_alpha_bar",
    "sld_guidance",
    "theorem_correction",
    "unsafe_posterior_mean",
    "v_from_eps",
    "x0_from_eps",
    "x0_from_eps_sigma",
    "x0_from_v",
]
