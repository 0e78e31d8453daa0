"""``FieldError``: a bad argument or setting, naming the field and the expected form.

Library code names its own fields; a command line maps a field to its flag (``FieldError.for_flag``), so the same
check serves both without the library knowing about flags.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FieldError", "require_positive_ints"]


class FieldError(ValueError):
    """``<owner.>field must be <expected>, got <value>``; ``field`` and ``expected`` are kept for re-wording."""

    def __init__(self, field: str, expected: str, got: Any, owner: str = "") -> None:
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"{owner + '.' if owner else ''}{field} must be {expected}, got {got!r}")

    def for_flag(self, flag: str) -> ValueError:
        """The same message naming a command-line flag instead of the field."""
        return ValueError(f"{flag} must be {self.expected}, got {self.got!r}")


def require_positive_ints(owner: object, *names: str) -> None:
    """Raise ``FieldError`` (owned by ``owner``'s class) for the first of ``names`` that is not an int >= 1 (a bool
    is not): the common check of settings dataclasses' sizes and counts."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FieldError(name, "a positive integer", value, owner=type(owner).__name__)
