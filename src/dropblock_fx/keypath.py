"""Errors that point at a key path (``stages[1].block_size``), shared by the recipe and the
schedule layers.

Validators raise `KeyedError` to say where below their own field a value is wrong; the
recipe loader turns it into a ``RecipeError`` line. This module depends on nothing else in the
package, so neither layer imports the other to use it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["KeyedError", "closest", "format_path", "MISSING"]

# "No value given" (``None`` can be the bad value itself).
MISSING: Any = object()


def format_path(path: Sequence[Any]) -> str:
    """``("stages", 1, "block_size")`` -> ``"stages[1].block_size"``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class KeyedError(ValueError):
    """Raised inside validators to point below the field the validator is attached to."""

    reason: str
    path: tuple[Any, ...] = ()
    value: Any = MISSING
    allowed: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.reason


def closest_name(word: Any, choices: Sequence[str]) -> Optional[str]:
    """The choice closest to ``word`` (the one place "did you mean" is decided), or None."""
    if not isinstance(word, str):
        return None
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def closest(word: Any, choices: Sequence[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or ``""``."""
    match = closest_name(word, choices)
    return f"; did you mean {match!r}?" if match else ""
