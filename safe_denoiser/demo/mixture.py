"""Isotropic Gaussian mixtures with closed-form diffused marginals and posterior means.

The independent reference for the theorem: with p_data = sum_k pi_k N(mu_k, s_k^2 I) and any Gaussian path
x_t = a x0 + s eps (``core.paths``), p_t = sum_k pi_k N(a mu_k, (a^2 s_k^2 + s^2) I) and
E[x0 | x_t, k] = mu_k + a s_k^2 / (a^2 s_k^2 + s^2) (x_t - a mu_k). The noise level is an abar (the VP path, as
before) or a ``GaussianPath`` (VP, sigma or rectified flow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from safe_denoiser.core.paths import GaussianPath

__all__ = ["GaussianMixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """Components ``means`` (K, D), ``stds`` (K,), ``weights`` (K,), and which components are ``unsafe`` (K,)."""

    means: Tensor
    stds: Tensor
    weights: Tensor
    unsafe: Tensor

    def __post_init__(self) -> None:
        k = self.means.shape[0]
        for name in ("stds", "weights", "unsafe"):
            if getattr(self, name).shape != (k,):
                raise ValueError(
                    f"GaussianMixture.{name} must have shape ({k},), got {tuple(getattr(self, name).shape)}"
                )
        if not bool(self.unsafe.any()) or bool(self.unsafe.all()):
            raise ValueError("GaussianMixture.unsafe must mark some but not all components")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _component_log_joint(self, x_t: Tensor, alpha_bar: float | GaussianPath) -> Tensor:
        """log pi_k + log N(x_t; a mu_k, (a^2 s_k^2 + s^2) I): (B, K)."""
        a, a2, s2 = _path_terms(alpha_bar)
        var = a2 * self.stds.square() + s2  # (K,)
        d2 = (x_t.unsqueeze(1) - a * self.means.unsqueeze(0)).square().sum(-1)  # (B, K)
        return self.weights.log() - 0.5 * d2 / var - 0.5 * self.dim * (var * 2 * math.pi).log()

    def log_density(self, x_t: Tensor, alpha_bar: float | GaussianPath, part: str = "data") -> Tensor:
        """log of Z_part p_part,t(x_t) for part in {'data', 'safe', 'unsafe'} (unnormalised by Z for parts)."""
        lj = self._component_log_joint(x_t, alpha_bar)
        return torch.logsumexp(lj.masked_fill(~self._mask(part), -math.inf), dim=1)

    def _mask(self, part: str) -> Tensor:
        if part == "data":
            return torch.ones_like(self.unsafe)
        if part == "unsafe":
            return self.unsafe
        if part == "safe":
            return ~self.unsafe
        raise ValueError(f"part must be 'data', 'safe' or 'unsafe', got {part!r}")

    def posterior_mean(self, x_t: Tensor, alpha_bar: float | GaussianPath, part: str = "data") -> Tensor:
        """E_part[x0 | x_t] in closed form: (B, D)."""
        lj = self._component_log_joint(x_t, alpha_bar).masked_fill(~self._mask(part), -math.inf)
        r = torch.softmax(lj, dim=1)  # responsibilities (B, K)
        a, a2, s2 = _path_terms(alpha_bar)
        var = a2 * self.stds.square() + s2
        gain = a * self.stds.square() / var  # (K,)
        resid = x_t.unsqueeze(1) - a * self.means.unsqueeze(0)  # (B, K, D)
        comp = self.means.unsqueeze(0) + gain[None, :, None] * resid
        return (r.unsqueeze(-1) * comp).sum(1)

    def exact_beta(self, x_t: Tensor, alpha_bar: float | GaussianPath) -> Tensor:
        """beta(x_t) = Z_u p_unsafe,t(x_t) / (Z_s p_safe,t(x_t)): (B,)."""
        return (self.log_density(x_t, alpha_bar, "unsafe") - self.log_density(x_t, alpha_bar, "safe")).exp()

    def sample(self, n: int, part: str = "data", generator: torch.Generator | None = None) -> Tensor:
        """n draws from p_part: (n, D)."""
        w = self.weights.masked_fill(~self._mask(part), 0.0)
        k = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * z

    def component_of(self, x0: Tensor) -> Tensor:
        """Index of the most likely component for each point at t = 0: (B,)."""
        return self._component_log_joint(x0, 1.0 - 1e-12).argmax(dim=1)


def _path_terms(level: float | GaussianPath) -> tuple[float, float, float]:
    """(a, a^2, s^2) of an abar (the VP path, computed as before: bit for bit) or of a path at a float level."""
    if isinstance(level, GaussianPath):
        if isinstance(level.level, Tensor):
            raise ValueError("GaussianMixture: the path's level must be a float (one noise level for the batch)")
        if level.kind != "vp":
            a, s = float(level.a), float(level.s)
            return a, a * a, s * s
        level = level.level
    return math.sqrt(level), level, 1.0 - level
