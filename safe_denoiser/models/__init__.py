"""What a run is made of: the model kinds (``registry``: the demo and plug-ins register into it, generic code looks
kinds up by name) and a run's ``model:`` section (``config.ModelConfig``, the one list of its fields)."""

from __future__ import annotations

from safe_denoiser.models.config import (
    BUNDLED_BANK,
    PRECISION_SETTING,
    ModelConfig,
    build_pipeline,
    guidance_from,
    keyword_fields,
)
from safe_denoiser.models.registry import (
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    ClassLabels,
    ModelKind,
    model_kind,
    model_kind_names,
    register_model_kind,
)

__all__ = [
    "BUNDLED_BANK",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "PRECISION_SETTING",
    "ClassLabels",
    "ModelConfig",
    "ModelKind",
    "build_pipeline",
    "guidance_from",
    "keyword_fields",
    "model_kind",
    "model_kind_names",
    "register_model_kind",
]
