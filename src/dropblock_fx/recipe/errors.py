"""``RecipeError``: one exception for every way a recipe can be wrong, naming where and why.

A message names the file (and line, for YAML files), the key path (``stages[1].block_size``),
the bad value and what is allowed, so a user can fix the recipe without reading the schema.
The classes live in `dropblock_fx.errors` (the schedule layer raises them too); this
module is their name inside the recipe layer.
"""

from ..errors import KeyedError, RecipeError, RecipeIssue, closest, format_path

__all__ = ["RecipeError", "RecipeIssue", "format_path", "KeyedError", "closest"]
