"""dropblock-fx: paper-faithful DropBlock for the CNNs you already use."""

from .modules import DropBlock2d, DropBlock3d, DropBlockNd
from .graph import register_norm
from .surgery import Plan, PlanRow, SurgeryError, apply_dropblock, describe, plan, remove_dropblock
from .op import calibrated_gamma, drop_block, expected_drop_rate, paper_gamma, set_backend
from .recipe import Recipe, RecipeError, StageSpec, list_recipes, load_recipe, resolve_stage
from .schedule import (
    DropBlockSchedule,
    ScheduleSpec,
    attach_schedule,
    detach_schedule,
    list_hooks,
    list_schedules,
    register_hook,
    register_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "apply_dropblock",
    "remove_dropblock",
    "describe",
    "plan",
    "Plan",
    "PlanRow",
    "SurgeryError",
    "register_norm",
    "drop_block",
    "DropBlock2d",
    "DropBlock3d",
    "DropBlockNd",
    "paper_gamma",
    "calibrated_gamma",
    "expected_drop_rate",
    "set_backend",
    "Recipe",
    "StageSpec",
    "ScheduleSpec",
    "RecipeError",
    "load_recipe",
    "list_recipes",
    "resolve_stage",
    "register_schedule",
    "list_schedules",
    "register_hook",
    "list_hooks",
    "attach_schedule",
    "detach_schedule",
    "DropBlockSchedule",
]
