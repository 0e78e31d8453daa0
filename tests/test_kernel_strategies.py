"""Each of kernel_estimate's three strategies, called directly, against the float64 recomputation of helpers.py.

The strategies (safe_denoiser/core/kernel.py): the compiled one-pass kernel, the static chunk loop (traces and
accelerators) and the host-checked chunk loop that skips underflowed chunks, gathers sparse ones and grows its chunks
(CPU). Every bound is ``kernel_reference``'s rounding-error bound for the strategy's number of rescales; it scales
with the values (the cases span magnitudes 1e-2 to 1e2). Then ``kernel_estimate`` is shown to pick each strategy
where documented and to return that strategy's bits.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser.core import fused
from safe_denoiser.core import kernel as kernel_module
from safe_denoiser.core.kernel import (
    KernelEstimate,
    _ChunkedBank,
    _compiled_kernel_sums,
    _estimate,
    _kernel_query,
    _sparse_chunk_sums,
    _static_chunk_sums,
    accumulation_dtype,
    kernel_estimate,
)

from helpers import assert_within, fused_chunks, kernel_case, kernel_reference

STRATEGIES = ("compiled", "static", "sparse")
CHUNK_LOOPS = ("static", "sparse")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def strategy_estimate(
    strategy: str,
    x: Tensor,
    bank: Tensor,
    scale: float | Tensor,
    variance: float | Tensor,
    squared: bool = True,
    step: int | None = None,
    grow: bool = False,
) -> tuple[KernelEstimate, int]:
    """One strategy's estimate, called directly, and the number of chunks its rounding-error bound counts."""
    n = bank.shape[0]
    xf = x.reshape(x.shape[0], -1).to(accumulation_dtype(x.dtype))
    flat = bank.reshape(n, -1)
    query = _kernel_query(xf, flat, scale, variance, squared, None, None)
    if strategy == "compiled":
        return _estimate(_compiled_kernel_sums(query, flat), query.offset, x, n), fused_chunks(n)
    rows = min(step or n, n)
    chunks = _ChunkedBank(query, flat, n, rows)
    sums = _static_chunk_sums(chunks) if strategy == "static" else _sparse_chunk_sums(chunks, grow)
    # grown chunks only merge chunks, so the base chunk count bounds the rescales
    return _estimate(sums, query.offset, x, n), math.ceil(n / rows)


def check_against_float64(
    strategy: str,
    x: Tensor,
    bank: Tensor,
    scale: float | Tensor,
    variance: float | Tensor,
    what: str,
    squared: bool = True,
    step: int | None = None,
    grow: bool = False,
) -> None:
    """The strategy's mean and log-mass within the rounding-error bounds of the float64 value (half banks are exact
    in float32, so the reference is computed on the stored values)."""
    est, chunks = strategy_estimate(strategy, x, bank, scale, variance, squared, step, grow)
    stored = bank if bank.dtype == torch.float64 else bank.float()
    ref = kernel_reference(x, stored, scale, variance, squared, chunks, accumulation_dtype(x.dtype))
    assert est.mean.dtype == x.dtype and est.log_mass.shape == (x.shape[0],)
    assert_within(est.mean, ref.mean, ref.mean_bound, f"{strategy} {what} mean")
    assert_within(est.log_mass, ref.log_mass, ref.log_mass_bound, f"{strategy} {what} log-mass")


@pytest.mark.parametrize("bank_dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_float64_over_seeds(strategy: str, bank_dtype: torch.dtype) -> None:
    """Squared kernel, float32 queries, float32 / float16 / bfloat16 banks: one chunk, a few, one row per chunk."""
    for seed in range(20):
        b, n, d = (1, 3, 5)[seed % 3], (1, 17, 40, 130)[seed % 4], (3, 64, 256, 1000)[seed % 4]
        magnitude = 10.0 ** ((seed % 5) - 2) if bank_dtype != torch.float16 else 10.0 ** ((seed % 3) - 1)
        x, bank, s, v = kernel_case(seed, b, n, d, magnitude)
        step = (None, 7, 32, 1)[seed % 4]
        what = f"{bank_dtype} seed {seed} (B, N, D) = {(b, n, d)} chunk {step}"
        check_against_float64(strategy, x, bank.to(bank_dtype), s, v, what, step=step, grow=seed % 2 == 0)


@pytest.mark.parametrize("strategy", CHUNK_LOOPS)
def test_float64_inputs_stay_float64(strategy: str) -> None:
    """float64 queries and bank accumulate in float64: the bound is float64's (the compiled kernel is float32 only)."""
    for seed in range(12):
        x, bank, s, v = kernel_case(200 + seed, 2, 60, 128)
        x, bank, s, v = x.double(), bank.double(), s.double(), v.double()
        check_against_float64(strategy, x, bank, s, v, f"float64 seed {seed}", step=(5, 60)[seed % 2])


def ascending_case(n: int, d: int, variance: float) -> tuple[Tensor, Tensor]:
    """A query and bank rows y_n = t_n sqrt(v) e, t_n rising from -3 to 3, with x = 4 e / sqrt(v): the logits
    -||x - y_n||^2 / (2 v) = 4 t_n / v - t_n^2 / 2 + const rise along the rows (the running max keeps moving)."""
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    noise = 0.01 * torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    bank = torch.linspace(-3.0, 3.0, n)[:, None] * direction + noise
    return 4.0 * direction[None] / math.sqrt(variance), bank * math.sqrt(variance)


@pytest.mark.parametrize(("variance", "loop_step"), [(1.0, 5), (0.002, 20)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_running_max_moves_at_every_chunk(strategy: str, variance: float, loop_step: int) -> None:
    """Every chunk's largest logit beats all earlier ones, so every update rescales the sums. With the sharp kernel
    (variance 0.002: logits 60 apart from row to row) the old sums underflow at each rescale and at most three rows
    of each chunk of twenty carry a float32 weight, so the host-checked loop gathers every chunk."""
    n, d = 200, 64
    x, bank = ascending_case(n, d, variance)
    step = 1 if strategy == "compiled" else loop_step  # the compiled kernel rescales per row
    logits = (-torch.cdist(x.double(), bank.double()).square()[0] / (2 * variance)).reshape(-1, step)
    chunk_max = logits.amax(1)
    rising = (chunk_max[1:] > chunk_max[:-1]).double().mean()
    assert float(rising) >= (0.9 if step == 1 else 1.0), float(rising)
    if variance < 1.0 and step > 1:  # below -110 a weight underflows to 0 in float32 (the smallest subnormal: e^-103)
        carrying = (logits - chunk_max[:, None] > -110.0).sum(1)
        assert bool((carrying * kernel_module.SPARSE_ROWS_FRACTION <= step).all()), carrying
    for grow in (False, True):
        check_against_float64(strategy, x, bank, 1.0, variance, f"ascending, grow {grow}", step=step, grow=grow)


@pytest.mark.parametrize("bank_dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("strategy", CHUNK_LOOPS)
def test_unsquared_reference_kernel(strategy: str, bank_dtype: torch.dtype) -> None:
    """The reference preset's kernel exp(-||x - y|| / (2 s^2)) on denoised estimates, over seeds and chunkings."""
    for seed in range(12):
        x, bank, _, _ = kernel_case(300 + seed, 3, 50, (10, 64, 300)[seed % 3])
        sigma_sq = (0.1, 1.0, 3.15**2)[seed % 3]
        step = (1, 8, 50)[seed % 3]
        what = f"unsquared {bank_dtype} seed {seed}"
        check_against_float64(strategy, x, bank.to(bank_dtype), 1.0, sigma_sq, what, False, step, seed % 2 == 0)


def test_compiled_kernel_refuses_the_unsquared_kernel() -> None:
    x, bank = torch.randn(2, 8), torch.randn(5, 8)
    query = _kernel_query(x, bank, 1.0, 1.0, False, None, None)
    with pytest.raises(ValueError, match="squared=True"):
        _compiled_kernel_sums(query, bank)


def record_strategies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap the three strategies in kernel.py; the list names each one as it runs."""
    calls: list[str] = []
    for name in ("_compiled_kernel_sums", "_static_chunk_sums", "_sparse_chunk_sums"):
        real = getattr(kernel_module, name)

        def recorded(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel_module, name, recorded)
    return calls


def test_entry_point_picks_each_strategy_and_returns_its_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_estimate runs the strategy the module docstring names for each case, bit for bit."""
    calls = record_strategies(monkeypatch)
    x, bank, s, v = kernel_case(5, 2, 40, 64)
    cases: list[tuple[str, dict[str, Any], str, int | None]] = [
        ("default CPU float32", {}, "_compiled_kernel_sums", None),
        ("explicit chunk size", {"chunk_size": 8}, "_sparse_chunk_sums", 8),
        ("unsquared", {"squared": False}, "_sparse_chunk_sums", None),
        ("strided bank", {"bank": bank.T.contiguous().T}, "_sparse_chunk_sums", None),
    ]
    for what, kwargs, expected, step in cases:
        calls.clear()
        est = kernel_estimate(**{"x": x, "bank": bank, "scale": s, "variance": v, **kwargs})
        assert calls == [expected], (what, calls)
        strategy = {"_compiled_kernel_sums": "compiled", "_sparse_chunk_sums": "sparse"}[expected]
        squared = kwargs.get("squared", True)
        direct, _ = strategy_estimate(strategy, x, kwargs.get("bank", bank), s, v, squared, step, step is None)
        assert torch.equal(est.mean, direct.mean) and torch.equal(est.log_mass, direct.log_mass), what
    calls.clear()
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    kernel_estimate(x, bank, s, v)
    assert calls == ["_sparse_chunk_sums"], calls


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traces_and_accelerators_take_the_static_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traced call (ONNX export) and a non-CPU device (the meta device stands in for an accelerator) run the
    static loop; the trace replays the static loop's bits."""
    calls = record_strategies(monkeypatch)
    x, bank, s, v = kernel_case(6, 2, 40, 64)

    def mean_and_mass(xx: Tensor, ss: Tensor, vv: Tensor) -> tuple[Tensor, Tensor]:
        est = kernel_estimate(xx, bank, ss, vv)
        return est.mean, est.log_mass

    traced = torch.jit.trace(mean_and_mass, (x, s, v), check_trace=False)
    assert calls == ["_static_chunk_sums"], calls
    mean, log_mass = traced(x, s, v)
    direct, _ = strategy_estimate("static", x, bank, s, v)  # one chunk: the automatic one holds all 40 rows
    assert torch.equal(mean, direct.mean) and torch.equal(log_mass, direct.log_mass)
    calls.clear()
    meta = kernel_estimate(x.to("meta"), bank.to("meta"), s.to("meta"), v.to("meta"))
    assert calls == ["_static_chunk_sums"] and meta.mean.shape == x.shape, calls
