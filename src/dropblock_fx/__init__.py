"""dropblock-fx: paper-faithful DropBlock for the CNNs you already use.

The public names load on first use (PEP 562), so ``import dropblock_fx`` and the
command line's ``recipes`` and ``--help`` do not import torch.

Examples:
    >>> import dropblock_fx as dbx
    >>> dbx.DropBlock2d(0.1, 7)
    DropBlock2d(drop_prob=0.1, block_size=7)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it (relative to this package)
_SOURCES: dict[str, str] = {
    "apply_dropblock": ".surgery",
    "remove_dropblock": ".surgery",
    "describe": ".surgery",
    "plan": ".surgery",
    "plan_of": ".surgery",
    "Plan": ".surgery",
    "PlanRow": ".surgery",
    "SurgeryError": ".surgery",
    "register_norm": ".graph",
    "drop_block": ".op",
    "DropBlock2d": ".modules",
    "DropBlock3d": ".modules",
    "DropBlockNd": ".modules",
    "DropBlockOptions": ".op",
    "paper_gamma": ".op",
    "calibrated_gamma": ".op",
    "expected_drop_rate": ".op",
    "set_backend": ".op",
    "Recipe": ".recipe",
    "StageSpec": ".recipe",
    "ScheduleSpec": ".schedule",
    "RecipeError": ".recipe",
    "load_recipe": ".recipe",
    "list_recipes": ".recipe",
    "resolve_stage": ".recipe",
    "register_schedule": ".schedule",
    "list_schedules": ".schedule",
    "register_hook": ".schedule",
    "list_hooks": ".schedule",
    "attach_schedule": ".schedule",
    "detach_schedule": ".schedule",
    "schedule_of": ".schedule",
    "DropBlockSchedule": ".schedule",
}

__all__ = list(_SOURCES)

if TYPE_CHECKING:  # what type checkers and the API reference see: the eager imports
    from .graph import register_norm
    from .modules import DropBlock2d, DropBlock3d, DropBlockNd
    from .op import DropBlockOptions, calibrated_gamma, drop_block, expected_drop_rate, paper_gamma, set_backend
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
        schedule_of,
    )
    from .surgery import Plan, PlanRow, SurgeryError, apply_dropblock, describe, plan_of, remove_dropblock
    from .surgery.plan import plan  # the function (static analysis would take the module of its name)


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(source, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
