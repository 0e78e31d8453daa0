"""Kernel estimates of the unsafe posterior mean E_unsafe[x0 | x_t] over a negative bank.

Pure tensor functions (docs/method.md section 1). Everything is computed in log space with an online logsumexp
over cache-sized bank chunks, so each call reads the bank from memory once, extra memory is O(B*N + chunk*D) and no
(B, N, D) tensor is ever built. The bank's squared norms are a constant of the bank (``bank_sq_norms``, held by
``NegativeBank``); a float16 / bfloat16 bank is read in half precision and accumulated in float32. No host
synchronisation: safe inside traced or compiled graphs. Differentiation is not supported (in-place updates).

``kernel_estimate`` is the one entry point, for any kernel (a scale and a variance per query, squared distance or
not). ``path_kernel_estimate`` is the theorem's forward kernel on a Gaussian path (``core.paths``), built on it from
two pieces that ``core.step``'s stacked conditional-odds query also uses: ``forward_kernel`` (the scale and
variance) and ``kde_posterior_mean`` (a kernel density bank's posterior mean); callers take its ``.mean`` (E_unsafe)
or ``.log_mass``, on ``vp_path(alpha_bar)`` for a VP sample.

``kernel_estimate`` picks one of three strategies for the online-softmax sums, which share one update
(``_chunk_weights``, ``_add_chunk``) and are each tested against float64 (tests/test_kernel_strategies.py):

* ``_compiled_kernel_sums``: on a CPU, outside a trace, float32 queries over a contiguous bank with automatic
  chunks and the squared kernel go to the compiled one-pass kernel (``core.fused``: each block of four rows used
  for the dot products and the weighted sums while it is in L2);
* ``_sparse_chunk_sums``: any other CPU call outside a trace runs a PyTorch chunk loop that checks on the host
  for underflowed and nearly one-hot chunks (skipped, or their second matmul gathered) and grows the chunks then;
* ``_static_chunk_sums``: traced graphs (ONNX export, torch.compile) and accelerators run fixed chunks with every
  update taken: no host synchronisation, so the graph is static.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from safe_denoiser.core import fused
from safe_denoiser.core.fused import fused_kernel_sums
from safe_denoiser.core.parameterization import broadcast_to_sample
from safe_denoiser.core.paths import GaussianPath

__all__ = [
    "KernelEstimate",
    "accumulation_dtype",
    "as_batch_column",
    "auto_chunk_size",
    "bank_sq_norms",
    "forward_kernel",
    "kde_posterior_mean",
    "kernel_estimate",
    "log_kernel",
    "path_kernel_estimate",
]


FLOAT32_BYTES = 4
CPU_CHUNK_BYTES = 4 * 1024**2  # a float32 chunk this size stays in cache between the two matmuls (bench/correction.py)
DEVICE_CHUNK_BYTES = 256 * 1024**2  # accelerators: few, large chunks (launch overhead); bounds the widening buffer
MIN_CHUNK_ROWS = 8
MAX_TRACED_CHUNKS = 16  # automatic chunks in a traced (ONNX) graph, where the loop is unrolled into nodes
# CPU, untraced: when at most 1/SPARSE_ROWS_FRACTION of a chunk's rows carry a non-zero weight (the usual case in
# high dimension, where the softmax is nearly one-hot), the second matmul gathers just those rows.
SPARSE_ROWS_FRACTION = 4
SPARSE_GROWTH = 64  # after a sparse chunk the next automatic chunk is this many times larger (bench/correction.py)


class KernelEstimate(NamedTuple):
    """The kernel-weighted bank mean and the log of the mean kernel value, per sample."""

    mean: Tensor  # (B, ...) same shape as the query
    log_mass: Tensor  # (B,) log( (1/N) sum_n k_n )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel and the correction are computed in: float64 stays float64, anything else float32."""
    # Half precision cannot hold the logits (d^2 / 2h reaches 1e4 and more at SD size); float32 errors are bounded
    # and tested against float64 in tests/test_kernel.py.
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_batch_column(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A float or (B,) / (B, 1) / () tensor as a (B, 1) float tensor on ``like``'s device and dtype."""
    if isinstance(value, Tensor):
        v = value.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
        if v.shape[0] == 1:
            return v.expand(batch, 1)
        if v.shape[0] != batch:
            raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(value.shape)}")
        return v
    return torch.full((batch, 1), float(value), device=like.device, dtype=like.dtype)


def bank_sq_norms(bank: Tensor, chunk_size: int | None = None) -> Tensor:
    """||y_n||^2 of each bank item, (N,), in the accumulation dtype; one chunked pass (no bank-sized temporary).

    A bank is a constant, so callers compute this once (``NegativeBank.sq_norms``) and pass it to the kernel.
    """
    n = bank.shape[0]
    acc = accumulation_dtype(bank.dtype)
    flat = bank.reshape(n, -1)
    step = min(n, chunk_size or auto_chunk_size(1, n, flat.shape[1], flat.device))
    # vector_norm reduces without a temporary the size of its input (square().sum() would allocate one).
    parts = [torch.linalg.vector_norm(flat[i : i + step].to(acc), dim=1).square() for i in range(0, n, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def auto_chunk_size(batch: int, n: int, d: int, device: torch.device | str = "cpu") -> int:
    """Bank rows per chunk so that a float32 chunk stays in cache between the kernel's two matmuls.

    On a CPU the chunk (plus the (B, chunk) logits) is kept near ``CPU_CHUNK_BYTES``, a few times the per-core L2
    and well under the shared L3; accelerators re-read from their own large caches and pay per launch, so there
    the chunk is as large as ``DEVICE_CHUNK_BYTES`` allows. Never fewer than ``MIN_CHUNK_ROWS`` rows (the per-chunk
    Python overhead) nor more than ``n``.
    """
    budget = CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else DEVICE_CHUNK_BYTES
    rows = budget // (FLOAT32_BYTES * (max(d, 1) + max(batch, 1)))
    return int(min(max(rows, MIN_CHUNK_ROWS), max(n, 1)))


def log_kernel(
    x: Tensor,
    bank: Tensor,
    scale: Tensor,
    variance: Tensor,
    squared: bool = True,
    *,
    bank_sq_norms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log k_n = -d_n^p / (2 v), d_n = ||x - scale * bank_n||, p = 2 (Gaussian) or 1 (reference code).

    ``x`` is (B, D), ``bank`` (N, D), ``scale`` and ``variance`` (B, 1), ``bank_sq_norms`` the precomputed (N,)
    ||bank_n||^2 (computed here when omitted). Returns (logits (B, N), offset (B, 1)) with log k = logits + offset.
    The squared distance is expanded as ||x||^2 - 2 s <x, y> + s^2 ||y||^2 so that one matmul does the work; for
    p = 2 the term ||x||^2, the same for every n, goes to ``offset`` instead of being added and then cancelled in
    the softmax, which would cost float32 digits when ||x||^2 >> the spread.
    """
    x_sq = torch.linalg.vector_norm(x, dim=1, keepdim=True).square()  # (B, 1)
    y_sq = (_bank_sq_norms(bank) if bank_sq_norms is None else bank_sq_norms.to(x.dtype)).unsqueeze(0)  # (1, N)
    cross = 2.0 * scale * (x @ bank.T) - scale.square() * y_sq  # (B, N): ||x||^2 - d^2
    if squared:
        return cross / (2.0 * variance), -x_sq / (2.0 * variance)
    dist = (x_sq - cross).clamp_min(0.0).sqrt()
    return -dist / (2.0 * variance), torch.zeros_like(x_sq)


_bank_sq_norms = bank_sq_norms  # log_kernel's parameter of the same name shadows the function


def _check_inputs(x: Tensor, bank: Tensor, chunk_size: int | None, norms: Tensor | None) -> None:
    if x.dim() < 2 or bank.dim() < 2:
        raise ValueError("x must be (B, ...) and bank (N, ...), each with at least 2 dimensions")
    if x.shape[1:] != bank.shape[1:]:
        raise ValueError(f"bank item shape {tuple(bank.shape[1:])} does not match sample shape {tuple(x.shape[1:])}")
    if bank.shape[0] == 0:
        raise ValueError("the bank is empty")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if norms is not None and tuple(norms.shape) != (bank.shape[0],):
        raise ValueError(f"bank_sq_norms must be ({bank.shape[0]},) (one per bank item), got {tuple(norms.shape)}")


def kernel_estimate(
    x: Tensor,
    bank: Tensor,
    scale: float | Tensor = 1.0,
    variance: float | Tensor = 1.0,
    squared: bool = True,
    chunk_size: int | None = None,
    *,
    bank_sq_norms: Tensor | None = None,
) -> KernelEstimate:
    """Self-normalised kernel mean sum_n softmax(log k)_n bank_n and log mean kernel value.

    One pass over the bank's memory: an online logsumexp over chunks (the flash-attention recurrence: the running
    maximum m, normaliser s and weighted sum acc are rescaled by exp(m_old - m_new)), each chunk small enough
    (``auto_chunk_size`` unless ``chunk_size`` is given) to be read from memory by the first matmul and from cache
    by the second. ``bank_sq_norms`` (N,) are the bank's precomputed squared norms; without them they cost one
    more read of the bank. A float16 / bfloat16 bank is widened chunk by chunk into a cache-resident float32
    buffer, so memory traffic is halved and all arithmetic is float32 (float64 for float64 inputs); the mean is
    returned in ``x``'s dtype.

    The sums come from one of three strategies (module docstring): the compiled one-pass kernel (CPU, untraced,
    float32, squared kernel, automatic chunks), the host-checked chunk loop (any other CPU call outside a trace)
    or the static chunk loop (traces and accelerators).
    """
    _check_inputs(x, bank, chunk_size, bank_sq_norms)
    n, b = bank.shape[0], x.shape[0]
    xf = x.reshape(b, -1).to(accumulation_dtype(x.dtype))
    y_all = bank.reshape(n, -1)
    query = _kernel_query(xf, y_all, scale, variance, squared, chunk_size, bank_sq_norms)
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if squared and chunk_size is None and not tracing and fused.accepts(xf, y_all):
        sums = _compiled_kernel_sums(query, y_all)
    else:
        step = min(n, chunk_size or auto_chunk_size(b, n, xf.shape[1], xf.device))
        if tracing and chunk_size is None:  # a traced loop is unrolled: keep the graph small
            step = max(step, math.ceil(n / MAX_TRACED_CHUNKS))
        chunks = _ChunkedBank(query, y_all, n, step)
        if xf.device.type == "cpu" and not tracing:
            sums = _sparse_chunk_sums(chunks, grow=chunk_size is None)
        else:
            sums = _static_chunk_sums(chunks)
    return _estimate(sums, query.offset, x, n)


class _KernelQuery(NamedTuple):
    """The queries' side of the logits, prepared once per call in the accumulation dtype.

    Squared kernel: logit_bn = <x_scaled_b, y_n> + bias_coef_b ||y_n||^2 and log k = logit + offset, the offset
    -||x_b||^2 / (2 v_b) being the same for every n. Unsquared: the logits of ``log_kernel``, offset 0.
    """

    x: Tensor  # (B, D)
    scale: Tensor  # (B, 1)
    variance: Tensor  # (B, 1)
    norms: Tensor  # (N,) the bank's squared norms
    x_scaled: Tensor  # (B, D): x s / v (squared kernel), x (unsquared)
    bias_coef: Tensor | None  # (B, 1): -s^2 / (2 v) for the squared kernel, None for the unsquared one
    offset: Tensor  # (B, 1)


def _kernel_query(
    xf: Tensor,
    bank: Tensor,
    scale: float | Tensor,
    variance: float | Tensor,
    squared: bool,
    chunk_size: int | None,
    bank_sq_norms: Tensor | None,
) -> _KernelQuery:
    """``kernel_estimate``'s query terms for (B, D) queries and an (N, D) bank; the bank's norms when not given."""
    b, acc_dtype = xf.shape[0], xf.dtype
    s = as_batch_column(scale, b, xf)
    v = as_batch_column(variance, b, xf)
    if bank_sq_norms is None:
        bank_sq_norms = _bank_sq_norms(bank.to(xf.device) if bank.device != xf.device else bank, chunk_size)
    norms = bank_sq_norms.to(device=xf.device, dtype=acc_dtype)
    if not squared:
        return _KernelQuery(xf, s, v, norms, xf, None, torch.zeros((b, 1), device=xf.device, dtype=acc_dtype))
    # logits = (s / v) <x, y> - s^2 ||y||^2 / (2 v): one addmm per chunk; ||x||^2 / (2 v) is the common offset.
    coef = s / v
    x_scaled = xf * coef
    bias_coef = -0.5 * coef * s
    offset = -torch.linalg.vector_norm(xf, dim=1, keepdim=True).square() / (2.0 * v)
    return _KernelQuery(xf, s, v, norms, x_scaled, bias_coef, offset)


class _SoftmaxSums(NamedTuple):
    """Online-softmax state over the rows seen so far: m = max logit, s = sum exp(l - m), acc = sum exp(l - m) y."""

    acc: Tensor  # (B, D)
    run_max: Tensor  # (B, 1)
    run_sum: Tensor  # (B, 1)


def _chunk_weights(logits: Tensor, sums: _SoftmaxSums | None) -> tuple[Tensor, Tensor]:
    """(exp(logits - m_new), m_new) with m_new the running max including this chunk; overwrites ``logits``."""
    new_max = logits.amax(dim=1, keepdim=True)
    if sums is not None:
        new_max = torch.maximum(sums.run_max, new_max)
    return logits.sub_(new_max).exp_(), new_max


def _add_chunk(sums: _SoftmaxSums | None, w: Tensor, new_max: Tensor, part: Tensor) -> _SoftmaxSums:
    """The online-softmax (flash-attention) update: the sums so far rescaled by exp(m_old - m_new), plus this
    chunk's weights ``w`` (B, chunk) and weighted rows ``part`` (B, D); updates ``sums`` in place."""
    if sums is None:  # the first chunk: nothing to rescale
        return _SoftmaxSums(part, new_max, w.sum(dim=1, keepdim=True))
    rescale = (sums.run_max - new_max).exp_()
    run_sum = sums.run_sum.mul_(rescale).add_(w.sum(dim=1, keepdim=True))
    return _SoftmaxSums(sums.acc.mul_(rescale).add_(part), new_max, run_sum)


class _ChunkedBank:
    """An (N, D) bank as the chunk loops read it, ``step`` rows at a time: rows in the accumulation dtype (through
    one cache-resident buffer of ``step`` rows when the bank is in half precision or on another device) and their
    logits. ``n`` is the bank's row count as the caller read it (in a trace, the graph's own size value)."""

    def __init__(self, query: _KernelQuery, bank: Tensor, n: int, step: int) -> None:
        self.query, self.bank, self.n, self.step = query, bank, n, step
        # the squared kernel's -s^2 ||y||^2 / (2 v) term, (B, N): one product per call, sliced per chunk
        self.bias = None if query.bias_coef is None else query.bias_coef * query.norms.unsqueeze(0)
        x = query.x
        widen = bank.dtype != x.dtype or bank.device != x.device
        self.buffer = torch.empty((step, x.shape[1]), device=x.device, dtype=x.dtype) if widen else None

    def read(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """(rows ``start:end`` (chunk, D), their logits (B, chunk)); the logits are a fresh tensor."""
        q, y = self.query, self.bank[start:end]
        if self.buffer is not None:
            y = self.buffer[: y.shape[0]].copy_(y)  # into cache: the only read of these rows from memory
        if self.bias is None:
            return y, log_kernel(q.x, y, q.scale, q.variance, False, bank_sq_norms=q.norms[start:end])[0]
        return y, torch.addmm(self.bias[:, start:end], q.x_scaled, y.T)


def _compiled_kernel_sums(query: _KernelQuery, bank: Tensor) -> _SoftmaxSums:
    """Online softmax in one compiled pass (``core.fused``): each row read once for both matmuls, squared kernel."""
    if query.bias_coef is None:
        raise ValueError("the compiled kernel computes the squared-distance kernel only (squared=True)")
    coef = query.bias_coef.reshape(-1)
    acc, run_max, run_sum = fused_kernel_sums(query.x_scaled, bank, coef, query.norms.contiguous())
    return _SoftmaxSums(acc, run_max.unsqueeze(1), run_sum.unsqueeze(1))


def _static_chunk_sums(chunks: _ChunkedBank) -> _SoftmaxSums:
    """Online softmax over fixed chunks, each one updated: no host check, so a traced graph is static."""
    n, step = chunks.n, chunks.step
    sums: _SoftmaxSums | None = None
    for start in range(0, n, step):
        y, logits = chunks.read(start, min(start + step, n))
        w, new_max = _chunk_weights(logits, sums)
        sums = _add_chunk(sums, w, new_max, w @ y)
    assert sums is not None  # the bank is not empty (checked)
    return sums


def _sparse_chunk_sums(chunks: _ChunkedBank, grow: bool) -> _SoftmaxSums:
    """Online softmax over chunks with host checks: underflowed chunks skipped, sparse ones gathered, grown.

    In high dimension most chunks' weights underflow to exactly 0 once the running max is found, and the rest are
    nearly one-hot; on a CPU testing that on the host is cheap, and skips the second matmul or restricts it to the
    rows that carry weight. Sparse chunks need no cache reuse (the second matmul touches a few rows), so with
    ``grow`` (automatic chunks) the chunk after a sparse one is SPARSE_GROWTH chunks: a bank of up to that
    many chunks takes two in all, and the per-chunk small operations stop adding up. The growth does not compound
    (the (B, chunk) logits stay small) and needs the rows unbuffered (a widening buffer holds one chunk).
    """
    grow = grow and chunks.buffer is None
    n, base, step, start = chunks.n, chunks.step, chunks.step, 0
    sums: _SoftmaxSums | None = None
    while start < n:
        end = min(start + step, n)
        y, logits = chunks.read(start, end)
        start = end
        w, new_max = _chunk_weights(logits, sums)
        rows = w.amax(dim=0).nonzero().squeeze(1)  # bank rows with a non-zero weight for some sample
        # the gather copies at most one cache-sized chunk, so a grown chunk never costs more than that in memory
        sparse = rows.shape[0] * SPARSE_ROWS_FRACTION <= y.shape[0] and rows.shape[0] <= base
        if grow:  # grown while sparse, back to the cache-sized chunk when not (the cache reuse is needed again)
            step = min(base * SPARSE_GROWTH, n) if sparse else base
        if rows.shape[0] == 0:
            continue  # every weight underflowed to 0: then the max did not move and the update adds exact zeros
        # the second matmul over just the rows that carry weight when they are few: the rest would add exact zeros
        sums = _add_chunk(sums, w, new_max, w[:, rows] @ y[rows] if sparse else w @ y)
    assert sums is not None  # the first chunk's largest logit has weight exp(0) = 1, so it is never skipped
    return sums


def _estimate(sums: _SoftmaxSums, offset: Tensor, x: Tensor, n: int) -> KernelEstimate:
    """The kernel mean in ``x``'s shape and dtype and the log mean kernel value, from the online-softmax sums."""
    mean = (sums.acc / sums.run_sum).reshape(x.shape).to(x.dtype)
    log_mass = (offset + sums.run_max + sums.run_sum.log()).squeeze(1) - math.log(n)
    return KernelEstimate(mean, log_mass)


def forward_kernel(
    x_t: Tensor, alpha_bar: float | Tensor, bandwidth: float | Tensor | None = None, bank_sigma: float | None = None
) -> tuple[Tensor, Tensor]:
    """(scale sqrt(abar), variance h), each (B, 1) in the accumulation dtype: the forward kernel on a VP sample
    (``path_kernel_estimate``'s), h = 1 - abar unless ``bandwidth`` gives it or ``bank_sigma`` widens it."""
    if bank_sigma is not None and bandwidth is not None:
        raise ValueError("give bandwidth (a fixed kernel variance) or bank_sigma (a kernel density bank), not both")
    acc = x_t.new_empty((), dtype=accumulation_dtype(x_t.dtype))
    ab = as_batch_column(alpha_bar, x_t.shape[0], acc)
    if bank_sigma is not None:
        variance = 1.0 - ab + ab * bank_sigma**2
    else:
        variance = (1.0 - ab) if bandwidth is None else as_batch_column(bandwidth, x_t.shape[0], acc)
    # abar == 1 (no noise) would divide by zero; 1e-12 keeps -d^2/(2h) finite in float32.
    return ab.sqrt(), variance.clamp_min(1e-12)


def kde_posterior_mean(x_t: Tensor, bank_mean: Tensor, scale: Tensor, variance: Tensor, bank_sigma: float) -> Tensor:
    """A kernel density bank's E[x0 | x_t] from its weighted mean m: m + (sqrt(abar) s^2 / h) (x_t - sqrt(abar) m).

    ``scale`` and ``variance`` are ``forward_kernel``'s (B, 1) columns; returned in ``bank_mean``'s dtype.
    """
    b = x_t.shape[0]
    shape = (b,) + (1,) * (x_t.dim() - 1)
    gain = (scale * bank_sigma**2 / variance).reshape(shape)  # (B, 1, ...)
    m = bank_mean.to(scale.dtype)
    return (m + gain * (x_t.to(scale.dtype) - scale.reshape(shape) * m)).to(bank_mean.dtype)


def path_kernel_estimate(
    x_t: Tensor,
    bank: Tensor,
    path: GaussianPath,
    bandwidth: float | Tensor | None = None,
    chunk_size: int | None = None,
    *,
    bank_sq_norms: Tensor | None = None,
    bank_sigma: float | None = None,
) -> KernelEstimate:
    """E_unsafe[x0 | x_t] and the kernel log-mass under the forward kernel N(x_t; a x^(n), s^2 I) on a Gaussian path.

    Evaluated on the equivalent VP sample c x_t at abar (``GaussianPath.to_vp``; on ``vp_path(abar)`` x_t itself):
    the kernel N(x_t; sqrt(abar) x^(n), h), h the forward process's variance 1 - abar (the exact posterior for a bank
    of point masses) unless ``bandwidth`` overrides it. ``x_t`` is (B, ...), ``bank`` (N, ...), the path's level and
    ``bandwidth`` floats or (B,). One pass over the bank gives both the mean (``.mean``) and the log-mass
    (``.log_mass``: log (1/N) sum_n k_n, k the unnormalised Gaussian, 1 at distance 0, so the mass lies in (0, 1];
    in high dimension it is tiny, which is why gates and thresholds work on its logarithm). ``chunk_size`` and
    ``bank_sq_norms`` as in ``kernel_estimate``.

    ``bank_sigma = s`` makes the bank a kernel density estimate, each item the centre of N(x^(n), s^2 I) in x0
    space, and returns that density's exact posterior mean and diffused mass (docs/method.md section 4): the
    forward kernel's variance becomes h = 1 - abar + abar s^2 and, per item, E[x0 | x_t, n] = x^(n) +
    (sqrt(abar) s^2 / h) (x_t - sqrt(abar) x^(n)), so with m the weighted bank mean
    E[x0 | x_t] = m + (sqrt(abar) s^2 / h) (x_t - sqrt(abar) m). As the noise vanishes h -> s^2 (the kernel's
    temperature never falls below s^2, so the choice between bank items stays soft) and E[x0 | x_t] -> x_t.
    E[x0 | x_t] is the same given x_t or its rescaled VP sample.
    """
    c, alpha_bar = path.to_vp()
    x = x_t if isinstance(c, float) and c == 1.0 else x_t * broadcast_to_sample(c, x_t)
    scale, variance = forward_kernel(x, alpha_bar, bandwidth, bank_sigma)
    est = kernel_estimate(x, bank, scale, variance, True, chunk_size, bank_sq_norms=bank_sq_norms)
    if bank_sigma is None:
        return est
    return KernelEstimate(kde_posterior_mean(x, est.mean, scale, variance, bank_sigma), est.log_mass)
