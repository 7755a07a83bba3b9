"""The hook registry: what advances a schedule.

A hook is a factory ``install(schedule, context) -> handle`` registered under a name; the
handle has ``remove()``. ``unit`` says what one ``schedule.step()`` counts: optimizer steps
(``"step"``) or epochs (``"epoch"``).

Built-ins: ``optimizer`` (a step post-hook on the optimizer: no change to the loop),
``manual`` (call ``.step()``), ``epoch`` (``.step(epoch=e)``, timm-scheduler style),
``forward`` (counts training forwards of the model, for loops you cannot touch) and
``lightning`` (a Lightning ``Callback`` at ``schedule.callback``; needs the extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

import torch

from ..keypath import closest

if TYPE_CHECKING:  # pragma: no cover
    from .core import DropBlockSchedule

__all__ = ["HookContext", "HookDef", "register_hook", "get_hook", "list_hooks"]


@dataclass
class HookContext:
    """What ``attach_schedule`` knows when a hook is installed."""

    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    options: dict[str, Any] = field(default_factory=dict)


class _Handle:
    """A removable hook handle; ``remove()`` is idempotent."""

    def __init__(self, remove: Optional[Callable[[], None]] = None, **attrs: Any) -> None:
        self._remove = remove
        self.__dict__.update(attrs)

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


@dataclass(frozen=True)
class HookDef:
    name: str
    install: Callable[["DropBlockSchedule", HookContext], Any]
    unit: Literal["step", "epoch"] = "step"


_HOOKS: dict[str, HookDef] = {}


def register_hook(
    name: str, *, unit: Literal["step", "epoch"] = "step", overwrite: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``install(schedule, context) -> handle`` (``handle.remove()`` uninstalls).

    The installer calls ``schedule.step()`` (or ``schedule.set_count(n)``) whenever its event
    happens. Example, a hook for gradient accumulation that counts micro-batches::

        @register_hook("micro-batch")
        def _install(schedule, ctx):
            accum = ctx.options.get("accumulate", 1)
            def post(module, args, output):
                if module.training:
                    schedule.step(1 / accum)
            return ctx.model.register_forward_hook(post)

        attach_schedule(model, total_steps=1000, hook="micro-batch", hook_options={"accumulate": 4})
    """
    if unit not in ("step", "epoch"):
        raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")

    def decorator(install: Callable[..., Any]) -> Callable[..., Any]:
        if name in _HOOKS and not overwrite and _HOOKS[name].install is not install:
            raise ValueError(f"hook {name!r} is already registered (pass overwrite=True to replace it)")
        _HOOKS[name] = HookDef(name, install, unit)
        return install

    return decorator


def list_hooks() -> list[str]:
    """Names of the registered hooks."""
    return sorted(_HOOKS)


def get_hook(name: str) -> HookDef:
    try:
        return _HOOKS[name]
    except KeyError:
        known = list_hooks()
        raise ValueError(f"unknown hook {name!r}{closest(name, known)}; known: {', '.join(known)}") from None


@register_hook("manual")
def _manual(schedule: "DropBlockSchedule", ctx: HookContext) -> _Handle:
    return _Handle()


@register_hook("epoch", unit="epoch")
def _epoch(schedule: "DropBlockSchedule", ctx: HookContext) -> _Handle:
    return _Handle()


@register_hook("optimizer")
def _optimizer(schedule: "DropBlockSchedule", ctx: HookContext) -> Any:
    opt = ctx.optimizer
    if opt is None or not hasattr(opt, "register_step_post_hook"):
        raise ValueError("hook='optimizer' needs attach_schedule(..., optimizer=<torch.optim.Optimizer>)")

    # Runs once per successful optimizer.step() (GradScaler skips the call on inf/NaN grads,
    # and then the schedule does not advance either).
    def post(optimizer: Any, args: Any, kwargs: Any) -> None:
        schedule.step()

    return opt.register_step_post_hook(post)


@register_hook("forward")
def _forward(schedule: "DropBlockSchedule", ctx: HookContext) -> Any:
    model = ctx.model

    # Kept out of compiled graphs: under torch.compile it runs eagerly at a graph break, and
    # fullgraph=True refuses it loudly rather than silently never advancing (use the
    # "optimizer" hook there).
    def pre(module: torch.nn.Module, args: Any) -> None:
        if module.training:
            schedule.step()

    reason = "dropblock_fx: hook='forward' counts forwards outside the graph; with fullgraph=True use hook='optimizer'"
    try:
        eager_pre = torch.compiler.disable(pre, reason=reason)
    except TypeError:  # torch without disable(reason=...)
        eager_pre = torch.compiler.disable(pre)
    return model.register_forward_pre_hook(eager_pre)


@register_hook("lightning")
def _lightning(schedule: "DropBlockSchedule", ctx: HookContext) -> _Handle:
    from ..integrations.lightning import DropBlockScheduleCallback

    return _Handle(callback=DropBlockScheduleCallback(schedule))
