"""Helpers shared by the tests: rounding-error bounds against float64 references, tiny-pipeline runners.

Tolerances come from rounding-error analysis, not from one seed. An inner product or sum of K terms t_i computed in
floating point with unit roundoff u (any order, blocked or not, with or without FMA) is within
lambda * sqrt(K) * u * sum |t_i| of the exact value with probability at least 1 - 2K exp(-lambda^2 (1-u)^2 / 2)
(Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019,
theorems 3.1 and 4.2; the worst-case bound has K where this has lambda sqrt(K)). LAMBDA = 7 makes that failure
probability below 1e-6 per inner product for K up to 2e4 (the SD latent size is 4 x 64 x 64 = 16384). The kernel
bounds below push those per-logit errors through the softmax exactly (not to first order). Single roundings (a cast
to float32 or float16) are bounded deterministically by u |x|. Measured once over 200 seeds: every bound in the
suite holds with error / bound <= 0.08 for the float32 kernel, <= 0.96 where a single rounding dominates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from safe_denoiser.core.kernel import accumulation_dtype

U32 = 2.0**-24  # unit roundoff of float32 (half its machine epsilon)
U64 = 2.0**-53  # unit roundoff of float64
LAMBDA = 7.0  # the probabilistic bound's constant (see the module docstring)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int | float, u: float) -> float:
    """Higham & Mary's lambda * sqrt(k) * u: relative error of a k-term sum, in units of sum |terms|."""
    return LAMBDA * math.sqrt(k) * u


def assert_within(got: Tensor, want: Tensor, bound: Tensor | float, what: str = "") -> None:
    """|got - want| <= bound elementwise (in float64); the message gives the worst error / bound ratio."""
    err = (got.double() - want.double()).abs()
    bound_t = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    if not bool((err <= bound_t).all()):
        ratio = float((err / bound_t).max())
        raise AssertionError(f"{what}: max |error| / bound = {ratio:.3g} (max error {float(err.max()):.3g})")


def worst_ratio(got: Tensor, want: Tensor, bound: Tensor | float) -> float:
    """max |got - want| / bound (for reporting how much headroom a bound leaves)."""
    err = (got.double() - want.double()).abs()
    bound_t = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    return float(torch.where(err == 0, 0.0, err / bound_t).max())


class KernelReference(NamedTuple):
    """The exact kernel estimate (float64, explicit differences) and bounds on a computed estimate's error."""

    mean: Tensor  # (B, ...) float64
    log_mass: Tensor  # (B,) float64
    mean_bound: Tensor  # (B, ...): |computed mean - mean| <= mean_bound
    log_mass_bound: Tensor  # (B,)


def _column(value: float | Tensor, batch: int) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1, 1).expand(batch, 1)


def _softmax_weight_error(logits: Tensor, delta: Tensor) -> Tensor:
    """max |p'_n - p_n| over logits perturbed by |d_n| <= delta_n, with p = softmax(logits) (B, N).

    Exact, not first order: p'_n = 1 / (1 + sum_{m != n} exp(l_m - l_n + d_m - d_n)), so p'_n lies between
    sigmoid(l_n -/+ delta_n - logsumexp_{m != n}(l_m +/- delta_m)). (B, N, N) memory: for banks of a few hundred.
    """
    n = logits.shape[1]
    p = torch.softmax(logits, dim=1)
    if n == 1:
        return torch.zeros_like(p)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=logits.device)
    others_hi = torch.logsumexp((logits + delta)[:, None, :].masked_fill(~off_diagonal, -math.inf), dim=2)
    others_lo = torch.logsumexp((logits - delta)[:, None, :].masked_fill(~off_diagonal, -math.inf), dim=2)
    p_hi = torch.sigmoid(logits + delta - others_lo)
    p_lo = torch.sigmoid(logits - delta - others_hi)
    return torch.maximum(p_hi - p, p - p_lo).clamp_min(0.0)


def kernel_reference(
    x: Tensor,
    bank: Tensor,
    scale: float | Tensor = 1.0,
    variance: float | Tensor = 1.0,
    squared: bool = True,
    chunks: int = 1,
    dtype: torch.dtype = torch.float32,
    direct: bool = False,
) -> KernelReference:
    """softmax_n(-d_n^p / (2 v)) @ bank and logsumexp - log N, d_n = ||x - s bank_n||, and error bounds for an
    estimate computed in ``dtype`` (the accumulation dtype) over ``chunks`` bank chunks.

    Error model (u = unit roundoff of ``dtype``, plus float64's for the reference's own rounding):
    * d_n^2 sums D terms. Expanded as ||x||^2 - 2 s <x, y_n> + s^2 ||y_n||^2 (``safe_denoiser.core.kernel``), the
      n-dependent part errs by <= gamma(D + 6) C_n, C_n = sum_i 2 s |x_i y_ni| + s^2 y_ni^2 (the + 6 covers the
      scalar products, the rounding of s and v and the division by 2 v); for p = 2 the ||x||^2 term is the same
      number for every n and moves only the log-mass, by gamma(D + 6) ||x||^2 / (2 v). Evaluated as a sum of
      squared differences (``direct``, as closed forms do) or under the square root (p = 1), every term is
      bounded by (|x_i| + s |y_ni|)^2, so the error is <= gamma(D + 6) (||x||^2 + C_n); for p = 1 then
      sqrt(d^2 +- error);
    * exp(l_n - running max): u |l_n - max| from the subtraction, 2u from exp, and the rescaling by
      exp(max_old - max_new) once per chunk (gamma(chunks + 2) (2 + range of l));
    * the weighted sums sum_n w_n y_n and sum_n w_n over N terms and the chunk rescales: gamma(N + chunks + 2)
      relative to sum_n p_n |y_n| (and to |mean| for the division).
    The logit errors are pushed through the softmax exactly (``_softmax_weight_error``), so a one-hot softmax with
    huge logits (abar -> 1) keeps a tight bound.
    """
    u = unit_roundoff(dtype) + U64
    b, n = x.shape[0], bank.shape[0]
    xd, yd = x.double().reshape(b, -1), bank.double().reshape(n, -1)
    dim = xd.shape[1]
    s, v = _column(scale, b), _column(variance, b)
    d2 = (xd[:, None, :] - s[:, :, None] * yd[None]).square().sum(-1)  # (B, N), explicit differences
    dist = d2 if squared else d2.sqrt()
    logits = -dist / (2.0 * v)
    p = torch.softmax(logits, dim=1)
    mean = p @ yd
    log_mass = torch.logsumexp(logits, dim=1) - math.log(n)

    x_sq = xd.square().sum(1, keepdim=True)  # (B, 1)
    cross = 2.0 * s * (xd.abs() @ yd.abs().T) + s.square() * yd.square().sum(1)[None]  # C_n (B, N)
    g = gamma(dim + 6, u)
    if squared and not direct:
        dist_err, common_err = g * cross, g * x_sq / (2.0 * v)
    else:
        d2_err = g * (x_sq + cross)
        dist_err = d2_err if squared else (d2 + d2_err).sqrt() - (d2 - d2_err).clamp_min(0.0).sqrt() + u * dist
        common_err = torch.zeros_like(x_sq)
    spread = logits.amax(dim=1, keepdim=True) - logits  # >= 0
    delta = dist_err / (2.0 * v) + u * spread + 2 * u + gamma(chunks + 2, u) * (2.0 + spread.amax(1, keepdim=True))
    r = _softmax_weight_error(logits, delta)  # (B, N)
    weights_part = (r[:, :, None] * (yd[None] - mean[:, None]).abs()).sum(1)
    sums_part = gamma(n + chunks + 2, u) * (p @ yd.abs() + mean.abs())
    mean_bound = weights_part + sums_part + u * mean.abs()

    lse = torch.logsumexp(logits, dim=1)
    logits_part = torch.maximum(
        torch.logsumexp(logits + delta, dim=1) - lse, lse - torch.logsumexp(logits - delta, dim=1)
    )
    # offset + running max + log(sum) - log N: four roundings of numbers bounded by these magnitudes.
    magnitude = (x_sq.squeeze(1) + cross.amax(dim=1)) / (2.0 * v.squeeze(1))
    additions = 4 * u * (magnitude + log_mass.abs() + math.log(n) + 1.0)
    log_mass_bound = logits_part + common_err.squeeze(1) + gamma(n + chunks + 2, u) + additions
    return KernelReference(mean.reshape(x.shape), log_mass, mean_bound.reshape(x.shape), log_mass_bound)


def fused_chunks(n: int) -> int:
    """``kernel_reference``'s ``chunks`` for the compiled kernel (core.fused, the default CPU path): a term is
    rescaled once per row where the running max moves and once per merge of the thread partials (fewer than
    n / MIN_ROWS_PER_THREAD + 1)."""
    from safe_denoiser.core.fused import MIN_ROWS_PER_THREAD

    return n + n // MIN_ROWS_PER_THREAD + 1


def kernel_case(seed: int, b: int, n: int, d: int, magnitude: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, bank, scale, variance) for ``kernel_estimate``: a (b, d) batch of queries noised from perturbed bank
    items, per-sample abar from high noise to nearly clean (scale sqrt(abar), variance 1 - abar, both (b, 1)), bank
    rows of varied norm; every value times ``magnitude``."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    ab = torch.rand(b, generator=g) * 0.98 + 0.01
    pick = torch.randint(0, n, (b,), generator=g)
    x0 = bank[pick] + 0.3 * torch.randn(b, d, generator=g)
    x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * torch.randn(b, d, generator=g)
    return magnitude * x_t, magnitude * bank, ab.sqrt()[:, None], (1 - ab)[:, None]


def forward_reference(
    x_t: Tensor,
    bank: Tensor,
    alpha_bar: float | Tensor,
    bandwidth: float | Tensor | None = None,
    chunks: int = 1,
    direct: bool = False,
) -> KernelReference:
    """``kernel_reference`` for the forward kernel: s = sqrt(abar), v = 1 - abar (or ``bandwidth``).

    ``alpha_bar`` and ``bandwidth`` are taken as the estimator sees them (rounded to its accumulation dtype), so
    the reference is the exact function of the estimator's inputs.
    """
    acc = accumulation_dtype(x_t.dtype)
    ab = torch.as_tensor(alpha_bar, dtype=acc).double()
    v = (1.0 - ab) if bandwidth is None else torch.as_tensor(bandwidth, dtype=acc).double()
    return kernel_reference(x_t, bank, ab.sqrt(), v.clamp_min(1e-12), True, chunks, acc, direct)


# ---- tiny diffusers pipelines --------------------------------------------------------------------------------
HW = 16  # image size; the tiny VAE downsamples by 2, so latents are 4 x 8 x 8


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded: the pipelines' per-image noise."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def latent_bank(n: int = 6, seed: int = 0, hw: int = HW) -> Tensor:
    """(n, 4, hw/2, hw/2) standard-normal latents from a seeded generator: a bank for the tiny pipeline."""
    return torch.randn(n, 4, hw // 2, hw // 2, generator=torch.Generator().manual_seed(seed))


def sample_latents(pipe: Any, prompts: list[str], seeds: list[int], steps: int, hw: int = HW, **kwargs: Any) -> Tensor:
    """The pipeline's final latents for ``prompts`` with per-image generators from ``seeds``."""
    return pipe(
        prompts,
        num_inference_steps=steps,
        height=hw,
        width=hw,
        output_type="latent",
        generator=generators(seeds),
        **kwargs,
    ).images


def assert_close_to_rounding(got: Tensor, want: Tensor, rel: float) -> None:
    """max |got - want| <= rel * max |want|: equal up to rounding measured against the samples' scale."""
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rel * scale, f"max |error| {err:.3g} > {rel:g} x max |value| {scale:.3g}"


def tiny_vae_dir(root: Path, seed: int = 0) -> Path:
    """A random-weight two-block diffusers VAE saved as safetensors under ``root / "vae"``; returns ``root``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root


def bundle_script() -> Any:
    """cpp_runtime/scripts/make_test_bundles.py loaded as a module (its specs and banks build the C++ test bundles)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "cpp_runtime" / "scripts" / "make_test_bundles.py"
    spec = importlib.util.spec_from_file_location("make_test_bundles", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
