"""Attach the safe denoiser to an existing diffusers pipeline: ``attach(pipe, bank, guidance)`` / ``detach(pipe)``.

Design: a scheduler wrapper. Every diffusers pipeline ends each denoising step with
``scheduler.step(model_output, t, x_t)``, where ``model_output`` is the *final* prediction (after classifier-free
guidance, guidance rescale, SLD, negative prompts, ...) and ``x_t`` the current sample. That call is the one place
that sees exactly what the theorem needs, for any pipeline, so ``attach`` replaces ``pipe.scheduler`` by a
``SafeScheduler`` that

* delegates every attribute read and write to the wrapped scheduler (``config``, ``timesteps``, ``order``,
  ``init_noise_sigma``, ``scale_model_input``, ``add_noise``, ...) and reports the wrapped class as its
  ``__class__``, so ``isinstance`` checks in pipelines behave as with the bare scheduler;
* overrides ``step`` only: inside the timestep window it corrects the noise prediction (constant, mass and odds
  presets: eps <- eps + beta (eps - eps_unsafe)) or re-noises a corrected x0_hat with fresh noise from the pipeline's
  generator (``reference`` preset), then calls the wrapped ``step`` unchanged. ``step`` accepts ``eta`` and
  ``generator`` whatever the wrapped scheduler takes (the pipeline inspects the signature to decide what to pass)
  and forwards only what the wrapped scheduler accepts; the generator is needed for the reference re-noise even
  with PNDM and LMS, whose ``step`` takes none;
* overrides ``set_timesteps`` (and ``set_begin_index``) to refresh host-side copies of the schedule, so that the
  window test reads a host timestep without a device sync: ``float(t)`` for CPU timesteps, else the cached
  schedule at the current position (the scheduler's own ``step_index`` for Euler/LMS/DPM-Solver, a call counter
  for DDIM/DDPM/PNDM).

The pipeline's code is not copied or patched: ``StableDiffusionPipeline.__call__`` (and img2img, ...) runs
unchanged. ``pipe.config`` keeps naming the wrapped scheduler (the attribute is set without re-registering it), so
``save_pretrained`` on an attached pipeline writes the plain pipeline. ``detach`` puts the original scheduler back.

Parameterisations. DDIM, DDPM, PNDM and DPM-Solver++ sample in the VP form x_t = sqrt(abar) x0 + sqrt(1-abar) eps
with abar = alphas_cumprod[t] (DPM-Solver: abar = 1/(1+sigma^2) from its own ``sigmas[step_index]``, identical
for the default spacing and consistent with the solver's conversions otherwise). Euler, Euler-ancestral and LMS
sample in the sigma form x = x0 + sigma eps (x_VP = x / sqrt(1+sigma^2), abar = 1/(1+sigma^2)) and their model
output is the prediction for the scaled (= VP) input. ``v_prediction`` outputs are converted to eps and the change
is mapped back linearly (dv = d_eps / sqrt(abar) at fixed x), so a closed gate leaves every bit unchanged.

Flow matching (FlowMatchEulerDiscreteScheduler: SD3, Flux, with any shift or dynamic shifting, which only move the
sigmas): the sample is x = (1 - sigma) x0 + sigma eps and the model output the velocity u = eps - x0. The kernel and
beta are evaluated on the equivalent VP sample and the velocity is corrected in its own space,
u <- u + beta (u - u_unsafe) (``core.step.path_correction``; exact also at sigma = 1, where eps carries none of it).
The reference preset is refused there (its threshold and re-noising are defined on the DDPM schedule). Flux packs
its latents into 2x2 patches, (B, C, h, w) -> (B, h w / 4, 4 C): ``attach`` packs an unpacked bank the same way, so
the bank lives in the space of the sample the scheduler steps (packing permutes coordinates, so kernel distances
and the correction are those of the unpacked latents).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.guidance import (
    ConstantGuidance,
    EnergyGuidance,
    PredictionGuidance,
    ReferenceGuidance,
    SafeGuidance,
    TheoremGuidance,
)
from safe_denoiser.core.kernel import accumulation_dtype
from safe_denoiser.core.parameterization import eps_from_v
from safe_denoiser.core.paths import flow_path
from safe_denoiser.core.step import (
    THRESHOLD_SEED,
    StepRecord,
    path_correction,
    reference_correction,
    reference_threshold,
    theorem_correction,
)
from safe_denoiser.diffusers.bank_layout import denoiser_network, in_sample_space
from safe_denoiser.diffusers.scheduler_registry import SUPPORTED_SCHEDULERS, Kind

__all__ = ["SUPPORTED_SCHEDULERS", "SafeScheduler", "StepTrace", "attach", "detach"]

SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")


class StepTrace(NamedTuple):
    """One step's record: the host timestep and what the correction did (device tensors, no sync).

    ``record.delta_norm`` is measured in VP terms whatever the scheduler: the change of eps (constant, mass and odds
    presets, also for v-prediction models) or of x_t_VP = x / sqrt(1 + sigma^2) (reference preset).
    """

    timestep: float
    record: StepRecord


def _scheduler_kind(scheduler: Any) -> Kind:
    """The parameterisation of a supported scheduler, or a ValueError naming what is supported."""
    import diffusers

    cls = type(scheduler)
    name = cls.__name__
    if name not in SUPPORTED_SCHEDULERS or getattr(diffusers, name, None) is not cls:
        raise ValueError(
            f"safe denoiser: unsupported scheduler {cls.__module__}.{cls.__qualname__}; supported: "
            f"{', '.join(sorted(SUPPORTED_SCHEDULERS))} (diffusers classes, not subclasses)"
        )
    cfg = scheduler.config
    if SUPPORTED_SCHEDULERS[name] == "flow":
        if cfg.get("invert_sigmas", False):
            raise ValueError(f"safe denoiser: {name} with invert_sigmas=True is not supported (sigma must fall)")
        return "flow"
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in SUPPORTED_PREDICTIONS:
        raise ValueError(
            f"safe denoiser: unsupported prediction_type {prediction!r} of {name}; supported: "
            f"{', '.join(SUPPORTED_PREDICTIONS)}"
        )
    if cfg.get("use_flow_sigmas", False):
        raise ValueError(f"safe denoiser: {name} with use_flow_sigmas=True (flow matching) is not supported")
    if cfg.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(
            f"safe denoiser: {name} with a learned variance (model output of 2x channels) is not supported"
        )
    return SUPPORTED_SCHEDULERS[name]


def _guidance(guidance: SafeGuidance | str | None) -> SafeGuidance:
    if guidance is None:
        return ConstantGuidance()
    if isinstance(guidance, str):
        return SafeGuidance.from_dict({"preset": guidance})
    if not isinstance(guidance, SafeGuidance):
        raise TypeError(f"guidance must be a SafeGuidance, got {type(guidance).__name__}")
    return guidance


class SafeScheduler:
    """A diffusers scheduler whose ``step`` applies the safe-denoiser correction first (see the module docstring).

    ``records`` holds one ``StepTrace`` per step of the last sampling call when ``record=True`` (reset by
    ``set_timesteps``); with ``record=False`` nothing is kept and steps outside the window cost nothing.
    """

    # The wrapper's own attributes (annotations only, set in __init__); every other name is the scheduler's.
    scheduler: Any
    banks: PreparedBanks
    guidance: SafeGuidance
    record: bool
    records: list[StepTrace]
    _kind: Kind
    _prediction: str
    _step_params: frozenset[str]
    _alphas_cumprod: Tensor
    _host_timesteps: Tensor | None
    _host_sigmas: Tensor | None
    _calls: int
    _begin: int
    _threshold: float | None
    _threshold_cache: dict[float, float]

    def __init__(
        self,
        scheduler: Any,
        banks: PreparedBanks | NegativeBank | Tensor,
        guidance: SafeGuidance | str | None = None,
        *,
        record: bool = False,
    ) -> None:
        import inspect

        if isinstance(scheduler, SafeScheduler):
            raise ValueError("the scheduler is already a SafeScheduler: detach it first")
        guidance = _guidance(guidance)
        if not isinstance(banks, PreparedBanks):
            banks = PreparedBanks.prepare(banks, guidance)
        kind = _scheduler_kind(scheduler)
        if kind == "flow" and guidance.renoises:
            raise ValueError(
                f"safe denoiser: the reference preset is defined on the DDPM schedule; with flow matching"
                f" ({type(scheduler).__name__}) use another preset (constant, mass, odds, sgf, shielded)"
            )
        own = {
            "scheduler": scheduler,
            "_kind": kind,
            "_prediction": "flow" if kind == "flow" else scheduler.config.get("prediction_type", "epsilon"),
            "_step_params": frozenset(inspect.signature(scheduler.step).parameters),
            "banks": banks,
            "guidance": guidance,
            "record": bool(record),
            "records": [],
            # Host copy: DDIM/DDPM move alphas_cumprod to the sample's device inside add_noise/get_velocity.
            "_alphas_cumprod": (
                torch.empty(0, dtype=torch.float64)
                if kind == "flow"
                else scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
            ),
            "_host_timesteps": None,
            "_host_sigmas": None,
            "_calls": 0,
            "_begin": 0,
            "_threshold": None,
            "_threshold_cache": {},
        }
        for name, value in own.items():
            object.__setattr__(self, name, value)
        # Pipelines read set_timesteps' signature (retrieve_timesteps: "sigmas", "timesteps"; Flux passes mu): show
        # the wrapped scheduler's own.
        object.__setattr__(self, "set_timesteps", _with_signature(self.set_timesteps, scheduler.set_timesteps))
        if getattr(scheduler, "timesteps", None) is not None and getattr(scheduler, "num_inference_steps", None):
            self._refresh_schedule()

    # ---- delegation ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper; guard against recursion before __init__ finished.
        if name == "scheduler" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "scheduler"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # isinstance(wrapper, DDIMScheduler) holds, as for the bare scheduler (type(wrapper) stays SafeScheduler).
        return type(self.scheduler)

    def __repr__(self) -> str:
        return (
            f"SafeScheduler({type(self.scheduler).__name__}, bank={tuple(self.banks.negative.data.shape)}, "
            f"guidance={self.guidance!r}, record={self.record})"
        )

    # ---- schedule bookkeeping (host side, once per sampling call) -----------------------------------------------
    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped ``set_timesteps``, then refresh host copies of the schedule and reset per-call state."""
        self.scheduler.set_timesteps(*args, **kwargs)
        self._refresh_schedule()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Img2img pipelines start mid-schedule; DDIM/DDPM/PNDM have no begin index, so the wrapper keeps one."""
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin_index)
        self._begin = int(begin_index)

    def _refresh_schedule(self) -> None:
        s = self.scheduler
        self._host_timesteps = s.timesteps.detach().to("cpu", torch.float64)
        sigmas = getattr(s, "sigmas", None)
        self._host_sigmas = sigmas.detach().to("cpu", torch.float64) if isinstance(sigmas, Tensor) else None
        self._calls = 0
        self._begin = 0
        self.records = []
        if self.guidance.renoises:
            self._threshold = self._reference_threshold()

    def _reference_threshold(self) -> float:
        """ReferenceGuidance.threshold, else the bank's minimum kernel sum at the schedule's last timestep (cached)."""
        g = self.guidance
        assert isinstance(g, ReferenceGuidance) and self._host_timesteps is not None
        if g.threshold is not None:
            return g.threshold
        ab_last = float(self._alphas_cumprod[round(float(self._host_timesteps[-1]))])
        if ab_last not in self._threshold_cache:
            bank = self.banks.negative.data
            gen = torch.Generator(device=bank.device).manual_seed(THRESHOLD_SEED)
            self._threshold_cache[ab_last] = reference_threshold(bank, g.kernel_sigma, ab_last, gen)
        return float(self._threshold_cache[ab_last])

    def _position(self, timestep: float | Tensor) -> int:
        """Index of the current step in ``timesteps`` (host ints only, except one lookup in a trajectory's first
        step when a sigma scheduler has neither step nor begin index: the lookup it performs itself right after)."""
        s = self.scheduler
        if self._kind == "vp":
            return self._begin + self._calls
        if s.step_index is not None:
            return int(s.step_index)
        if s.begin_index is not None:
            return int(s.begin_index)
        return int(s.index_for_timestep(timestep))

    def _host_timestep(self, timestep: float | Tensor) -> float:
        if not isinstance(timestep, Tensor) or timestep.device.type == "cpu":
            return float(timestep)
        if self._host_timesteps is None:
            raise RuntimeError("SafeScheduler: call set_timesteps through the wrapper before step")
        return float(self._host_timesteps[self._position(timestep)])

    def _noise_level(self, t_host: float, timestep: float | Tensor) -> tuple[float, float]:
        """(abar, c) with x_VP = c * sample: c = 1 for VP samplers, sqrt(abar) for sigma-form samplers."""
        if self._kind == "vp":
            return float(self._alphas_cumprod[round(t_host)]), 1.0
        if self._host_sigmas is None:
            raise RuntimeError("SafeScheduler: call set_timesteps through the wrapper before step")
        sigma = float(self._host_sigmas[self._position(timestep)])
        ab = 1.0 / (1.0 + sigma * sigma)
        return ab, (math.sqrt(ab) if self._kind == "sigma" else 1.0)

    def _banks_on(self, like: Tensor) -> PreparedBanks:
        if self.banks.device != like.device:  # the pipeline moved after attach: follow it once
            self.banks = self.banks.to(like.device)
        return self.banks

    # ---- the correction ---------------------------------------------------------------------------------
    def correct(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The (model_output, sample) that the wrapped ``step`` should receive at this step.

        Outside the window both come back untouched (and nothing is computed unless recording).
        """
        from diffusers.utils.torch_utils import randn_tensor

        g = self.guidance
        t_host = self._host_timestep(timestep)
        in_window = g.in_window(t_host)
        if not in_window and not self.record:
            return model_output, sample
        banks = self._banks_on(sample)
        t_dev = timestep if isinstance(timestep, Tensor) else t_host
        if self._kind == "flow":
            assert isinstance(g, (TheoremGuidance, EnergyGuidance))
            return self._correct_flow(model_output, timestep, t_dev, sample, banks, g, in_window, t_host), sample
        ab, c = self._noise_level(t_host, timestep)
        x = sample if c == 1.0 else sample * c
        v_pred = self._prediction == "v_prediction"
        eps = eps_from_v(x, model_output, ab) if v_pred else model_output
        # The window mask in the core reads the device-side timestep: no host<->device copy.
        if isinstance(g, (TheoremGuidance, EnergyGuidance)):
            new_eps, rec = theorem_correction(eps, x, ab, t_dev, banks, g)
            if in_window:
                # eps-space change mapped to the model's output; zero where the gate is closed (bit-exact no-op).
                model_output = model_output + (new_eps - eps) / math.sqrt(ab) if v_pred else new_eps
        else:
            assert isinstance(g, ReferenceGuidance)
            if in_window:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            else:  # recording only: the mask is closed, so the noise is never used (and no RNG draw is made)
                noise = torch.zeros_like(sample)
            threshold = self._threshold_tensor(x)
            new_x, rec = reference_correction(eps, x, ab, t_dev, banks, g, threshold, noise)
            if in_window:
                sample = new_x if c == 1.0 else sample + (new_x - x) / c
        if self.record:
            self.records.append(StepTrace(t_host, rec))
        return model_output, sample

    def _correct_flow(
        self,
        velocity: Tensor,
        timestep: float | Tensor,
        t_dev: float | Tensor,
        sample: Tensor,
        banks: PreparedBanks,
        guidance: PredictionGuidance,
        in_window: bool,
        t_host: float,
    ) -> Tensor:
        """The rectified-flow velocity u corrected in its own space (module docstring)."""
        if self._host_sigmas is None:
            raise RuntimeError("SafeScheduler: call set_timesteps through the wrapper before step")
        sigma = float(self._host_sigmas[self._position(timestep)])
        new_u, rec = path_correction(velocity, sample, flow_path(sigma), "flow", t_dev, banks, guidance)
        if self.record:
            self.records.append(StepTrace(t_host, rec))
        return new_u if in_window else velocity

    def _threshold_tensor(self, like: Tensor) -> Tensor:
        if self._threshold is None:
            self._threshold = self._reference_threshold()
        # A fill, not a host->device copy.
        return torch.full((), self._threshold, device=like.device, dtype=accumulation_dtype(like.dtype))

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        *,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Correct, then the wrapped scheduler's ``step`` with the arguments it accepts."""
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("safe denoiser: per_token_timesteps (one sigma per token) is not supported")
        model_output, sample = self.correct(model_output, timestep, sample, generator)
        if eta is not None and "eta" in self._step_params:
            kwargs["eta"] = eta
        if generator is not None and "generator" in self._step_params:
            kwargs["generator"] = generator
        out = self.scheduler.step(model_output, timestep, sample, return_dict=return_dict, **kwargs)
        self._calls += 1
        return out


_OWN = frozenset(SafeScheduler.__annotations__)


def _with_signature(method: Any, like: Any) -> Any:
    """``method`` as a plain function whose ``inspect.signature`` is ``like``'s."""
    import inspect

    def call(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    call.__doc__ = method.__doc__
    setattr(call, "__signature__", inspect.signature(like))  # noqa: B010 (mypy: functions have no such attribute)
    return call


def _pipeline_device_dtype(pipe: Any) -> tuple[torch.device, torch.dtype]:
    net = denoiser_network(pipe)
    if net is not None:
        return net.device, net.dtype
    return pipe.device, pipe.dtype


def attach(
    pipe: Any,
    bank: NegativeBank | Tensor | PreparedBanks,
    guidance: SafeGuidance | str | None = None,
    *,
    record: bool = False,
    reference: NegativeBank | Tensor | None = None,
) -> SafeScheduler:
    """Make ``pipe`` apply the safe denoiser at every step inside ``guidance.window``; returns the handle.

    ``guidance``: a ``SafeGuidance`` preset or a preset's name (None: ``ConstantGuidance()``). The banks are laid
    out in the sample space of the pipeline's scheduler (``sample_space_bank``) and prepared once on the pipeline's
    device and dtype (``PreparedBanks``; the kernel still accumulates in float32). The handle is the
    ``SafeScheduler`` now at ``pipe.scheduler``: ``handle.records`` (with ``record=True``), ``handle.guidance``.
    ``reference``: the reference bank (safe or unlabelled data) that the odds preset needs; or pass ``bank`` as
    ``PreparedBanks`` holding both (prepared before the pipeline was known: they are laid out and moved here, their
    data variance kept).
    """
    guidance = _guidance(guidance)
    if isinstance(bank, PreparedBanks):
        if reference is not None:
            raise ValueError("attach: give the reference bank inside the PreparedBanks, not beside it")
        given = bank
    else:
        given = PreparedBanks(_whole(bank), None if reference is None else _whole(reference))
    if given.reference is None and guidance.needs_reference_bank:
        raise ValueError(
            f"the {guidance.preset} preset needs a reference bank: attach(pipe, bank, guidance, reference=...)"
        )
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler to attach the safe denoiser to")
    if isinstance(scheduler, SafeScheduler):
        raise ValueError("a safe denoiser is already attached to this pipeline: detach(pipe) first")
    device, dtype = _pipeline_device_dtype(pipe)
    laid = given.relaid(lambda b, what: _whole(in_sample_space(pipe, b, what)))
    banks = PreparedBanks.prepare(laid, guidance, device=device, dtype=dtype)
    handle = SafeScheduler(scheduler, banks, guidance, record=record)
    object.__setattr__(pipe, "scheduler", handle)  # bypass config registration: pipe.config keeps the real class
    return handle


def _whole(bank: NegativeBank | Tensor) -> NegativeBank:
    return bank if isinstance(bank, NegativeBank) else NegativeBank.from_tensor(bank)


def detach(pipe: Any) -> Any:
    """Put the original scheduler back; returns it. Raises ValueError when nothing is attached."""
    handle = getattr(pipe, "scheduler", None)
    if not isinstance(handle, SafeScheduler):
        raise ValueError("no safe denoiser is attached to this pipeline (pipe.scheduler is not a SafeScheduler)")
    object.__setattr__(pipe, "scheduler", handle.scheduler)
    return handle.scheduler
