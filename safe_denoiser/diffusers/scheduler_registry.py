"""The scheduler registry: short names, diffusers classes and how each parameterises its sample.

One table for the whole package: ``make_scheduler`` (Stable Diffusion pipelines), ``DigitsPipeline`` (the demo
offers the subset ``DEMO_SCHEDULERS``) and ``SafeScheduler`` (which needs each class's parameterisation, ``kind``):

* "vp": x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with abar = alphas_cumprod[t] (DDIM, DDPM, PNDM);
* "vp_sigma": the same VP sample, its noise level read from the scheduler's own ``sigmas`` (DPM-Solver++);
* "sigma": x = x0 + sigma eps, the model input scaled by ``scale_model_input`` (Euler, Euler ancestral, LMS);
* "flow": the rectified flow x = (1 - sigma) x0 + sigma eps, the model predicting the velocity u = eps - x0
  (FlowMatchEulerDiscreteScheduler: SD3, Flux; its shift and dynamic shifting only move the sigmas).

Classes are resolved lazily (importing diffusers is slow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEMO_SCHEDULERS",
    "SCHEDULERS",
    "SUPPORTED_SCHEDULERS",
    "Kind",
    "SchedulerSpec",
    "scheduler_class",
    "scheduler_spec",
]

Kind = Literal["vp", "vp_sigma", "sigma", "flow"]


@dataclass(frozen=True)
class SchedulerSpec:
    """One sampler: the diffusers class name and the parameterisation of its sample (``kind``)."""

    class_name: str
    kind: Kind


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", "vp"),
    "ddpm": SchedulerSpec("DDPMScheduler", "vp"),
    "pndm": SchedulerSpec("PNDMScheduler", "vp"),
    "dpmpp": SchedulerSpec("DPMSolverMultistepScheduler", "vp_sigma"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", "sigma"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "sigma"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "sigma"),
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", "flow"),
}

# The demo model's samplers. Not offered: the sigma form (Euler, LMS). The demo's cosine schedule ends at
# alpha_bar = 2.4e-9, i.e. sigma_max = 20,000, and these samplers have no x0 clipping, so eps errors times sigma
# blow up (measured with Euler: samples in +-3,000 at 20 or 50 trailing steps).
DEMO_SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm", "dpmpp")

# diffusers class name -> kind: what ``SafeScheduler`` supports.
SUPPORTED_SCHEDULERS: dict[str, Kind] = {spec.class_name: spec.kind for spec in SCHEDULERS.values()}


def scheduler_spec(name: str, allowed: tuple[str, ...] | None = None) -> SchedulerSpec:
    """The registry entry of a short name (case and '-'/'_' insensitive); ValueError naming the choices."""
    choices = sorted(SCHEDULERS if allowed is None else allowed)
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in choices:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {choices}")
    return SCHEDULERS[key]


def scheduler_class(name: str, allowed: tuple[str, ...] | None = None) -> Any:
    """The diffusers scheduler class of a short name (see ``scheduler_spec``)."""
    import diffusers

    return getattr(diffusers, scheduler_spec(name, allowed).class_name)
