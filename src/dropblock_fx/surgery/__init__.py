"""The surgery layer: ``apply_dropblock``, ``remove_dropblock``, ``describe``, ``plan``, ``plan_of``."""

from .apply import apply_dropblock, describe, plan_of, remove_dropblock
from .plan import Plan, PlanRow, SurgeryError, plan, resolve_recipe

__all__ = ["apply_dropblock", "remove_dropblock", "describe", "plan", "plan_of", "Plan", "PlanRow", "SurgeryError",
           "resolve_recipe"]
