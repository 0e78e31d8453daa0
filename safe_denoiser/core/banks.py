"""``PreparedBanks``: what one correction reads, prepared once and passed whole.

The negative bank, the reference bank that the odds preset needs, each holding its squared norms (``NegativeBank``),
their pooled data variance (the conditional odds' prior, ``OddsGuidance.odds_sigma``) and their data radius (the
largest item norm, the unit of the trust region ``TheoremGuidance.trust_radius``), on the model's device.
Built once at attach or export; the sampling loop never re-derives any of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from safe_denoiser.core.bank import NegativeBank, _data_key
from safe_denoiser.core.guidance import OddsGuidance, SafeGuidance, TheoremGuidance
from safe_denoiser.core.kernel import bank_sq_norms

__all__ = ["PreparedBanks", "bank_data_variance", "data_radius", "uses_data_radius"]


@dataclass(frozen=True)
class PreparedBanks:
    """The banks of one guidance: ``negative`` always, ``reference`` exactly when the preset reads one, the data
    variance exactly when the conditional odds need it and the data radius exactly when the trust region does. Build
    with ``prepare``."""

    negative: NegativeBank
    reference: NegativeBank | None = None
    data_variance: float | None = None
    data_radius: float | None = None

    @classmethod
    def prepare(
        cls,
        negative: NegativeBank | Tensor | PreparedBanks,
        guidance: SafeGuidance,
        reference: NegativeBank | Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PreparedBanks:
        """Validate the banks for ``guidance``, move them to ``device`` / ``dtype`` (a half-precision bank stays half:
        half the bytes per step, the kernel accumulates in float32) and compute their constants once.

        ``negative`` may be banks prepared before (e.g. on the CPU, before the pipeline's layout and device were
        known): their data variance is kept, not derived again (it does not depend on the layout, a permutation).
        """
        variance = radius = None
        if isinstance(negative, PreparedBanks):
            if reference is not None:
                raise ValueError("give the reference bank inside the PreparedBanks, not beside it")
            prepared = negative
            negative, reference = prepared.negative, prepared.reference
            variance, radius = prepared.data_variance, prepared.data_radius
        if guidance.needs_reference_bank and reference is None:
            raise ValueError(f"the {guidance.preset} preset needs a reference bank (safe or unlabelled data)")
        neg = _moved(negative, device, dtype, "bank")
        ref = _moved(reference, device, dtype, "reference bank") if guidance.needs_reference_bank else None
        if ref is not None and ref.sample_shape != neg.sample_shape:
            raise ValueError(f"reference bank items {ref.sample_shape} do not match the bank's {neg.sample_shape}")
        if not (isinstance(guidance, OddsGuidance) and guidance.odds_sigma is not None):
            variance = None
        elif variance is None:
            assert ref is not None
            variance = bank_data_variance(neg.data, ref.data)
        return cls(neg, ref, variance, _radius((neg, ref), guidance, radius))

    @classmethod
    def of_tensors(
        cls,
        negative: Tensor,
        negative_sq_norms: Tensor | None = None,
        reference: Tensor | None = None,
        reference_sq_norms: Tensor | None = None,
        data_variance: float | None = None,
        data_radius: float | None = None,
    ) -> PreparedBanks:
        """Banks a traced graph holds (constants or inputs, already checked at export): no validation, which would
        read values on the host; norms None are computed from the values on first use."""
        ref = None if reference is None else _unchecked(reference, reference_sq_norms)
        return cls(_unchecked(negative, negative_sq_norms), ref, data_variance, data_radius)

    def relaid(self, layout: Callable[[NegativeBank, str], NegativeBank]) -> PreparedBanks:
        """The same banks in another layout (``layout(bank, "bank" | "reference bank")``), data variance kept: it
        is a mean over coordinates, which a layout only permutes."""
        ref = None if self.reference is None else layout(self.reference, "reference bank")
        return PreparedBanks(layout(self.negative, "bank"), ref, self.data_variance, self.data_radius)

    def to(self, device: torch.device | str) -> PreparedBanks:
        """The same banks on another device (norms move with them)."""
        ref = None if self.reference is None else self.reference.to(device)
        return PreparedBanks(self.negative.to(device), ref, self.data_variance, self.data_radius)

    @property
    def device(self) -> torch.device:
        return self.negative.data.device


def _radius(
    banks: tuple[NegativeBank, NegativeBank | None], guidance: SafeGuidance, kept: float | None
) -> float | None:
    """The banks' data radius when ``guidance`` has a trust region (kept from banks prepared before: a norm does
    not depend on the layout, a permutation, or the device), else None."""
    if not uses_data_radius(guidance):
        return None
    if kept is not None:
        return kept
    return data_radius(*[(b.data, b.sq_norms) for b in banks if b is not None])


def uses_data_radius(guidance: SafeGuidance | None) -> bool:
    """Whether ``guidance`` reads the banks' data radius (a theorem preset with a trust region)."""
    return isinstance(guidance, TheoremGuidance) and guidance.trust_radius is not None


def data_radius(*banks: tuple[Tensor, Tensor | None]) -> float:
    """The unit of the trust region: the largest item norm over the banks ((values, squared norms or None) each),
    the radius of the ball around the origin that holds the data they sample. An all-zero bank has none: refused."""
    largest = max(float((bank_sq_norms(v) if sq is None else sq).max()) for v, sq in banks)
    if not largest > 0.0:
        raise ValueError("the banks' items are all zero: no data radius for TheoremGuidance.trust_radius (set None)")
    return largest**0.5


def _unchecked(data: Tensor, sq_norms: Tensor | None) -> NegativeBank:
    bank = NegativeBank.__new__(NegativeBank)
    bank.data, bank.metadata = data, {}
    bank._norms = None if sq_norms is None else (_data_key(data), sq_norms)
    return bank


def _moved(
    bank: NegativeBank | Tensor | None, device: torch.device | str | None, dtype: torch.dtype | None, name: str
) -> NegativeBank:
    if isinstance(bank, Tensor):
        bank = NegativeBank.from_tensor(bank)  # validates: float, (N, ...), non-empty, finite
    if not isinstance(bank, NegativeBank):
        raise TypeError(f"{name} must be a NegativeBank or a tensor, got {type(bank).__name__}")
    if dtype is not None and bank.data.dtype in (torch.float16, torch.bfloat16):
        dtype = bank.data.dtype
    return bank.to(device=device, dtype=dtype)


def bank_data_variance(*banks: Tensor, chunk_rows: int = 4096) -> float:
    """The data's variance per coordinate, sigma_d^2: the per-coordinate variance over the union of the banks' items,
    averaged over coordinates. A constant of the banks, computed once at attach or export: two chunked float64
    passes (mean, then squared deviations), so a large or memory-mapped bank is never copied whole."""
    n = sum(b.shape[0] for b in banks)
    if n < 2:
        raise ValueError("a data variance needs at least 2 bank items")

    def chunks() -> Iterator[Tensor]:
        for b in banks:
            flat = b.reshape(b.shape[0], -1)
            for i in range(0, flat.shape[0], chunk_rows):
                yield flat[i : i + chunk_rows].double()

    d = banks[0][0].numel()
    total = torch.zeros(d, dtype=torch.float64, device=banks[0].device)
    for c in chunks():
        total += c.sum(dim=0)
    mean, squares = total / n, torch.zeros_like(total)
    for c in chunks():
        squares += (c - mean).square().sum(dim=0)
    return float((squares / (n - 1)).mean())
