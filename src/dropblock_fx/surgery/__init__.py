"""The surgery layer: ``apply_dropblock``, ``remove_dropblock``, ``describe``, ``plan``."""

from .apply import apply_dropblock, describe, remove_dropblock
from .plan import Plan, PlanRow, SurgeryError, plan, resolve_recipe

__all__ = ["apply_dropblock", "remove_dropblock", "describe", "plan", "Plan", "PlanRow", "SurgeryError",
           "resolve_recipe"]
