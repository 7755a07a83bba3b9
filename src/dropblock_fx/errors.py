"""Errors that point at a key path (``stages[1].block_size``), shared by the schedule and the
recipe layers.

Validators raise `KeyedError` to say where below their own field a value is wrong;
`issues_from_validation` turns a pydantic ``ValidationError`` (of a recipe, a stage or a
schedule) into `RecipeIssue` s, and [`RecipeError`][dropblock_fx.RecipeError] carries them with the file and
line. This module depends on nothing else in the package, so neither layer imports the other
to report an error.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

__all__ = [
    "KeyedError", "RecipeError", "RecipeIssue", "closest", "closest_name", "format_path", "MISSING",
    "issues_from_validation", "parse_yaml", "yaml_line",
]

# "No value given" (``None`` can be the bad value itself).
MISSING: Any = object()


def format_path(path: Sequence[Any]) -> str:
    """``("stages", 1, "block_size")`` -> ``"stages[1].block_size"``.

    Examples:
        >>> format_path(("stages", 1, "block_size"))
        'stages[1].block_size'
    """
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class KeyedError(ValueError):
    """Raised inside validators to point below the field the validator is attached to.

    Examples:
        >>> str(KeyedError("must be >= 1", path=("steps",), value=0))
        'must be >= 1'
    """

    reason: str
    path: tuple[Any, ...] = ()
    value: Any = MISSING
    allowed: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.reason


def closest_name(word: Any, choices: Sequence[str]) -> Optional[str]:
    """The choice closest to ``word`` (the one place "did you mean" is decided), or None.

    Examples:
        >>> closest_name("cosin", ["linear", "cosine"])
        'cosine'
    """
    if not isinstance(word, str):
        return None
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def closest(word: Any, choices: Sequence[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or ``""``.

    Examples:
        >>> closest("optimiser", ["optimizer", "manual"])
        "; did you mean 'optimizer'?"
    """
    match = closest_name(word, choices)
    return f"; did you mean {match!r}?" if match else ""


# -- RecipeError ---------------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RecipeIssue:
    """One problem in a recipe: where (``path``, ``line``), what (``value``), why (``reason``).

    Examples:
        >>> RecipeIssue(("stages", 1, "block_size"), "must be >= 1", 0).describe()
        'stages[1].block_size: must be >= 1 (got 0)'
    """

    path: tuple[Any, ...] = ()
    reason: str = ""
    value: Any = MISSING
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
        if self.value is not MISSING:
            parts.append(f"(got {_short(self.value)})")
        text = " ".join(parts)
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text


class RecipeError(ValueError):
    """A recipe (or a schedule) that cannot be loaded or does not validate.

    Attributes:
        file: the recipe file, or ``None`` for dicts and built-in objects.
        issues: every problem found (`RecipeIssue`); the first one is also exposed as
            ``path`` (key path string), ``value``, ``allowed``, ``line`` and ``reason``.

    Examples:
        >>> from dropblock_fx import load_recipe
        >>> load_recipe({"stages": [3, {"stage": 4, "block_size": 0}]})
        Traceback (most recent call last):
        ...
        dropblock_fx.errors.RecipeError: invalid recipe: stages[1].block_size: ...
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
        return None if v is MISSING else v

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


# -- YAML text ------------------------------------------------------------------------------------


def _tab_indented(text: str, line: Optional[int]) -> bool:
    """Whether the lines around ``line`` (1-based) start with a tab: YAML's most common trap."""
    lines = text.splitlines()
    if line is None:
        return any(ln[:1] == "\t" for ln in lines)
    near = lines[max(0, line - 2):line + 1]
    return any(ln.lstrip(" ")[:1] == "\t" for ln in near)


def parse_yaml(text: Any, file: Optional[str] = None) -> Any:
    """``yaml.safe_load(text)``; a failure is a [`RecipeError`][dropblock_fx.RecipeError] with the line (and a word
    on tabs, YAML's most common trap).

    Examples:
        >>> parse_yaml("stages: [3, 4]")
        {'stages': [3, 4]}
    """
    if not isinstance(text, str):
        raise RecipeError([RecipeIssue(reason="YAML text must be a string", value=text)], file=file)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        reason = f"not valid YAML: {e.problem or e}"
        if "\t" in text and ("found character '\\t'" in str(e) or _tab_indented(text, line)):
            reason += " (a tab in the indentation: YAML indents with spaces only)"
        raise RecipeError([RecipeIssue(reason=reason, line=line)], file=file) from None
    except Exception as e:  # YAMLError, RecursionError on absurd nesting, ...
        raise RecipeError(f"not valid YAML: {type(e).__name__}: {e}", file=file) from None


def _yaml_nodes(text: Optional[str]) -> Optional[Any]:
    """The YAML node tree (``yaml.compose``: safe, builds no objects) for line numbers."""
    if not text:
        return None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:
        return None


def _line_in(root: Any, path: Sequence[Any]) -> Optional[int]:
    if root is None:
        return None
    node = root
    line = node.start_mark.line + 1
    try:
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                        node = v
                        line = k.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
    except Exception:
        return line
    return line


def yaml_line(text: Optional[str], path: Sequence[Any]) -> Optional[int]:
    """The 1-based line of key ``path`` in YAML ``text`` (the nearest enclosing key's when the
    key is absent), or ``None``.

    Examples:
        >>> yaml_line("name: x\\nstages:\\n  - 3\\n  - 4\\n", ("stages", 1))
        4
    """
    return _line_in(_yaml_nodes(text), path)


# -- pydantic errors -> RecipeIssues ------------------------------------------------------------

_UNION_TAGS = {"index", "name", "spec", "preset", "table"}


def _walk(data: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Follow ``loc`` through the input, dropping pydantic's union tags: (path, value)."""
    path: list[Any] = []
    cur = data
    for part in loc:
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
            path.append(part)
        elif isinstance(cur, (list, tuple)) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
            path.append(part)
        elif isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("literal[", "dict["))):
            continue  # a union branch, not a key
        elif isinstance(part, str) and part == "[key]":
            continue
        else:
            path.append(part)
            cur = MISSING
    return tuple(path), cur


def _inner_types(annotation: Any) -> list[Any]:
    """Every type named inside an annotation (``Optional[list[Annotated[X, ...]]]`` -> X, ...)."""
    out, todo = [], [annotation]
    while todo:
        t = todo.pop()
        out.append(t)
        todo += [a for a in typing.get_args(t) if not isinstance(a, (str, int, float, bool)) or a is None]
    return out


def _field_at(model: Any, path: Sequence[Any]) -> tuple[Any, Any]:
    """``(the model whose field the last key of path is, that field's annotation)``, following
    nested models through the field annotations (``stages[1]`` -> ``StageSpec``)."""
    annotation = None
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return model, None
        annotation = fields[part].annotation
        nested = [t for t in _inner_types(annotation) if isinstance(t, type) and hasattr(t, "model_fields")]
        if nested and part is not path[-1]:
            model = nested[0]
    return model, annotation


def _literal_choices(annotation: Any) -> Optional[str]:
    for t in _inner_types(annotation):
        if typing.get_origin(t) is typing.Literal:
            return ", ".join(str(a) for a in typing.get_args(t))
    return None


_ALLOWED_BY_TYPE = {
    "greater_than_equal": lambda c: f">= {c.get('ge')}",
    "greater_than": lambda c: f"> {c.get('gt')}",
    "less_than_equal": lambda c: f"<= {c.get('le')}",
    "less_than": lambda c: f"< {c.get('lt')}",
    "literal_error": lambda c: str(c.get("expected")),
    "too_short": lambda c: f"at least {c.get('min_length')} item(s)",
    "too_long": lambda c: f"at most {c.get('max_length')} item(s)",
}


def issues_from_validation(err: Any, data: Any, model: Any, text: Optional[str] = None,
                           prefix: Sequence[Any] = ()) -> list[RecipeIssue]:
    """One `RecipeIssue` per key of ``data`` that the pydantic ``ValidationError`` ``err``
    of ``model`` names: the key path in the input (pydantic's union tags dropped, a
    `KeyedError` 's own path appended), the value found there, what is allowed, and the
    line in ``text`` (the YAML it came from). ``prefix`` goes before every path
    (``("schedule",)`` for a schedule given on its own).

    Examples:
        >>> from pydantic import BaseModel, ValidationError
        >>> class Spec(BaseModel):
        ...     steps: int = 1
        >>> try:
        ...     Spec.model_validate({"steps": "x"})
        ... except ValidationError as e:
        ...     print(issues_from_validation(e, {"steps": "x"}, Spec)[0].describe())
        steps: Input should be a valid integer, unable to parse string as an integer (got 'x')
    """
    nodes = _yaml_nodes(text)
    out: list[RecipeIssue] = []
    seen: set[tuple[Any, ...]] = set()
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        kind = e.get("type", "")
        ctx = e.get("ctx") or {}
        path, value = _walk(data, loc)
        if value is MISSING:
            value = e.get("input", MISSING)
        reason = e.get("msg", "invalid")
        allowed = _ALLOWED_BY_TYPE[kind](ctx) if kind in _ALLOWED_BY_TYPE else None
        if kind == "extra_forbidden":
            owner, _ = _field_at(model, path[:-1] + ("",))
            names = list(getattr(owner, "model_fields", {}))
            reason = f"unknown key {path[-1]!r}{closest(path[-1], names)}" if path else "unknown key"
            allowed = ", ".join(names)
        elif kind == "missing":
            reason = f"missing required key {path[-1]!r}" if path else "missing required key"
            value = MISSING
        elif "index" in loc and kind in ("int_type", "int_parsing", "union_tag_invalid"):
            reason = "a stage is an index (integer), a name (string) or a mapping with 'stage'"
            allowed = "e.g. 3, -1, 'layer4' or {stage: 4, block_size: 5}"
        elif allowed is None or kind == "literal_error":  # a field of fixed choices: list them
            keys = [p for p in path if not isinstance(p, int)]
            allowed = (_literal_choices(_field_at(model, keys)[1]) if keys else None) or allowed
        err_obj = ctx.get("error")
        if isinstance(err_obj, KeyedError):
            path = path + tuple(err_obj.path)
            reason = err_obj.reason
            _, sub_value = _walk(data, path)
            value = err_obj.value if err_obj.value is not MISSING else sub_value
            allowed = err_obj.allowed or allowed
        elif kind == "value_error" and isinstance(reason, str):
            reason = reason.removeprefix("Value error, ")
        if path in seen:  # several union branches failing at one key: the first says enough
            continue
        seen.add(path)
        out.append(RecipeIssue(path=(*prefix, *path), reason=reason, value=value, allowed=allowed,
                               line=_line_in(nodes, path)))
    return out
