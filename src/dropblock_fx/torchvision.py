"""``dropblock_fx.torchvision``: torchvision's ``get_model`` with a recipe.

A plain re-export of `dropblock_fx.integrations.torchvision`.
"""

from .integrations.torchvision import default_target, get_model, model_task

__all__ = ["get_model", "default_target", "model_task"]
