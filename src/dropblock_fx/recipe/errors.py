"""``RecipeError``: one exception for every way a recipe can be wrong, naming where and why.

A message names the file (and line, for YAML files), the key path (``stages[1].block_size``),
the bad value and what is allowed, so a user can fix the recipe without reading the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

# The key-path helpers are shared with the schedule layer; they live outside both layers.
from ..keypath import MISSING as _MISSING
from ..keypath import KeyedError, closest, format_path

__all__ = ["RecipeError", "RecipeIssue", "format_path", "KeyedError", "closest"]


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RecipeIssue:
    """One problem in a recipe: where (``path``, ``line``), what (``value``), why (``reason``)."""

    path: tuple[Any, ...] = ()
    reason: str = ""
    value: Any = _MISSING
    allowed: Optional[str] = None
    line: Optional[int] = None  # 1-based, YAML files only

    @property
    def key(self) -> str:
        return format_path(self.path)

    def describe(self) -> str:
        parts = []
        if self.key:
            parts.append(f"{self.key}:")
        parts.append(self.reason)
        if self.value is not _MISSING:
            parts.append(f"(got {_short(self.value)})")
        text = " ".join(parts)
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text


class RecipeError(ValueError):
    """A recipe that cannot be loaded or does not validate.

    Attributes:
        file: the recipe file, or ``None`` for dicts and built-in objects.
        issues: every problem found (`RecipeIssue`); the first one is also exposed as
            ``path`` (key path string), ``value``, ``allowed``, ``line`` and ``reason``.

    Examples:
        >>> from dropblock_fx import load_recipe
        >>> load_recipe({"stages": [3, {"stage": 4, "block_size": 0}]})
        Traceback (most recent call last):
        ...
        dropblock_fx.recipe.errors.RecipeError: invalid recipe: stages[1].block_size: ...
    """

    def __init__(self, issues: Sequence[RecipeIssue] | str, file: Optional[str] = None) -> None:
        if isinstance(issues, str):
            issues = [RecipeIssue(reason=issues)]
        self.issues: list[RecipeIssue] = list(issues) or [RecipeIssue(reason="invalid recipe")]
        self.file = None if file is None else str(file)
        super().__init__(self._message())

    # The first issue, flattened, for callers that show one problem (the CLI does).
    @property
    def path(self) -> str:
        return self.issues[0].key

    @property
    def value(self) -> Any:
        v = self.issues[0].value
        return None if v is _MISSING else v

    @property
    def allowed(self) -> Optional[str]:
        return self.issues[0].allowed

    @property
    def line(self) -> Optional[int]:
        return self.issues[0].line

    @property
    def reason(self) -> str:
        return self.issues[0].reason

    def _where(self, issue: RecipeIssue) -> str:
        if self.file is None:
            return ""
        return f"{self.file}:{issue.line}: " if issue.line else f"{self.file}: "

    def _message(self) -> str:
        first = self.issues[0]
        head = f"{self._where(first)}invalid recipe: {first.describe()}"
        rest = [f"  {self._where(i)}{i.describe()}" for i in self.issues[1:]]
        return "\n".join([head, *rest])

    def __reduce__(self):  # picklable (multiprocessing, test runners)
        return (type(self), (self.issues, self.file))

