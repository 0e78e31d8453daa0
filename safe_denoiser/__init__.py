"""safe-denoiser: training-free safe denoisers for diffusion models (Kim et al., NeurIPS 2025).

Layers, each a subpackage (a lower layer never imports a higher one):

- ``safe_denoiser.core``: pure tensor math (kernel estimate, Theorem 1, one step's correction, SLD equations),
  the settings and the ``NegativeBank``. Needs torch and safetensors only.
- ``safe_denoiser.diffusers``: the scheduler wrapper (``attach``), the SLD UNet wrapper, pipeline builders, VAE.
- ``safe_denoiser.lightning``: ``trainer.predict`` generation (module, prompt sets, writer, CLI).
- ``safe_denoiser.demo``: the bundled digits model, its judge and evaluation, the 2-D toy, Gaussian mixtures.
- ``safe_denoiser.export``: builds ONNX / TensorRT bundles (torch).
- ``safe_denoiser.runtime``: runs a bundle with numpy + onnxruntime (no torch).

The names below are importable from the top level; each loads its own layer on first use (PEP 562), so
``import safe_denoiser`` itself loads nothing heavy and ``safe_denoiser.runtime.bundle`` runs without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BankError", "NegativeBank", "l2_normalize_positions"], "safe_denoiser.core.bank"),
    **dict.fromkeys(
        ["ConstantGuidance", "MassGuidance", "OddsGuidance", "ReferenceGuidance", "SafeGuidance"],
        "safe_denoiser.core.guidance",
    ),
    "PreparedBanks": "safe_denoiser.core.banks",
    **dict.fromkeys(["cfg_combine", "safe_eps", "safe_x0"], "safe_denoiser.core.correction"),
    **dict.fromkeys(["KernelEstimate", "kernel_estimate", "path_kernel_estimate"], "safe_denoiser.core.kernel"),
    **dict.fromkeys(["GaussianPath", "flow_path", "sigma_path", "vp_path"], "safe_denoiser.core.paths"),
    **dict.fromkeys(
        [
            "alpha_bar_from_sigma",
            "eps_from_v",
            "eps_from_x0",
            "eps_from_x0_sigma",
            "sigma_from_alpha_bar",
            "v_from_eps",
            "x0_from_eps",
            "x0_from_eps_sigma",
            "x0_from_v",
        ],
        "safe_denoiser.core.parameterization",
    ),
    "SLDConfig": "safe_denoiser.core.sld_config",
    "sld_guidance": "safe_denoiser.core.sld",
    **dict.fromkeys(
        ["StepRecord", "reference_correction", "reference_threshold", "theorem_correction"], "safe_denoiser.core.step"
    ),
    **dict.fromkeys(["SafeScheduler", "StepTrace", "attach", "detach"], "safe_denoiser.diffusers.safe_scheduler"),
    **dict.fromkeys(["SLDUNet", "attach_sld", "detach_sld"], "safe_denoiser.diffusers.sld_unet"),
    "SafreeConfig": "safe_denoiser.core.safree",
    **dict.fromkeys(["Safree", "attach_safree", "detach_safree"], "safe_denoiser.diffusers.safree_pipeline"),
    "GaussianMixture": "safe_denoiser.demo.mixture",
}

__all__ = [
    "BankError",
    "ConstantGuidance",
    "GaussianMixture",
    "GaussianPath",
    "KernelEstimate",
    "MassGuidance",
    "NegativeBank",
    "OddsGuidance",
    "PreparedBanks",
    "ReferenceGuidance",
    "SLDConfig",
    "SLDUNet",
    "SafeGuidance",
    "SafeScheduler",
    "Safree",
    "SafreeConfig",
    "StepRecord",
    "StepTrace",
    "alpha_bar_from_sigma",
    "attach",
    "attach_safree",
    "attach_sld",
    "cfg_combine",
    "detach",
    "detach_safree",
    "detach_sld",
    "eps_from_v",
    "eps_from_x0",
    "eps_from_x0_sigma",
    "flow_path",
    "kernel_estimate",
    "l2_normalize_positions",
    "path_kernel_estimate",
    "reference_correction",
    "reference_threshold",
    "safe_eps",
    "safe_x0",
    "sigma_from_alpha_bar",
    "sigma_path",
    "sld_guidance",
    "theorem_correction",
    "v_from_eps",
    "vp_path",
    "x0_from_eps",
    "x0_from_eps_sigma",
    "x0_from_v",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safe_denoiser' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static type checkers see the eager imports
    from safe_denoiser.core.bank import BankError, NegativeBank, l2_normalize_positions
    from safe_denoiser.core.banks import PreparedBanks
    from safe_denoiser.core.correction import cfg_combine, safe_eps, safe_x0
    from safe_denoiser.core.guidance import (
        ConstantGuidance,
        MassGuidance,
        OddsGuidance,
        ReferenceGuidance,
        SafeGuidance,
    )
    from safe_denoiser.core.kernel import KernelEstimate, kernel_estimate, path_kernel_estimate
    from safe_denoiser.core.parameterization import (
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
    from safe_denoiser.core.paths import GaussianPath, flow_path, sigma_path, vp_path
    from safe_denoiser.core.safree import SafreeConfig
    from safe_denoiser.core.sld import sld_guidance
    from safe_denoiser.core.sld_config import SLDConfig
    from safe_denoiser.core.step import StepRecord, reference_correction, reference_threshold, theorem_correction
    from safe_denoiser.demo.mixture import GaussianMixture
    from safe_denoiser.diffusers.safe_scheduler import SafeScheduler, StepTrace, attach, detach
    from safe_denoiser.diffusers.safree_pipeline import Safree, attach_safree, detach_safree
    from safe_denoiser.diffusers.sld_unet import SLDUNet, attach_sld, detach_sld
