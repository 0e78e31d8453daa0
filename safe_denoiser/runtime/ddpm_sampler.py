"""DDPM (ancestral) sampling in numpy: diffusers' ``DDPMScheduler.step`` for epsilon prediction, float32.

The bundle records the DDPM settings that ``DDPMScheduler.from_config`` resolved at export
(``manifest.scheduler.ddpm``: timestep spacing, steps offset, x0 clipping, variance type). The step, with
prev_t the next timestep of the schedule (abar_prev = 1 after the last one), in ``DDPMScheduler.step``'s order:

    x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)               (clipped to +-clip_sample_range)
    beta_t = 1 - abar_t / abar_prev
    mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t) x
    x_prev = mean + sqrt(max((1 - abar_prev) / (1 - abar_t) beta_t, 1e-20)) z      (z only where t > 0)

Only ``variance_type`` "fixed_small" (diffusers' default, the demo's and Stable Diffusion's) is implemented.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import SchedulerInfo

__all__ = ["ddpm_settings", "ddpm_step"]

_VARIANCE_FLOOR = np.float32(1e-20)  # DDPMScheduler clamps the variance there (it takes its log elsewhere)


def ddpm_settings(scheduler: SchedulerInfo) -> dict[str, Any]:
    """The bundle's DDPM settings, checked: a ValueError naming what this runtime cannot run."""
    cfg = scheduler.ddpm
    if not cfg:
        raise ValueError(
            "this bundle records no DDPM settings (manifest scheduler.ddpm): it was exported before DDPM sampling"
            " existed; re-export it or sample with DDIM"
        )
    if cfg.get("thresholding", False):
        raise ValueError("the bundle's DDPM scheduler uses dynamic thresholding, which this runtime does not implement")
    variance = cfg.get("variance_type", "fixed_small")
    if variance != "fixed_small":
        raise ValueError(f"scheduler.ddpm.variance_type {variance!r} is not supported (expected 'fixed_small')")
    return cfg


def ddpm_step(
    eps: np.ndarray, t: int, prev_t: int, x: np.ndarray, noise: np.ndarray | None, scheduler: SchedulerInfo
) -> np.ndarray:
    """One DDPM update in float32 (``prev_t`` < 0 after the last step); ``noise`` is used only where t > 0."""
    cfg = ddpm_settings(scheduler)
    ac = scheduler.alphas_cumprod
    one = np.float32(1)
    a_t = np.float32(ac[t])
    a_prev = np.float32(ac[prev_t]) if prev_t >= 0 else one
    b_t, b_prev = one - a_t, one - a_prev
    alpha = a_t / a_prev
    beta = one - alpha
    x0 = (x - b_t**0.5 * eps) / a_t**0.5
    if cfg.get("clip_sample", False):
        r = np.float32(cfg.get("clip_sample_range", 1.0))
        x0 = np.clip(x0, -r, r)
    mean = (a_prev**0.5 * beta) / b_t * x0 + alpha**0.5 * b_prev / b_t * x
    if t > 0:
        if noise is None:
            raise ValueError(f"the DDPM step at timestep {t} needs noise")
        variance = np.maximum(b_prev / b_t * beta, _VARIANCE_FLOOR)
        mean = mean + variance**0.5 * noise
    return np.asarray(mean, dtype=np.float32)
