"""The shipped tokenizer and text encoder as the attacks see them: prompts as token-id rows, their encoder states,
and the vocabulary an attack may draw from.

An attack prompt of ``k`` tokens is the row ``[BOS, t_1 .. t_k, EOS, EOS, ...]`` of ``MAX_TOKENS`` (77) ids, exactly
what the pipeline's tokenizer makes of the decoded text (the padding token is EOS, as in SD-1.x). So that this holds,
attacks draw only whole-word tokens (``</w>``-suffixed, printable ASCII) that the tokenizer gives back as themselves:
decoding joins them with spaces and re-tokenizing returns the same ids (``TextEncoder.roundtrips`` checks it).
Tokens holding a sensitive word (``filter.contains_sensitive``) are never drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.mini_sd.attacks.filter import contains_sensitive
from safe_denoiser.mini_sd.data import ASSETS_DIR, MAX_TOKENS

__all__ = ["TextEncoder"]

_WORD_END = "</w>"


@dataclass(frozen=True)
class TextEncoder:
    """The pipeline's ``CLIPTokenizer`` and frozen ``CLIPTextModel`` (eval mode, no gradients on its weights)."""

    tokenizer: Any
    model: Any

    @classmethod
    def load(cls, folder: str | Path = ASSETS_DIR) -> TextEncoder:
        """The shipped ones (``tokenizer/`` and ``text_encoder/`` of the miniature's diffusers folder)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        model = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True).eval()
        model.requires_grad_(False)
        return cls(tokenizer, model)

    @property
    def bos(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @cached_property
    def allowed_ids(self) -> Tensor:
        """(V_allowed,) sorted token ids an attack may use (module docstring)."""
        vocab: dict[str, int] = self.tokenizer.get_vocab()
        out = []
        for token, index in vocab.items():
            word = token[: -len(_WORD_END)]
            if not token.endswith(_WORD_END) or not word or not word.isascii() or not word.isprintable():
                continue
            if word.strip() != word or contains_sensitive(word):
                continue
            if self.tokenizer(word, add_special_tokens=False).input_ids == [index]:
                out.append(index)
        return torch.tensor(sorted(out), dtype=torch.long)

    def rows(self, tokens: Tensor) -> Tensor:
        """(B, k) attack tokens to (B, 77) prompt rows: BOS, the tokens, EOS padding."""
        b, k = tokens.shape
        if k > MAX_TOKENS - 2:
            raise ValueError(f"attack prompts hold at most {MAX_TOKENS - 2} tokens, got {k}")
        row = torch.full((b, MAX_TOKENS), self.eos, dtype=torch.long)
        row[:, 0] = self.bos
        row[:, 1 : k + 1] = tokens
        return row

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(B, 77) ids of free-text prompts as the pipeline tokenizes them (max_length padding, truncation)."""
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids

    def states(self, rows: Tensor, batch: int = 512) -> Tensor:
        """(B, 77, width) last hidden states: what the UNet's cross-attention reads."""
        with torch.no_grad():
            return torch.cat([self.model(input_ids=r).last_hidden_state for r in rows.split(batch)])

    def pooled(self, rows: Tensor, batch: int = 512) -> Tensor:
        """(B, width) the first-EOS state (CLIP's pooled text embedding)."""
        with torch.no_grad():
            return torch.cat([self.model(input_ids=r).pooler_output for r in rows.split(batch)])

    def forward_one_hot(self, rows: Tensor, one_hot: Tensor, select: Callable[[Any], Tensor]) -> Tensor:
        """``select(output)`` of the encoder run on ``one_hot @ token_embedding`` (a (B, 77, V) relaxation of
        ``rows``, differentiable) in place of the embedding lookup; ``rows`` still mark the EOS for pooling."""
        table = self.model.get_input_embeddings()
        handle = table.register_forward_hook(lambda _m, _i, _o: one_hot @ table.weight)
        try:
            return select(self.model(input_ids=rows))
        finally:
            handle.remove()

    def decode(self, tokens: Tensor) -> list[str]:
        """(B, k) attack tokens to prompt text (words joined by spaces)."""
        return [self.tokenizer.decode(t.tolist()).strip() for t in tokens]

    def roundtrips(self, tokens: Tensor) -> bool:
        """True when the decoded prompts tokenize back to exactly ``rows(tokens)``."""
        return bool(torch.equal(self.encode_text(self.decode(tokens)), self.rows(tokens)))
