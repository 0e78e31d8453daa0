"""The traced step of rectified-flow models (SD3, Flux with ``FlowMatchEulerDiscreteScheduler``).

``FlowDenoiserStep`` is one guided, corrected step between the sampler's x_t and its Euler update: the transformer
(SD3: on the CFG batch [negative; prompt], then CFG; Flux: one call with the embedded guidance scale, as FLUX.1-dev
samples), then the safe-denoiser correction of the velocity u = eps - x0 in its own space
(``core.step.path_correction`` on ``flow_path(sigma)``) with the negative bank as a constant (and, for the odds preset,
the reference bank of Theorem 1's beta as a second one, packed like the negative bank). ``sigma`` is an input:
the schedule (shift, Flux's dynamic shifting ``mu``) is host-side work (``export.flow_sampler``).

Inputs (B = the request batch):

============================== =================== ====================================================
sample                         (B, C, h, w) f32    SD3: the latents; Flux: packed latents (B, h w / 4, 4 C)
timestep                       (B,) f32            the scheduler's timestep (sigma x num_train_timesteps)
sigma                          (B,) f32            the scheduler's sigma at this step
prompt_embeds                  (B, L, D) f32       the pipeline's ``encode_prompt`` output
pooled_prompt_embeds           (B, P) f32          its pooled output
negative_prompt_embeds         (B, L, D) f32       SD3 only
negative_pooled_prompt_embeds  (B, P) f32          SD3 only
guidance_scale                 (B,) f32            SD3: CFG scale; Flux: the guidance embedding's value
============================== =================== ====================================================

Outputs: ``noise_pred`` (the corrected velocity; the Euler step is x + (sigma_next - sigma) u), ``x0_hat``
(x - sigma u), with the correction ``correction_applied`` (B,) bool and ``kernel_log_mass`` (B,) f32. Flux's
image position ids depend only on the sample shape (fixed by the bank): a constant; its text ids are zeros.

Two things stop the legacy exporter on Flux's transformer, both worked around here: it has no symbolic for
``aten::rms_norm`` (the query/key norms) at opset 17 or 18, so ``register_rms_norm`` adds one (x / sqrt(mean(x^2) +
eps) * weight, the operator's definition); and diffusers' ``apply_rotary_emb`` reshapes with the traced batch size
baked in as a constant (``x.reshape(*x.shape[:-1], -1, 2)``), so a graph traced at batch 2 fails at batch 3:
``traceable_rotary`` swaps in the same values by strided slicing (x[..., 0::2], x[..., 1::2]) while tracing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from safe_denoiser.core.correction import cfg_combine
from safe_denoiser.core.guidance import EnergyGuidance, SafeGuidance, TheoremGuidance
from safe_denoiser.core.paths import flow_path, x0_from_prediction
from safe_denoiser.core.step import path_correction
from safe_denoiser.runtime.contract import denoiser_names
from safe_denoiser.runtime.manifest import (
    BANK_INITIALIZER,
    BANK_NORMS_INITIALIZER,
    REFERENCE_BANK_INITIALIZER,
    REFERENCE_NORMS_INITIALIZER,
    BankDtype,
)

from .graphs import bank_constants, bank_scalars, graph_banks, register_banks

__all__ = ["FlowDenoiserStep", "FlowFamily", "flow_family", "register_rms_norm", "traceable_rotary"]

FlowFamily = Literal["sd3", "flux"]


def flow_family(pipe: Any) -> FlowFamily | None:
    """ "sd3" or "flux" for a flow-matching pipeline with a transformer, None for anything else."""
    if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or getattr(pipe, "transformer", None) is None:
        return None
    return "flux" if hasattr(type(pipe), "_pack_latents") else "sd3"


class FlowDenoiserStep(nn.Module):
    """Transformer + (CFG) + velocity correction as one traceable step (see the module docstring).

    Args:
        transformer: ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        family: "sd3" or "flux".
        guidance: the correction's settings (theorem preset), or None (no bank, no correction outputs).
        bank: the negative bank in the space the scheduler steps (Flux: packed, (N, h w / 4, 4 C)).
        image_ids: Flux's image position ids (h w / 4, 3) (required for "flux"); its text ids are zeros.
        reference_bank: the odds preset's reference bank, in the bank's space (required with ``OddsGuidance``).
        bank_dtype: how both banks are stored, "float32" or "float16" (cast to the sample's dtype in the graph).
    """

    bank: Tensor
    bank_sq_norms: Tensor
    reference_bank: Tensor
    reference_sq_norms: Tensor
    image_ids: Tensor

    def __init__(
        self,
        transformer: nn.Module,
        family: FlowFamily,
        guidance: SafeGuidance | None = None,
        bank: Tensor | None = None,
        image_ids: Tensor | None = None,
        reference_bank: Tensor | None = None,
        bank_dtype: BankDtype = "float32",
    ) -> None:
        super().__init__()
        if family not in ("sd3", "flux"):
            raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
        if guidance is not None and (bank is None or not isinstance(guidance, (TheoremGuidance, EnergyGuidance))):
            raise ValueError("FlowDenoiserStep: the correction needs a bank and a preset other than reference")
        if family == "flux" and image_ids is None:
            raise ValueError("FlowDenoiserStep: Flux needs its image position ids")
        if (guidance is not None and guidance.needs_reference_bank) != (reference_bank is not None):
            raise ValueError("FlowDenoiserStep: a reference bank is required with the odds preset and used only there")
        self.transformer = transformer
        self.family = family
        self.guidance = guidance
        register_banks(self, bank, reference_bank, bank_dtype)
        self.bank_scalars = bank_scalars(guidance, self)
        self.register_buffer("image_ids", torch.empty(0) if image_ids is None else image_ids.detach().clone())

    @property
    def odds(self) -> bool:
        """Whether the correction's beta is Theorem 1's odds (the graph then holds the reference bank too)."""
        return self.guidance is not None and self.guidance.needs_reference_bank

    @property
    def input_names(self) -> list[str]:
        """Runtime inputs, in the order ``forward`` takes them (``contract.denoiser_names``, the runtimes' list)."""
        return denoiser_names("flow", sd3=self.family == "sd3", guided=self.guidance is not None)[0]

    @property
    def constant_names(self) -> list[str]:
        """Inputs that the exporter turns into initializers (after the runtime inputs)."""
        names = [BANK_INITIALIZER, BANK_NORMS_INITIALIZER] if self.guidance is not None else []
        return names + ([REFERENCE_BANK_INITIALIZER, REFERENCE_NORMS_INITIALIZER] if self.odds else [])

    def constants(self) -> list[Tensor]:
        """The values of ``constant_names``, in order."""
        values = bank_constants(self)
        return [values[k] for k in self.constant_names]

    @property
    def output_names(self) -> list[str]:
        return denoiser_names("flow", sd3=self.family == "sd3", guided=self.guidance is not None)[1]

    def _velocity(self, x: dict[str, Tensor]) -> Tensor:
        """The (guided) velocity, as the SD3 / Flux pipelines compute it, in float32."""
        dtype = next(self.transformer.parameters()).dtype
        sample, t = x["sample"], x["timestep"]
        if self.family == "flux":
            out = self.transformer(
                hidden_states=sample.to(dtype),
                timestep=t / 1000,
                guidance=x["guidance_scale"],
                pooled_projections=x["pooled_prompt_embeds"].to(dtype),
                encoder_hidden_states=x["prompt_embeds"].to(dtype),
                txt_ids=x["prompt_embeds"].new_zeros(x["prompt_embeds"].shape[1], 3),  # traced: length stays dynamic
                img_ids=self.image_ids,
                return_dict=False,
            )[0]
            return out.to(sample.dtype)
        out = self.transformer(
            hidden_states=torch.cat([sample, sample]).to(dtype),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([x["negative_prompt_embeds"], x["prompt_embeds"]]).to(dtype),
            pooled_projections=torch.cat([x["negative_pooled_prompt_embeds"], x["pooled_prompt_embeds"]]).to(dtype),
            return_dict=False,
        )[0]
        u_neg, u_pos = out.to(sample.dtype).chunk(2)
        return cfg_combine(u_neg, u_pos, x["guidance_scale"])

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """One step; ``inputs`` are ``input_names`` (then optionally ``constant_names``), outputs ``output_names``."""
        names = self.input_names
        if len(inputs) not in (len(names), len(names) + len(self.constant_names)):
            raise ValueError(f"FlowDenoiserStep expects inputs {names} (+ constants {self.constant_names})")
        x = dict(zip(names, inputs, strict=False))
        consts = dict(zip(self.constant_names, inputs[len(names) :], strict=True)) if len(inputs) > len(names) else {}
        banks = graph_banks(self, consts, x["sample"], self.odds, self.bank_scalars)
        u = self._velocity(x)
        path = flow_path(x["sigma"])
        record: list[Tensor] = []
        if isinstance(self.guidance, (TheoremGuidance, EnergyGuidance)):
            u, rec = path_correction(u, x["sample"], path, "flow", x["timestep"], banks, self.guidance)
            record = [rec.applied, rec.log_mass]
        return (u, x0_from_prediction(x["sample"], u, path, "flow"), *record)


def _rms_norm_symbolic(opset: int) -> Any:
    """An ONNX symbolic for aten::rms_norm(x, normalized_shape, weight, eps) at ``opset``."""

    def symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
        from torch.onnx import symbolic_helper as sh

        axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
        eps_value = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
        if eps_value is None or not isinstance(eps_value, float):  # F.rms_norm's default: the dtype's eps
            eps_value = float(torch.finfo(torch.float32).eps)
        square = g.op("Mul", x, x)
        if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
            mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        eps_const = g.op("CastLike", g.op("Constant", value_t=torch.tensor(eps_value)), mean)
        out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_const)))
        return out if sh._is_none(weight) else g.op("Mul", out, weight)

    return symbolic


def register_rms_norm(opset: int) -> None:
    """Give the legacy exporter a symbolic for ``aten::rms_norm`` at ``opset`` (idempotent)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic(opset), opset)


def _rotary_by_slicing(original: Any) -> Any:
    """``apply_rotary_emb`` with the real/imaginary split done by slicing (the same values, no baked shape)."""

    def apply(
        x: Tensor, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2
    ) -> Tensor:
        if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis
        index = (None, slice(None), None, slice(None)) if sequence_dim == 1 else (None, None, slice(None), slice(None))
        cos, sin = cos[index].to(x.device), sin[index].to(x.device)
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(3)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    return apply


@contextmanager
def traceable_rotary() -> Iterator[None]:
    """While tracing, Flux's attention applies rotary embeddings without a batch-size constant (module docstring)."""
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary_by_slicing(original)
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
