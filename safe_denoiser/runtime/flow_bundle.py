"""Flow bundles (SD3, Flux) from a prompt to a final sample, in numpy + onnxruntime (no torch).

What ``Bundle.sample_flow`` / ``Bundle.encode_flow`` run (docs/bundle_format.md, "What a runtime does with a flow
bundle"): each prompt tokenized with every tokenizer the manifest's ``tokenizers`` lists, ``text_encoder.onnx`` once
for the prompts and (SD3) once for the negative prompts, the Philox initial noise, ``flow_schedule`` and per step
``denoiser.onnx`` then ``flow_euler_step``. Embeddings computed elsewhere (the pipeline's ``encode_prompt``) can be
given instead of prompts, which is how bundles exported without a text encoder are sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import check_array, check_int, check_scales, check_seeds
from .flow_sampler import flow_euler_step, flow_schedule
from .manifest import ManifestError
from .noise import INITIAL_STREAM

if TYPE_CHECKING:
    from .bundle import Bundle, SampleResult

__all__ = ["FlowEmbeddings", "encode_flow", "flow_embeddings", "sample_flow", "tokenize_flow"]

_NEGATIVES = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass(frozen=True)
class FlowEmbeddings:
    """The denoiser's conditioning of a flow bundle: the pipeline's ``encode_prompt`` outputs (SD3: with the negative
    prompt's; Flux: none, its guidance scale is an embedding, not CFG)."""

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None

    @property
    def batch(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def feeds(self) -> dict[str, np.ndarray]:
        """The denoiser inputs these fill (the negatives only when set)."""
        values = {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }
        return {k: v for k, v in values.items() if v is not None}


def _texts(prompts: str | Sequence[str], name: str) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return texts


def tokenize_flow(bundle: Bundle, prompts: str | Sequence[str]) -> dict[str, np.ndarray]:
    """``{text_encoder input: (B, max_length) int64 ids}``, one entry per manifest tokenizer, as the pipeline
    tokenizes (padding to ``max_length``, truncation)."""
    specs = bundle.manifest.tokenizers
    if not specs:
        raise ManifestError(
            "this flow bundle has no tokenizers (exported before flow text encoders were): give prompt_embeds and"
            " pooled_prompt_embeds, or re-export it"
        )
    texts = _texts(prompts, "prompts")
    inputs = bundle.session("text_encoder").get_inputs()
    known = {i.name for i in inputs}
    ids: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.input not in known:
            raise ManifestError(f"manifest: tokenizer {spec.folder!r} feeds {spec.input!r}, not a text_encoder input")
        tok = bundle.flow_tokenizer(spec)
        out = tok(texts, padding=spec.padding, max_length=spec.max_length, truncation=True, return_tensors="np")
        ids[spec.input] = out.input_ids.astype(np.int64)
    if known != set(ids):
        raise ManifestError(f"manifest: tokenizers feed {sorted(ids)}, text_encoder takes {sorted(known)}")
    return ids


def encode_flow(bundle: Bundle, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds (B, L, D), pooled_prompt_embeds (B, P)) float32 through the tokenizers and text_encoder.onnx."""
    outputs = ["prompt_embeds", "pooled_prompt_embeds"]
    ids = tokenize_flow(bundle, prompts)
    pe, pooled = bundle.session("text_encoder").run(outputs, ids)
    return np.asarray(pe, dtype=np.float32), np.asarray(pooled, dtype=np.float32)


def flow_embeddings(
    bundle: Bundle,
    prompts: str | Sequence[str] | None,
    negative_prompts: str | Sequence[str] | None,
    given: dict[str, Any],
) -> FlowEmbeddings:
    """The conditioning from prompts (encoded here) or from ``given`` embeddings (keyword -> array), checked."""
    sd3 = _NEGATIVES[0] in bundle.manifest.graphs["denoiser"].input_names
    supplied = {k: v for k, v in given.items() if v is not None}
    if prompts is not None:
        if supplied:
            raise ValueError(f"give prompts or embeddings, not both (got prompts and {sorted(supplied)})")
        pe, pooled = encode_flow(bundle, prompts)
        if negative_prompts is not None and not sd3:
            raise ValueError("negative_prompts: this Flux bundle takes none (its guidance scale is an embedding)")
        if not sd3:
            return FlowEmbeddings(pe, pooled)
        negatives = [""] * pe.shape[0] if negative_prompts is None else _texts(negative_prompts, "negative_prompts")
        if len(negatives) != pe.shape[0]:
            raise ValueError(f"negative_prompts: {len(negatives)} for {pe.shape[0]} prompts")
        return FlowEmbeddings(pe, pooled, *encode_flow(bundle, negatives))
    if negative_prompts is not None:
        raise ValueError("negative_prompts go with prompts; with embeddings give negative_prompt_embeds")
    return _given_embeddings(supplied, sd3)


def _given_embeddings(given: dict[str, Any], sd3: bool) -> FlowEmbeddings:
    if "prompt_embeds" not in given or "pooled_prompt_embeds" not in given:
        raise ValueError("give prompts, or prompt_embeds and pooled_prompt_embeds (the pipeline's encode_prompt)")
    prompt = check_array(given["prompt_embeds"], "prompt_embeds", (None, None, None))
    b = prompt.shape[0]
    pooled = check_array(given["pooled_prompt_embeds"], "pooled_prompt_embeds", (b, None))
    if not sd3:
        if any(k in given for k in _NEGATIVES):
            raise ValueError("negative embeddings: this Flux bundle takes none (its guidance scale is an embedding)")
        return FlowEmbeddings(prompt, pooled)
    if any(k not in given for k in _NEGATIVES):
        raise ValueError(
            "negative_prompt_embeds and negative_pooled_prompt_embeds are required by this SD3 bundle (the"
            " pipeline's encode_prompt of the negative or empty prompt)"
        )
    negative = check_array(given[_NEGATIVES[0]], _NEGATIVES[0], prompt.shape)
    return FlowEmbeddings(prompt, pooled, negative, check_array(given[_NEGATIVES[1]], _NEGATIVES[1], (b, None)))


def sample_flow(
    bundle: Bundle,
    embeddings: FlowEmbeddings,
    noise: np.ndarray | None,
    steps: int | None,
    guidance_scale: float | Sequence[float] | None,
    seed: int | Sequence[int],
) -> SampleResult:
    """The flow-matching Euler loop through denoiser.onnx (module docstring); returns the final sample as stepped."""
    from .bundle import SampleResult, _check_finite

    m = bundle.manifest
    if m.flow is None:
        raise ValueError("this bundle is not a flow-matching bundle: sample it with Bundle.sample")
    train = int(m.flow["num_train_timesteps"])  # as the C++ runtime: 1..num_train_timesteps
    steps = m.num_inference_steps if steps is None else check_int(steps, "steps", 1, train)
    b = embeddings.batch
    x = bundle._seed_noise(check_seeds(seed, b), INITIAL_STREAM) if noise is None else noise
    x = check_array(x, "noise", (b, *m.sample_shape))
    scale = m.guidance_scale if guidance_scale is None else guidance_scale
    conditioning = {**embeddings.feeds(), "guidance_scale": check_scales(scale, b)}
    timesteps, sigmas = flow_schedule(m.flow, steps)
    session = bundle.session("denoiser")
    outputs = m.graphs["denoiser"].output_names
    applied: list[np.ndarray] = []
    for i, t in enumerate(timesteps):
        feeds = {
            "sample": x,
            "timestep": np.full((b,), t, dtype=np.float32),
            "sigma": np.full((b,), sigmas[i], dtype=np.float32),
            **conditioning,
        }
        out = dict(zip(outputs, session.run(outputs, feeds), strict=True))
        if "correction_applied" in out:
            applied.append(out["correction_applied"])
        x = flow_euler_step(out["noise_pred"], x, sigmas[i], sigmas[i + 1])
        _check_finite(x, i, steps, float(t))
    return SampleResult(x, timesteps, np.stack(applied) if applied else None)
