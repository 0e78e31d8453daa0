"""The tiny T5 tokenizer of the test pipelines: a real SentencePiece Unigram model with T5's conventions, shipped in
the package (``data/tiny_t5/spiece.model``, made by ``make_tiny_t5.py``) and loaded offline.

Its folder is a T5 tokenizer folder as SD3's ``tokenizer_3`` and Flux's ``tokenizer_2`` are: the C++ runtime's
``T5Tokenizer`` reads the same ``spiece.model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TINY_T5_EXTRA_IDS", "TINY_T5_FOLDER", "tiny_t5_tokenizer"]

TINY_T5_FOLDER: Path = Path(__file__).with_name("data") / "tiny_t5"  # spiece.model: make_tiny_t5.py writes it
TINY_T5_EXTRA_IDS = 100  # T5's <extra_id_N> sentinels, added after the model's pieces (as transformers does)


def tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """transformers' ``T5TokenizerFast`` of the tiny model (Flux's 512 by default; SD3 pads T5 to 256).

    Converted from ``spiece.model`` by transformers (needs the ``sentencepiece`` package, a dev extra); ``len()`` is
    the model's pieces plus the 100 sentinels, so a text encoder needs at least that vocabulary.
    """
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # lazily exported

    return T5TokenizerFast.from_pretrained(
        str(TINY_T5_FOLDER), local_files_only=True, model_max_length=model_max_length, extra_ids=TINY_T5_EXTRA_IDS
    )
