"""The recipe layer: schema, loading and validation (``RecipeError`` with key paths), and the
built-in recipes of the top-level ``recipes/`` directory."""

from ..errors import RecipeError, RecipeIssue
from .loader import (
    DEFAULT_RECIPE,
    list_recipes,
    load_recipe,
    recipe_file,
    RecipeLike,
    recipe_from_yaml,
    recipe_source,
    recipe_to_yaml,
    validate_recipe,
)
from .schema import SITE_KINDS, Recipe, ScheduleSpec, StageSpec
from .stages import ModelStage, resolve_stage, resolve_stages

__all__ = [
    "Recipe",
    "StageSpec",
    "ScheduleSpec",
    "SITE_KINDS",
    "RecipeError",
    "RecipeIssue",
    "load_recipe",
    "list_recipes",
    "recipe_file",
    "recipe_from_yaml",
    "recipe_source",
    "recipe_to_yaml",
    "validate_recipe",
    "resolve_stage",
    "resolve_stages",
    "ModelStage",
    "DEFAULT_RECIPE",
    "RecipeLike",
]
