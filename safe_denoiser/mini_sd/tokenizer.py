"""The miniature's tokenizer: CLIP's byte-level BPE scheme with merges learnt here on the caption grammar.

The merges are trained with Hugging Face ``tokenizers`` (``BpeTrainer``) behind CLIP's own normaliser (NFC,
whitespace, lower case) and pre-tokeniser (CLIP's word regex, byte-level), with CLIP's ``</w>`` end-of-word suffix.
The vocabulary is then laid out as CLIP's is: the 256 byte characters, the same with ``</w>``, one token per merge
in merge order, ``<|startoftext|>`` and ``<|endoftext|>`` (which is also the padding and unknown token, as in
SD-1.x). ``transformers.CLIPTokenizer`` writes the folder: vocab.json + merges.txt (the standard form) and
tokenizer.json (what ``tokenizers``, ``CLIPTokenizerFast`` and the C++ runtime read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from safe_denoiser.files import atomic_write
from safe_denoiser.mini_sd.captions import training_universe
from safe_denoiser.mini_sd.data import MAX_TOKENS

__all__ = ["BOS", "EOS", "train_tokenizer"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


def _learn_merges(corpus: list[str], vocab_size: int) -> list[tuple[str, str]]:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    merges: list[Any] = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def train_tokenizer(out: str | Path, vocab_size: int = 1024) -> dict[str, Any]:
    """Learn the merges on the training captions and save a CLIPTokenizer folder at ``out``; returns a record."""
    from transformers import CLIPTokenizer

    corpus = sorted(training_universe())
    merges = _learn_merges(corpus, vocab_size)
    chars = _byte_characters()
    tokens = [*chars, *(c + "</w>" for c in chars)]
    known = set(tokens)
    for a, b in merges:
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=cast(Any, list(merges)), model_max_length=MAX_TOKENS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))  # tokenizer.json + tokenizer_config.json (transformers 5 writes no more)
    # The standard vocab/merges form, which every CLIPTokenizer (transformers 4's Python one too) reads.
    atomic_write(out / "vocab.json", lambda tmp: tmp.write_text(json.dumps(vocab, ensure_ascii=False), "utf-8"))
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(out / "merges.txt", lambda tmp: tmp.write_text("#version: 0.2\n" + lines, "utf-8"))
    return {
        "vocab_tokens": len(vocab),
        "merges": len(merges),
        "corpus_captions": len(corpus),
        "model_max_length": MAX_TOKENS,
        "longest_caption_tokens": max(len(tokenizer(c).input_ids) for c in corpus),
    }
