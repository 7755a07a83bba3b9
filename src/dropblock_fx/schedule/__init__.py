"""The schedule layer: schedules (rate over progress), hooks (what advances them), and
``attach_schedule`` that drives a model's DropBlock modules, with ``state_dict`` for resume.

The schedule functions, their registry and ``ScheduleSpec`` are torch-free and load with the
package (recipes use them); what drives modules (``core``, ``hooks``) loads on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import functions as _builtin_schedules  # noqa: F401  (registers the built-ins)
from .registry import get_schedule, list_schedules, register_schedule, schedule_value
from .spec import ScheduleLike, ScheduleSpec

_LAZY = {
    "DropBlockSchedule": ".core",
    "attach_schedule": ".core",
    "detach_schedule": ".core",
    "schedule_of": ".core",
    "schedule_length": ".core",
    "HookContext": ".hooks",
    "HookHandle": ".hooks",
    "list_hooks": ".hooks",
    "register_hook": ".hooks",
}

if TYPE_CHECKING:
    from .core import DropBlockSchedule, attach_schedule, detach_schedule, schedule_length, schedule_of
    from .hooks import HookContext, HookHandle, list_hooks, register_hook

__all__ = [
    "ScheduleSpec",
    "ScheduleLike",
    "DropBlockSchedule",
    "attach_schedule",
    "detach_schedule",
    "schedule_of",
    "schedule_length",
    "register_schedule",
    "get_schedule",
    "list_schedules",
    "schedule_value",
    "register_hook",
    "list_hooks",
    "HookContext",
    "HookHandle",
]


def __getattr__(name: str) -> Any:
    source = _LAZY.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(source, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
