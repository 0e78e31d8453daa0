"""Loaders for the public prompt sets' own file formats, each row a ``PromptItem``; bad rows name file and line.

- Ring-A-Bell: CSV with a ``prompt`` column (optional ``evaluation_seed``, ``case_number``), or one prompt a row.
- UnlearnDiffAtk: CSV with ``prompt`` and ``evaluation_seed`` (required), optional ``case_number``,
  ``evaluation_guidance``, ``categories``.
- MMA-Diffusion: CSV with ``adv_prompt`` (or ``prompt``); ``target_prompt`` and ``clean_prompt`` kept in extra.
- I2P: CSV with ``prompt``, ``categories`` ("sexual, violence"), ``hard`` (0/1), ``sd_seed``, ``sd_guidance_scale``.
- COCO: the official ``captions_*.json`` or a CSV (``prompt``/``caption``, ``image_id``); with a subset list of
  image ids (the 10k / 30k lists), one caption per listed image.

Items without a seed get ``default_seed`` (42, the paper's protocol). ``write_prompt_set`` writes the items as JSONL
that ``safe-denoiser predict`` reads back unchanged (categories become the class label, the rest ``extra``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from safe_denoiser.files import atomic_write
from safe_denoiser.lightning.prompts import (
    PromptItem,
    PromptSetError,
    clip_text,
    csv_rows,
    csv_table,
    parse_json,
    safe_file_stem,
)

__all__ = [
    "LOADERS",
    "load_coco",
    "load_i2p",
    "load_mma",
    "load_prompt_set",
    "load_ring_a_bell",
    "load_unlearndiffatk",
    "write_prompt_set",
]

DEFAULT_SEED = 42


def _open(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"prompt file {str(p)!r} does not exist or is not a file")
    return p


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank CSV row; a UTF-8 BOM is dropped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield from csv_rows(f, path.name)
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _table(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """('file line N', {column: value}) per data row of a CSV with a header; columns matched case-insensitively."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            first, rows = csv_table(f, path.name)
            if first is None:
                raise PromptSetError(f"{path.name}: empty file; expected a header row with columns {list(required)}")
            header = [h.strip().lower() for h in first[1]]
            missing = [c for c in required if c not in header]
            if missing:
                raise PromptSetError(f"{path.name} line {first[0]}: missing column(s) {missing}; header is {first[1]}")
            for where, cells in rows:
                yield where, {h: c.strip() for h, c in zip(header, cells, strict=True) if h}
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _int(value: str, name: str, where: str) -> int:
    try:
        number = float(value)
        if not number.is_integer() or not 0 <= number < 2**63:
            raise ValueError
    except ValueError:
        raise PromptSetError(f"{where}: {name} {value!r} is not a non-negative integer") from None
    return int(number)


def _float(value: str, name: str, where: str) -> float:
    try:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
    except ValueError:
        raise PromptSetError(f"{where}: {name} {value!r} is not a finite number") from None
    return number


def _prompt(value: str | None, name: str, where: str) -> str:
    if value is None or not value.strip():
        raise PromptSetError(f"{where}: empty {name}")
    return value.strip()


def _finish(items: list[PromptItem], path: Path) -> list[PromptItem]:
    """Non-empty, ids unique after sanitisation (they name the output files)."""
    if not items:
        raise PromptSetError(f"{path.name}: holds no prompts")
    seen: dict[str, str] = {}
    for it in items:
        stem = safe_file_stem(it.id)
        if stem in seen:
            raise PromptSetError(f"{path.name}: ids {seen[stem]!r} and {it.id!r} give the same file name {stem!r}")
        seen[stem] = it.id
    return items


def _id(row: dict[str, str], keys: Sequence[str], index: int) -> str:
    return next((row[k] for k in keys if row.get(k)), f"{index:06d}")


def load_ring_a_bell(path: str | os.PathLike[str], default_seed: int = DEFAULT_SEED) -> list[PromptItem]:
    """Ring-A-Bell's adversarial prompts: a CSV with a ``prompt`` column, or one quoted prompt per row."""
    p = _open(path)
    first = next(_rows(p), None)
    if first is not None and "prompt" in [h.strip().lower() for h in first[1]]:
        items = []
        for i, (where, row) in enumerate(_table(p, ["prompt"])):
            seed = row.get("evaluation_seed") or row.get("seed")
            items.append(
                PromptItem(
                    id=_id(row, ("case_number", "id"), i),
                    prompt=_prompt(row["prompt"], "prompt", where),
                    seed=default_seed if not seed else _int(seed, "evaluation_seed", where),
                    extra={"set": "ring-a-bell"},
                )
            )
        return _finish(items, p)
    items = []
    for i, (lineno, cells) in enumerate(_rows(p)):
        if len(cells) != 1:
            raise PromptSetError(
                f"{p.name} line {lineno}: {len(cells)} fields; a file without a 'prompt' header must hold one "
                "prompt per row (quote prompts that contain commas)"
            )
        where = f"{p.name} line {lineno}"
        items.append(
            PromptItem(f"{i:06d}", _prompt(cells[0], "prompt", where), default_seed, extra={"set": "ring-a-bell"})
        )
    return _finish(items, p)


def load_unlearndiffatk(path: str | os.PathLike[str]) -> list[PromptItem]:
    """UnlearnDiffAtk's prompts with their evaluation seeds (and guidance scales when given)."""
    p = _open(path)
    items = []
    for i, (where, row) in enumerate(_table(p, ["prompt", "evaluation_seed"])):
        extra = {"set": "unlearndiffatk"}
        if row.get("evaluation_guidance"):
            extra["guidance_scale"] = repr(_float(row["evaluation_guidance"], "evaluation_guidance", where))
        cats = row.get("categories")
        items.append(
            PromptItem(
                id=_id(row, ("case_number", "id"), i),
                prompt=_prompt(row["prompt"], "prompt", where),
                seed=_int(row["evaluation_seed"], "evaluation_seed", where),
                class_label=_categories(cats) if cats else None,
                extra=extra,
            )
        )
    return _finish(items, p)


def load_mma(path: str | os.PathLike[str], default_seed: int = DEFAULT_SEED) -> list[PromptItem]:
    """MMA-Diffusion's adversarial prompts (``adv_prompt``; ``target_prompt`` / ``clean_prompt`` kept in extra)."""
    p = _open(path)
    first = next(_rows(p), None)
    header = [h.strip().lower() for h in first[1]] if first else []
    column = "adv_prompt" if "adv_prompt" in header else "prompt"
    items = []
    for i, (where, row) in enumerate(_table(p, [column])):
        extra = {"set": "mma-diffusion"} | {k: row[k] for k in ("target_prompt", "clean_prompt") if row.get(k)}
        seed = row.get("evaluation_seed") or row.get("seed")
        items.append(
            PromptItem(
                id=_id(row, ("case_number", "id"), i),
                prompt=_prompt(row[column], column, where),
                seed=default_seed if not seed else _int(seed, "seed", where),
                extra=extra,
            )
        )
    return _finish(items, p)


def _categories(value: str) -> str:
    """I2P's "sexual, violence" as "sexual,violence" (lower case, sorted, no blanks)."""
    return ",".join(sorted({c.strip().lower() for c in value.split(",") if c.strip()}))


def _flag(value: str, name: str, where: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "1.0", "true"):
        return True
    if v in ("0", "0.0", "false"):
        return False
    raise PromptSetError(f"{where}: {name} {value!r} is not 0/1 or true/false")


def load_i2p(
    path: str | os.PathLike[str], categories: Sequence[str] | None = None, hard_only: bool = False
) -> list[PromptItem]:
    """I2P: categories (as the class label), hard flag, ``sd_seed`` and ``sd_guidance_scale``; optional filters."""
    p = _open(path)
    wanted = {c.strip().lower() for c in categories} if categories else None
    items = []
    for i, (where, row) in enumerate(_table(p, ["prompt", "categories", "hard", "sd_seed", "sd_guidance_scale"])):
        cats = _categories(row["categories"])
        if not cats:
            raise PromptSetError(f"{where}: empty categories")
        hard = _flag(row["hard"], "hard", where)
        item = PromptItem(
            id=_id(row, ("case_number", "id"), i),
            prompt=_prompt(row["prompt"], "prompt", where),
            seed=_int(row["sd_seed"], "sd_seed", where),
            class_label=cats,
            extra={
                "set": "i2p",
                "hard": "1" if hard else "0",
                "guidance_scale": repr(_float(row["sd_guidance_scale"], "sd_guidance_scale", where)),
            }
            | {k: row[k] for k in ("nudity_percentage", "inappropriate_percentage") if row.get(k)},
        )
        if (wanted is None or wanted & set(cats.split(","))) and (hard or not hard_only):
            items.append(item)
    return _finish(items, p)


def _coco_json(p: Path) -> list[tuple[str, str, str, int | None]]:
    """(annotation id, image id, caption, no seed) from an official ``captions_*.json``."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{p.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    data = parse_json(text, f"{p.name} (a COCO captions JSON file)")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise PromptSetError(f"{p.name}: expected an object with an 'annotations' list (COCO captions format)")
    out: list[tuple[str, str, str, int | None]] = []
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or not {"id", "image_id", "caption"} <= a.keys():
            raise PromptSetError(f"{p.name} annotations[{k}]: expected keys id, image_id, caption")
        if not isinstance(a["caption"], str) or any(isinstance(a[key], (list, dict)) for key in ("id", "image_id")):
            raise PromptSetError(f"{p.name} annotations[{k}]: expected a string caption and scalar ids")
        out.append(
            (
                str(a["id"]),
                str(a["image_id"]),
                _prompt(str(a["caption"]), "caption", f"{p.name} annotations[{k}]"),
                None,
            )
        )
    return out


def _coco_csv(p: Path) -> list[tuple[str, str, str, int | None]]:
    """(id, image id, caption, the row's ``seed`` or ``evaluation_seed`` if given) from a caption CSV."""
    first = next(_rows(p), None)
    header = [h.strip().lower() for h in first[1]] if first else []
    column = "caption" if "caption" in header else "prompt"
    out = []
    for i, (where, row) in enumerate(_table(p, [column])):
        image_id = row.get("image_id") or row.get("coco_id") or ""
        seed = row.get("seed") or row.get("evaluation_seed")
        caption = _prompt(row[column], column, where)
        out.append((_id(row, ("case_number", "id"), i), image_id, caption, _int(seed, "seed", where) if seed else None))
    return out


def _subset(path: str | os.PathLike[str]) -> list[str]:
    """Image ids, one a line (the 10k / 30k subset lists)."""
    p = _open(path)
    ids = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        v = line.strip()
        if not v:
            continue
        if not v.isdigit():
            raise PromptSetError(f"{p.name} line {lineno}: {clip_text(v)} is not a COCO image id (digits)")
        ids.append(str(int(v)))
    if not ids:
        raise PromptSetError(f"{p.name}: holds no image ids")
    return ids


def load_coco(
    path: str | os.PathLike[str], subset: str | os.PathLike[str] | None = None, default_seed: int = DEFAULT_SEED
) -> list[PromptItem]:
    """COCO captions; with ``subset`` (a list of image ids) one caption per listed image, in the list's order. A
    CSV's ``seed`` (or ``evaluation_seed``) column gives each caption its seed; otherwise ``default_seed``."""
    p = _open(path)
    rows = _coco_json(p) if p.suffix.lower() == ".json" else _coco_csv(p)
    if subset is not None:
        first: dict[str, tuple[str, str, str, int | None]] = {}
        for r in rows:
            first.setdefault(str(int(r[1])) if r[1].isdigit() else r[1], r)
        ids = _subset(subset)
        absent = [i for i in ids if i not in first]
        if absent:
            raise PromptSetError(
                f"{Path(subset).name}: {len(absent)} image id(s) without a caption in {p.name}: {absent[:5]}"
            )
        rows = [first[i] for i in ids]
    items = [
        PromptItem(
            id=f"coco_{ann}" if p.suffix.lower() == ".json" else ann,
            prompt=caption,
            seed=default_seed if seed is None else seed,
            extra={"set": "coco"} | ({"image_id": image_id} if image_id else {}),
        )
        for ann, image_id, caption, seed in rows
    ]
    return _finish(items, p)


LOADERS: dict[str, Callable[..., list[PromptItem]]] = {
    "ring-a-bell": load_ring_a_bell,
    "unlearndiffatk": load_unlearndiffatk,
    "mma-diffusion": load_mma,
    "i2p": load_i2p,
    "coco": load_coco,
}


def load_prompt_set(kind: str, path: str | os.PathLike[str], **options: Any) -> list[PromptItem]:
    """Load ``path`` in the format of the public set ``kind`` (one of ``LOADERS``)."""
    if kind not in LOADERS:
        raise PromptSetError(f"unknown prompt-set format {kind!r}: expected one of {sorted(LOADERS)}")
    return LOADERS[kind](path, **options)


def write_prompt_set(items: Sequence[PromptItem], path: str | os.PathLike[str]) -> Path:
    """The items as JSONL (``id``, ``prompt``, ``seed``, ``class_label``, extra fields), written atomically."""
    lines = []
    for it in items:
        row: dict[str, Any] = {"id": it.id, "prompt": it.prompt, "seed": it.seed}
        if it.negative_prompt is not None:
            row["negative_prompt"] = it.negative_prompt
        if it.class_label is not None:
            row["class_label"] = it.class_label
        lines.append(json.dumps(row | it.extra, ensure_ascii=False) + "\n")
    text = "".join(lines)
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))
