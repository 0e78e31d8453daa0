"""A bundle's prompt tokenizer through the ``tokenizers`` library alone, as SD-1.x pipelines tokenize.

A bundle's ``tokenizer/`` folder is the pipeline's tokenizer as ``save_pretrained`` wrote it: ``tokenizer.json`` (the
fast tokenizer: normaliser, BPE, the start / end post-processor) and ``tokenizer_config.json`` (``model_max_length``,
``pad_token``). transformers' own tokenizer reads the same two files, pads to ``model_max_length`` with the pad token
and truncates keeping the special tokens; doing that here with ``tokenizers`` gives the same ids without importing
transformers, which is most of the Python runtime's start-up (about 1.6 s of 2.3 s on the miniature's bundle,
docs/performance.md). A folder without both files, or whose pad token is not in the vocabulary, has no fast form:
``load_prompt_tokenizer`` returns None and the runtime falls back to transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PromptTokenizer", "load_prompt_tokenizer"]


@dataclass(frozen=True)
class PromptTokenizer:
    """``tokenizers.Tokenizer`` with the pipeline's padding and truncation to ``max_length``."""

    tokenizer: Any
    max_length: int

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask) (B, max_length) int64."""
        encodings = self.tokenizer.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        return ids, mask


def load_prompt_tokenizer(folder: str | Path) -> PromptTokenizer | None:
    """The folder's tokenizer in its fast form, or None when it has none (module docstring)."""
    folder = Path(folder)
    file, config_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (file.is_file() and config_file.is_file()):
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    max_length, pad = config.get("model_max_length"), config.get("pad_token")
    if isinstance(pad, dict):  # older configs store special tokens as serialised AddedTokens
        pad = pad.get("content")
    if not (isinstance(max_length, int) and 0 < max_length <= 4096 and isinstance(pad, str)):
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        return None
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    return PromptTokenizer(tokenizer, max_length)
