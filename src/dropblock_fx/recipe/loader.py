"""Loading recipes: built-in names, YAML files (``yaml.safe_load`` only), dicts, ``Recipe``s.

Every failure is a [`RecipeError`][dropblock_fx.RecipeError] naming file, line, key path, value and what is
allowed; nothing else escapes (the loader is fuzzed for it).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml
from pydantic import ValidationError

from ..keypath import closest_name
from .errors import _MISSING, KeyedError, RecipeError, RecipeIssue, closest
from .schema import SITE_KINDS, Recipe, ScheduleSpec

__all__ = [
    "load_recipe",
    "list_recipes",
    "recipe_file",
    "recipe_from_yaml",
    "recipe_to_yaml",
    "validate_recipe",
    "validate_schedule",
    "DEFAULT_RECIPE",
]

DEFAULT_RECIPE = "last-two-stages"
RecipeLike = Union[None, str, "os.PathLike[str]", Mapping[str, Any], Recipe]


def _builtin_dirs() -> list[Path]:
    # The package dropblock_fx.recipes (the top-level recipes/ folder of the source tree,
    # mapped by pyproject.toml); a plain checkout on sys.path without installing: <repo>/recipes.
    dirs = []
    try:
        from importlib.resources import files

        dirs.append(Path(str(files("dropblock_fx.recipes"))))
    except (ImportError, TypeError):  # pragma: no cover - not installed
        pass
    here = Path(__file__).resolve().parent
    if (here.parents[2] / "pyproject.toml").is_file():
        dirs.append(here.parents[2] / "recipes")
    return dirs


def _builtin_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _builtin_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def list_recipes() -> list[str]:
    """Names of the built-in recipes (``load_recipe(name)`` loads one).

    Examples:
        >>> "paper-resnet50" in list_recipes()
        True
    """
    return sorted(_builtin_files())


def recipe_file(name: str) -> Path:
    """Path of the built-in recipe ``name`` (``RecipeError`` if there is none)."""
    files = _builtin_files()
    if name not in files:
        raise RecipeError(
            [RecipeIssue(reason=f"no built-in recipe {name!r}{closest(name, list(files))}",
                         allowed=", ".join(sorted(files)))]
        )
    return files[name]


def load_recipe(source: RecipeLike = None) -> Recipe:
    """Load a recipe from a built-in name, a YAML file path, a dict or a ``Recipe``.

    ``None`` gives the generic default, ``"last-two-stages"``. A string is a built-in name
    if there is one, else a path.

    Raises:
        RecipeError: with file, line, key path, bad value and allowed values.

    Examples:
        >>> r = load_recipe("paper-resnet50")
        >>> r.stages, r.block_size, r.keep_prob
        ([3, 4], 7, 0.9)
    """
    if source is None:
        source = DEFAULT_RECIPE
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return validate_recipe(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            text_source = os.fspath(source)
        except Exception as e:  # a PathLike whose __fspath__ misbehaves
            raise RecipeError(f"not a recipe name or path: {e}") from None
        if not isinstance(text_source, str):
            raise RecipeError(f"not a recipe name or path: {text_source!r}")
        files = _builtin_files()
        if isinstance(source, str) and source in files:
            return _load_file(files[source])
        path = Path(text_source)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # NUL bytes, names too long, ...
            is_file = False
        if is_file:
            return _load_file(path)
        match = closest_name(text_source, list(files))
        suggestion = f" (did you mean the built-in {match!r}?)" if match else ""
        raise RecipeError(
            [RecipeIssue(
                reason=f"{text_source!r} is not a built-in recipe or an existing file{suggestion}",
                allowed="built-ins " + ", ".join(sorted(files)) + ", or a path to a .yaml file",
            )]
        )
    raise RecipeError(
        [RecipeIssue(reason="a recipe is a name, a path, a dict or a Recipe", value=source)]
    )


def _load_file(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError, ValueError) as e:
        raise RecipeError(f"cannot read the recipe: {e}", file=str(path)) from None
    return recipe_from_yaml(text, file=str(path))


def _tab_indented(text: str, line: Optional[int]) -> bool:
    """Whether the lines around ``line`` (1-based) start with a tab: YAML's most common trap."""
    lines = text.splitlines()
    if line is None:
        return any(ln[:1] == "\t" for ln in lines)
    near = lines[max(0, line - 2):line + 1]
    return any(ln.lstrip(" ")[:1] == "\t" for ln in near)


def recipe_from_yaml(text: str, *, file: Optional[str] = None) -> Recipe:
    """Parse YAML text with ``yaml.safe_load`` and validate it."""
    if not isinstance(text, str):
        raise RecipeError([RecipeIssue(reason="YAML text must be a string", value=text)], file=file)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        reason = f"not valid YAML: {e.problem or e}"
        if "\t" in text and ("found character '\\t'" in str(e) or _tab_indented(text, line)):
            reason += " (a tab in the indentation: YAML indents with spaces only)"
        raise RecipeError([RecipeIssue(reason=reason, line=line)], file=file) from None
    except Exception as e:  # YAMLError, RecursionError on absurd nesting, ...
        raise RecipeError(f"not valid YAML: {type(e).__name__}: {e}", file=file) from None
    if data is None:
        data = {}
    recipe = validate_recipe(data, file=file, text=text)
    _SOURCES[id(recipe)] = (weakref.ref(recipe, lambda _, key=id(recipe): _SOURCES.pop(key, None)), file, text)
    return recipe


# Where a recipe was read from, so that errors found later (a stage this model does not
# have) can still name file and line. Kept outside the object: equality and YAML ignore it.
_SOURCES: dict[int, tuple["weakref.ref[Recipe]", Optional[str], str]] = {}


def recipe_source(recipe: Recipe) -> Optional[tuple[Optional[str], str]]:
    """``(file, yaml_text)`` the recipe was loaded from, or ``None``."""
    entry = _SOURCES.get(id(recipe))
    if entry is None or entry[0]() is not recipe:
        return None
    return entry[1], entry[2]


def line_of(recipe: Recipe, path: tuple[Any, ...]) -> Optional[int]:
    """The line of ``path`` in the YAML the recipe was loaded from, or ``None``."""
    source = recipe_source(recipe)
    return None if source is None else _line_of(_line_index(source[1]), path)


def validate_recipe(data: Any, *, file: Optional[str] = None, text: Optional[str] = None) -> Recipe:
    """Validate a mapping as a [`Recipe`][dropblock_fx.Recipe]; ``text`` (the YAML) adds line numbers."""
    if not isinstance(data, Mapping):
        raise RecipeError(
            [RecipeIssue(reason=f"a recipe is a mapping of settings, not a {type(data).__name__}", value=data)],
            file=file,
        )
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as e:
        raise RecipeError(_issues(e, data, text, Recipe), file=file) from None
    except RecipeError:
        raise
    except Exception as e:  # a validator bug must still surface as RecipeError
        raise RecipeError(f"{type(e).__name__}: {e}", file=file) from None


def validate_schedule(data: Any) -> ScheduleSpec:
    """Validate a schedule mapping (``attach_schedule(schedule=...)``)."""
    if not isinstance(data, Mapping):
        raise RecipeError([RecipeIssue(path=("schedule",), reason="a schedule is a mapping", value=data)])
    try:
        return ScheduleSpec.model_validate(dict(data))
    except ValidationError as e:
        issues = _issues(e, data, None, ScheduleSpec)
        for i in issues:
            i.path = ("schedule", *i.path)
        raise RecipeError(issues) from None


def recipe_to_yaml(recipe: Recipe, *, header: Optional[str] = None) -> str:
    """YAML for ``recipe``: every setting (unset overrides left out), in schema order."""
    data = recipe.model_dump(mode="python", exclude_none=True)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text


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
            cur = _MISSING
    return tuple(path), cur


def _field_names(model: type, data: Any, path: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``path`` (for 'unknown key' messages)."""
    from .schema import StageSpec

    if path and path[0] == "schedule":
        return list(ScheduleSpec.model_fields)
    if path and path[0] == "stages":
        return list(StageSpec.model_fields)
    return list(model.model_fields)


_ALLOWED_BY_TYPE = {
    "greater_than_equal": lambda c: f">= {c.get('ge')}",
    "greater_than": lambda c: f"> {c.get('gt')}",
    "less_than_equal": lambda c: f"<= {c.get('le')}",
    "less_than": lambda c: f"< {c.get('lt')}",
    "literal_error": lambda c: str(c.get("expected")),
    "too_short": lambda c: f"at least {c.get('min_length')} item(s)",
    "too_long": lambda c: f"at most {c.get('max_length')} item(s)",
}


def _issues(err: ValidationError, data: Any, text: Optional[str], model: type) -> list[RecipeIssue]:
    lines = _line_index(text)
    out: list[RecipeIssue] = []
    seen: set[tuple[Any, ...]] = set()
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        kind = e.get("type", "")
        ctx = e.get("ctx") or {}
        path, value = _walk(data, loc)
        if value is _MISSING:
            value = e.get("input", _MISSING)
        reason = e.get("msg", "invalid")
        allowed = None
        if kind in _ALLOWED_BY_TYPE:
            allowed = _ALLOWED_BY_TYPE[kind](ctx)
        if kind == "extra_forbidden":
            names = _field_names(model, data, path[:-1])
            reason = f"unknown key {path[-1]!r}{closest(path[-1], names)}" if path else "unknown key"
            allowed = ", ".join(names)
        elif kind == "missing":
            reason = f"missing required key {path[-1]!r}" if path else "missing required key"
            value = _MISSING
        elif "index" in loc and kind in ("int_type", "int_parsing", "union_tag_invalid"):
            reason = "a stage is an index (integer), a name (string) or a mapping with 'stage'"
            allowed = "e.g. 3, -1, 'layer4' or {stage: 4, block_size: 5}"
        elif path and path[-1] in ("sites",) or (len(path) >= 2 and path[-2] == "sites"):
            allowed = ", ".join(SITE_KINDS)
        err_obj = ctx.get("error")
        if isinstance(err_obj, KeyedError):
            path = path + tuple(err_obj.path)
            reason = err_obj.reason
            sub_path, sub_value = _walk(data, path)
            value = err_obj.value if err_obj.value is not _MISSING else sub_value
            allowed = err_obj.allowed or allowed
        elif kind == "value_error" and isinstance(reason, str):
            reason = reason.removeprefix("Value error, ")
        if path in seen:  # several union branches failing at one key: the first says enough
            continue
        seen.add(path)
        out.append(RecipeIssue(path=path, reason=reason, value=value, allowed=allowed, line=_line_of(lines, path)))
    return out


def _line_index(text: Optional[str]) -> Optional[Any]:
    """The YAML node tree (``yaml.compose``: safe, builds no objects) for line numbers."""
    if not text:
        return None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:
        return None


def _line_of(root: Any, path: tuple[Any, ...]) -> Optional[int]:
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
