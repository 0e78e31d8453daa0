"""A flow bundle's text side and decoder (SD3, Flux): ``text_encoder.onnx``, ``vae_decoder.onnx``, the tokenizers.

``FlowTextEncoder`` is the pipeline's ``encode_prompt`` after tokenization, as one graph over every tokenizer's ids
(docs/bundle_format.md, "Flow bundles"): it calls the pipeline's own encoders the way ``_get_clip_prompt_embeds`` /
``_get_t5_prompt_embeds`` do and assembles their outputs in ``encode_prompt``'s order of operations, so a graph
traced from it is ``encode_prompt`` by construction (tests/test_flow_bundle_text.py compares them).

- SD3: CLIP-L's and CLIP-G's penultimate hidden states, concatenated on features and zero-padded to T5's width,
  then T5's last hidden state (or zeros (B, max_sequence_length, joint_attention_dim) when the pipeline has no T5,
  as diffusers does) on the sequence axis; pooled: the two text projections, concatenated.
- Flux: ``prompt_embeds`` = T5's last hidden state; ``pooled_prompt_embeds`` = CLIP-L's pooler output.

``FlowVaeDecoder`` takes the sampler's final sample as stepped (Flux: packed), unpacks it (Flux), undoes the latent
scaling and shift and decodes: runtimes feed it the final sample as it is. Each tokenizer is saved to its own
folder (named as the pipeline's attribute) and described by a ``TokenizerSpec`` for the manifest.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safe_denoiser.runtime.manifest import GraphSpec
from safe_denoiser.runtime.tokenizer_spec import TOKENIZER_FILES, TokenizerSpec

from .flow_graphs import FlowFamily
from .onnx_graph import ExportOptions, export_graph

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "FlowTextEncoder",
    "FlowTokenizer",
    "FlowVaeDecoder",
    "export_flow_text_and_vae",
    "flow_tokenizers",
    "save_tokenizer",
]

DEFAULT_MAX_SEQUENCE_LENGTH: dict[str, int] = {"sd3": 256, "flux": 512}  # the pipelines' __call__ defaults
_EXAMPLE_PROMPTS = ["a photo of a cat", "", "a red car parked by the sea at dusk, " * 12]


@dataclass(frozen=True)
class FlowTokenizer:
    """One of the pipeline's tokenizers with the manifest entry that describes it in the bundle."""

    tokenizer: Any
    spec: TokenizerSpec
    t5_slot: bool  # the T5 encoder's tokenizer (its length axis stays dynamic in the graph)

    def ids(self, prompts: list[str]) -> Tensor:
        """(B, max_length) int64 ids, tokenized as the pipeline does (``spec``'s padding and truncation)."""
        out = self.tokenizer(
            prompts, padding=self.spec.padding, max_length=self.spec.max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids.long()


def flow_tokenizers(pipe: Any, family: FlowFamily, max_sequence_length: int | None = None) -> list[FlowTokenizer]:
    """The pipeline's tokenizers in ``text_encoder`` input order (SD3: CLIP-L, CLIP-G, T5 if it has one; Flux:
    CLIP-L, T5), each with folder, kind, input name, length (CLIP: ``tokenizer_max_length``; T5:
    ``max_sequence_length``, default the pipeline's) and the special ids the tokenizer object has."""
    t5_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    clip_length = int(pipe.tokenizer_max_length)
    slots = [("tokenizer", clip_length, False)]
    if family == "sd3":
        slots.append(("tokenizer_2", clip_length, False))
        if pipe.text_encoder_3 is not None:
            slots.append(("tokenizer_3", t5_length, True))
    else:
        slots.append(("tokenizer_2", t5_length, True))
    result = []
    for i, (attr, length, t5) in enumerate(slots):
        tok = getattr(pipe, attr)
        if tok is None:
            raise ValueError(f"the {family} pipeline has no {attr}: its text encoder cannot be exported")
        name = "input_ids" if i == 0 else f"input_ids_{i + 1}"
        result.append(FlowTokenizer(tok, TokenizerSpec.of_tokenizer(tok, attr, name, length), t5))
    return result


class FlowTextEncoder(nn.Module):
    """Every tokenizer's ids -> (prompt_embeds, pooled_prompt_embeds) as ``encode_prompt`` computes them.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (its text encoders are used, not copied).
        family: "sd3" or "flux".
        max_sequence_length: T5's token count; SD3 without T5: the length of the zeros in T5's place.
        encoders: replacements for the pipeline's text encoders (e.g. float16 copies), same order.
    """

    output_names = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, pipe: Any, family: FlowFamily, max_sequence_length: int, encoders: list[Any] | None = None):
        super().__init__()
        names = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if family == "sd3" else [])
        found = [getattr(pipe, n) for n in names]
        chosen = encoders if encoders is not None else found
        self.family = family
        self.encoders = nn.ModuleList([e for e in chosen if e is not None])
        self.zeros_length = max_sequence_length  # SD3 without T5
        self.joint_dim = int(pipe.transformer.config.joint_attention_dim) if family == "sd3" else 0

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"] + [f"input_ids_{i + 1}" for i in range(1, len(self.encoders))]

    def forward(self, *ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.family == "flux":
            pooled = self.encoders[0](ids[0], output_hidden_states=False).pooler_output
            return self.encoders[1](ids[1], output_hidden_states=False)[0].float(), pooled.float()
        clip_l = self.encoders[0](ids[0], output_hidden_states=True)
        clip_g = self.encoders[1](ids[1], output_hidden_states=True)
        clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)
        if len(self.encoders) == 3:
            t5 = self.encoders[2](ids[2])[0].to(clip.dtype)
        else:  # the pipeline's zeros, built from the batch axis so it stays dynamic
            t5 = clip.new_zeros((clip.shape[0], self.zeros_length, self.joint_dim))
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([clip_l[0], clip_g[0]], dim=-1)
        return torch.cat([clip, t5], dim=-2).float(), pooled.float()


class FlowVaeDecoder(nn.Module):
    """The sampler's final sample (Flux: packed (B, h w / 4, 4 C)) -> image (B, 3, H, W) in [-1, 1].

    ``latent_shape``: one unpacked latent (C, h, w) (the bank's / noise's shape before Flux packs it).
    """

    input_names = ("latents",)
    output_names = ("image",)

    def __init__(self, pipe: Any, family: FlowFamily, latent_shape: tuple[int, ...], vae: Any = None) -> None:
        super().__init__()
        self.vae = vae if vae is not None else pipe.vae
        self.family = family
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        _, h, w = latent_shape
        self.pixels = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        self.unpack = type(pipe)._unpack_latents if family == "flux" else None

    def forward(self, latents: Tensor) -> Tensor:
        """The pipelines' decode: (Flux: ``_unpack_latents``), ``latents / scaling + shift``, ``vae.decode``."""
        if self.unpack is not None:
            latents = self.unpack(latents, self.pixels[0], self.pixels[1], self.vae_scale_factor)
        latents = latents / self.scaling_factor + self.shift_factor
        dtype = next(self.vae.parameters()).dtype
        out: Any = self.vae.decode(latents.to(dtype), return_dict=False)
        return out[0].float()


def save_tokenizer(flow_tokenizer: FlowTokenizer, root: Path) -> None:
    """``save_pretrained`` into ``root / spec.folder``; a T5 tokenizer must leave ``spiece.model`` there (copied from
    the file it was loaded from when ``save_pretrained`` writes only tokenizer.json), else ValueError."""
    spec, tok = flow_tokenizer.spec, flow_tokenizer.tokenizer
    folder = root / spec.folder
    tok.save_pretrained(str(folder))
    needed = folder / TOKENIZER_FILES[spec.kind]
    source = getattr(tok, "vocab_file", None)
    if not needed.is_file() and spec.kind == "t5" and isinstance(source, str) and Path(source).is_file():
        shutil.copyfile(source, needed)
    if not needed.is_file():
        raise ValueError(
            f"pipeline.{spec.folder} ({type(tok).__name__}, kind {spec.kind!r}) saved no {needed.name!r}: a runtime"
            f" reads a {spec.kind} tokenizer from that file; load the tokenizer from a folder that has it"
        )


def export_flow_text_and_vae(
    pipe: Any, family: FlowFamily, latent_shape: tuple[int, ...], root: Path, options: ExportOptions
) -> tuple[dict[str, GraphSpec], tuple[TokenizerSpec, ...]]:
    """text_encoder.onnx, vae_decoder.onnx and the tokenizer folders of an SD3 / Flux pipeline under ``root``."""
    length = options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    toks = flow_tokenizers(pipe, family, length)
    for tok in toks:
        save_tokenizer(tok, root)
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    encoders = [getattr(pipe, n, None) for n in names[: 3 if family == "sd3" else 2]]
    if options.fp16:
        encoders = [None if e is None else copy.deepcopy(e).half() for e in encoders]
    te = FlowTextEncoder(pipe, family, length, [e.eval() if e is not None else None for e in encoders]).eval()

    def ids(b: int) -> list[Tensor]:
        prompts = (_EXAMPLE_PROMPTS * b)[:b]
        return [tok.ids(prompts) for tok in toks]

    axes: dict[str, dict[int, str]] = {t.spec.input: {0: "batch"} for t in toks}
    for t in toks:
        if t.t5_slot:
            axes[t.spec.input][1] = "t5_length"
    axes.update(prompt_embeds={0: "batch", 1: "text_length"}, pooled_prompt_embeds={0: "batch"})
    b, check_b = options.batch, options.batch + 1
    graphs = {
        "text_encoder": export_graph(
            te,
            ids(b),
            ids(check_b) if options.verify else None,
            root / "text_encoder.onnx",
            te.input_names,
            list(te.output_names),
            axes,
            options,
        )
    }
    vae = copy.deepcopy(pipe.vae).half() if options.fp16 else pipe.vae
    vd = FlowVaeDecoder(pipe, family, latent_shape, vae.eval()).eval()
    graphs["vae_decoder"] = export_graph(
        vd,
        [_example_latents(latent_shape, family, b, 2)],
        [_example_latents(latent_shape, family, check_b, 3)] if options.verify else None,
        root / "vae_decoder.onnx",
        list(vd.input_names),
        list(vd.output_names),
        {"latents": {0: "batch"}, "image": {0: "batch"}},
        options,
    )
    return graphs, tuple(t.spec for t in toks)


def _example_latents(latent_shape: tuple[int, ...], family: FlowFamily, b: int, seed: int) -> Tensor:
    """Random final samples as the sampler returns them (Flux: packed 2x2 patches)."""
    c, h, w = latent_shape
    x = torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(seed))
    if family == "flux":
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    return x
