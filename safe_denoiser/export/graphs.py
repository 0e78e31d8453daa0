"""The PyTorch modules that are traced into the bundle's ONNX graphs.

``DenoiserStep`` is one guided, corrected denoising step, everything between the sampler's x_t and its update:

1. one UNet call on the CFG batch [uncond; cond] (plus SLD's safety-concept branch: [uncond; cond; safety], built
   by ``core.sld.append_safety_branch`` as ``SLDUNet`` builds it);
2. SLD's safety term (``core.sld.sld_guidance``) with its momentum as explicit state and the step index as an input,
   so the warm-up test is graph logic on each sample's real step;
3. classifier-free guidance (``correction.cfg_combine``);
4. the safe-denoiser correction (``step.theorem_correction`` or ``step.reference_correction``) with the negative
   bank as a constant (and, for the odds preset, the reference bank of Theorem 1's beta as a second constant). The
   timestep is a tensor, so the window test and the kernel-mass gate are graph logic (``torch.where``), evaluated
   per sample at run time rather than fixed when the graph is traced.

Inputs (B = the request batch; the UNet sees 2B or 3B):

=====================  ==================  ======================================================================
sample                 (B, C, H, W) f32    x_t in the VP form (for sigma samplers: the scaled model input)
timestep               (B,) f32            the UNet timestep (training-step units, 0..T-1)
alpha_bar              (B,) f32            alphas_cumprod[timestep] (sigma samplers: 1 / (1 + sigma^2))
class_labels           (B,) i64            demo model: digits 0..9 (10 = no class)
negative_class_labels  (B,) i64            demo model: the uncond branch's class (10 = null class)
prompt_embeds          (B, L, D) f32       text models: the prompt's text-encoder output
negative_prompt_embeds (B, L, D) f32       text models: the negative (or empty) prompt's output
guidance_scale         (B,) f32            CFG scale w: eps = eps_u + w (eps_c - eps_u)
noise                  (B, C, H, W) f32    reference preset only: fresh noise for the re-noise
sld_momentum           (B, C, H, W) f32    SLD only: momentum nu (zeros at the first step)
sld_step               (B,) i64            SLD only: the step index (SLD acts from its warm-up step on)
=====================  ==================  ======================================================================

Outputs: ``noise_pred`` (guided, corrected eps), ``sample_corrected`` (the x_t the sampler must step from: the
re-noised sample for the reference preset where it fired, else ``sample``), ``x0_hat`` (the denoised estimate of
those two), and with the correction ``correction_applied`` (B,) bool and ``kernel_log_mass`` (B,) f32; with SLD
``sld_momentum_out``. The sampler update is then plain DDIM/DDPM/... on (noise_pred, sample_corrected).

Constants that become named initializers (``BANK_INITIALIZER`` = "negative_bank" and its norms,
``REFERENCE_BANK_INITIALIZER`` = "reference_bank" and its norms, "reference_threshold", "sld_safety_embedding") are
passed to the module as extra trailing inputs during export, so that the exporter controls their names and storage;
called with the runtime inputs only, the module uses its own buffers.

``bank_dtype="float16"`` stores both banks rounded to float16 (half the bytes) and casts them to float32 inside the
graph: the kernel still accumulates in float32, and the float32 norms are those of the rounded values, so the graph
computes exactly the float32 correction of the rounded bank (``stored_bank``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from safe_denoiser.core.banks import PreparedBanks, bank_data_variance, data_radius, uses_data_radius
from safe_denoiser.core.correction import cfg_combine
from safe_denoiser.core.guidance import EnergyGuidance, OddsGuidance, ReferenceGuidance, SafeGuidance, TheoremGuidance
from safe_denoiser.core.kernel import bank_sq_norms
from safe_denoiser.core.parameterization import x0_from_eps
from safe_denoiser.core.sld import append_safety_branch, sld_guidance
from safe_denoiser.core.sld_config import SLDConfig
from safe_denoiser.core.step import reference_correction, theorem_correction
from safe_denoiser.runtime.contract import denoiser_names
from safe_denoiser.runtime.manifest import (
    BANK_DTYPES,
    BANK_INITIALIZER,
    BANK_NORMS_INITIALIZER,
    REFERENCE_BANK_INITIALIZER,
    REFERENCE_NORMS_INITIALIZER,
    BankDtype,
)

__all__ = [
    "BankScalars",
    "Conditioning",
    "DenoiserStep",
    "TextEncoderGraph",
    "VaeDecoderGraph",
    "bank_constants",
    "bank_scalars",
    "graph_banks",
    "register_banks",
    "stored_bank",
]

Conditioning = Literal["class_labels", "text"]
THRESHOLD_INITIALIZER = "reference_threshold"
SAFETY_INITIALIZER = "sld_safety_embedding"


def stored_bank(data: Tensor, bank_dtype: BankDtype = "float32") -> Tensor:
    """A bank as the graph stores it: a float32 copy, or rounded to float16 (``bank_dtype="float16"``)."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
    return data.detach().float().to(getattr(torch, bank_dtype)).clone()


def register_banks(
    module: nn.Module, bank: Tensor | None, reference_bank: Tensor | None, bank_dtype: BankDtype = "float32"
) -> None:
    """The banks as buffers ``bank`` / ``reference_bank`` (stored as ``bank_dtype``; empty when None) and their
    float32 squared norms ``bank_sq_norms`` / ``reference_sq_norms``, those of the stored values."""
    for name, data in (("bank", bank), ("reference_bank", reference_bank)):
        module.register_buffer(name, torch.empty(0) if data is None else stored_bank(data, bank_dtype))
    for name, stored in (("bank_sq_norms", "bank"), ("reference_sq_norms", "reference_bank")):
        values: Tensor = getattr(module, stored)
        module.register_buffer(name, bank_sq_norms(values.float()) if values.numel() else torch.empty(0))


class BankScalars(NamedTuple):
    """The banks' scalar constants that a step reads, traced into the graph (``PreparedBanks``' fields): the data
    variance of the odds at the denoised estimate (``odds_sigma``) and the data radius of the trust region
    (``trust_radius``); None where the guidance does not use them."""

    data_variance: float | None
    data_radius: float | None


def bank_scalars(guidance: SafeGuidance | None, module: nn.Module) -> BankScalars:
    """``BankScalars`` of the banks stored on ``module`` (``register_banks``' buffers, norms included) for
    ``guidance``."""
    buffers: dict[str, Tensor] = dict(module.named_buffers())
    bank, reference = buffers["bank"], buffers["reference_bank"]
    odds_at_estimate = isinstance(guidance, OddsGuidance) and guidance.odds_sigma is not None and reference.numel()
    variance = bank_data_variance(bank.float(), reference.float()) if odds_at_estimate else None
    stored = ((bank, buffers["bank_sq_norms"]), (reference, buffers["reference_sq_norms"]))
    present = [(values.float(), sq) for values, sq in stored if values.numel()]
    radius = data_radius(*present) if uses_data_radius(guidance) and present else None
    return BankScalars(variance, radius)


def bank_constants(module: nn.Module) -> dict[str, Tensor]:
    """The banks' initializer names -> the module's buffers (``register_banks``)."""
    names = {
        BANK_INITIALIZER: "bank",
        BANK_NORMS_INITIALIZER: "bank_sq_norms",
        REFERENCE_BANK_INITIALIZER: "reference_bank",
        REFERENCE_NORMS_INITIALIZER: "reference_sq_norms",
    }
    return {k: getattr(module, v) for k, v in names.items()}


def _widen(bank: Tensor, like: Tensor) -> Tensor:
    """A float16-stored bank in ``like``'s dtype (a Cast inside the graph); other banks as they are."""
    return bank.to(like.dtype) if bank.dtype == torch.float16 else bank


def graph_banks(
    module: nn.Module, consts: dict[str, Tensor], sample: Tensor, odds: bool, scalars: BankScalars
) -> PreparedBanks:
    """The banks as one step reads them (``register_banks``), with the traced constants ``scalars``.

    The constants fed to an exported graph, else the module's buffers; a float16-stored bank widened to the
    sample's dtype. Norms exist only as constants: eager calls compute them from the bank in the module's own dtype
    (a float64 reference run then has exact norms, not float32 ones cast up).
    """
    banks = {**bank_constants(module), **consts}  # what the graph is fed wins over the module's buffers
    bank = _widen(banks[BANK_INITIALIZER], sample)
    reference = _widen(banks[REFERENCE_BANK_INITIALIZER], sample) if odds else None
    return PreparedBanks.of_tensors(
        bank, consts.get(BANK_NORMS_INITIALIZER), reference, consts.get(REFERENCE_NORMS_INITIALIZER), *scalars
    )


class DenoiserStep(nn.Module):
    """UNet + SLD + CFG + safe-denoiser correction as one traceable step (see the module docstring).

    Args:
        unet: a diffusers UNet2DModel (class-conditional) or UNet2DConditionModel (text), epsilon prediction.
        conditioning: "class_labels" or "text".
        guidance: the correction's settings, or None (CFG only: no bank, no correction outputs).
        bank: (N, C, H, W) negative bank (required with ``guidance``).
        threshold: the reference preset's gate threshold (required with a reference ``guidance``).
        sld: SLD settings, or None; only with text conditioning.
        safety_embedding: (1, L, D) text-encoder output of SLD's safety concept (required with ``sld``).
        reference_bank: (M, C, H, W) reference bank of the odds preset (required with ``OddsGuidance``).
        bank_dtype: how both banks are stored, "float32" or "float16" (see the module docstring).
    """

    bank: Tensor
    bank_sq_norms: Tensor
    reference_bank: Tensor
    reference_sq_norms: Tensor
    threshold: Tensor
    safety_embedding: Tensor

    def __init__(
        self,
        unet: nn.Module,
        conditioning: Conditioning,
        guidance: SafeGuidance | None = None,
        bank: Tensor | None = None,
        threshold: float | None = None,
        sld: SLDConfig | None = None,
        safety_embedding: Tensor | None = None,
        reference_bank: Tensor | None = None,
        bank_dtype: BankDtype = "float32",
    ) -> None:
        super().__init__()
        if conditioning not in ("class_labels", "text"):
            raise ValueError(f"conditioning must be 'class_labels' or 'text', got {conditioning!r}")
        if guidance is not None and bank is None:
            raise ValueError("DenoiserStep: a bank is required when guidance is set")
        if guidance is not None and guidance.renoises and threshold is None:
            raise ValueError("DenoiserStep: the reference preset needs its threshold")
        if sld is not None and (conditioning != "text" or safety_embedding is None):
            raise ValueError("DenoiserStep: SLD needs text conditioning and the safety-concept embedding")
        odds = guidance is not None and guidance.needs_reference_bank
        if odds != (reference_bank is not None):
            raise ValueError("DenoiserStep: a reference bank is required with the odds preset and used only there")
        self.unet = unet
        self.conditioning = conditioning
        self.guidance = guidance
        self.sld = sld
        # Float32 (or float16-stored) constants: the correction accumulates in float32 even when the UNet runs in
        # float16; the norms are float32 and those of the stored (possibly rounded) values.
        register_banks(self, bank, reference_bank, bank_dtype)
        self.bank_scalars = bank_scalars(guidance, self)
        self.register_buffer("threshold", torch.tensor(float(threshold if threshold is not None else 0.0)))
        emb = torch.empty(0) if safety_embedding is None else safety_embedding.detach().float().clone()
        self.register_buffer("safety_embedding", emb)

    # ---- names --------------------------------------------------------------------------------------------
    @property
    def reference(self) -> bool:
        return self.guidance is not None and self.guidance.renoises

    @property
    def odds(self) -> bool:
        """Whether the correction's beta is Theorem 1's odds (the graph then holds the reference bank too)."""
        return self.guidance is not None and self.guidance.needs_reference_bank

    @property
    def input_names(self) -> list[str]:
        """Runtime inputs, in the order ``forward`` takes them (``contract.denoiser_names``, the runtimes' list)."""
        return self._names()[0]

    def _names(self) -> tuple[list[str], list[str]]:
        guided, sld = self.guidance is not None, self.sld is not None
        labels = self.conditioning == "class_labels"
        return denoiser_names("vp", class_labels=labels, guided=guided, renoises=self.reference, sld=sld)

    @property
    def constant_names(self) -> list[str]:
        """Inputs that the exporter turns into initializers (after the runtime inputs)."""
        names = []
        if self.guidance is not None:
            names += [BANK_INITIALIZER, BANK_NORMS_INITIALIZER]
        if self.odds:
            names += [REFERENCE_BANK_INITIALIZER, REFERENCE_NORMS_INITIALIZER]
        if self.reference:
            names.append(THRESHOLD_INITIALIZER)
        if self.sld is not None:
            names.append(SAFETY_INITIALIZER)
        return names

    def constants(self) -> list[Tensor]:
        """The values of ``constant_names``, in order."""
        values = {
            **bank_constants(self),
            THRESHOLD_INITIALIZER: self.threshold,
            SAFETY_INITIALIZER: self.safety_embedding,
        }
        return [values[k] for k in self.constant_names]

    @property
    def output_names(self) -> list[str]:
        return self._names()[1]

    # ---- the step -----------------------------------------------------------------------------------------
    def _unet(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The UNet in its weights' dtype; eps back in the sample's dtype (float32, or float64 for a reference)."""
        dtype = next(self.unet.parameters()).dtype
        if self.conditioning == "class_labels":
            out = self.unet(x.to(dtype), t, class_labels=cond, return_dict=False)[0]
        else:
            out = self.unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """One step; ``inputs`` are ``input_names`` (then optionally ``constant_names``), outputs ``output_names``."""
        names = self.input_names
        if len(inputs) not in (len(names), len(names) + len(self.constant_names)):
            raise ValueError(f"DenoiserStep expects inputs {names} (+ constants {self.constant_names})")
        x: dict[str, Tensor] = dict(zip(names, inputs, strict=False))
        consts = dict(zip(self.constant_names, inputs[len(names) :], strict=True)) if len(inputs) > len(names) else {}
        sample = x["sample"]
        banks = graph_banks(self, consts, sample, self.odds, self.bank_scalars)
        threshold = consts.get(THRESHOLD_INITIALIZER, self.threshold)
        safety = consts.get(SAFETY_INITIALIZER, self.safety_embedding)

        t, ab = x["timestep"], x["alpha_bar"]
        if self.conditioning == "class_labels":
            cond = torch.cat([x["negative_class_labels"], x["class_labels"]])
        else:
            cond = torch.cat([x["negative_prompt_embeds"], x["prompt_embeds"]])
        x_in, t_in = torch.cat([sample, sample]), torch.cat([t, t])
        if self.sld is not None:  # SLD's third branch, as SLDUNet batches it: [uncond; cond; safety]
            x_in, t_in, cond = (
                append_safety_branch(x_in),
                append_safety_branch(t_in),
                append_safety_branch(cond, safety),
            )
        eps_all = self._unet(x_in, t_in, cond)

        extra: list[Tensor] = []
        if self.sld is not None:
            eps_u, eps_c, eps_s = eps_all.chunk(3)
            term, momentum = sld_guidance(eps_u, eps_c, eps_s, x["sld_momentum"], x["sld_step"], self.sld)
            eps_c = eps_c - term
            extra.append(momentum)
        else:
            eps_u, eps_c = eps_all.chunk(2)
        eps = cfg_combine(eps_u, eps_c, x["guidance_scale"])

        g = self.guidance
        if g is None:
            x_out = sample
            record: list[Tensor] = []
        elif isinstance(g, (TheoremGuidance, EnergyGuidance)):  # every preset that corrects eps at fixed x_t
            eps, rec = theorem_correction(eps, sample, ab, t, banks, g)
            x_out = sample
            record = [rec.applied, rec.log_mass]
        else:
            assert isinstance(g, ReferenceGuidance)
            x_out, rec = reference_correction(eps, sample, ab, t, banks, g, threshold, x["noise"])
            record = [rec.applied, rec.log_mass]
        x0 = x0_from_eps(x_out, eps, ab)
        return (eps, x_out, x0, *record, *extra)


class TextEncoderGraph(nn.Module):
    """Prompt token ids (B, L) int64 -> the text encoder's last hidden state (B, L, D) float32."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    input_names: ClassVar[list[str]] = ["input_ids"]
    output_names: ClassVar[list[str]] = ["last_hidden_state"]

    def forward(self, input_ids: Tensor) -> Tensor:
        """What ``StableDiffusionPipeline.encode_prompt`` takes: ``text_encoder(ids)[0]``."""
        out: Any = self.text_encoder(input_ids)
        return out[0].float()


class VaeDecoderGraph(nn.Module):
    """The sampler's final latents (B, 4, h, w) -> image (B, 3, H, W) in [-1, 1] (scaling factor applied inside)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    input_names: ClassVar[list[str]] = ["latents"]
    output_names: ClassVar[list[str]] = ["image"]

    def forward(self, latents: Tensor) -> Tensor:
        """``vae.decode(latents / scaling_factor).sample`` as the pipelines do it."""
        dtype = next(self.vae.parameters()).dtype
        out: Any = self.vae.decode((latents / self.scaling_factor).to(dtype), return_dict=False)
        return out[0].float()
