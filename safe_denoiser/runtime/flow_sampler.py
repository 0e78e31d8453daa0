"""Flow-matching sampling in numpy: the sigma schedule, dynamic shifting and the Euler update (no torch).

The host-side half of a rectified-flow bundle (``export.flow_graphs`` is the graph half). ``flow_schedule`` is
``FlowMatchEulerDiscreteScheduler.set_timesteps`` as the SD3 and Flux pipelines call it, in the same float64 /
float32 operations: SD3 lets the scheduler space its timesteps between the training schedule's sigma_max and
sigma_min; Flux passes ``linspace(1, 1 / steps, steps)`` and ``mu`` from the image's token count
(``calculate_shift``). The shift is static (shift s: s sigma / (1 + (s - 1) sigma)) or dynamic (``mu``: exponential
exp(mu) / (exp(mu) + 1 / sigma - 1), or linear). ``flow_euler_step`` is the scheduler's deterministic step,
x + (sigma_next - sigma) u in float32. ``manifest.flow`` holds what these need, resolved at export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["calculate_shift", "flow_euler_step", "flow_schedule"]


def calculate_shift(image_seq_len: int, flow: Mapping[str, Any]) -> float:
    """The pipelines' mu: linear in the token count between (base_image_seq_len, base_shift) and the max pair."""
    base_len, max_len = int(flow["base_image_seq_len"]), int(flow["max_image_seq_len"])
    base_shift, max_shift = float(flow["base_shift"]), float(flow["max_shift"])
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def _time_shift(flow: Mapping[str, Any], mu: float, t: np.ndarray) -> np.ndarray:
    if flow.get("time_shift_type", "exponential") == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_schedule(flow: Mapping[str, Any], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (steps,) f32, sigmas (steps + 1,) f32 ending in 0) of a ``steps``-step schedule, noisiest first."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    n_train = int(flow["num_train_timesteps"])
    sigmas: np.ndarray
    if flow["pipeline_sigmas"] == "linspace":  # Flux: the pipeline passes these; the scheduler casts to float32
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    else:  # SD3: the scheduler's own spacing (float64 until the end)
        sigmas = np.linspace(float(flow["sigma_max"]) * n_train, float(flow["sigma_min"]) * n_train, steps) / n_train
    if flow["use_dynamic_shifting"]:
        mu = flow["mu"] if flow.get("mu") is not None else calculate_shift(int(flow["image_seq_len"]), flow)
        sigmas = _time_shift(flow, float(mu), sigmas)
    else:
        shift = float(flow["shift"])
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas32 = np.asarray(sigmas).astype(np.float32)
    timesteps = sigmas32 * np.float32(n_train)
    return timesteps, np.append(sigmas32, np.float32(0.0))


def flow_euler_step(velocity: np.ndarray, x: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """x + (sigma_next - sigma) u in float32, as ``FlowMatchEulerDiscreteScheduler.step`` computes it."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return (x.astype(np.float32) + dt * velocity).astype(np.float32)
