"""The model-kind registry: what ``model.model`` may name, each kind one typed value that generic code consults.

A ``ModelKind`` says how to build the diffusers pipeline, what it takes (class labels or text), the shape of one
sample, whether it needs a local folder or has a fixed size, and the banks it ships (``bank: bundled``). Generic
code (the run config, ``predict``, ``export``) looks kinds up by name and never imports a model by name.

Kinds come from three places, loaded once on the first look-up:

* the built-in diffusers kinds (``safe_denoiser.models.diffusers_kinds``: sd, sdxl, sd3, flux, sd14-random);
* the ``safe_denoiser.model_kinds`` entry points of installed packages (the bundled demo registers itself there,
  in pyproject.toml), each naming a ``ModelKind`` or a sequence of them;
* the modules named in the environment variable ``SAFE_DENOISER_PLUGINS`` (comma-separated), imported so that
  they can call ``register_model_kind``: how a subprocess gets the random-weight test kinds
  (``SAFE_DENOISER_PLUGINS=safe_denoiser.testing``), which are registered only when that module is imported.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.errors import FieldError

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "ClassLabels",
    "ModelKind",
    "PipelineBuilder",
    "SampleShape",
    "model_kind",
    "model_kind_names",
    "register_model_kind",
]

ENTRY_POINT_GROUP = "safe_denoiser.model_kinds"
PLUGINS_ENV = "SAFE_DENOISER_PLUGINS"
Inputs = Literal["class-conditional", "text-to-image"]


class PipelineBuilder(Protocol):
    """Builds a kind's diffusers pipeline on the CPU (``model_dir``/``unet_weights``/``seed`` as the kind uses them)."""

    def __call__(self, *, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any: ...


class SampleShape(Protocol):
    """(C, H, W) of one sample of ``pipe`` at ``height`` x ``width`` pixels (None: the model's default size)."""

    def __call__(self, pipe: Any, height: int | None, width: int | None) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class ClassLabels:
    """The labels a class-conditional model takes: ``0 .. count - 1``; ``null`` is the "no class" label of
    classifier-free guidance; ``names`` describes the labels that are not plain classes (for messages)."""

    count: int
    null: int
    names: Mapping[int, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``0-12 (10: no class, 11: a digit with a loop, ...)``: the accepted labels, for messages."""
        named = ", ".join(f"{k}: {v}" for k, v in sorted({self.null: "no class", **self.names}.items()))
        return f"0-{self.count - 1} ({named})"

    def parse(self, raw: Any, what: str) -> int:
        """``raw`` (an int or its decimal text) as a label; a ValueError naming ``what`` otherwise."""
        try:
            label = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{what} must be one of {self.describe()}, got {raw!r}") from None
        if not 0 <= label < self.count:
            raise ValueError(f"{what} must be one of {self.describe()}, got {label}")
        return label


@dataclass(frozen=True)
class ModelKind:
    """One value of ``model.model``.

    ``inputs``: what a prompt is (class labels, with ``labels`` saying which, or text). ``needs_model_dir``: the
    kind loads a local diffusers folder (``model.model_dir``, required), whose UNet or transformer
    ``model.unet_weights`` may replace; a kind without one refuses both fields. ``fixed_size``: the model makes one
    image size (``height``/``width`` are refused). ``bundled_bank`` / ``bundled_reference_bank``: what
    ``bank: bundled`` / ``reference_bank: bundled`` load (None: the kind ships none). ``user_facing``: listed in
    messages (test kinds are not).
    """

    name: str
    build: PipelineBuilder
    sample_shape: SampleShape
    inputs: Inputs = "text-to-image"
    description: str = ""
    labels: ClassLabels | None = None
    needs_model_dir: bool = False
    fixed_size: bool = False
    bundled_bank: Callable[[], NegativeBank] | None = None
    bundled_reference_bank: Callable[[], NegativeBank] | None = None
    user_facing: bool = True

    def __post_init__(self) -> None:
        if (self.inputs == "class-conditional") != (self.labels is not None):
            raise ValueError(f"model kind {self.name!r}: class-conditional kinds (and only they) name their labels")


_KINDS: dict[str, ModelKind] = {}
_LOADED = False


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Make ``kind`` available as ``model.model: <kind.name>`` (registering the same value twice is harmless)."""
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"model kind {kind.name!r} is registered twice with different definitions")
    _KINDS[kind.name] = kind
    return kind


def _register_all(value: Any, source: str) -> None:
    kinds: Iterable[Any] = value if isinstance(value, (list, tuple)) else [value]
    for kind in kinds:
        if not isinstance(kind, ModelKind):
            raise TypeError(f"{source} must name a ModelKind or a sequence of them, got {type(kind).__name__}")
        register_model_kind(kind)


def _load_plugins() -> None:
    """The built-in kinds, the entry points' and those of ``SAFE_DENOISER_PLUGINS``' modules, once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from safe_denoiser.models.diffusers_kinds import DIFFUSERS_KINDS

    _register_all(DIFFUSERS_KINDS, "safe_denoiser.models.diffusers_kinds.DIFFUSERS_KINDS")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _register_all(point.load(), f"entry point {point.name!r} ({point.value})")
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"{PLUGINS_ENV} names the module {name!r}, which cannot be imported: {exc}") from exc


def model_kind_names(include_testing: bool = False) -> tuple[str, ...]:
    """The registered kinds' names, in registration order (test kinds only with ``include_testing``)."""
    _load_plugins()
    return tuple(k.name for k in _KINDS.values() if k.user_facing or include_testing)


def model_kind(name: Any) -> ModelKind:
    """The kind called ``name``; a ``FieldError`` on ``model.model`` naming the known kinds otherwise."""
    _load_plugins()
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        hint = ""
        if isinstance(name, str) and name.startswith("tiny-"):
            hint = f" (the random-weight test kinds register with `import safe_denoiser.testing` or {PLUGINS_ENV})"
        raise FieldError("model", f"one of {', '.join(model_kind_names())}{hint}", name, owner="model")
    return kind
