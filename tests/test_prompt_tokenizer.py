"""The Python runtime's prompt tokenizer (``runtime.prompt_tokenizer``): the ``tokenizers``-only path gives the ids
and masks transformers gives for the same saved folder, padded and truncated as the pipelines do."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safe_denoiser.diffusers.pipelines import tiny_clip_tokenizer
from safe_denoiser.runtime.prompt_tokenizer import load_prompt_tokenizer

MINI_SD_TOKENIZER = Path(__file__).resolve().parents[1] / "safe_denoiser" / "assets" / "mini_sd" / "tokenizer"
EDGE_CASES = [
    "",
    "a handwritten eight",
    "A  HANDWRITTEN   Eight!!",
    "ünïcödé 8 ∞ \t tabs\nnewline",
    "eight " * 100,  # far past 77 tokens: truncated keeping the end token
    "<|endoftext|> inside a prompt",
    "!!!! pad-like characters !",
]


def _prompts(seed: int, n: int = 40) -> list[str]:
    """Edge cases and seeded random strings over letters, digits, punctuation, spaces and a few non-ASCII."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 ,.!?-'\"() éüß∞中"
    return EDGE_CASES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


def _reference(folder: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int64), out.attention_mask.astype(np.int64)


def _saved(tokenizer: Any, folder: Path) -> Path:
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("which", ["mini_sd", "tiny_eos_pad", "tiny_bang_pad"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_equals_transformers(which: str, seed: int, tmp_path: Path) -> None:
    if which == "mini_sd":
        folder = MINI_SD_TOKENIZER
    else:
        pad = "<|endoftext|>" if which == "tiny_eos_pad" else "!"
        folder = _saved(tiny_clip_tokenizer(pad_token=pad), tmp_path / which)
    fast = load_prompt_tokenizer(folder)
    assert fast is not None
    prompts = _prompts(seed)
    ids, mask = fast(prompts)
    want_ids, want_mask = _reference(folder, prompts)
    assert ids.dtype == np.int64 and ids.shape == want_ids.shape == (len(prompts), fast.max_length)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_folders_without_a_fast_form_fall_back(tmp_path: Path) -> None:
    """No tokenizer.json, or a pad token outside the vocabulary: None (the runtime then uses transformers)."""
    folder = _saved(tiny_clip_tokenizer(), tmp_path / "tok")
    (folder / "tokenizer.json").rename(tmp_path / "moved.json")
    assert load_prompt_tokenizer(folder) is None
    (tmp_path / "moved.json").rename(folder / "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<not-a-token>"}))
    assert load_prompt_tokenizer(folder) is None
