"""The compiled one-pass kernel (core.fused) against float64, across threads, bank dtypes and softmax regimes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser import kernel_estimate
from safe_denoiser.core import fused
from safe_denoiser.core import kernel as kernel_module

from helpers import assert_within, fused_chunks, kernel_case, kernel_reference


def count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the kernel's reference to the compiled kernel; the list grows by one per call."""
    calls: list[int] = []
    real = kernel_module.fused_kernel_sums

    def counted(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "fused_kernel_sums", counted)
    return calls


def test_extension_is_built() -> None:
    """The package's install builds the extension (a C compiler is part of the set-up); not silently absent."""
    assert fused.unavailable_reason() is None, fused.unavailable_reason()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_over_seeds(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_estimate's default path is the compiled kernel and stays within the float32 bound of float64."""
    calls = count_fused_calls(monkeypatch)
    monkeypatch.setattr(fused, "MIN_BYTES_PER_THREAD", 1)  # split even these small banks over the threads
    torch.set_num_threads(threads)
    try:
        for seed in range(30):
            b, n, d = (1, 2, 5)[seed % 3], (1, 17, 40, 130)[seed % 4], (3, 64, 256, 1000)[seed % 4]
            x, bank, s, v = kernel_case(seed, b, n, d)
            est = kernel_estimate(x, bank, s, v)
            ref = kernel_reference(x, bank, s, v, chunks=fused_chunks(n))
            assert_within(est.mean, ref.mean, ref.mean_bound, f"seed {seed} mean")
            assert_within(est.log_mass, ref.log_mass, ref.log_mass_bound, f"seed {seed} log-mass")
    finally:
        torch.set_num_threads(1)
    assert len(calls) == 30


@pytest.mark.parametrize("regime", ["near", "noise"])
def test_sd_latent_size_regimes(regime: str) -> None:
    """D = 4x64x64: nearly one-hot weights (abar 0.5, queries near items) and every item weighted (abar 0.005)."""
    g = torch.Generator().manual_seed(7)
    n, d, ab = 48, 4 * 64 * 64, 0.5 if regime == "near" else 0.005
    bank = torch.randn(n, d, generator=g)
    x0 = bank[:2] + 0.3 * torch.randn(2, d, generator=g) if regime == "near" else torch.randn(2, d, generator=g)
    x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(2, d, generator=g)
    s, v = torch.full((2, 1), math.sqrt(ab)), torch.full((2, 1), 1 - ab)
    ref = kernel_reference(x, bank, s, v, chunks=fused_chunks(n))
    for threads in (1, 3):
        acc, run_max, run_sum = fused.fused_kernel_sums(
            x * (s / v), bank, (-0.5 * s.square() / v).reshape(2), bank.square().sum(1), threads=threads
        )
        assert_within(acc / run_sum[:, None], ref.mean, ref.mean_bound, f"{regime}, {threads} threads")
        log_mass = run_max + run_sum.log() - x.square().sum(1) / (2 * v[:, 0]) - math.log(n)  # minus the offset
        assert_within(log_mass, ref.log_mass, ref.log_mass_bound, f"{regime}, {threads} threads log-mass")
    if regime == "noise":  # every item carries weight: the dense branch was exercised
        logits = -torch.cdist(x.double(), math.sqrt(ab) * bank.double()).square() / (2 * (1 - ab))
        assert (torch.softmax(logits, 1) > 1e-30).all()


def test_running_max_moves_at_every_row() -> None:
    """Rows sorted by increasing logit: the accumulator is rescaled at every row (the recurrence's worst case)."""
    d, n = 64, 200
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    bank = torch.linspace(-3.0, 3.0, n)[:, None] * direction + 0.01 * torch.randn(n, d)
    x = 4.0 * direction[None]  # logits <x, y_n> - ||y_n||^2 / 2 increase along the rows
    ref = kernel_reference(x, bank, 1.0, 1.0, chunks=fused_chunks(n))
    acc, run_max, run_sum = fused.fused_kernel_sums(x, bank, torch.tensor([-0.5]), bank.square().sum(1), threads=1)
    logits = x @ bank.T - 0.5 * bank.square().sum(1)
    assert bool((logits[0, 1:] > logits[0, :-1]).float().mean() > 0.9)  # the max really moves almost every row
    assert_within(acc / run_sum[:, None], ref.mean, ref.mean_bound, "ascending rows")
    log_mass = run_max + run_sum.log() - x.square().sum(1) / 2 - math.log(n)  # minus the offset ||x||^2 / 2v
    assert_within(log_mass, ref.log_mass, ref.log_mass_bound, "ascending rows log-mass")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_banks(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half banks are widened exactly to float32 a row at a time: the float32 bound of the widened bank holds."""
    calls = count_fused_calls(monkeypatch)
    for seed in range(10):
        x, bank32, s, v = kernel_case(100 + seed, 3, 70, 300)
        bank = bank32.to(dtype)
        est = kernel_estimate(x, bank, s, v)
        ref = kernel_reference(x, bank.float(), s, v, chunks=fused_chunks(70))  # the half values are exact in f32
        assert_within(est.mean, ref.mean, ref.mean_bound, f"{dtype} seed {seed}")
        assert_within(est.log_mass, ref.log_mass, ref.log_mass_bound, f"{dtype} seed {seed} log-mass")
    assert len(calls) == 10


def test_switch_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAFE_DENOISER_FUSED_KERNEL=0, float64, explicit chunks: the PyTorch loop runs, within the same bounds."""
    calls = count_fused_calls(monkeypatch)
    x, bank, s, v = kernel_case(3, 2, 50, 128)
    ref = kernel_reference(x, bank, s, v, chunks=fused_chunks(50))
    kernel_estimate(x, bank, s, v)
    assert len(calls) == 1
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert not fused.enabled() and "switched off" in str(fused.unavailable_reason())
    library = kernel_estimate(x, bank, s, v)
    monkeypatch.delenv(fused.ENV_SWITCH)
    chunked = kernel_estimate(x, bank, s, v, chunk_size=7)
    double = kernel_estimate(x.double(), bank.double(), s.double(), v.double())
    strided = kernel_estimate(x, bank.T.contiguous().T, s, v)  # the C loop reads rows: a strided bank cannot go
    assert len(calls) == 1
    for what, got in (("switched off", library), ("chunked", chunked), ("float64", double), ("strided", strided)):
        assert_within(got.mean, ref.mean, ref.mean_bound, what)


def test_bad_input_names_the_field() -> None:
    x, bank, norms, c = torch.randn(2, 8), torch.randn(5, 8), torch.rand(5), torch.full((2,), -0.5)
    with pytest.raises(ValueError, match="bank dtype"):
        fused.fused_kernel_sums(x, bank.double(), c, norms)
    with pytest.raises(ValueError, match="norms must be float32 of shape"):
        fused.fused_kernel_sums(x, bank, c, norms[:4])
    with pytest.raises(ValueError, match="bias_coef must be float32"):
        fused.fused_kernel_sums(x, bank, c.double(), norms)
    with pytest.raises(ValueError, match="x must be a contiguous CPU tensor"):
        fused.fused_kernel_sums(torch.randn(8, 2).T, bank, c, norms)
    with pytest.raises(ValueError, match=r"x must be \(B, D\)"):
        fused.fused_kernel_sums(x, torch.randn(5, 9), c, norms)


@pytest.mark.parametrize("portable", [True, False])
def test_float16_widening_is_exact_for_every_value(portable: bool) -> None:
    """All 65,536 float16 bit patterns (normals, subnormals, zeros, infinities, NaNs) widen to the same float32 bits
    as PyTorch's conversion, with the portable converter and with the one the CPU dispatches to (F16C here)."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).contiguous()
    out = torch.empty(halves.shape, dtype=torch.float32)
    assert fused._fused_kernel is not None
    fused._fused_kernel.widen_float16(halves.data_ptr(), out.data_ptr(), halves.numel(), int(portable))
    assert torch.equal(out.view(torch.int32), halves.float().view(torch.int32))


def test_threads_only_for_large_banks() -> None:
    """One thread below MIN_BYTES_PER_THREAD (a second one would wait for PyTorch's spinning OpenMP workers), then one
    per MIN_BYTES_PER_THREAD up to the thread limit."""
    per = fused.MIN_BYTES_PER_THREAD
    assert fused.worker_count(515 * 16384 * 4, threads=2) == 1  # SD latents, N = 515: 33 MiB
    assert fused.worker_count(per - 1, threads=8) == 1
    assert fused.worker_count(2 * per, threads=8) == 2
    assert fused.worker_count(100 * per, threads=8) == 8
    assert fused.worker_count(100 * per, threads=1) == 1
