"""The schedule registry: named pure functions from training progress to a rate factor.

A schedule is ``f(progress, **params) -> factor`` with ``progress`` and ``factor`` in
``[0, 1]``; a module's rate is ``target_drop_prob * factor``. Being a pure function of
progress is what makes resuming exact: the state of a schedule is one step counter.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import KeyedError, closest
from ..registry import Registry

__all__ = [
    "ScheduleFn",
    "ScheduleDef",
    "register_schedule",
    "get_schedule",
    "list_schedules",
    "check_schedule",
    "schedule_value",
    "canonical_name",
    "SCHEDULES",
]

ScheduleFn = Callable[..., float]

# Points every schedule is evaluated at when a recipe is validated: a bad parameter fails
# at load time, with its key path, not after hours of training.
_PROBE = tuple(i / 16 for i in range(17))


@dataclass(frozen=True)
class ScheduleDef:
    """A registered schedule: its function and its parameters with their defaults."""

    name: str
    fn: ScheduleFn
    params: Mapping[str, Any]  # name -> default (inspect.Parameter.empty when required)
    doc: str

    def __call__(self, progress: float, **params: Any) -> float:
        return self.fn(progress, **params)


def canonical_name(name: Any) -> str:
    """Schedule names are case-insensitive and ``_`` / ``-`` are the same (``warmup_hold``).

    Examples:
        >>> canonical_name("Warmup_Hold")
        'warmup-hold'
    """
    return str(name).strip().lower().replace("_", "-")


SCHEDULES: Registry[ScheduleDef] = Registry("schedule", normalize=canonical_name, error=KeyError)


def register_schedule(name: str, *, overwrite: bool = False) -> Callable[[ScheduleFn], ScheduleFn]:
    """Register ``fn(progress, **params) -> factor`` under ``name``.

    Parameters must be keyword arguments (with defaults, or required). The function must be
    pure: the same progress and params always give the same factor.

    Examples:
        >>> @register_schedule("square", overwrite=True)
        ... def square(progress: float, end: float = 1.0) -> float:
        ...     return end * progress ** 2
        >>> schedule_value("square", 0.5)
        0.25
    """

    def decorator(fn: ScheduleFn) -> ScheduleFn:
        key = canonical_name(name)
        known = SCHEDULES.find(key)
        if known is not None and not overwrite and known.fn is not fn:
            raise ValueError(f"schedule {key!r} is already registered (pass overwrite=True to replace it)")
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"schedule {key!r}: the first argument must be the progress")
        defaults = {}
        for p in params[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"schedule {key!r}: parameters must be named, not *args / **kwargs")
            defaults[p.name] = p.default
        SCHEDULES.register(key, ScheduleDef(key, fn, defaults, inspect.getdoc(fn) or ""), overwrite=True)
        return fn

    return decorator


def list_schedules() -> list[str]:
    """Names of the registered schedules.

    Examples:
        >>> "linear" in list_schedules()
        True
    """
    return SCHEDULES.names()


def get_schedule(name: str) -> ScheduleDef:
    """The registered schedule ``name``; ``KeyError`` names the known ones.

    Examples:
        >>> get_schedule("Warmup_Hold").name
        'warmup-hold'
    """
    return SCHEDULES.get(name)


def _describe_params(sdef: ScheduleDef) -> str:
    if not sdef.params:
        return "no parameters"
    return ", ".join(
        k if v is inspect.Parameter.empty else f"{k} (default {v!r})" for k, v in sdef.params.items()
    )


def check_schedule(name: str, params: Mapping[str, Any]) -> None:
    """Validate ``params`` for schedule ``name``: known keys, and factors in ``[0, 1]`` over
    the whole run. Raises a ``ValueError`` whose ``path`` points below ``params``.

    Examples:
        >>> check_schedule("linear", {"end": 2.0})
        Traceback (most recent call last):
        ...
        dropblock_fx.errors.KeyedError: end must be a number in [0, 1]
    """
    sdef = get_schedule(name)
    for key in params:
        if key not in sdef.params:
            raise KeyedError(
                f"schedule {sdef.name!r} has no parameter {key!r}{closest(key, list(sdef.params))}",
                path=("params", key), value=params[key], allowed=_describe_params(sdef),
            )
    for key, default in sdef.params.items():
        if default is inspect.Parameter.empty and key not in params:
            raise KeyedError(
                f"schedule {sdef.name!r} needs parameter {key!r}", path=("params",),
                allowed=_describe_params(sdef),
            )
    for p in _PROBE:
        try:
            value = schedule_value(sdef.name, p, params)
        except KeyedError as e:
            raise KeyedError(e.reason, path=("params", *e.path), value=e.value, allowed=e.allowed) from None
        except Exception as e:  # user functions may raise anything on bad params
            raise KeyedError(
                f"schedule {sdef.name!r} fails with these params: {type(e).__name__}: {e}",
                path=("params",), value=dict(params), allowed=_describe_params(sdef),
            ) from None
        if not (0.0 <= value <= 1.0):
            raise KeyedError(
                f"schedule {sdef.name!r} gives {value!r} at progress {p:g}; a schedule is a factor of "
                "the target rate and must stay in [0, 1]",
                path=("params",), value=dict(params), allowed=_describe_params(sdef),
            )


def schedule_value(name: str, progress: float, params: Mapping[str, Any] | None = None) -> float:
    """Factor of schedule ``name`` at ``progress`` (clamped to ``[0, 1]``).

    Examples:
        >>> schedule_value("linear", 0.25)
        0.25
    """
    p = min(1.0, max(0.0, float(progress)))
    value = get_schedule(name).fn(p, **(params or {}))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"schedule {name!r} returned {type(value).__name__}, not a number")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"schedule {name!r} returned NaN at progress {p:g}")
    return value
