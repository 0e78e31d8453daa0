"""The PyTorch one-pass loop: precomputed bank norms, automatic cache-sized chunks, skipped underflowed chunks and
half-precision banks, each against the float64 reference bounds of helpers.py.

The loop runs wherever the compiled kernel does not (no extension built, accelerators, traces, explicit chunks), so
this module switches the compiled kernel off; tests/test_fused.py tests that kernel."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from safe_denoiser.core import fused
from safe_denoiser.core.kernel import (
    CPU_CHUNK_BYTES,
    DEVICE_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    auto_chunk_size,
    bank_sq_norms,
    kernel_estimate,
    path_kernel_estimate,
)
from safe_denoiser.core.paths import vp_path

from helpers import (
    KernelReference,
    _softmax_weight_error,
    assert_within,
    forward_reference,
    gamma,
    kernel_reference,
    unit_roundoff,
)

SD = (4, 64, 64)  # Stable Diffusion latents: D = 16384


@pytest.fixture(autouse=True)
def pytorch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here exercises the PyTorch loop, not the compiled kernel."""
    monkeypatch.setenv(fused.ENV_SWITCH, "0")


def auto_chunks(x: Tensor, bank: Tensor) -> int:
    """How many chunks the automatic chunk size makes (the reference bounds grow with it)."""
    n, d = bank.shape[0], bank[0].numel()
    return math.ceil(n / auto_chunk_size(x.shape[0], n, d, x.device))


def check(est_mean: Tensor, est_log_mass: Tensor, ref: KernelReference, what: str) -> None:
    assert_within(est_mean, ref.mean, ref.mean_bound, f"{what} mean")
    assert_within(est_log_mass, ref.log_mass, ref.log_mass_bound, f"{what} log-mass")


def near_bank(bank: Tensor, batch: int, alpha_bar: float, seed: int) -> Tensor:
    """x_t noised from perturbed bank items: the sharp, nearly one-hot posterior of real use."""
    g = torch.Generator().manual_seed(seed)
    x0 = bank[torch.randint(0, bank.shape[0], (batch,), generator=g)]
    x0 = x0 + 0.3 * torch.randn(x0.shape, generator=g)
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * torch.randn(x0.shape, generator=g)


def test_auto_chunk_size_fits_the_cache_budget() -> None:
    d = math.prod(SD)
    rows = auto_chunk_size(2, 100_000, d)
    assert rows >= MIN_CHUNK_ROWS and rows * d * 4 <= CPU_CHUNK_BYTES < (rows + 1) * (d + 2) * 4
    assert auto_chunk_size(1, 515, 16) == 515  # a small bank is one chunk
    assert auto_chunk_size(1, 5, 10**9) == 5  # never more rows than the bank has
    assert auto_chunk_size(1, 10**6, 10**9) == MIN_CHUNK_ROWS
    assert auto_chunk_size(1, 10**6, d, "cuda") == DEVICE_CHUNK_BYTES // (4 * (d + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bank_sq_norms_match_float64(dtype: torch.dtype) -> None:
    bank = (3 * torch.randn(300, 2, 8, 8)).to(dtype)
    norms = bank_sq_norms(bank, chunk_size=7)
    exact = bank.double().flatten(1).square().sum(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert norms.dtype == acc and norms.shape == (300,)
    # a 128-term sum of squares and a square root, squared again
    assert_within(norms, exact, gamma(128 + 4, unit_roundoff(acc)) * exact, f"{dtype} norms")


@pytest.mark.parametrize("alpha_bar", [0.05, 0.5, 0.98])
def test_precomputed_norms_and_auto_chunks_at_sd_size(alpha_bar: float) -> None:
    """Several automatic chunks at D = 16384; passing the norms changes nothing (they are the same numbers)."""
    g = torch.Generator().manual_seed(11)
    bank = torch.randn(150, *SD, generator=g)
    x_t = near_bank(bank, 2, alpha_bar, seed=12)
    assert auto_chunks(x_t, bank) >= 2
    ref = forward_reference(x_t, bank, alpha_bar, chunks=auto_chunks(x_t, bank))
    with_norms = path_kernel_estimate(x_t, bank, vp_path(alpha_bar), bank_sq_norms=bank_sq_norms(bank))
    without = path_kernel_estimate(x_t, bank, vp_path(alpha_bar))
    check(with_norms.mean, with_norms.log_mass, ref, f"abar {alpha_bar}")
    assert torch.equal(with_norms.mean, without.mean) and torch.equal(with_norms.log_mass, without.log_mass)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_skipped_underflow_chunks_keep_the_result(chunk: int) -> None:
    """A sharp kernel: most chunks' weights underflow to 0 and their update is skipped; the nearest item is put
    last, so the running max moves after many skipped chunks and the rescale still has to be right."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(120, 1024, generator=g)
    x_t = near_bank(bank[-1:], 1, 0.9, seed=6)
    x_t = torch.cat([x_t, near_bank(bank, 1, 0.9, seed=7)])
    ref = forward_reference(x_t, bank, 0.9, chunks=math.ceil(120 / chunk))
    est = path_kernel_estimate(x_t, bank, vp_path(0.9), chunk_size=chunk)
    check(est.mean, est.log_mass, ref, f"chunk {chunk}")
    # the regime really skips: all but a handful of items have weights below float32's smallest subnormal
    logits = -forward_logits(x_t, bank, 0.9)
    assert int((logits - logits.amax(1, keepdim=True) > -104).sum(1).max()) <= 3


def forward_logits(x_t: Tensor, bank: Tensor, alpha_bar: float) -> Tensor:
    """-log k in float64 by explicit differences (B, N)."""
    d2 = (x_t.double()[:, None] - math.sqrt(alpha_bar) * bank.double()[None]).flatten(2).square().sum(-1)
    return d2 / (2 * (1 - alpha_bar))


def test_unsquared_kernel_with_norms_and_chunks() -> None:
    x, bank = torch.randn(3, 64), torch.randn(50, 64)
    ref = kernel_reference(x, bank, 1.0, 2.0, squared=False, chunks=7)
    est = kernel_estimate(x, bank, 1.0, 2.0, False, 8, bank_sq_norms=bank_sq_norms(bank))
    check(est.mean, est.log_mass, ref, "unsquared")


def storage_bound(x_t: Tensor, bank: Tensor, half: Tensor, alpha_bar: float, ref: KernelReference) -> Tensor:
    """A priori bound on |mean(half bank) - mean(bank)| (exact arithmetic) from one rounding per stored value.

    |dy| <= u_h |y| + tiny (half the smallest subnormal) per element moves each logit (s/v) <x, y> - s^2 ||y||^2/(2v)
    by at most delta_n = (s/v) sum |x| |dy| + (s^2/2v) (2 ||y|| ||dy|| + ||dy||^2); the softmax moves by r_n
    (``_softmax_weight_error``, exact) and mean' - mean = sum (p'_n - p_n)(y'_n - mean) + sum p_n dy_n.
    """
    u_h, tiny = unit_roundoff(half.dtype), torch.finfo(half.dtype).smallest_normal * unit_roundoff(half.dtype)
    alpha_bar = float(torch.tensor(alpha_bar, dtype=torch.float32))  # as the estimator and the references see it
    s, v = math.sqrt(alpha_bar), 1 - alpha_bar
    x, y, yh = x_t.double().flatten(1), bank.double().flatten(1), half.double().flatten(1)
    dy = u_h * y.abs() + tiny
    dy_norm = dy.norm(dim=1)
    delta = (s / v) * (x.abs() @ dy.T) + (s * s / (2 * v)) * (2 * y.norm(dim=1) * dy_norm + dy_norm**2)[None]
    logits = -forward_logits(x_t, half, alpha_bar)
    r = _softmax_weight_error(logits, delta)
    p = torch.softmax(logits, dim=1)
    mean_h = p @ yh
    bound = (r[:, :, None] * (yh[None] - mean_h[:, None]).abs()).sum(1) + torch.softmax(
        -forward_logits(x_t, bank, alpha_bar), 1
    ) @ dy
    return bound.reshape(ref.mean.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "alpha_bar", "sharp"),
    [((4, 4, 4), 0.02, False), ((4, 4, 4), 0.1, False), ((4, 4, 4), 0.5, False), ((4, 16, 16), 0.5, True)],
)
def test_half_bank_accumulates_in_float32(
    dtype: torch.dtype, shape: tuple[int, ...], alpha_bar: float, sharp: bool
) -> None:
    """Arithmetic: float32 bounds against float64 on the stored values. Storage: against the float32 bank, within
    the a priori rounding bound above (which the README quotes). Diffuse weights (noise queries, D = 64) and the
    sharp, nearly one-hot weights of real latents (queries near bank items)."""
    g = torch.Generator().manual_seed(21)
    bank = torch.randn(96, *shape, generator=g)
    half = bank.to(dtype)
    x_t = near_bank(bank, 3, alpha_bar, seed=22) if sharp else torch.randn(3, *shape, generator=g)
    est = path_kernel_estimate(x_t, half, vp_path(alpha_bar), chunk_size=20, bank_sq_norms=bank_sq_norms(half))
    assert est.mean.dtype == torch.float32  # returned in the query's dtype
    if not sharp:  # the weights really are spread over many items
        assert float(torch.softmax(-forward_logits(x_t, bank, alpha_bar), 1).amax(1).min()) < 0.8
    ref_half = forward_reference(x_t, half.float(), alpha_bar, chunks=5)  # half values are exact in float32
    check(est.mean, est.log_mass, ref_half, f"{dtype} arithmetic")
    ref = forward_reference(x_t, bank, alpha_bar, chunks=5)
    storage = storage_bound(x_t, bank, half, alpha_bar, ref)
    assert_within(ref_half.mean, ref.mean, storage, f"{dtype} storage")
    assert_within(est.mean, ref.mean, storage + ref_half.mean_bound, f"{dtype} total")


def test_bad_norms() -> None:
    with pytest.raises(ValueError, match=r"bank_sq_norms must be \(5,\)"):
        path_kernel_estimate(torch.randn(2, 8), torch.randn(5, 8), vp_path(0.5), bank_sq_norms=torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size"):
        path_kernel_estimate(torch.randn(2, 8), torch.randn(5, 8), vp_path(0.5), chunk_size=-3)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_second_matmul_keeps_the_result(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nearly one-hot weights: the second matmul over only the rows that carry weight is within the same float64
    bounds as the dense one, for a batch whose samples pick different rows (their union is gathered), one of them
    a query far from every item (its nearest row still takes all the weight)."""
    import safe_denoiser.core.kernel as kernel

    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(96, 2048, generator=g)
    x_t = torch.cat([near_bank(bank[[3]], 1, 0.9, seed=seed), near_bank(bank[[70]], 1, 0.9, seed=seed + 1)])
    x_t = torch.cat([x_t, 0.05 * torch.randn(1, 2048, generator=g)])
    chunk = 16
    ref = forward_reference(x_t, bank, 0.9, chunks=96 // chunk)
    calls: list[int] = []
    real = torch.Tensor.nonzero

    def counting(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "nonzero", counting)
    sparse = path_kernel_estimate(x_t, bank, vp_path(0.9), chunk_size=chunk)
    assert calls, "the sparse branch was not taken"
    check(sparse.mean, sparse.log_mass, ref, "sparse")
    monkeypatch.setattr(kernel, "SPARSE_ROWS_FRACTION", 10**9)  # never sparse
    dense = path_kernel_estimate(x_t, bank, vp_path(0.9), chunk_size=chunk)
    check(dense.mean, dense.log_mass, ref, "dense")


def test_sparse_chunks_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a sparse chunk the automatic chunks grow (fewer per-chunk operations); the result stays within the
    float64 bounds, which hold for any chunking no finer than the automatic one."""
    import safe_denoiser.core.kernel as kernel

    g = torch.Generator().manual_seed(11)
    bank = torch.randn(300, *SD, generator=g)
    x_t = near_bank(bank[[250]], 1, 0.5, seed=12)
    calls: list[int] = []
    real = torch.addmm

    def counting(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "addmm", counting)
    est = path_kernel_estimate(x_t, bank, vp_path(0.5), bank_sq_norms=bank_sq_norms(bank))
    grown = len(calls)
    calls.clear()
    monkeypatch.setattr(kernel, "SPARSE_GROWTH", 1)
    path_kernel_estimate(x_t, bank, vp_path(0.5), bank_sq_norms=bank_sq_norms(bank))
    fixed = len(calls)
    assert auto_chunks(x_t, bank) >= 4 and grown < fixed, (grown, fixed)
    check(est.mean, est.log_mass, forward_reference(x_t, bank, 0.5, chunks=auto_chunks(x_t, bank)), "grown chunks")


def test_grown_chunks_do_not_compound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grown chunks are SPARSE_GROWTH cache-sized chunks at most, however many sparse chunks come before (the
    (B, chunk) logits and the gather stay bounded on a bank of any size); the result stays within the float64
    bounds."""
    import safe_denoiser.core.kernel as kernel

    monkeypatch.setattr(kernel, "SPARSE_GROWTH", 2)
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(4000, 2048, generator=g)
    x_t = near_bank(bank[[3]], 1, 0.5, seed=6)  # the nearest item in the first chunk: every later chunk is sparse
    base = kernel.auto_chunk_size(1, 4000, 2048)
    sizes: list[int] = []
    real = torch.addmm

    def recording(bias: Tensor, a: Tensor, b: Tensor, *args: object, **kwargs: object) -> Tensor:
        if b.shape[0] == 2048:  # the first matmul, x @ chunk.T: one per chunk
            sizes.append(b.shape[1])
        return real(bias, a, b, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "addmm", recording)
    est = path_kernel_estimate(x_t, bank, vp_path(0.5), bank_sq_norms=bank_sq_norms(bank))
    monkeypatch.undo()
    assert sizes[0] == base and max(sizes) == 2 * base and sum(sizes) == 4000, (base, sizes)
    ref = forward_reference(x_t, bank, 0.5, chunks=math.ceil(4000 / base))
    check(est.mean, est.log_mass, ref, "bounded growth")
