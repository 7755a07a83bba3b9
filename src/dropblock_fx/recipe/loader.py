"""Loading recipes: built-in names, YAML files (``yaml.safe_load`` only), dicts, ``Recipe``s.

Every failure is a [`RecipeError`][dropblock_fx.RecipeError] naming file, line, key path, value and what is
allowed; nothing else escapes (the loader is fuzzed for it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import RecipeError, RecipeIssue, closest, closest_name
from ..schedule.spec import validate_schedule
from .schema import Recipe, line_of, recipe_source, validate_recipe

__all__ = [
    "load_recipe",
    "list_recipes",
    "recipe_file",
    "recipe_from_yaml",
    "recipe_to_yaml",
    "recipe_source",
    "line_of",
    "validate_recipe",
    "validate_schedule",
    "DEFAULT_RECIPE",
    "RecipeLike",
]

DEFAULT_RECIPE = "last-two-stages"
# What every function that takes a recipe accepts: a built-in name, a YAML path, a mapping, a
# Recipe, or None (the default recipe).
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


def recipe_from_yaml(text: str, *, file: Optional[str] = None) -> Recipe:
    """Parse YAML text with ``yaml.safe_load`` and validate it (`Recipe.from_yaml`).

    Examples:
        >>> recipe_from_yaml("stages: [4]").stages
        [4]
    """
    return Recipe.from_yaml(text, file=file)


def recipe_to_yaml(recipe: Recipe, *, header: Optional[str] = None) -> str:
    """YAML for ``recipe`` (`Recipe.to_yaml`).

    Examples:
        >>> recipe_to_yaml(load_recipe("paper-resnet50")).splitlines()[0]
        'name: paper-resnet50'
    """
    return recipe.to_yaml(header=header)
