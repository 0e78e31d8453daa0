"""``ModelConfig``: the ``model:`` section of a run, the one list of its fields.

``safe-denoiser predict`` (``SafeDiffusionModule`` takes these fields as its keyword arguments, its signature
generated from this class: ``keyword_fields``) and ``safe-denoiser export`` read the same section through it. Each
field carries its type, the expected form named in errors, and how it is recorded; so validation
(``ModelConfig.__post_init__``) and the settings recorded with every image and compared on resume
(``ModelConfig.image_settings``) both derive from the field list. A field added here is checked, recorded and
compared without further code. Neither imports Lightning, so an export needs none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, get_type_hints

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.guidance import SafeGuidance
from safe_denoiser.core.safree import SafreeConfig
from safe_denoiser.core.sld_config import SLDConfig
from safe_denoiser.errors import FieldError
from safe_denoiser.models.registry import ModelKind, model_kind

__all__ = ["BUNDLED_BANK", "PRECISION_SETTING", "ModelConfig", "build_pipeline", "guidance_from"]

BUNDLED_BANK = "bundled"  # ``bank: bundled``: the bank the model kind ships (the demo's)
PRECISION_SETTING = "trainer.precision"  # recorded beside the fields: the numeric precision shapes the pixels too


def guidance_from(settings: Mapping[str, Any] | None) -> SafeGuidance | None:
    """``{"preset": "odds", "odds_scale": 3, ...}`` -> the preset's type; None or ``{"enabled": false}`` -> None."""
    if settings is None:
        return None
    values = dict(settings)
    if not values.pop("enabled", True):
        return None
    try:
        return SafeGuidance.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.safe_denoiser: {exc}") from exc


def _sld_from(value: Any) -> SLDConfig | None:
    if value is None:
        return None
    try:
        return SLDConfig.from_value(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.sld: {exc}") from exc


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ---- per-field checks and records ------------------------------------------------------------------------------
def _is_int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _positive_int(v: Any) -> bool:
    return _is_int(v, 1)


def _size(v: Any) -> bool:
    return v is None or _is_int(v, 1)


def _seed(v: Any) -> bool:
    return _is_int(v, 0)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _text_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _mapping_or_none(v: Any) -> bool:
    return v is None or isinstance(v, Mapping)


def _sld_value(v: Any) -> bool:
    return v is None or isinstance(v, (str, Mapping))


def _hash(bank: NegativeBank | None) -> str | None:
    return None if bank is None else f"sha256:{bank.sha256()}"


def _record_bank(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if banks is None else _hash(banks.negative)


def _record_reference_bank(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if banks is None else _hash(banks.reference)


def _record_unet_weights(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if config.unet_weights is None else f"sha256:{file_sha256(config.unet_weights)}"


def _record_guidance(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if config.guidance is None else config.guidance.to_dict()


def _record_sld(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if config.sld_config is None else config.sld_config.to_dict()


def _record_safree(config: ModelConfig, banks: PreparedBanks | None) -> Any:
    return None if config.safree_config is None else config.safree_config.to_dict()


Check = Callable[[Any], bool]
Record = Callable[["ModelConfig", PreparedBanks | None], Any]


def _spec(check: Check, expected: str, record: Record | None = None) -> dict[str, Any]:
    """A field's check (``expected`` names the accepted form in the error) and how it is recorded (None: its value
    as written): the metadata of each ``ModelConfig`` field."""
    return {"check": check, "expected": expected, "record": record}


@dataclass(frozen=True)
class ModelConfig:
    """A run's ``model:`` section, validated on construction.

    Args:
        model: the model kind (``safe_denoiser.models.model_kind_names()``): "demo" (the bundled digits model;
            prompts are class labels), "sd", "sdxl", "sd3", "flux" (a local diffusers folder, ``model_dir``),
            "sd14-random" (the SD-1.4 architecture with random weights).
        model_dir: local diffusers folder of the folder kinds (refused by the others); nothing is ever downloaded.
        unet_weights: optional safetensors UNet state dict replacing the folder's (ESD, RECE, ...); folder kinds
            only.
        scheduler: sampler name (ddim, ddpm, pndm, euler, euler_a, lms, dpmpp, flow_euler; demo: ddim, ddpm, dpmpp).
        num_inference_steps: sampling steps.
        guidance_scale: classifier-free guidance scale.
        height: image height in pixels (None: the model's default; refused for fixed-size models such as the demo).
        width: image width in pixels (as ``height``).
        negative_prompt: default negative prompt (class-conditional models: a class label), overridden per item.
        bank: negative bank (.safetensors); "bundled" for the bank the model kind ships (the demo's).
        reference_bank: the odds preset's reference bank (safe or unlabelled data, .safetensors); "bundled" for the
            model kind's (the demo's safe training digits).
        safe_denoiser: None (off) or ``{"preset": "constant" | "mass" | "odds" | "reference", <its fields>}``.
        sld: None (off), an SLD preset name (weak, medium, strong, max) or SLDConfig fields (text models only).
        sld_concept: the SLD safety concept text (default: diffusers' SLD concept).
        safree: None (off) or SafreeConfig fields (``{}``: the defaults, nudity concepts; text models only).
        seed: weight seed of the random-weight models.
        batch_invariant: run the pipeline one item at a time inside each batch, so that an image's bytes never
            depend on the batch it lands in (or so the world size). Kernels pick different blockings for different
            batch shapes, and the resulting last-bit differences can flip a pixel's rounding. Set False for
            throughput (one pipeline call per batch) where a rare one-level pixel difference is acceptable.
    """

    model: str = field(default="demo", metadata=_spec(_text, "a model kind name"))
    model_dir: str | None = field(default=None, metadata=_spec(_text_or_none, "a string or null"))
    unet_weights: str | None = field(
        default=None, metadata=_spec(_text_or_none, "a string or null", _record_unet_weights)
    )
    scheduler: str = field(default="ddim", metadata=_spec(_text, "a string"))
    num_inference_steps: int = field(default=50, metadata=_spec(_positive_int, "a positive int"))
    guidance_scale: float = field(default=7.5, metadata=_spec(_finite, "a finite number"))
    height: int | None = field(default=None, metadata=_spec(_size, "an int >= 1 or null"))
    width: int | None = field(default=None, metadata=_spec(_size, "an int >= 1 or null"))
    negative_prompt: str | None = field(default=None, metadata=_spec(_text_or_none, "a string or null"))
    bank: str | None = field(default=None, metadata=_spec(_text_or_none, "a string or null", _record_bank))
    reference_bank: str | None = field(
        default=None, metadata=_spec(_text_or_none, "a string or null", _record_reference_bank)
    )
    safe_denoiser: dict[str, Any] | None = field(
        default=None, metadata=_spec(_mapping_or_none, "a mapping or null", _record_guidance)
    )
    sld: str | dict[str, Any] | None = field(
        default=None, metadata=_spec(_sld_value, "a preset name, a mapping or null", _record_sld)
    )
    sld_concept: str | None = field(default=None, metadata=_spec(_text_or_none, "a string or null"))
    safree: dict[str, Any] | None = field(
        default=None, metadata=_spec(_mapping_or_none, "a mapping or null", _record_safree)
    )
    seed: int = field(default=0, metadata=_spec(_seed, "an int >= 0"))
    batch_invariant: bool = field(default=True, metadata=_spec(_flag, "true or false"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["check"](value):
                raise FieldError(f.name, f.metadata["expected"], value, owner="model")
        self._check_kind(self.kind)
        guidance = self.guidance  # parses safe_denoiser, sld and safree: each error names its section
        self.sld_config  # noqa: B018
        self.safree_config  # noqa: B018
        if guidance is not None and self.bank is None:
            raise ValueError("model.bank is required when model.safe_denoiser is set (a .safetensors bank file)")
        if guidance is not None and guidance.needs_reference_bank and self.reference_bank is None:
            raise ValueError(
                f"model.reference_bank is required with the {guidance.preset} preset (a .safetensors bank of safe"
                " or unlabelled data, or 'bundled' for a model that ships one)"
            )

    def _check_kind(self, kind: ModelKind) -> None:
        """The rules the model kind sets: a folder (and its weights) or none, a fixed size, text-only methods, shipped
        banks."""
        if kind.needs_model_dir and not self.model_dir:
            raise ValueError(f"model.model_dir is required with model: {self.model} (a local diffusers folder)")
        for name in ("model_dir", "unet_weights"):  # only a folder kind reads them; elsewhere they would be ignored
            if not kind.needs_model_dir and getattr(self, name) is not None:
                expected = f"null for model {self.model!r} (it loads no diffusers folder)"
                raise FieldError(name, expected, getattr(self, name), owner="model")
        for name in ("height", "width"):
            if kind.fixed_size and getattr(self, name) is not None:
                expected = f"null for model {self.model!r} (it makes images of one fixed size)"
                raise FieldError(name, expected, getattr(self, name), owner="model")
        for name in ("sld", "safree"):
            if kind.inputs == "class-conditional" and getattr(self, name) is not None:
                raise ValueError(f"model.{name} needs a text model; model {self.model!r} takes class labels")
        for name, ships in (("bank", kind.bundled_bank), ("reference_bank", kind.bundled_reference_bank)):
            if getattr(self, name) == BUNDLED_BANK and ships is None:
                expected = f"a .safetensors bank file (model {self.model!r} ships no bank)"
                raise FieldError(name, expected, BUNDLED_BANK, owner="model")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> ModelConfig:
        """From a YAML ``model:`` mapping; unknown keys raise a ValueError naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; expected some of {known}")
        return cls(**dict(section))

    def to_mapping(self) -> dict[str, Any]:
        """The fields as written (the inverse of ``from_mapping``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ---- what the fields mean --------------------------------------------------------------------------------
    @property
    def kind(self) -> ModelKind:
        """The model kind (``model``) from the registry."""
        return model_kind(self.model)

    @cached_property
    def guidance(self) -> SafeGuidance | None:
        """The safe denoiser's settings (None: off), parsed once."""
        return guidance_from(self.safe_denoiser)

    @cached_property
    def sld_config(self) -> SLDConfig | None:
        """SLD's settings (None: off)."""
        return _sld_from(self.sld)

    @cached_property
    def safree_config(self) -> SafreeConfig | None:
        """SAFREE's settings (None: off)."""
        return SafreeConfig.from_section(None if self.safree is None else dict(self.safree), "model.safree")

    def build_pipeline(self) -> Any:
        """The kind's diffusers pipeline on the CPU, without a progress bar (callers show their own)."""
        pipe = self.kind.build(
            scheduler=self.scheduler, model_dir=self.model_dir, unet_weights=self.unet_weights, seed=self.seed
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_shape(self, pipe: Any) -> tuple[int, ...]:
        """(C, H, W) of one sample of ``pipe``: the demo's pixels, or the latents of ``height`` x ``width``."""
        return tuple(int(v) for v in self.kind.sample_shape(pipe, self.height, self.width))

    # ---- banks -------------------------------------------------------------------------------------------------
    def _load(self, name: str, sample_shape: tuple[int, ...] | None) -> NegativeBank:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"model.{name} is not set (a .safetensors bank file, or 'bundled')")
        if value == BUNDLED_BANK:
            ship = self.kind.bundled_bank if name == "bank" else self.kind.bundled_reference_bank
            assert ship is not None  # refused at construction otherwise
            return ship().validate(sample_shape)
        return NegativeBank.load(value, sample_shape=sample_shape)

    def load_bank(self, sample_shape: tuple[int, ...] | None = None) -> NegativeBank:
        """The negative bank (``bundled``: the model kind's), checked against ``sample_shape`` when given."""
        return self._load("bank", sample_shape)

    def load_reference_bank(self, sample_shape: tuple[int, ...] | None = None) -> NegativeBank | None:
        """The reference bank of the odds preset (``bundled``: the model kind's); None when unset."""
        return None if self.reference_bank is None else self._load("reference_bank", sample_shape)

    def load_banks(self) -> PreparedBanks | None:
        """The banks this run's guidance reads, prepared once on the CPU (None when the guidance is off; the
        reference bank only for a preset that reads one): what shapes the images, so what ``image_settings``
        hashes, and what ``attach`` lays out for the pipeline."""
        guidance = self.guidance
        if guidance is None:
            return None
        reference = self.load_reference_bank() if guidance.needs_reference_bank else None
        return PreparedBanks.prepare(self.load_bank(), guidance, reference)

    def fit_banks(self, banks: PreparedBanks, sample_shape: tuple[int, ...]) -> PreparedBanks:
        """``banks`` checked against the model's sample shape; a mismatch is an error naming the field and file."""
        for name, bank in (("bank", banks.negative), ("reference_bank", banks.reference)):
            try:
                None if bank is None else bank.validate(sample_shape)
            except ValueError as exc:
                raise ValueError(f"model.{name} {getattr(self, name)!r}: {exc}") from None
        return banks

    # ---- the record ----------------------------------------------------------------------------------------------
    def image_settings(self, banks: PreparedBanks | None, precision: str | None) -> dict[str, Any]:
        """Everything besides its item that shapes an image, one entry per field (banks and UNet weights by
        content hash, guidance/SLD/SAFREE parsed) plus the trainer's precision: recorded in every PNG and metadata
        row, compared on resume."""
        settings = {}
        for f in dataclasses.fields(self):
            record: Record | None = f.metadata["record"]
            settings[f.name] = getattr(self, f.name) if record is None else record(self, banks)
        settings[PRECISION_SETTING] = precision
        return settings


def build_pipeline(model: str = "demo", **fields: Any) -> Any:
    """The pipeline of a model kind (``fields``: other ``ModelConfig`` fields, e.g. ``scheduler``, ``seed``)."""
    return ModelConfig(model=model, **fields).build_pipeline()


_Init = TypeVar("_Init", bound=Callable[..., None])


def keyword_fields(config_type: type[Any]) -> Callable[[_Init], _Init]:
    """Decorate ``__init__(self, **fields)`` so that its signature and docstring are ``config_type``'s fields:
    LightningCLI/jsonargparse then offer each field as ``--model.<field>`` (and ``model:`` YAML keys) with its type
    and default, and the field list stays written once."""
    hints = get_type_hints(config_type)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(config_type)
    ]

    def decorate(init: _Init) -> _Init:
        init.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        init.__doc__ = config_type.__doc__
        return init

    return decorate
