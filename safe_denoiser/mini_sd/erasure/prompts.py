"""The prompts the erasures are built from, all from the caption grammar (``captions.py``), and their text states.

``captions.digit_captions(d)`` is every single-digit caption the grammar says about the digit ``d`` (every
attribute combination an image can have, every training frame): 3,320 texts for the 8. The erasures draw seeded
subsets of those for the concept and, for UCE's preservation, for the other digits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.mini_sd.captions import digit_captions
from safe_denoiser.mini_sd.data import MAX_TOKENS

__all__ = ["drawn_captions", "last_word_index", "sample_captions", "text_states"]


def drawn_captions(digits: tuple[int, ...], count: int, seed: int) -> list[str]:
    """``count`` captions drawn without replacement (seeded) from the pooled ``digit_captions`` of ``digits``."""
    pool = [t for d in digits for t in digit_captions(d)]
    return sample_captions(pool, count, seed, f"the captions of digits {digits}")


def sample_captions(pool: Sequence[str], count: int, seed: int, what: str = "the pool") -> list[str]:
    """``count`` of ``pool`` drawn without replacement with ``random.Random(seed)``."""
    if not 0 < count <= len(pool):
        raise ValueError(f"count must be 1..{len(pool)} ({what}), got {count}")
    return random.Random(seed).sample(list(pool), count)


@torch.no_grad()
def text_states(pipe: Any, texts: list[str]) -> Tensor:
    """(len(texts), 77, width): what ``StableDiffusionPipeline.encode_prompt`` gives the UNet for each text."""
    ids = pipe.tokenizer(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    out: Tensor = pipe.text_encoder(ids)[0]
    return out


def last_word_index(pipe: Any, text: str) -> int:
    """The position of ``text``'s last word token (the start-of-text token, 0, for the empty prompt)."""
    ids = pipe.tokenizer(text, truncation=True, max_length=MAX_TOKENS).input_ids
    return max(0, len(ids) - 2)
