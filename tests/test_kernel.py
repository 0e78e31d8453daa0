"""The kernel estimator against float64 brute force; chunking, batching, precision and bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from safe_denoiser import kernel_estimate, path_kernel_estimate, vp_path
from safe_denoiser.core.kernel import bank_sq_norms, forward_kernel, kde_posterior_mean

from helpers import KernelReference, assert_within, forward_reference, fused_chunks, kernel_reference, unit_roundoff

# Every comparison is against the exact float64 value with the float32 rounding-error bound of helpers.py
# (``kernel_reference``): it scales with the inputs, the bank size, the chunk count and the kernel's bandwidth.
# The default CPU path is the compiled kernel, whose per-row rescales ``fused_chunks`` counts.


def check(est_mean: torch.Tensor, est_log_mass: torch.Tensor | None, ref: KernelReference, what: str) -> None:
    """The estimate's mean (and log-mass, when given) within the float32 bounds of the float64 reference."""
    assert_within(est_mean, ref.mean, ref.mean_bound, f"{what} mean")
    if est_log_mass is not None:
        assert_within(est_log_mass, ref.log_mass, ref.log_mass_bound, f"{what} log-mass")


def test_matches_float64_brute_force() -> None:
    x, bank = torch.randn(4, 3, 6, 6), torch.randn(37, 3, 6, 6)
    ab = torch.tensor([0.02, 0.3, 0.8, 0.97])
    ref = forward_reference(x, bank, ab, chunks=fused_chunks(37))
    est = kernel_estimate(x, bank, ab.sqrt().reshape(-1, 1), (1 - ab).reshape(-1, 1))
    check(est.mean, est.log_mass, ref, "kernel_estimate")
    forward = path_kernel_estimate(x, bank, vp_path(ab))
    check(forward.mean, forward.log_mass, ref, "forward kernel")


def test_bandwidth_override() -> None:
    x, bank = torch.randn(2, 8), torch.randn(10, 8)
    ref = forward_reference(
        x, bank, torch.tensor([0.5, 0.5]), bandwidth=torch.tensor([3.0, 3.0]), chunks=fused_chunks(10)
    )
    est = path_kernel_estimate(x, bank, vp_path(0.5), bandwidth=3.0)
    check(est.mean, est.log_mass, ref, "h")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_unchunked(chunk: int) -> None:
    x, bank = torch.randn(3, 4, 4, 4), torch.randn(100, 4, 4, 4)
    full = kernel_estimate(x, bank, 0.7, 0.51)
    part = kernel_estimate(x, bank, 0.7, 0.51, chunk_size=chunk)
    ref_full = kernel_reference(x, bank, 0.7, 0.51, chunks=fused_chunks(100))
    ref_part = kernel_reference(x, bank, 0.7, 0.51, chunks=math.ceil(100 / chunk))
    check(full.mean, full.log_mass, ref_full, "unchunked")
    check(part.mean, part.log_mass, ref_part, f"chunk {chunk}")
    # equal to each other up to the two estimates' rounding (the triangle inequality through the reference)
    assert_within(part.mean, full.mean, ref_full.mean_bound + ref_part.mean_bound, "chunked vs unchunked mean")
    assert_within(part.log_mass, full.log_mass, ref_full.log_mass_bound + ref_part.log_mass_bound, "log-mass")


def test_batch_equals_items_one_at_a_time() -> None:
    x, bank = torch.randn(5, 4, 8, 8), torch.randn(30, 4, 8, 8)
    ab = torch.tensor([0.1, 0.2, 0.5, 0.9, 0.99])
    batched = path_kernel_estimate(x, bank, vp_path(ab)).mean
    ref = forward_reference(x, bank, ab, chunks=fused_chunks(30))
    check(batched, None, ref, "batched")
    for i in range(5):
        single = path_kernel_estimate(x[i : i + 1], bank, vp_path(float(ab[i]))).mean
        assert_within(single, ref.mean[i : i + 1], ref.mean_bound[i : i + 1], f"item {i} alone")
        assert_within(batched[i : i + 1], single, 2 * ref.mean_bound[i : i + 1], f"item {i}: batch vs alone")


@pytest.mark.parametrize("alpha_bar", [1e-6, 0.01, 0.5, 0.99, 0.99999])
def test_float32_at_sd_latent_size_is_finite_and_matches_float64(alpha_bar: float) -> None:
    """D = 4x64x64: plain exp() would underflow to 0/0 here; the log-space estimator stays exact."""
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(64, 4, 64, 64, generator=g)
    x0 = bank[:4] + 0.3 * torch.randn(4, 4, 64, 64, generator=g)
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * torch.randn(4, 4, 64, 64, generator=g)
    ab = torch.full((4,), alpha_bar)
    est32 = kernel_estimate(x_t, bank, ab.sqrt().reshape(-1, 1), (1 - ab).reshape(-1, 1), chunk_size=16)
    assert torch.isfinite(est32.mean).all() and torch.isfinite(est32.log_mass).all()
    check(est32.mean, est32.log_mass, forward_reference(x_t, bank, ab, chunks=4), f"abar {alpha_bar}")
    # naive exp() of the same log-kernel underflows (the reason for log space)
    if alpha_bar > 0.5:
        d2 = (x_t.double().flatten(1)[:, None] - math.sqrt(alpha_bar) * bank.double().flatten(1)[None]).square().sum(-1)
        assert (torch.exp(-d2 / (2 * (1 - alpha_bar))).float().sum(1) == 0).all()


def test_half_precision_accumulates_in_float32() -> None:
    x, bank = torch.randn(2, 4, 16, 16).half(), torch.randn(50, 4, 16, 16).half()
    ref = forward_reference(x.float(), bank.float(), 0.4, chunks=fused_chunks(50))  # half inputs: exact in f32
    out = path_kernel_estimate(x, bank, vp_path(0.4)).mean
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    # float32 accumulation, then one rounding of the result to half: relative u16, but absolute (u16 times the
    # smallest normal number) among float16's subnormals
    half = torch.finfo(torch.float16)
    bound = ref.mean_bound + unit_roundoff(torch.float16) * (ref.mean.abs() + ref.mean_bound + half.tiny)
    assert_within(out, ref.mean, bound, "half")


def test_unsquared_distance_kernel() -> None:
    """The reference code's kernel exp(-||x - y|| / (2 s^2)) on denoised estimates."""
    x, bank = torch.randn(3, 10), torch.randn(12, 10)
    d = torch.cdist(x.double(), bank.double())
    logk = -d / (2 * 3.15**2)
    est = kernel_estimate(x, bank, 1.0, 3.15**2, squared=False)
    bounds = kernel_reference(x, bank, 1.0, 3.15**2, squared=False)  # cdist is the float64 reference here
    assert_within(est.mean, torch.softmax(logk, 1) @ bank.double(), bounds.mean_bound, "unsquared mean")
    assert_within(est.log_mass, torch.logsumexp(logk, 1) - math.log(12), bounds.log_mass_bound, "unsquared log-mass")


def test_memory_is_o_bn_plus_nd() -> None:
    """Peak memory stays far below the 4 GiB that a (B, N, D) difference tensor would need (B=8, N=8000)."""
    code = """
import resource, torch
from safe_denoiser import path_kernel_estimate, vp_path
x, bank = torch.randn(8, 4, 64, 64), torch.randn(8_000, 4, 64, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = path_kernel_estimate(x, bank, vp_path(0.5), chunk_size=1024).mean
assert out.shape == x.shape and bool(torch.isfinite(out).all())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = int(res.stdout.strip().splitlines()[-1])
    bnd_mib = 8 * 8_000 * 4 * 64 * 64 * 4 // 2**20
    assert growth_mib < bnd_mib / 8, f"peak grew by {growth_mib} MiB; a (B, N, D) tensor is {bnd_mib} MiB"


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="does not match sample shape"):
        path_kernel_estimate(torch.randn(2, 4, 8, 8), torch.randn(5, 4, 8, 9), vp_path(0.5))
    with pytest.raises(ValueError, match="empty"):
        path_kernel_estimate(torch.randn(2, 8), torch.randn(0, 8), vp_path(0.5))
    with pytest.raises(ValueError, match="chunk_size"):
        path_kernel_estimate(torch.randn(2, 8), torch.randn(3, 8), vp_path(0.5), chunk_size=0)
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        path_kernel_estimate(torch.randn(2, 8), torch.randn(3, 8), vp_path(torch.tensor([0.1, 0.2, 0.3])))


def test_path_kernel_estimate_passes_norms_and_kde_bank() -> None:
    """On the VP path, path_kernel_estimate is kernel_estimate with forward_kernel's scale and variance (plus
    kde_posterior_mean for a KDE bank) bit for bit, and uses the bank norms it is given."""
    x, bank, ab = torch.randn(3, 4, 8, 8), torch.randn(20, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    # norms scaled by 1.5 change every estimate: equal results mean these very norms were used, not recomputed ones
    norms = 1.5 * bank_sq_norms(bank)
    for bank_sigma in (None, 0.3):
        got = path_kernel_estimate(x, bank, vp_path(ab), bank_sq_norms=norms, bank_sigma=bank_sigma)
        scale, variance = forward_kernel(x, ab, bank_sigma=bank_sigma)
        want = kernel_estimate(x, bank, scale, variance, bank_sq_norms=norms)
        want_mean = want.mean if bank_sigma is None else kde_posterior_mean(x, want.mean, scale, variance, bank_sigma)
        assert torch.equal(got.mean, want_mean) and torch.equal(got.log_mass, want.log_mass), bank_sigma
        true_norms = path_kernel_estimate(x, bank, vp_path(ab), bank_sigma=bank_sigma)
        assert not torch.equal(got.mean, true_norms.mean), bank_sigma
