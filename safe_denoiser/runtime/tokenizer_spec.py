"""The manifest's ``tokenizers`` entries of a flow bundle (SD3, Flux): one typed value per tokenizer folder.

Each entry says what a runtime needs to tokenize as the pipeline does (docs/bundle_format.md, "Flow bundles"): the
folder inside the bundle, the tokenizer's kind ("clip": byte-level BPE read from ``tokenizer.json``; "t5":
SentencePiece read from ``spiece.model``), the ``text_encoder`` input its ids feed, the padding / truncation
length, and the special token ids a runtime needs besides the vocabulary (``special_ids``: read from the tokenizer
object at export, because they come from ``tokenizer_config.json`` as transformers resolves it, e.g. SD3's CLIP-G pads
with "!", which ``tokenizer.json`` does not say). Padding is always to ``max_length`` and truncation always on, as the
SD3 and Flux pipelines call their tokenizers; both are recorded so a reader never has to assume them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

__all__ = [
    "SPECIAL_ID_KEYS",
    "TOKENIZER_FILES",
    "TOKENIZER_KINDS",
    "TokenizerKind",
    "TokenizerSpec",
    "TokenizerSpecError",
    "special_ids",
    "tokenizer_kind",
]

TokenizerKind = Literal["clip", "t5"]
TOKENIZER_KINDS: tuple[TokenizerKind, ...] = ("clip", "t5")
# The file each kind's runtime tokenizer reads (the C++ CLIP tokenizer: tokenizer.json; sentencepiece: spiece.model).
TOKENIZER_FILES: dict[str, str] = {"clip": "tokenizer.json", "t5": "spiece.model"}
# The special-id keys of each kind's entry (clip: BOS, text, EOS, padding; t5: text, </s>, padding, and the count of
# <extra_id_N> sentinels that prompts may contain). Everything below derives from this table.
SPECIAL_ID_KEYS: dict[str, tuple[str, ...]] = {
    "clip": ("pad_id", "eos_id", "bos_id"),
    "t5": ("pad_id", "eos_id", "extra_ids"),
}
_ALL_SPECIAL_KEYS = tuple(dict.fromkeys(key for keys in SPECIAL_ID_KEYS.values() for key in keys))
MAX_EXTRA_IDS = 10000  # the C++ T5 tokenizer's bound
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class TokenizerSpecError(ValueError):
    """A ``tokenizers`` entry that is malformed or names a folder that lacks what its kind needs."""


def tokenizer_kind(tokenizer: Any) -> TokenizerKind:
    """ "clip" or "t5" from the tokenizer's class (``CLIPTokenizer*`` / ``T5Tokenizer*``); ValueError otherwise."""
    name = type(tokenizer).__name__
    for prefix, kind in (("CLIPTokenizer", "clip"), ("T5Tokenizer", "t5")):
        if name.startswith(prefix):
            return kind  # type: ignore[return-value]
    raise ValueError(f"tokenizer class {name!r} is not supported in a bundle (expected CLIPTokenizer* or T5Tokenizer*)")


def _t5_sentinels(tokenizer: Any) -> int:
    """The count of ``<extra_id_N>`` tokens, checked to be numbered as T5's (N = 0..count-1, ``<extra_id_N>`` =
    ``len(tokenizer) - 1 - N``: what the C++ tokenizer rebuilds from the count); ValueError otherwise."""
    found = {int(m.group(1)): i for t, i in tokenizer.get_vocab().items() if (m := _SENTINEL.fullmatch(t))}
    size = len(tokenizer)
    if any(found.get(n) != size - 1 - n for n in range(len(found))):
        raise ValueError(
            f"{type(tokenizer).__name__}: its <extra_id_N> tokens are not numbered as T5's (<extra_id_N> ="
            f" len(tokenizer) - 1 - N for N = 0..{len(found) - 1}), which the runtimes assume"
        )
    return len(found)


def special_ids(tokenizer: Any, kind: TokenizerKind) -> dict[str, int]:
    """``SPECIAL_ID_KEYS[kind]`` -> id (``extra_ids``: the sentinel count) as transformers' ``tokenizer`` object has
    them; ValueError naming the token when the tokenizer lacks one."""
    values = {
        "pad_id": lambda: tokenizer.pad_token_id,
        "eos_id": lambda: tokenizer.eos_token_id,
        "bos_id": lambda: tokenizer.bos_token_id,
        "extra_ids": lambda: _t5_sentinels(tokenizer),
    }
    ids = {key: values[key]() for key in SPECIAL_ID_KEYS[kind]}
    missing = [key for key, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{type(tokenizer).__name__} has no {missing} (a {kind} tokenizer in a bundle needs them)")
    return {key: int(v) for key, v in ids.items()}


@dataclass(frozen=True)
class TokenizerSpec:
    """One tokenizer of a flow bundle's ``text_encoder`` (see the module docstring)."""

    folder: str
    kind: TokenizerKind
    input: str
    max_length: int
    pad_id: int
    eos_id: int
    bos_id: int | None = None  # clip only
    extra_ids: int = 0  # t5 only: the <extra_id_N> sentinels (ids len - 1 - N)
    padding: str = "max_length"
    truncation: bool = True

    def __post_init__(self) -> None:
        where = f"manifest: tokenizers entry {self.folder!r}"
        path = PurePosixPath(self.folder)
        if not self.folder or path.is_absolute() or ".." in path.parts or "\\" in self.folder:
            raise TokenizerSpecError(f"{where}: folder must be a relative path inside the bundle, got {self.folder!r}")
        if self.kind not in TOKENIZER_KINDS:
            raise TokenizerSpecError(f"{where}: kind must be one of {TOKENIZER_KINDS}, got {self.kind!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise TokenizerSpecError(f"{where}: max_length must be an int >= 2, got {self.max_length!r}")
        if self.padding != "max_length" or self.truncation is not True:
            raise TokenizerSpecError(
                f"{where}: padding must be 'max_length' and truncation true (how the SD3 / Flux pipelines tokenize),"
                f" got padding={self.padding!r}, truncation={self.truncation!r}"
            )
        if not self.input:
            raise TokenizerSpecError(f"{where}: input must name a text_encoder input")
        for key in _ALL_SPECIAL_KEYS:
            value, wanted = getattr(self, key), key in SPECIAL_ID_KEYS[self.kind]
            high = MAX_EXTRA_IDS if key == "extra_ids" else 2**31 - 1
            if not wanted and value not in (None, 0):
                raise TokenizerSpecError(f"{where}: a {self.kind} tokenizer has no {key}, got {value!r}")
            if wanted and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high):
                raise TokenizerSpecError(f"{where}: {key} must be an int in 0..{high}, got {value!r}")

    @property
    def special_ids(self) -> dict[str, int]:
        """The recorded ``SPECIAL_ID_KEYS[kind]`` values."""
        return {key: getattr(self, key) for key in SPECIAL_ID_KEYS[self.kind]}

    def check_tokenizer(self, tokenizer: Any) -> None:
        """``TokenizerSpecError`` naming the field when the loaded tokenizer's special ids (``special_ids``) are not
        the recorded ones: its ids would not be the ones the other runtime and the export used."""
        try:
            got = special_ids(tokenizer, self.kind)
        except ValueError as exc:
            raise TokenizerSpecError(f"tokenizer folder {self.folder!r}: {exc}") from None
        for key, want in self.special_ids.items():
            if got[key] != want:
                raise TokenizerSpecError(
                    f"manifest: tokenizers entry {self.folder!r}: {key} is {want}, but the tokenizer in"
                    f" {self.folder!r} has {got[key]} (re-export the bundle, or restore the folder)"
                )

    @property
    def required_file(self) -> str:
        """The file of ``folder`` that this kind's tokenizer is read from."""
        return TOKENIZER_FILES[self.kind]

    def check_folder(self, bundle_dir: str | Path) -> None:
        """``TokenizerSpecError`` naming the folder and file when the folder or its kind's file is missing."""
        folder = Path(bundle_dir) / self.folder
        if not folder.is_dir():
            raise TokenizerSpecError(f"bundle {str(bundle_dir)!r}: tokenizer folder {self.folder!r} is missing")
        if not (folder / self.required_file).is_file():
            raise TokenizerSpecError(
                f"bundle {str(bundle_dir)!r}: tokenizer folder {self.folder!r} ({self.kind}) has no"
                f" {self.required_file!r}, which a {self.kind} tokenizer is read from"
            )

    @classmethod
    def from_dict(cls, data: Any) -> TokenizerSpec:
        if not isinstance(data, dict):
            raise TokenizerSpecError(f"manifest: a tokenizers entry must be an object, got {type(data).__name__}")
        missing = [k for k in ("folder", "kind", "input", "max_length") if k not in data]
        if missing:
            raise TokenizerSpecError(f"manifest: tokenizers entry {data.get('folder')!r} is missing {missing}")
        ids = [k for k in SPECIAL_ID_KEYS.get(data["kind"], ()) if k not in data]
        if ids:  # written since the runtimes stopped deriving them from tokenizer.json: no safe fallback
            raise TokenizerSpecError(
                f"manifest: tokenizers entry {data['folder']!r} has no {ids} (exported before special token ids were"
                " recorded): re-export the bundle"
            )
        return cls(
            folder=str(data["folder"]),
            kind=data["kind"],
            input=str(data["input"]),
            max_length=data["max_length"],
            pad_id=data.get("pad_id", -1),  # present for a known kind (checked above); -1 is refused
            eos_id=data.get("eos_id", -1),
            bos_id=data.get("bos_id"),
            extra_ids=data.get("extra_ids", 0),
            padding=data.get("padding", "max_length"),
            truncation=data.get("truncation", True),
        )

    @classmethod
    def of_tokenizer(cls, tokenizer: Any, folder: str, input: str, max_length: int) -> TokenizerSpec:
        """The entry of a transformers tokenizer: its kind from the class, its special ids (``special_ids``)."""
        kind = tokenizer_kind(tokenizer)
        ids = special_ids(tokenizer, kind)
        return cls(
            folder,
            kind,
            input,
            max_length,
            pad_id=ids["pad_id"],
            eos_id=ids["eos_id"],
            bos_id=ids.get("bos_id"),
            extra_ids=ids.get("extra_ids", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "kind": self.kind,
            "input": self.input,
            "max_length": self.max_length,
            **self.special_ids,
            "padding": self.padding,
            "truncation": self.truncation,
        }
