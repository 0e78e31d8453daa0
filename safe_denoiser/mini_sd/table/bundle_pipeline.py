"""An exported bundle called as the table calls a diffusers pipeline, so that the table scores a bundle's images.

``BundlePipeline(Bundle(dir))`` takes the arguments ``quality.generate_prompts`` passes (prompts, negative prompts,
DDIM steps, CFG scale, one ``torch.Generator`` per image, ``output_type="pt"``) and returns images in [0, 1] as the
pipeline does. The bundle carries its own preset and banks, so its rows run with ``Row.safe = None`` and no text
defence. Each image starts from the runtime's portable noise of its generator's seed (``runtime.noise``, the bits
``safe-denoiser-cpp`` draws), not torch's: a bundle row and a PyTorch row compare as samples, two bundles of one
config (float32 and int8) image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["BundlePipeline"]


class BundlePipeline:
    """``pipe(prompts, negative_prompt=..., num_inference_steps=..., guidance_scale=..., generator=[...])`` over a
    runtime ``Bundle`` (text bundles: the miniature's, SD-1.x's); ``.images`` (B, C, H, W) float32 in [0, 1]."""

    def __init__(self, bundle: Any) -> None:
        if bundle.manifest.model_kind != "text-to-image":
            kind = bundle.manifest.model_kind
            raise ValueError(f"BundlePipeline needs a text bundle (prompts), got {kind!r}: {bundle.path}")
        self.bundle = bundle

    def __call__(
        self,
        prompt: Sequence[str],
        negative_prompt: Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: Sequence[torch.Generator] | None = None,
        output_type: str = "pt",
    ) -> SimpleNamespace:
        prompts = list(prompt)
        if output_type != "pt":
            raise ValueError(f"BundlePipeline.output_type must be 'pt', got {output_type!r}")
        if generator is None or len(generator) != len(prompts):
            raise ValueError(f"BundlePipeline.generator must be one torch.Generator per prompt ({len(prompts)})")
        result = self.bundle.sample(
            prompts,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative=None if negative_prompt is None else list(negative_prompt),
            seed=[g.initial_seed() for g in generator],
        )
        images = torch.from_numpy(self.bundle.decode(result.sample))
        return SimpleNamespace(images=(images / 2 + 0.5).clamp(0.0, 1.0))  # diffusers' "pt" postprocessing
