"""The one-pass compiled kernel: each bank row read from memory once, for both the dot products and the sums.

``core.kernel.kernel_estimate`` calls this on a CPU, outside a trace, for float32 queries and a contiguous float32 /
float16 / bfloat16 bank (docs/performance.md); everywhere else it runs its PyTorch chunked loop, which is also the
float64 reference. The C source is ``csrc/fused_kernel.c``, built at install as an optional extension: where it
could not be built (no C compiler) ``unavailable_reason`` says so and the PyTorch loop runs. Setting the
environment variable ``SAFE_DENOISER_FUSED_KERNEL=0`` turns it off (for comparisons and benchmarks).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from safe_denoiser.core import _fused_kernel  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    _fused_kernel = None
    _IMPORT_ERROR = str(exc)

__all__ = ["BANK_DTYPES", "accepts", "enabled", "fused_kernel_sums", "unavailable_reason", "worker_count"]

ENV_SWITCH = "SAFE_DENOISER_FUSED_KERNEL"
BANK_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MIN_ROWS_PER_THREAD = 16  # a thread costs ~tens of microseconds to start: below this it does not pay
# A second thread pays only on large banks: right after an OpenMP region (the UNet's last operation in a sampler
# step) PyTorch's OpenMP workers keep spinning on the other cores for a few milliseconds, and a thread started then
# waits for them (bench: 2 threads lose up to 3.5 ms at N = 3,000 at SD size and win from N = 10,000 on). One thread
# already reads at 18-30 GB/s; more are for banks of hundreds of MiB on machines with many memory channels.
MIN_BYTES_PER_THREAD = 256 * 1024**2


def unavailable_reason() -> str | None:
    """Why the compiled kernel cannot run here (not built, or switched off), or None when it can."""
    if _fused_kernel is None:
        return (
            f"the extension safe_denoiser.core._fused_kernel was not built ({_IMPORT_ERROR}); reinstall the package "
            "with a C compiler on PATH (pip install -e . builds it)"
        )
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    return None


def enabled() -> bool:
    """Whether ``kernel_estimate`` uses the compiled kernel where its inputs allow."""
    return unavailable_reason() is None


def accepts(x: Tensor, bank: Tensor) -> bool:
    """Whether ``fused_kernel_sums`` takes these (B, D) queries and (N, D) bank (and is enabled here): float32
    queries without autograd and a contiguous float32 / float16 / bfloat16 bank, both on the CPU."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and bank.device.type == "cpu"
        and bank.dtype in BANK_DTYPES
        and bank.is_contiguous()
        and not x.requires_grad
        and enabled()
    )


def worker_count(bank_bytes: int, threads: int | None = None) -> int:
    """Threads for one call over a bank of ``bank_bytes``: one per ``MIN_BYTES_PER_THREAD``, at least one, at most
    ``threads`` (default ``torch.get_num_threads()``)."""
    limit = torch.get_num_threads() if threads is None else threads
    return max(1, min(limit, bank_bytes // MIN_BYTES_PER_THREAD))


def fused_kernel_sums(
    x: Tensor, bank: Tensor, bias_coef: Tensor, norms: Tensor, threads: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One-pass online-softmax sums over a bank: (acc (B, D), run_max (B,), run_sum (B,)).

    With logit_bn = <x_b, y_n> + bias_coef_b * norms_n: run_max_b = max_n logit_bn, run_sum_b = sum_n
    exp(logit_bn - run_max_b) and acc_b = sum_n exp(logit_bn - run_max_b) y_n, so the softmax mean is acc / run_sum
    and the logsumexp is run_max + log(run_sum). ``x`` (B, D), ``bias_coef`` (B,) and ``norms`` (N,) are float32 on
    the CPU; ``bank`` is (N, D), float32, float16 or bfloat16, contiguous. ``threads`` defaults to
    ``worker_count``'s choice (rows are split in contiguous ranges, at least ``MIN_ROWS_PER_THREAD`` each).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fused kernel unavailable: {reason}")
    if x.dim() != 2 or bank.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise ValueError(f"x must be (B, D) and bank (N, D), got {tuple(x.shape)} and {tuple(bank.shape)}")
    b, n, d = x.shape[0], bank.shape[0], x.shape[1]
    if b == 0 or n == 0 or d == 0:
        raise ValueError(f"x and bank must be non-empty, got {tuple(x.shape)} and {tuple(bank.shape)}")
    if bank.dtype not in BANK_DTYPES:
        raise ValueError(f"bank dtype must be float32, float16 or bfloat16, got {bank.dtype}")
    for name, t, shape in (("x", x, (b, d)), ("bias_coef", bias_coef, (b,)), ("norms", norms, (n,))):
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be float32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("x", x), ("bank", bank), ("bias_coef", bias_coef), ("norms", norms)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor (device {t.device})")
    bank_bytes = bank.numel() * bank.element_size()
    workers = worker_count(bank_bytes) if threads is None else int(threads)
    workers = max(1, min(workers, n // MIN_ROWS_PER_THREAD))
    acc = torch.empty((b, d), dtype=torch.float32)
    run_max = torch.empty((b,), dtype=torch.float32)
    run_sum = torch.empty((b,), dtype=torch.float32)
    assert _fused_kernel is not None  # unavailable_reason() checked it
    _fused_kernel.kernel_sums(
        x.data_ptr(),
        b,
        bank.data_ptr(),
        BANK_DTYPES[bank.dtype],
        n,
        d,
        bias_coef.data_ptr(),
        norms.data_ptr(),
        acc.data_ptr(),
        run_max.data_ptr(),
        run_sum.data_ptr(),
        workers,
    )
    return acc, run_max, run_sum
