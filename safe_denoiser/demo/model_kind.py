"""The bundled digits model as a model kind (``model: demo``), registered through the ``safe_denoiser.model_kinds``
entry point (pyproject.toml), so that no generic module imports the demo.

What the kind says is what the model takes: class labels 0-12 (the ten digits, the null class 10 and the two
super-classes 11 and 12 of ``digits.SUPER_CLASSES``), one fixed 8 x 8 size, the shipped negative bank and the safe
training digits as its reference bank.
"""

from __future__ import annotations

from typing import Any

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.demo.digits import NULL_CLASS, NUM_LABELS, SUPER_CLASS_NAMES
from safe_denoiser.models.registry import ClassLabels, ModelKind

__all__ = ["DEMO", "DEMO_LABELS"]

DEMO_LABELS = ClassLabels(count=NUM_LABELS, null=NULL_CLASS, names=dict(SUPER_CLASS_NAMES))


def _build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
    from safe_denoiser.demo.pipeline import DigitsPipeline

    return DigitsPipeline.from_bundled(scheduler=scheduler)


def _sample_shape(pipe: Any, height: int | None, width: int | None) -> tuple[int, ...]:
    return tuple(int(v) for v in pipe.sample_shape)


def _bundled_bank() -> NegativeBank:
    from safe_denoiser.demo.bank import bundled_bank_path

    return NegativeBank.load(bundled_bank_path())


def _bundled_reference_bank() -> NegativeBank:
    from safe_denoiser.demo.bank import build_reference_bank

    return build_reference_bank()


DEMO = ModelKind(
    "demo",
    _build,
    _sample_shape,
    inputs="class-conditional",
    description="the bundled 8x8-digits model (prompts are class labels)",
    labels=DEMO_LABELS,
    fixed_size=True,
    bundled_bank=_bundled_bank,
    bundled_reference_bank=_bundled_reference_bank,
)
