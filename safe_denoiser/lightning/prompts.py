"""Prompt sets: plain text, CSV and JSONL files of generation requests, one ``PromptItem`` each.

Column names of the public attack sets are understood (Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion, I2P):
``prompt``; the seed from ``seed``, ``evaluation_seed`` or ``sd_seed``; the id from ``id`` or ``case_number``;
the class from ``class``, ``class_label``, ``label`` or ``categories``; ``negative_prompt``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PromptItem", "PromptSetError", "load_prompts", "safe_file_stem"]

PROMPT_KEYS = ("prompt", "text", "caption")
SEED_KEYS = ("seed", "evaluation_seed", "sd_seed")
ID_KEYS = ("id", "case_number")
CLASS_KEYS = ("class", "class_label", "label", "categories")
NEGATIVE_KEYS = ("negative_prompt",)
_STEM = re.compile(r"[^A-Za-z0-9_.-]+")


class PromptSetError(ValueError):
    """A prompt file that cannot be read: missing file or column, bad seed, duplicate id."""


@dataclass(frozen=True)
class PromptItem:
    """One image to generate. ``seed`` alone decides its random numbers (independent of batch and world size)."""

    id: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    class_label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The output file name (without suffix), sanitised from the id, never from the prompt text."""
        return safe_file_stem(self.id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_file_stem(item_id: str, max_len: int = 100) -> str:
    """Letters, digits, '.', '_' and '-' only; no leading dot (no hidden files, no '..'); bounded length."""
    stem = _STEM.sub("_", item_id).lstrip(".")[:max_len]
    if not stem:
        raise PromptSetError(f"item id {item_id!r} gives an empty file name; use letters, digits, '_', '-' or '.'")
    return stem


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
    return None


def _parse_seed(value: Any, where: str, default_seed: int) -> int:
    if value is None:
        return default_seed
    try:
        seed = int(float(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise PromptSetError(f"{where}: seed {value!r} is not an integer") from exc
    if not 0 <= seed < 2**63:
        raise PromptSetError(f"{where}: seed {seed} must be in [0, 2**63)")
    return seed


def _item(row: dict[str, Any], index: int, where: str, default_seed: int) -> PromptItem:
    prompt = _first(row, PROMPT_KEYS)
    if prompt is None:
        raise PromptSetError(f"{where}: no prompt: expected a column named one of {list(PROMPT_KEYS)}")
    raw_id = _first(row, ID_KEYS)
    item_id = str(raw_id) if raw_id is not None else f"{index:06d}"
    cls = _first(row, CLASS_KEYS)
    neg = _first(row, NEGATIVE_KEYS)
    used = set(PROMPT_KEYS + SEED_KEYS + ID_KEYS + CLASS_KEYS + NEGATIVE_KEYS)
    extra = {str(k): str(v) for k, v in row.items() if k not in used and k is not None and v is not None}
    return PromptItem(
        id=item_id,
        prompt=str(prompt),
        seed=_parse_seed(_first(row, SEED_KEYS), where, default_seed),
        negative_prompt=None if neg is None else str(neg),
        class_label=None if cls is None else str(cls),
        extra=extra,
    )


def load_prompts(path: str | os.PathLike[str], default_seed: int = 42) -> list[PromptItem]:
    """Read a .txt (one prompt a line), .csv (header row) or .jsonl (one object a line) prompt set.

    Items without a seed get ``default_seed`` (the paper's protocol: seed 42 unless the set gives one).
    Ids must be unique after sanitisation, since they name the output files.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"prompt file {str(p)!r} does not exist or is not a file")
    suffix = p.suffix.lower()
    items: list[PromptItem] = []
    try:
        with p.open(encoding="utf-8", newline="") as f:
            if suffix == ".txt":
                lines = [line.strip() for line in f]
                for i, line in enumerate(x for x in lines if x):
                    items.append(PromptItem(id=f"{i:06d}", prompt=line, seed=default_seed))
            elif suffix == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or not any(k in reader.fieldnames for k in PROMPT_KEYS):
                    raise PromptSetError(
                        f"{p.name}: no prompt column: expected one of {list(PROMPT_KEYS)}, found {reader.fieldnames}"
                    )
                for i, row in enumerate(reader):
                    items.append(_item(row, i, f"{p.name} row {i + 2}", default_seed))
            elif suffix in (".jsonl", ".ndjson"):
                n = 0
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise PromptSetError(f"{p.name} line {lineno}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict):
                        raise PromptSetError(
                            f"{p.name} line {lineno}: expected a JSON object, got {type(row).__name__}"
                        )
                    items.append(_item(row, n, f"{p.name} line {lineno}", default_seed))
                    n += 1
            else:
                raise PromptSetError(f"prompt file {p.name!r}: unsupported suffix {suffix!r}; use .txt, .csv or .jsonl")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"prompt file {p.name!r} is not UTF-8 text") from exc
    if not items:
        raise PromptSetError(f"prompt file {p.name!r} holds no prompts")
    seen: dict[str, str] = {}
    for it in items:
        if it.stem in seen:
            raise PromptSetError(
                f"{p.name}: ids {seen[it.stem]!r} and {it.id!r} give the same file name {it.stem!r}; ids must be unique"
            )
        seen[it.stem] = it.id
    return items
