"""SAFREE on a Stable Diffusion pipeline: ``attach_safree(pipe, config)`` / ``detach_safree(pipe)``.

The equations live in ``safe_denoiser.core.safree``; see its docstring. Design (nothing of the pipeline is copied):

* ``pipe.encode_prompt`` is wrapped (an instance attribute over the class method). It returns the pipeline's own
  embeddings unchanged and, per prompt, computes once: the leave-one-out pooled embeddings (one text-encoder call
  for all masked prompts of the batch), the trigger flags, the filtered hidden states and t'.
* Hooks on the *innermost* UNet (forward pre-hook and forward hook; ``SLDUNet`` and other wrappers are looked
  through) put the filtered rows into the prompt half of the CFG batch, [uncond (R), cond (R), ...], for steps
  0..t' of each prompt, and, with latent re-attention, append one reference row per filtered prompt (its original
  embedding) that the up-block pre-hooks compare against and the forward hook removes again.

Because SAFREE lives inside the UNet call and changes only the prompt rows, it composes with ``attach`` (the
scheduler wrapper sees the final prediction), with ``attach_sld`` (SLD appends its safety rows after the prompt
rows; SAFREE's hooks run inside SLD's single UNet call), and with negative prompts and swapped-in UNet weights,
in any order of attachment. A prompt without a trigger token adds no row and changes no bit. Per-trajectory
state (the step counter) resets on every ``encode_prompt`` and whenever the scheduler's ``timesteps`` tensor is
replaced (a new ``set_timesteps``); call ``reset()`` in hand-written loops that reuse a schedule.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..core.safree import SafreeConfig, latent_reattention, orthogonal_projector, safree_tokens

__all__ = ["Safree", "SafreeRecord", "attach_safree", "detach_safree", "encode_pooled", "innermost_unet"]


class SafreeRecord(NamedTuple):
    """One prompt's detection: per real token whether it is a trigger, and t' (the last filtered step)."""

    triggers: tuple[bool, ...]
    last_step: int

    @property
    def filtered(self) -> bool:
        return any(self.triggers)


class _Call(NamedTuple):
    """What one pipeline call's prompts need at every step."""

    rows: int  # R: prompt rows of the CFG batch (prompts x images per prompt)
    filtered: Tensor  # (R, L, D) filtered hidden states
    flagged: list[int]  # rows with at least one trigger
    last_steps: list[int]  # per row, t'


class _Pending(NamedTuple):
    """The current UNet call's extra reference rows: batch size before them and (target, reference) row indices."""

    size: int
    targets: Tensor
    references: Tensor


def innermost_unet(unet: nn.Module) -> nn.Module:
    """Look through wrappers that keep the real UNet as their ``unet`` child (``SLDUNet``, ...)."""
    child = unet._modules.get("unet")
    while isinstance(child, nn.Module):
        unet, child = child, child._modules.get("unet")
    return unet


def _text_parts(pipe: Any) -> tuple[Any, Any]:
    tokenizer, text_encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or text_encoder is None:
        raise ValueError(f"{type(pipe).__name__} needs a tokenizer and a text_encoder for SAFREE")
    return tokenizer, text_encoder


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), padded and truncated to the model length as the pipeline does it."""
    out = tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask


def encode_pooled(text_encoder: Any, ids: Tensor) -> Tensor:
    """(N, D) pooled text embeddings of token ids (N, L), without gradients."""
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[1]


def _masked_ids(ids: Tensor, n: int, mask_token_id: int) -> Tensor:
    """(n, L): the prompt's ids with real token i (position i + 1) replaced by ``mask_token_id`` in row i."""
    rows = ids.repeat(n, 1)
    positions = torch.arange(n)
    rows[positions, positions + 1] = mask_token_id
    return rows


def _append_rows(value: Any, n: int, idx: Tensor) -> Any:
    """Batch-aligned inputs (first dim n) get rows ``idx`` appended; everything else passes through."""
    if isinstance(value, Tensor):
        return torch.cat([value, value[idx.to(value.device)]]) if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, (list, tuple)):
        return type(value)(_append_rows(v, n, idx) for v in value)
    if isinstance(value, dict):
        return {k: _append_rows(v, n, idx) for k, v in value.items()}
    return value


class Safree:
    """SAFREE attached to one pipeline (see the module docstring); ``records`` describe the last call's prompts."""

    def __init__(self, pipe: Any, config: SafreeConfig, concept_projector: Tensor) -> None:
        self.config = config
        self.concept_projector = concept_projector
        self.records: list[SafreeRecord] = []
        self.step_index = 0
        self._pipe = weakref.ref(pipe)
        self._call: _Call | None = None
        self._pending: _Pending | None = None
        self._marker: object | None = None
        self._handles: list[Any] = []
        self._original_encode: Callable[..., Any] = pipe.encode_prompt
        self._signature = inspect.signature(self._original_encode)

    # ---- the text side (once per pipeline call) -----------------------------------------------------------
    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's ``encode_prompt``, unchanged output; records what SAFREE does to each prompt."""
        out = self._original_encode(*args, **kwargs)
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        prompt = arguments.get("prompt")
        self.reset()
        self._call, self.records = None, []
        if prompt is None:  # precomputed prompt_embeds: no tokens to analyse
            return out
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        self._call = self._analyse(prompts, per_prompt, out[0])
        return out

    def _analyse(self, prompts: list[str], per_prompt: int, embeds: Tensor) -> _Call:
        """Filtered hidden states, flags and t' of each prompt; one text-encoder call for all masked prompts."""
        pipe = self._pipe()
        tokenizer, text_encoder = _text_parts(pipe)
        if embeds.shape[0] != len(prompts) * per_prompt:
            raise ValueError(
                f"SAFREE: {embeds.shape[0]} prompt embeddings for {len(prompts)} prompts x {per_prompt} images"
            )
        ids, attention = _tokenize(tokenizer, prompts)
        if ids.shape[1] != embeds.shape[1]:
            raise ValueError(f"SAFREE: {ids.shape[1]} tokens but prompt embeddings of length {embeds.shape[1]}")
        counts = [max(int(a.sum()) - 2, 0) for a in attention]  # real tokens between BOS and EOS
        masked_ids = [_masked_ids(ids[b], n, self.config.mask_token_id) for b, n in enumerate(counts) if n > 0]
        pooled = encode_pooled(text_encoder, torch.cat(masked_ids)) if masked_ids else None
        projector = self.concept_projector.to(embeds.device)
        filtered, offset = [], 0
        self.records = []
        for b, n in enumerate(counts):
            masked = pooled[offset : offset + n] if pooled is not None else embeds.new_zeros(0, embeds.shape[-1])
            offset += n
            active = attention[b].to(device=embeds.device, dtype=torch.bool)
            tokens, flags, last = safree_tokens(embeds[b * per_prompt], masked, active, projector, self.config)
            filtered.append(tokens)
            self.records.append(SafreeRecord(tuple(bool(f) for f in flags.tolist()), last))
        rows = [r for r in self.records for _ in range(per_prompt)]
        return _Call(
            rows=len(rows),
            filtered=torch.stack(filtered).repeat_interleave(per_prompt, dim=0),
            flagged=[i for i, r in enumerate(rows) if r.filtered],
            last_steps=[r.last_step for r in rows],
        )

    @property
    def filtered_embeddings(self) -> Tensor | None:
        """(R, L, D) the last call's filtered prompt rows (prompts x images per prompt); None without prompts."""
        return None if self._call is None else self._call.filtered

    # ---- the UNet side (every step) -----------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new trajectory at step 0."""
        self.step_index = 0
        self._pending = None

    def _track_trajectory(self) -> None:
        """Reset when the scheduler's schedule object changed (a new sampling call): an identity test, no sync."""
        marker = getattr(getattr(self._pipe(), "scheduler", None), "timesteps", None)
        if marker is not None and marker is not self._marker:
            self._marker = marker
            self.reset()

    def _re_attention_on(self) -> bool:
        return self.config.re_attention and any(s != 1.0 for s in self.config.re_attention_scales)

    def unet_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Filtered prompt rows in; with re-attention, one reference row per filtered prompt appended."""
        self._pending = None
        call = self._call
        if call is None:
            return None
        self._track_trajectory()
        step = self.step_index
        self.step_index += 1
        rows = [r for r in call.flagged if not self.config.self_validation or step <= call.last_steps[r]]
        if not rows:
            return None
        items, named = list(args), dict(kwargs)
        positional = len(items) > 2  # SLDUNet passes (sample, timestep, encoder_hidden_states) positionally
        ehs: Tensor = items[2] if positional else named["encoder_hidden_states"]
        size = ehs.shape[0]
        pipe = self._pipe()
        offset = call.rows if bool(getattr(pipe, "do_classifier_free_guidance", size >= 2 * call.rows)) else 0
        if size < offset + call.rows:
            raise ValueError(
                f"SAFREE: a UNet batch of {size} rows has no prompt rows {offset}..{offset + call.rows - 1}"
            )
        targets = torch.tensor([offset + r for r in rows], device=ehs.device)
        new_ehs = ehs.index_copy(0, targets, call.filtered[rows].to(ehs))
        if self._re_attention_on():
            new_ehs = torch.cat([new_ehs, ehs[targets]])  # the reference rows keep the original prompt
            self._pending = _Pending(size, targets, torch.arange(size, size + len(rows), device=ehs.device))
            items = [_append_rows(a, size, targets) for a in items]  # encoder_hidden_states is replaced below
            named = {k: _append_rows(v, size, targets) for k, v in named.items()}
        if positional:
            items[2] = new_ehs
        else:
            named["encoder_hidden_states"] = new_ehs
        return tuple(items), named

    def unet_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Drop the reference rows from the UNet output."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if isinstance(output, tuple):
            return (output[0][: pending.size], *output[1:])
        output.sample = output.sample[: pending.size]
        return output

    def up_block_pre_hook(self, scale: float) -> Callable[..., Any]:
        """A pre-hook re-weighting the skip features of the filtered rows against their reference rows."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            pending = self._pending
            if pending is None:
                return None
            radius = self.config.re_attention_radius

            def reweight(x: Tensor) -> Tensor:
                new = latent_reattention(x[pending.targets], x[pending.references], scale, radius)
                return x.index_copy(0, pending.targets, new)

            if "res_hidden_states_tuple" in kwargs:
                kwargs = {**kwargs, "res_hidden_states_tuple": tuple(map(reweight, kwargs["res_hidden_states_tuple"]))}
                return args, kwargs
            if len(args) > 1:
                return (args[0], tuple(map(reweight, args[1])), *args[2:]), kwargs
            return None

        return hook

    def install(self, pipe: Any) -> None:
        """Wrap ``pipe.encode_prompt`` and register the UNet hooks."""
        unet = innermost_unet(pipe.unet)
        self._handles.append(unet.register_forward_pre_hook(self.unet_pre_hook, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self.unet_hook, with_kwargs=True))
        if self.config.re_attention:
            for i, block in enumerate(getattr(unet, "up_blocks", [])):
                stage = getattr(block, "resolution_idx", None)
                stage = i if stage is None else stage
                if stage < len(self.config.re_attention_scales):
                    hook = self.up_block_pre_hook(self.config.re_attention_scales[stage])
                    self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        object.__setattr__(pipe, "encode_prompt", self.encode_prompt)

    def remove(self, pipe: Any) -> None:
        """Remove the hooks and the ``encode_prompt`` wrapper."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        pipe.__dict__.pop("encode_prompt", None)


def concept_projector(pipe: Any, concepts: Sequence[str]) -> Tensor:
    """P_C (D, D) from the pooled embeddings of the concept phrases under the pipeline's own text encoder."""
    tokenizer, text_encoder = _text_parts(pipe)
    ids, _ = _tokenize(tokenizer, concepts)
    return orthogonal_projector(encode_pooled(text_encoder, ids))


def attach_safree(pipe: Any, config: SafreeConfig | None = None) -> Safree:
    """Make ``pipe`` sample with SAFREE (default settings: the nudity concepts); returns the ``Safree`` handle."""
    cfg = SafreeConfig() if config is None else config
    if not isinstance(cfg, SafreeConfig):
        raise TypeError(f"config must be a SafreeConfig, got {type(config).__name__}")
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no unet to attach SAFREE to")
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt: SAFREE needs a text-conditioned pipeline")
    if isinstance(pipe.__dict__.get("_safree"), Safree):
        raise ValueError("SAFREE is already attached to this pipeline: detach_safree(pipe) first")
    handle = Safree(pipe, cfg, concept_projector(pipe, cfg.concepts))
    handle.install(pipe)
    object.__setattr__(pipe, "_safree", handle)
    return handle


def detach_safree(pipe: Any) -> Safree:
    """Remove SAFREE from ``pipe``; returns the handle. Raises ValueError when SAFREE is not attached."""
    handle = pipe.__dict__.get("_safree")
    if not isinstance(handle, Safree):
        raise ValueError("SAFREE is not attached to this pipeline")
    handle.remove(pipe)
    del pipe.__dict__["_safree"]
    return handle
