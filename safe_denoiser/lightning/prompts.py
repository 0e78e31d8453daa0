"""Prompt sets: plain text, CSV and JSONL files of generation requests, one ``PromptItem`` each.

Column names of the public attack sets are understood (Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion, I2P):
``prompt``; the seed from ``seed``, ``evaluation_seed`` or ``sd_seed``; the id from ``id`` or ``case_number``;
the class from ``class``, ``class_label``, ``label`` or ``categories``; ``negative_prompt``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PromptItem",
    "PromptSetError",
    "clip_text",
    "csv_rows",
    "csv_table",
    "load_prompts",
    "parse_json",
    "safe_file_stem",
]

PROMPT_KEYS = ("prompt", "text", "caption")
SEED_KEYS = ("seed", "evaluation_seed", "sd_seed")
ID_KEYS = ("id", "case_number")
CLASS_KEYS = ("class", "class_label", "label", "categories")
NEGATIVE_KEYS = ("negative_prompt",)
_STEM = re.compile(r"[^A-Za-z0-9_.-]+")
CLIP = 80  # longest value echoed in a message


def clip_text(value: Any, limit: int = CLIP) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted (ids and prompts can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}... ({len(text)} characters)"


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
        raise PromptSetError(
            f"item id {clip_text(item_id)} gives an empty file name; use letters, digits, '_', '-' or '.'"
        )
    return stem


def _first(row: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    """The first of ``keys`` with a value; a JSON list or object there is refused (it would become its repr)."""
    for k in keys:
        if k in row and row[k] not in (None, ""):
            if isinstance(row[k], (list, dict)):
                kind = "list" if isinstance(row[k], list) else "object"
                raise PromptSetError(f"{where}: {k} must be a string or a number, got a JSON {kind}")
            return row[k]
    return None


def _as_integer(value: Any) -> int | None:
    """An int from an int, an integral float (``2922.0``, as spreadsheets write) or such a string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _parse_seed(value: Any, where: str, default_seed: int) -> int:
    if value is None:
        return default_seed
    seed = _as_integer(value)
    if seed is None:  # "1.9" is refused, not truncated to 1
        raise PromptSetError(f"{where}: seed {clip_text(value)} is not an integer")
    if not 0 <= seed < 2**63:
        raise PromptSetError(f"{where}: seed {seed} must be in [0, 2**63)")
    return seed


def _item(row: dict[str, Any], index: int, where: str, default_seed: int) -> PromptItem:
    prompt = _first(row, PROMPT_KEYS, where)
    if prompt is None:
        present = [k for k in PROMPT_KEYS if k in row]
        if present:
            raise PromptSetError(f"{where}: the prompt is empty (column {present[0]!r}); every item needs one")
        raise PromptSetError(f"{where}: no prompt: expected a column named one of {list(PROMPT_KEYS)}")
    raw_id = _first(row, ID_KEYS, where)
    item_id = str(raw_id) if raw_id is not None else f"{index:06d}"
    cls = _first(row, CLASS_KEYS, where)
    neg = _first(row, NEGATIVE_KEYS, where)
    used = set(PROMPT_KEYS + SEED_KEYS + ID_KEYS + CLASS_KEYS + NEGATIVE_KEYS)
    extra = {str(k): str(v) for k, v in row.items() if k not in used and k is not None and v is not None}
    return PromptItem(
        id=item_id,
        prompt=str(prompt),
        seed=_parse_seed(_first(row, SEED_KEYS, where), where, default_seed),
        negative_prompt=None if neg is None else str(neg),
        class_label=None if cls is None else str(cls),
        extra=extra,
    )


def _read_text(p: Path) -> str:
    """The file as text: UTF-8, a byte-order mark dropped (spreadsheets write one), bad bytes named by line."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise PromptSetError(
            f"prompt file {p.name!r} is not UTF-8 text: line {line} has the byte {data[offset]:#04x} "
            "that UTF-8 does not allow; save the file as UTF-8"
        ) from None


def _txt_items(text: str, default_seed: int) -> list[PromptItem]:
    lines = [line.strip() for line in text.splitlines()]
    return [PromptItem(id=f"{i:06d}", prompt=line, seed=default_seed) for i, line in enumerate(x for x in lines if x)]


def csv_rows(lines: Iterable[str], name: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank CSV row of ``lines`` (a file opened with ``newline=""``); malformed
    CSV and fields over ``csv.field_size_limit()`` characters raise ``PromptSetError`` naming ``name`` and the line."""
    reader = csv.reader(lines)
    start = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as exc:
        limit = csv.field_size_limit()
        if "field limit" in str(exc):
            raise PromptSetError(
                f"{name} line {start}: a field is longer than {limit} characters; expected fields of at most "
                f"{limit} characters (a prompt is a few hundred)"
            ) from None
        raise PromptSetError(f"{name} line {start}: malformed CSV ({exc})") from None


def csv_table(lines: Iterable[str], name: str) -> tuple[tuple[int, list[str]] | None, Iterator[tuple[str, list[str]]]]:
    """The header row (line number, names; None for an empty file) and ('name line N', cells) of each data row;
    a row with more or fewer fields than the header is refused naming the line."""
    rows = csv_rows(lines, name)
    first = next(rows, None)

    def data() -> Iterator[tuple[str, list[str]]]:
        width = len(first[1]) if first else 0
        for lineno, cells in rows:
            if len(cells) != width:
                raise PromptSetError(
                    f"{name} line {lineno}: {len(cells)} fields, the header has {width}; expected one field per "
                    "column (quote fields that contain commas)"
                )
            yield f"{name} line {lineno}", cells

    return first, data()


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)``; invalid or absurdly nested JSON raises ``PromptSetError`` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{where}: not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # e.g. 100,000 nested brackets: Python's parser recurses once per level
        raise PromptSetError(
            f"{where}: JSON nested deeper than Python can parse (about {sys.getrecursionlimit()} levels); "
            "expected flat objects of strings and numbers"
        ) from None


def _csv_items(text: str, name: str, default_seed: int) -> list[PromptItem]:
    first, rows = csv_table(io.StringIO(text, newline=""), name)
    header = first[1] if first else []
    if not any(k in header for k in PROMPT_KEYS):
        found = [clip_text(k, 40) for k in header][:20]
        raise PromptSetError(f"{name}: no prompt column: expected one of {list(PROMPT_KEYS)}, found {found}")
    return [
        _item(dict(zip(header, cells, strict=True)), i, where, default_seed) for i, (where, cells) in enumerate(rows)
    ]


def _jsonl_items(text: str, name: str, default_seed: int) -> list[PromptItem]:
    items: list[PromptItem] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{name} line {lineno}")
        if not isinstance(row, dict):
            raise PromptSetError(f"{name} line {lineno}: expected a JSON object, got {type(row).__name__}")
        items.append(_item(row, len(items), f"{name} line {lineno}", default_seed))
    return items


def load_prompts(path: str | os.PathLike[str], default_seed: int = 42) -> list[PromptItem]:
    """Read a .txt (one prompt a line), .csv (header row) or .jsonl (one object a line) prompt set.

    Items without a seed get ``default_seed`` (the paper's protocol: seed 42 unless the set gives one).
    Ids must be unique after sanitisation, since they name the output files.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"prompt file {clip_text(str(p), 200)} does not exist or is not a file")
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl", ".ndjson"):
        raise PromptSetError(f"prompt file {p.name!r}: unsupported suffix {suffix!r}; use .txt, .csv or .jsonl")
    text = _read_text(p)
    if suffix == ".txt":
        items = _txt_items(text, default_seed)
    elif suffix == ".csv":
        items = _csv_items(text, p.name, default_seed)
    else:
        items = _jsonl_items(text, p.name, default_seed)
    if not items:
        raise PromptSetError(f"prompt file {p.name!r} holds no prompts")
    seen: dict[str, str] = {}
    for it in items:
        if it.stem in seen:
            raise PromptSetError(
                f"{p.name}: ids {clip_text(seen[it.stem])} and {clip_text(it.id)} give the same file name "
                f"{clip_text(it.stem)}; ids must be unique"
            )
        seen[it.stem] = it.id
    return items
