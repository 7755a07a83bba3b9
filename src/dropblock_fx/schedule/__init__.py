"""The schedule layer: schedules (rate over progress), hooks (what advances them), and
``attach_schedule`` that drives a model's DropBlock modules, with ``state_dict`` for resume."""

from . import functions as _builtin_schedules  # noqa: F401  (registers the built-ins)
from . import pending as _pending  # noqa: F401  (installs the "no schedule attached" warning)
from .core import DropBlockSchedule, attach_schedule, detach_schedule, schedule_length
from .hooks import HookContext, list_hooks, register_hook
from .registry import get_schedule, list_schedules, register_schedule, schedule_value
from .spec import ScheduleSpec

__all__ = [
    "ScheduleSpec",
    "DropBlockSchedule",
    "attach_schedule",
    "detach_schedule",
    "schedule_length",
    "register_schedule",
    "get_schedule",
    "list_schedules",
    "schedule_value",
    "register_hook",
    "list_hooks",
    "HookContext",
]
