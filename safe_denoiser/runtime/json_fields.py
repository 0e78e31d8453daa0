"""Integer fields of ``manifest.json`` read as the C++ runtime reads them (``json_integer_in``): a JSON integer
literal, never a float such as 2.5 (which ``int()`` would silently turn into 2) or 2.0, nor a bool."""

from __future__ import annotations

from typing import Any

__all__ = ["json_int", "json_ints"]


def _error(field: str, expected: str, value: Any) -> ValueError:
    from .manifest import ManifestError  # manifest.py imports this module

    return ManifestError(f"manifest: {field} must be {expected}, got {value!r:.60}")


def json_int(value: Any, field: str) -> int:
    """``value`` when it is a JSON integer; ``ManifestError`` naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(field, "an int (a JSON integer literal)", value)
    return value


def json_ints(values: Any, field: str) -> tuple[int, ...]:
    """A JSON list of integers as a tuple (``json_int`` on each entry, naming ``field``)."""
    if not isinstance(values, list):
        raise _error(field, "a list of ints", values)
    return tuple(json_int(v, field) for v in values)
