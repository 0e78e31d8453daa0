"""Run an exported bundle with onnxruntime: a small numpy DDIM sampler (no torch, no diffusers at run time).

::

    from safe_denoiser.export.runtime import Bundle
    bundle = Bundle("bundles/digits")                       # validates manifest.json and the bank's hash
    images = bundle.sample([3, 1, 4, 1], steps=25, seed=0)   # class labels (demo) or prompts / embeddings
    pixels = Bundle.to_uint8(bundle.decode(images.sample))  # (B, H, W, C) uint8

The sampler is deterministic DDIM (eta = 0) over the bundle's training schedule, with the timestep spacing,
offset and x0 clipping that diffusers' ``DDIMScheduler.from_config`` resolved at export time
(``manifest.scheduler.ddim``). Each step is one ``denoiser.onnx`` call: it returns the guided, corrected noise
prediction and the sample to step from (re-noised by the reference preset where it fired), then
x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, as ``DDIMScheduler.step`` computes it.

Execution providers: "CPUExecutionProvider" (default), "CUDAExecutionProvider", "TensorrtExecutionProvider" or
the short names "cpu", "cuda", "tensorrt"; a provider that the installed onnxruntime lacks raises
``ProviderUnavailableError`` saying what to install.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import Manifest, SchedulerInfo

__all__ = [
    "PROVIDER_ALIASES",
    "Bundle",
    "ProviderUnavailableError",
    "SampleResult",
    "ddim_step",
    "ddim_timesteps",
    "make_session",
    "resolve_providers",
    "run_bundle",
]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_INSTALL_HINT = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (matching your CUDA and cuDNN) instead of onnxruntime",
    "TensorrtExecutionProvider": (
        "install onnxruntime-gpu and NVIDIA TensorRT (its libraries on the loader path); or build TensorRT engines"
        " with `safe-denoiser export --tensorrt`"
    ),
}


class ProviderUnavailableError(ValueError):
    """An execution provider was requested that the installed onnxruntime does not offer."""


def resolve_providers(providers: str | Sequence[str] | None = None) -> list[str]:
    """Full provider names, checked against ``onnxruntime.get_available_providers()``."""
    import onnxruntime as ort

    if providers is None:
        providers = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        providers = [providers]
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    if not names:
        raise ProviderUnavailableError("no execution provider given")
    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            hint = _INSTALL_HINT.get(name, "check the provider's name")
            raise ProviderUnavailableError(
                f"execution provider {name!r} is not available in the installed onnxruntime {ort.__version__}"
                f" (available: {', '.join(available)}): {hint}"
            )
    return names


def make_session(
    path: str | os.PathLike[str], providers: str | Sequence[str] | None = None, threads: int | None = None
) -> Any:
    """An ``onnxruntime.InferenceSession`` with quiet logging (constant-folding notices are not errors)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=resolve_providers(providers))


# ---- DDIM in numpy ---------------------------------------------------------------------------------------------
def ddim_timesteps(scheduler: SchedulerInfo, steps: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps: the int64 timesteps of a ``steps``-step schedule, noisiest first."""
    t_train = scheduler.num_train_timesteps
    if not 0 < steps <= t_train:
        raise ValueError(f"steps must lie in 1..{t_train}, got {steps}")
    cfg = scheduler.ddim
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (t_train // steps)).round()[::-1].astype(np.int64) + int(cfg.get("steps_offset", 0))
    elif spacing == "trailing":
        ts = np.round(np.arange(t_train, 0, -t_train / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r} (expected linspace, leading or trailing)")
    return np.ascontiguousarray(ts)


def ddim_step(eps: np.ndarray, t: int, x: np.ndarray, steps: int, scheduler: SchedulerInfo) -> np.ndarray:
    """One deterministic DDIM update (eta = 0) in float32, in ``DDIMScheduler.step``'s order of operations.

    ``scheduler.ddim["use_clipped_model_output"]`` mirrors the pipeline's argument of that name (DigitsPipeline
    passes True, diffusers' Stable Diffusion pipelines do not).
    """
    cfg = scheduler.ddim
    if cfg.get("thresholding", False):
        raise ValueError("the bundle's scheduler uses dynamic thresholding, which this runtime does not implement")
    ac = scheduler.alphas_cumprod
    prev = t - scheduler.num_train_timesteps // steps
    a_t = np.float32(ac[t])
    a_prev = np.float32(ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod)
    b_t = np.float32(1) - a_t
    x0 = (x - b_t**0.5 * eps) / a_t**0.5
    if cfg.get("clip_sample", False):
        r = float(cfg.get("clip_sample_range", 1.0))
        x0 = np.clip(x0, -r, r)
        if cfg.get("use_clipped_model_output", False):  # the pipeline re-derives eps from the clipped x0
            eps = (x - a_t**0.5 * x0) / b_t**0.5
    return (a_prev**0.5 * x0 + (np.float32(1) - a_prev) ** 0.5 * eps).astype(np.float32)


@dataclass
class SampleResult:
    """The final sample (B, C, H, W), the timesteps used and, per step, where the correction fired (steps, B)."""

    sample: np.ndarray
    timesteps: np.ndarray
    applied: np.ndarray | None


class Bundle:
    """An exported bundle opened for inference with onnxruntime (sessions are created on first use)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        check_bank: bool = True,
    ) -> None:
        self.path = Path(path)
        self.manifest = Manifest.load(self.path, check_bank=check_bank)
        self.providers = resolve_providers(providers)
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None

    def session(self, graph: str) -> Any:
        """The onnxruntime session of ``graph`` ("denoiser", "text_encoder", "vae_decoder")."""
        if graph not in self._sessions:
            if graph not in self.manifest.graphs:
                raise KeyError(f"bundle has no {graph!r} graph; it has {sorted(self.manifest.graphs)}")
            file = self.path / self.manifest.graphs[graph].file
            self._sessions[graph] = make_session(file, self.providers, self.threads)
        return self._sessions[graph]

    # ---- conditioning -------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt embeddings (B, L, D) float32 through the bundle's tokenizer and text_encoder.onnx."""
        if self.manifest.tokenizer is None:
            raise ValueError("this bundle has no text encoder (its model takes class labels)")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / self.manifest.tokenizer))
        tok = self._tokenizer
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np"
        ).input_ids.astype(np.int64)
        return np.asarray(self.session("text_encoder").run(None, {"input_ids": ids})[0], dtype=np.float32)

    def _labels(self, labels: Any, b: int | None, name: str) -> np.ndarray:
        null = int(self.manifest.null_class if self.manifest.null_class is not None else 0)
        if labels is None:
            if b is None:
                raise ValueError(f"{name}: give class labels")
            return np.full((b,), null, dtype=np.int64)
        out = np.array([null if v is None else int(v) for v in np.asarray(labels, dtype=object).reshape(-1)])
        if out.size and (out.min() < 0 or out.max() > null):
            raise ValueError(f"{name} must lie in 0..{null} ({null} = no class), got {out.tolist()}")
        return out.astype(np.int64)

    def _embeddings(self, value: Any, b: int | None, name: str) -> np.ndarray:
        if value is None:
            if b is None:
                raise ValueError(f"{name}: give prompts or prompt embeddings")
            value = [""] * b
        if isinstance(value, np.ndarray):
            return np.ascontiguousarray(value, dtype=np.float32)
        if isinstance(value, str):
            value = [value]
        return self.encode(list(value))

    # ---- sampling -----------------------------------------------------------------------------------------
    def sample(
        self,
        conditioning: Any,
        noise: np.ndarray | None = None,
        steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        negative: Any = None,
        step_noise: Sequence[np.ndarray | None] | None = None,
        seed: int = 0,
    ) -> SampleResult:
        """DDIM sampling through denoiser.onnx.

        Args:
            conditioning: class labels (demo model; None entries = no class), or prompts (list of str) or prompt
                embeddings (B, L, D) for text models.
            noise: initial noise (B, *sample_shape) float32; drawn from ``numpy.random.default_rng(seed)`` if None.
            steps, guidance_scale: default to the manifest's (the config's) values.
            negative: negative class labels / prompts / embeddings (default: null class / empty prompt).
            step_noise: reference preset only: per step, the re-noise noise (None entries: zeros); default: drawn
                from the same generator at the steps inside the correction window.
        """
        m = self.manifest
        steps = m.num_inference_steps if steps is None else int(steps)
        rng = np.random.default_rng(seed)
        if m.model_kind == "class-conditional":
            cond = self._labels(conditioning, None, "class labels")
            b = cond.shape[0]
            neg = self._labels(negative, b, "negative class labels")
            cond_feeds = {"class_labels": cond, "negative_class_labels": neg}
        else:
            prompt = self._embeddings(conditioning, None, "conditioning")
            b = prompt.shape[0]
            cond_feeds = {"prompt_embeds": prompt, "negative_prompt_embeds": self._embeddings(negative, b, "negative")}
        if any(v.shape[0] != b for v in cond_feeds.values()):
            raise ValueError(f"conditioning and negative conditioning differ in batch size ({b})")
        if noise is None:
            noise = rng.standard_normal((b, *m.sample_shape)).astype(np.float32)
        x = np.ascontiguousarray(noise, dtype=np.float32)
        if x.shape[0] != b:
            raise ValueError(f"noise has batch {x.shape[0]} for {b} conditioning entries")
        gs = m.guidance_scale if guidance_scale is None else guidance_scale
        gs_arr = np.broadcast_to(np.asarray(gs, dtype=np.float32), (b,)).copy()
        timesteps = ddim_timesteps(m.scheduler, steps)
        self._check_threshold(timesteps)
        reference = m.guidance is not None and m.guidance.mode == "reference"
        if step_noise is not None and len(step_noise) != steps:
            raise ValueError(f"step_noise has {len(step_noise)} entries for {steps} steps")
        session = self.session("denoiser")
        outputs = m.graphs["denoiser"].output_names
        momentum = np.zeros_like(x) if m.sld is not None else None
        applied: list[np.ndarray] = []
        ac = np.asarray(m.scheduler.alphas_cumprod, dtype=np.float32)
        for i, t in enumerate(timesteps):
            feeds: dict[str, np.ndarray] = {
                "sample": x,
                "timestep": np.full((b,), t, dtype=np.float32),
                "alpha_bar": np.full((b,), ac[t], dtype=np.float32),
                **cond_feeds,
                "guidance_scale": gs_arr,
            }
            if reference:
                feeds["noise"] = self._renoise(i, int(t), x, step_noise, rng)
            if momentum is not None:
                feeds["sld_momentum"] = momentum
                feeds["sld_step"] = np.full((b,), i, dtype=np.int64)
            out = dict(zip(outputs, session.run(outputs, feeds), strict=True))
            if momentum is not None:
                momentum = out["sld_momentum_out"]
            if "correction_applied" in out:
                applied.append(out["correction_applied"])
            x = ddim_step(out["noise_pred"], int(t), out["sample_corrected"], steps, m.scheduler)
        return SampleResult(x, timesteps, np.stack(applied) if applied else None)

    def _renoise(
        self, i: int, t: int, x: np.ndarray, step_noise: Sequence[np.ndarray | None] | None, rng: np.random.Generator
    ) -> np.ndarray:
        if step_noise is not None:
            n = step_noise[i]
            return np.zeros_like(x) if n is None else np.ascontiguousarray(n, dtype=np.float32)
        assert self.manifest.guidance is not None
        w0, w1 = self.manifest.guidance.window
        # Draw only where the graph can use it, as the PyTorch pipeline does (outside, the graph ignores it).
        return rng.standard_normal(x.shape).astype(np.float32) if w0 <= t <= w1 else np.zeros_like(x)

    def _check_threshold(self, timesteps: np.ndarray) -> None:
        m = self.manifest
        if m.reference_threshold_alpha_bar is None or m.guidance is None or m.guidance.threshold is not None:
            return
        ab_last = float(m.scheduler.alphas_cumprod[int(timesteps[-1])])
        if abs(ab_last - m.reference_threshold_alpha_bar) > 1e-12:
            warnings.warn(
                f"the reference gate's threshold was computed at export for the last timestep of a"
                f" {m.reference_threshold_steps}-step schedule; this {len(timesteps)}-step schedule ends elsewhere,"
                " so the gate differs slightly from PyTorch's (set safe_denoiser.threshold or re-export)",
                stacklevel=3,
            )

    # ---- images -------------------------------------------------------------------------------------------
    def decode(self, sample: np.ndarray) -> np.ndarray:
        """Images (B, C, H, W) in [-1, 1]: vae_decoder.onnx for latent models, the sample itself otherwise."""
        if "vae_decoder" not in self.manifest.graphs:
            return np.asarray(sample, dtype=np.float32)
        return np.asarray(
            self.session("vae_decoder").run(None, {"latents": np.ascontiguousarray(sample, np.float32)})[0]
        )

    @staticmethod
    def to_uint8(images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded as diffusers' image processor does."""
        x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return np.rint(x * 255.0).astype(np.uint8)


def run_bundle(
    bundle_dir: str | os.PathLike[str],
    conditioning: Any,
    steps: int | None = None,
    noise: np.ndarray | None = None,
    providers: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Open a bundle and sample: the final sample (latents for text models, images in [-1, 1] for the demo).

    ``conditioning``: class labels or prompt embeddings/prompts; ``kwargs`` go to ``Bundle.sample``.
    """
    return Bundle(bundle_dir, providers).sample(conditioning, noise=noise, steps=steps, **kwargs).sample
