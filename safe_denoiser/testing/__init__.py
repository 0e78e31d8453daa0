"""Test support: random-weight tiny pipelines and the test model kinds "tiny-sd", "tiny-sdxl", "tiny-sd3" and
"tiny-flux", registered when this module is imported (tests, cpp_runtime/scripts/make_test_bundles.py, benches).

They are not user-facing model kinds: messages do not list them, and a ``safe-denoiser predict`` subprocess gets
them only with ``SAFE_DENOISER_PLUGINS=safe_denoiser.testing`` in its environment (``safe_denoiser.models.registry``).
"""

from __future__ import annotations

from typing import Any

from safe_denoiser.models.diffusers_kinds import latent_sample_shape
from safe_denoiser.models.registry import ModelKind, register_model_kind
from safe_denoiser.testing.pipelines import (
    TINY_FAMILIES,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from safe_denoiser.testing.t5 import TINY_T5_FOLDER, tiny_t5_tokenizer

__all__ = [
    "TINY_FAMILIES",
    "TINY_KINDS",
    "TINY_T5_FOLDER",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
]


def _tiny_builder(family: str) -> Any:
    def build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
        return tiny_pipeline(family, seed=seed, scheduler=scheduler)

    return build


TINY_KINDS: tuple[ModelKind, ...] = tuple(
    register_model_kind(
        ModelKind(
            f"tiny-{family}",
            _tiny_builder(family),
            latent_sample_shape,
            description=f"tiny random-weight {family} (tests)",
            user_facing=False,
        )
    )
    for family in TINY_FAMILIES
)
