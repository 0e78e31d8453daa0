"""Run an exported bundle with onnxruntime: small numpy DDIM / DDPM samplers (no torch, no diffusers at run time).

::

    from safe_denoiser.runtime.bundle import Bundle
    bundle = Bundle("bundles/digits")                       # validates manifest.json and the bank's hash
    images = bundle.sample([3, 1, 4, 1], steps=25, seed=0)   # class labels (demo) or prompts / embeddings
    pixels = Bundle.to_uint8(bundle.decode(images.sample))  # (B, H, W, C) uint8

The sampler is deterministic DDIM (eta = 0) over the bundle's training schedule, with the timestep spacing,
offset and x0 clipping that diffusers' ``DDIMScheduler.from_config`` resolved at export time
(``manifest.scheduler.ddim``). Each step is one ``denoiser.onnx`` call: it returns the guided, corrected noise
prediction and the sample to step from (re-noised by the reference preset where it fired), then
x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, as ``DDIMScheduler.step`` computes it. ``sampler="ddpm"``
steps with ``DDPMScheduler.step`` instead (``ddpm_sampler``), its variance noise drawn from the Philox stream
``ddpm_stream(step)`` of each image's (seed, item).

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

from safe_denoiser.core.guidance import ReferenceGuidance

from .arguments import check_array, check_int, check_labels, check_scales, check_seeds
from .contract import check_session_io
from .ddpm_sampler import ddpm_settings, ddpm_step
from .manifest import GraphOptimization, Manifest, ManifestError, SchedulerInfo
from .noise import INITIAL_STREAM, ddpm_stream, gaussian_noise, renoise_stream
from .prompt_tokenizer import load_prompt_tokenizer
from .safree_text import SafreePrompt, masked_ids, pooled_rows, safree_prompt
from .tokenizer_spec import TokenizerSpec, TokenizerSpecError

__all__ = [
    "PROVIDER_ALIASES",
    "SAMPLERS",
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
SAMPLERS = ("ddim", "ddpm")
_INSTALL_HINT = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (matching your CUDA and cuDNN) instead of onnxruntime",
    "TensorrtExecutionProvider": (
        "install onnxruntime-gpu and NVIDIA TensorRT (its libraries on the loader path); or build TensorRT engines"
        " from the bundle (safe_denoiser.export.tensorrt.build_engines)"
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
    path: str | os.PathLike[str],
    providers: str | Sequence[str] | None = None,
    threads: int | None = None,
    optimization: GraphOptimization | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` with quiet logging (constant-folding notices are not errors).

    A graph already optimised offline for the session's first provider (``optimization``, from its manifest entry)
    is loaded with ORT_DISABLE_ALL: its optimisations are in the file, so session creation skips them; any other
    graph gets onnxruntime's default (ORT_ENABLE_ALL, at every session start).
    """
    import onnxruntime as ort

    from .graph_records import check_session_provider

    names = resolve_providers(providers)
    check_session_provider(Path(path).name, optimization, names)  # fused GPU-only operators: refused by name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimization is not None and optimization.provider == names[0]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=names)


# ---- DDIM in numpy ---------------------------------------------------------------------------------------------
def ddim_timesteps(scheduler: SchedulerInfo, steps: int, settings: dict[str, Any] | None = None) -> np.ndarray:
    """DDIMScheduler.set_timesteps: the int64 timesteps of a ``steps``-step schedule, noisiest first.

    ``settings``: the sampler settings to space them by (default ``scheduler.ddim``; DDPM's set_timesteps is the
    same code over ``scheduler.ddpm``).
    """
    t_train = scheduler.num_train_timesteps
    if not 0 < steps <= t_train:
        raise ValueError(f"steps must lie in 1..{t_train}, got {steps}")
    cfg = scheduler.ddim if settings is None else settings
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (t_train // steps)).round()[::-1].astype(np.int64) + int(cfg.get("steps_offset", 0))
    elif spacing == "trailing":
        ts = np.round(np.arange(t_train, 0, -t_train / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r} (expected linspace, leading or trailing)")
    if ts.size and (int(ts.min()) < 0 or int(ts.max()) >= t_train):  # "leading" + offset can pass the table's end
        raise ValueError(
            f"{steps} steps with {spacing} spacing reach timestep {int(ts.max())}, outside 0..{t_train - 1}; "
            "use fewer steps"
        )
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


@dataclass(frozen=True)
class _SamplingLoop:
    """What every step of one ``Bundle.sample`` call shares: the conditioning feeds (guidance scale included),
    SAFREE's per-prompt analysis, the noise keys, the schedule, the sampler and any explicit per-step noise."""

    feeds: dict[str, np.ndarray]
    safree: list[SafreePrompt] | None
    keys: list[tuple[int, int]]
    timesteps: np.ndarray
    alphas_cumprod: np.ndarray  # the schedule's table as float32, converted once per call
    ddpm: bool
    step_noise: Sequence[np.ndarray | None] | None
    ddpm_noise: Sequence[np.ndarray | None] | None


@dataclass
class SampleResult:
    """The final sample (B, C, H, W), the timesteps used and, per step, where the correction fired (steps, B)."""

    sample: np.ndarray
    timesteps: np.ndarray
    applied: np.ndarray | None
    safree: list[SafreePrompt] | None = None  # per prompt, with a SAFREE bundle and text prompts


class Bundle:
    """An exported bundle opened for inference with onnxruntime (sessions are created on first use)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        check_bank: bool = True,
        check_files: bool = True,
    ) -> None:
        self.path = Path(path)
        # check_files: every graph and data file against its sha256 in the manifest (False skips it, for speed)
        self.manifest = Manifest.load(self.path, check_bank=check_bank, check_files=check_files)
        self.providers = resolve_providers(providers)
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._flow_tokenizers: dict[str, Any] = {}  # flow bundles: folder -> tokenizer

    def session(self, graph: str) -> Any:
        """The onnxruntime session of ``graph`` ("denoiser", "text_encoder", "vae_decoder")."""
        if graph not in self._sessions:
            if graph not in self.manifest.graphs:
                raise KeyError(f"bundle has no {graph!r} graph; it has {sorted(self.manifest.graphs)}")
            spec = self.manifest.graphs[graph]
            file = self.path / spec.file
            try:
                session = make_session(file, self.providers, self.threads, spec.optimization)
            except ProviderUnavailableError:
                raise
            except Exception as exc:  # onnxruntime's parse errors do not name the file
                raise ManifestError(f"{str(file)!r}: onnxruntime cannot load this graph: {exc}") from exc
            check_session_io(session, spec, graph)  # the graph's I/O is the manifest's (runtime/contract.py)
            self._sessions[graph] = session
        return self._sessions[graph]

    # ---- conditioning -------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt embeddings (B, L, D) float32 through the bundle's tokenizer and text_encoder.onnx."""
        if self.manifest.tokenizer is None:
            raise ValueError("this bundle has no text encoder (its model takes class labels)")
        return self._text(self._tokenize(prompts)[0])

    def _tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask) (B, L) int64, padded and truncated to the model length as the pipelines do it."""
        if self.manifest.tokenizer is None:
            raise ValueError("this bundle has no text encoder (its model takes class labels or embeddings)")
        if self._tokenizer is None:
            folder = self.path / self.manifest.tokenizer
            self._tokenizer = load_prompt_tokenizer(folder) or _transformers_tokenizer(folder)
        ids, mask = self._tokenizer(prompts)
        return ids, mask

    def _text(self, ids: np.ndarray) -> np.ndarray:
        """text_encoder.onnx's last hidden state (B, L, D) float32."""
        return np.asarray(self.session("text_encoder").run(None, {"input_ids": ids})[0], dtype=np.float32)

    def encode_safree(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[SafreePrompt]]:
        """The prompts' embeddings (B, L, D) and SAFREE's filtered rows, flags and t' per prompt (``safree_text``).

        One text-encoder call for the prompts and one for all their leave-one-out prompts, as the PyTorch side does.
        """
        settings = self.manifest.safree
        if settings is None:
            raise ValueError("this bundle was exported without SAFREE (no 'safree' section in its manifest)")
        ids, attention = self._tokenize(prompts)
        hidden = self._text(ids)
        counts = [max(int(a.sum()) - 2, 0) for a in attention]  # real tokens between BOS and EOS
        masked = [masked_ids(ids[b], n, settings.mask_token_id) for b, n in enumerate(counts) if n > 0]
        pooled = None
        if masked:
            all_ids = np.concatenate(masked)
            pooled = pooled_rows(self._text(all_ids), all_ids, settings)
        results, offset = [], 0
        for b, n in enumerate(counts):
            rows = pooled[offset : offset + n] if pooled is not None else np.zeros((0, hidden.shape[-1]), np.float32)
            offset += n
            results.append(safree_prompt(hidden[b], rows, attention[b].astype(bool), settings))
        return hidden, results

    def _safree_rows(self, prompt: np.ndarray, filtered: list[SafreePrompt], step: int) -> np.ndarray:
        """The prompt rows at ``step``: filtered for steps 0..t' (every step without self-validation)."""
        assert self.manifest.safree is not None
        always = not self.manifest.safree.self_validation
        return np.stack([r.filtered if always or step <= r.last_step else prompt[b] for b, r in enumerate(filtered)])

    def _labels(self, labels: Any, b: int | None, name: str) -> np.ndarray:
        null = int(self.manifest.null_class if self.manifest.null_class is not None else 0)
        if labels is None:
            if b is None:
                raise ValueError(f"{name}: give class labels")
            return np.full((b,), null, dtype=np.int64)
        out = check_labels(labels, null, name, self.manifest.class_label_max())
        if b is not None and out.shape[0] != b:
            raise ValueError(f"{name}: {out.shape[0]} labels for {b} images")
        return out

    def _embeddings(self, value: Any, b: int | None, name: str) -> np.ndarray:
        if value is None:
            if b is None:
                raise ValueError(f"{name}: give prompts or prompt embeddings")
            value = [""] * b
        if isinstance(value, np.ndarray):
            return check_array(value, name, (b, None, None))
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
        seed: int | Sequence[int] = 0,
        sampler: str = "ddim",
        ddpm_noise: Sequence[np.ndarray | None] | None = None,
    ) -> SampleResult:
        """DDIM or DDPM sampling through denoiser.onnx.

        Args:
            conditioning: class labels (demo model; None entries = no class), or prompts (list of str) or prompt
                embeddings (B, L, D) for text models.
            noise: initial noise (B, *sample_shape) float32; if None, the portable Philox noise of ``seed``
                (``safe_denoiser.runtime.noise``, the same bits as ``safe-denoiser-cpp``).
            steps, guidance_scale: default to the manifest's (the config's) values.
            negative: negative class labels / prompts / embeddings (default: null class / empty prompt).
            step_noise: reference preset only: per step, the re-noise noise (None entries: zeros); default: drawn
                from the Philox noise of ``seed`` at the steps inside the correction window.
            seed: one int (image i uses (seed, item i)) or one seed per image (image i uses (seed[i], item 0)).
            sampler: "ddim" (deterministic, eta = 0) or "ddpm" (``DDPMScheduler.step``, ``ddpm_sampler``).
            ddpm_noise: DDPM only: per step, the variance noise (B, *sample_shape) (None where the timestep is 0);
                default: the Philox noise of ``seed`` on stream ``ddpm_stream(step)``.
        """
        m = self.manifest
        steps = self._check_sample_args(sampler, steps, step_noise, ddpm_noise)
        cond_feeds, safree = self._conditioning_feeds(conditioning, negative)
        b = next(iter(cond_feeds.values())).shape[0]
        keys = check_seeds(seed, b)
        if noise is None:
            noise = self._seed_noise(keys, INITIAL_STREAM)
        # Without a bank a text model's spatial size is free (the graph's height and width axes are dynamic).
        free = m.bank is None and m.model_kind == "text-to-image"
        x = check_array(noise, "noise", (b, m.sample_shape[0], None, None) if free else (b, *m.sample_shape))
        gs_arr = check_scales(m.guidance_scale if guidance_scale is None else guidance_scale, b)
        ddpm = sampler == "ddpm"
        timesteps = ddim_timesteps(m.scheduler, steps, ddpm_settings(m.scheduler) if ddpm else None)
        self._check_threshold(timesteps)
        alphas = np.asarray(m.scheduler.alphas_cumprod, dtype=np.float32)
        loop = _SamplingLoop(
            {**cond_feeds, "guidance_scale": gs_arr}, safree, keys, timesteps, alphas, ddpm, step_noise, ddpm_noise
        )
        momentum = np.zeros_like(x) if m.sld is not None else None
        applied: list[np.ndarray] = []
        for i, t in enumerate(timesteps):
            x, momentum, fired = self._sample_step(loop, i, int(t), x, momentum)
            if fired is not None:
                applied.append(fired)
            _check_finite(x, i, steps, float(t))
        return SampleResult(x, timesteps, np.stack(applied) if applied else None, safree)

    def _check_sample_args(
        self,
        sampler: str,
        steps: int | None,
        step_noise: Sequence[np.ndarray | None] | None,
        ddpm_noise: Sequence[np.ndarray | None] | None,
    ) -> int:
        """The number of steps (the manifest's by default), after checking ``sample``'s sampler arguments."""
        m = self.manifest
        if m.path != "vp":
            raise ValueError(f"this is a {m.path} bundle: sample it with Bundle.sample_flow")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if ddpm_noise is not None and sampler != "ddpm":
            raise ValueError("ddpm_noise is for sampler='ddpm' only")
        train_steps = len(m.scheduler.alphas_cumprod)
        steps = m.num_inference_steps if steps is None else check_int(steps, "steps", 1, train_steps)
        for name, given in (("step_noise", step_noise), ("ddpm_noise", ddpm_noise)):
            if given is not None and len(given) != steps:
                raise ValueError(f"{name} has {len(given)} entries for {steps} steps")
        return steps

    def _sample_step(
        self, loop: _SamplingLoop, i: int, t: int, x: np.ndarray, momentum: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One DDIM / DDPM step through denoiser.onnx: (next sample, SLD momentum, where the correction fired)."""
        m = self.manifest
        b = x.shape[0]
        feeds = {
            **loop.feeds,
            "sample": x,
            "timestep": np.full((b,), t, dtype=np.float32),
            "alpha_bar": np.full((b,), loop.alphas_cumprod[t], dtype=np.float32),
        }
        if loop.safree is not None:
            feeds["prompt_embeds"] = self._safree_rows(loop.feeds["prompt_embeds"], loop.safree, i)
        if m.guidance is not None and m.guidance.renoises:
            feeds["noise"] = self._renoise(i, t, x, loop.step_noise, loop.keys)
        if momentum is not None:
            feeds["sld_momentum"] = momentum
            feeds["sld_step"] = np.full((b,), i, dtype=np.int64)
        out = self._run_denoiser(feeds)
        steps = len(loop.timesteps)
        if loop.ddpm:
            prev_t = int(loop.timesteps[i + 1]) if i + 1 < steps else -1  # DDPMScheduler.previous_timestep
            z = self._ddpm_noise(i, t, x, loop.ddpm_noise, loop.keys)
            x = ddpm_step(out["noise_pred"], t, prev_t, out["sample_corrected"], z, m.scheduler)
        else:
            x = ddim_step(out["noise_pred"], t, out["sample_corrected"], steps, m.scheduler)
        return x, out.get("sld_momentum_out"), out.get("correction_applied")

    def _conditioning_feeds(
        self, conditioning: Any, negative: Any
    ) -> tuple[dict[str, np.ndarray], list[SafreePrompt] | None]:
        """The denoiser's conditioning inputs (labels or prompt embeddings, and their negatives) and, for a SAFREE
        bundle given prompts, each prompt's SAFREE analysis."""
        safree: list[SafreePrompt] | None = None
        if self.manifest.model_kind == "class-conditional":
            cond = self._labels(conditioning, None, "class labels")
            neg = self._labels(negative, cond.shape[0], "negative class labels")
            return {"class_labels": cond, "negative_class_labels": neg}, None
        if self.manifest.safree is not None and conditioning is not None and not isinstance(conditioning, np.ndarray):
            texts = [conditioning] if isinstance(conditioning, str) else list(conditioning)
            prompt, safree = self.encode_safree(texts)
        else:  # precomputed embeddings have no tokens to analyse: they pass through, as in PyTorch
            prompt = self._embeddings(conditioning, None, "conditioning")
        b = prompt.shape[0]
        feeds = {"prompt_embeds": prompt, "negative_prompt_embeds": self._embeddings(negative, b, "negative")}
        if any(v.shape[0] != b for v in feeds.values()):
            raise ValueError(f"conditioning and negative conditioning differ in batch size ({b})")
        return feeds, safree

    def _run_denoiser(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.manifest.graphs["denoiser"].output_names
        return dict(zip(outputs, self.session("denoiser").run(outputs, feeds), strict=True))

    def sample_flow(
        self,
        prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        seed: int | Sequence[int] = 0,
        prompts: str | Sequence[str] | None = None,
        negative_prompts: str | Sequence[str] | None = None,
    ) -> SampleResult:
        """Flow-matching Euler sampling through denoiser.onnx (SD3 / Flux bundles; ``flow_bundle``, ``flow_sampler``).

        ``prompts`` (and for SD3 ``negative_prompts``, default "") go through the bundle's tokenizers and
        text_encoder.onnx; or give the pipeline's ``encode_prompt`` outputs as embeddings (SD3: the negative or
        empty prompt's too; Flux takes none: ``guidance_scale`` is its guidance embedding).
        ``noise``: the initial sample (B, *sample_shape) (Flux: packed); default: Philox noise of ``seed``.
        The result's sample is what ``decode`` (vae_decoder.onnx) takes as it is.
        """
        from .flow_bundle import flow_embeddings, sample_flow

        given = {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        }
        if self.manifest.flow is None:
            raise ValueError("this bundle is not a flow-matching bundle: sample it with Bundle.sample")
        embeddings = flow_embeddings(self, prompts, negative_prompts, given)
        return sample_flow(self, embeddings, noise, steps, guidance_scale, seed)

    def encode_flow(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """A flow bundle's (prompt_embeds, pooled_prompt_embeds) of ``prompts``: every tokenizer, text_encoder.onnx."""
        from .flow_bundle import encode_flow

        return encode_flow(self, prompts)

    def flow_tokenizer(self, spec: TokenizerSpec) -> Any:
        """The tokenizer of a manifest ``tokenizers`` entry (loaded once, with transformers' AutoTokenizer); a
        ``ManifestError`` naming the field when its special ids are not the recorded ones (``check_tokenizer``)."""
        if spec.folder not in self._flow_tokenizers:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.path / spec.folder))
            try:
                spec.check_tokenizer(tokenizer)
            except TokenizerSpecError as exc:
                raise ManifestError(str(exc)) from None
            self._flow_tokenizers[spec.folder] = tokenizer
        return self._flow_tokenizers[spec.folder]

    def _renoise(
        self, i: int, t: int, x: np.ndarray, step_noise: Sequence[np.ndarray | None] | None, keys: list[tuple[int, int]]
    ) -> np.ndarray:
        if step_noise is not None:
            n = step_noise[i]
            return np.zeros_like(x) if n is None else check_array(n, f"step_noise[{i}]", x.shape)
        assert self.manifest.guidance is not None
        w0, w1 = self.manifest.guidance.window
        # Draw only where the graph can use it, as the PyTorch pipeline does (outside, the graph ignores it).
        return self._seed_noise(keys, renoise_stream(i)) if w0 <= t <= w1 else np.zeros_like(x)

    def _ddpm_noise(
        self, i: int, t: int, x: np.ndarray, ddpm_noise: Sequence[np.ndarray | None] | None, keys: list[tuple[int, int]]
    ) -> np.ndarray | None:
        """The DDPM step's variance noise: given, or drawn where DDPMScheduler draws it (t > 0)."""
        if ddpm_noise is not None:
            n = ddpm_noise[i]
            return None if n is None else check_array(n, f"ddpm_noise[{i}]", x.shape)
        return self._seed_noise(keys, ddpm_stream(i)) if t > 0 else None

    def _seed_noise(self, keys: list[tuple[int, int]], stream: int) -> np.ndarray:
        """(B, *sample_shape) float32 Philox noise, image i keyed by keys[i] = (seed, item)."""
        shape = self.manifest.sample_shape
        n = int(np.prod(shape))
        return np.stack([gaussian_noise(s, item, stream, n).reshape(shape) for s, item in keys])

    def _check_threshold(self, timesteps: np.ndarray) -> None:
        m = self.manifest
        g = m.guidance
        if m.reference_threshold_alpha_bar is None or not isinstance(g, ReferenceGuidance) or g.threshold is not None:
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
            if self.manifest.flow is not None:  # flow bundles exported before their VAE decoder was
                raise ManifestError("this flow bundle has no 'vae_decoder' graph (exported before it was); re-export")
            return np.asarray(sample, dtype=np.float32)
        return np.asarray(
            self.session("vae_decoder").run(None, {"latents": np.ascontiguousarray(sample, np.float32)})[0]
        )

    @staticmethod
    def to_uint8(images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded as diffusers' image processor does."""
        x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return np.rint(x * 255.0).astype(np.uint8)


def _check_finite(x: np.ndarray, i: int, steps: int, t: float) -> None:
    """Never hand back NaN samples without a word."""
    finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if not finite.all():
        raise FloatingPointError(
            f"step {i + 1} of {steps} (timestep {t:g}) made non-finite samples for image(s) "
            f"{np.flatnonzero(~finite).tolist()}; check the guidance scale, the conditioning and the bank"
        )


def run_bundle(
    bundle_dir: str | os.PathLike[str],
    conditioning: Any,
    steps: int | None = None,
    noise: np.ndarray | None = None,
    providers: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Open a bundle and sample: the final sample (latents for text models, images in [-1, 1] for the demo).

    ``conditioning``: class labels or prompt embeddings/prompts; ``kwargs`` go to ``Bundle.sample``. A flow bundle
    (SD3, Flux) takes prompts (``kwargs`` go to ``Bundle.sample_flow``: ``negative_prompts``, ``guidance_scale``, ...).
    """
    bundle = Bundle(bundle_dir, providers)
    if bundle.manifest.flow is not None:
        return bundle.sample_flow(prompts=conditioning, noise=noise, steps=steps, **kwargs).sample
    return bundle.sample(conditioning, noise=noise, steps=steps, **kwargs).sample


def _transformers_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer through transformers (a folder without the fast form): (ids, mask) as the pipelines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))

    def tokenize(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np"
        )
        return out.input_ids.astype(np.int64), out.attention_mask.astype(np.int64)

    return tokenize
