"""The hook registry: what advances a schedule.

A hook is a factory ``install(schedule, context) -> handle`` registered under a name; the
handle has ``remove()``. ``unit`` says what one ``schedule.step()`` counts: optimizer steps
(``"step"``) or epochs (``"epoch"``).

Built-ins: ``optimizer`` (a step post-hook on the optimizer: no change to the loop),
``manual`` (call ``.step()``), ``epoch`` (``.step(epoch=e)``, timm-scheduler style) and
``forward`` (counts training forwards of the model, for loops you cannot touch). ``lightning``
(a Lightning ``Callback`` at ``schedule.callback``) is registered by
``dropblock_fx.integrations.lightning``, imported the first time it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol

import torch

from ..registry import Registry

__all__ = ["HookContext", "HookDef", "HookHandle", "Steppable", "register_hook", "get_hook", "list_hooks", "HOOKS"]


class Steppable(Protocol):
    """What a hook advances: a ``DropBlockSchedule`` (``step`` counts one unit, ``set_count``
    jumps to a count)."""

    def step(self, n: float = 1, *, epoch: Optional[float] = None) -> float: ...

    def set_count(self, count: float) -> None: ...


@dataclass
class HookContext:
    """What ``attach_schedule`` knows when a hook is installed."""

    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    options: dict[str, Any] = field(default_factory=dict)


class HookHandle:
    """A removable hook handle; ``remove()`` is idempotent. Extra keyword arguments become
    attributes (the Lightning hook's handle has ``callback``).

    Examples:
        >>> calls = []
        >>> h = HookHandle(lambda: calls.append(1))
        >>> h.remove(); h.remove(); calls
        [1]
    """

    def __init__(self, remove: Optional[Callable[[], None]] = None, **attrs: Any) -> None:
        self._remove = remove
        self.__dict__.update(attrs)

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


@dataclass(frozen=True)
class HookDef:
    """A registered hook: its installer, what one step counts, and whether it lives on the
    model (``with_model``: copies and pickles of the model carry it, each with its own
    schedule; otherwise a copy's schedule is detached)."""

    name: str
    install: Callable[[Steppable, HookContext], Any]
    unit: Literal["step", "epoch"] = "step"
    with_model: bool = False


HOOKS: Registry[HookDef] = Registry("hook")
HOOKS.lazy("lightning", "dropblock_fx.integrations.lightning")


def register_hook(
    name: str, *, unit: Literal["step", "epoch"] = "step", overwrite: bool = False, with_model: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``install(schedule, context) -> handle`` (``handle.remove()`` uninstalls).

    The installer calls ``schedule.step()`` (or ``schedule.set_count(n)``) whenever its event
    happens. ``with_model=True`` says the hook lives on the model, so copies of the model
    carry it: the installer must then install a picklable object that holds the schedule
    (not a closure). Example, a hook for gradient accumulation that counts micro-batches::

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
        known = HOOKS.find(name)
        if known is not None and not overwrite and known.install is not install:
            raise ValueError(f"hook {name!r} is already registered (pass overwrite=True to replace it)")
        HOOKS.register(name, HookDef(name, install, unit, with_model), overwrite=True)
        return install

    return decorator


def list_hooks() -> list[str]:
    """Names of the registered hooks.

    Examples:
        >>> {"optimizer", "forward", "lightning"} <= set(list_hooks())
        True
    """
    return HOOKS.names()


def get_hook(name: str) -> HookDef:
    """The registered hook ``name`` (its plug-in module imported if need be).

    Examples:
        >>> get_hook("epoch").unit
        'epoch'
    """
    return HOOKS.get(name)


@register_hook("manual", with_model=True)
def _manual(schedule: Steppable, ctx: HookContext) -> HookHandle:
    return HookHandle()


@register_hook("epoch", unit="epoch", with_model=True)
def _epoch(schedule: Steppable, ctx: HookContext) -> HookHandle:
    return HookHandle()


class OptimizerStep:
    """The optimizer post-hook: one ``schedule.step()`` per successful ``optimizer.step()``
    (``GradScaler`` skips the call on inf/NaN grads, and then the schedule does not advance)."""

    def __init__(self, schedule: Steppable) -> None:
        self.schedule = schedule

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.schedule.step()


@register_hook("optimizer")
def _optimizer(schedule: Steppable, ctx: HookContext) -> Any:
    opt = ctx.optimizer
    if opt is None or not hasattr(opt, "register_step_post_hook"):
        raise ValueError("hook='optimizer' needs attach_schedule(..., optimizer=<torch.optim.Optimizer>)")
    return opt.register_step_post_hook(OptimizerStep(schedule))


def _count_training_forward(schedule: Steppable, module: torch.nn.Module) -> None:
    if module.training:
        schedule.step()


# Kept out of compiled graphs: under torch.compile it runs eagerly at a graph break, and
# fullgraph=True refuses it loudly rather than silently never advancing (use the "optimizer"
# hook there).
_REASON = "dropblock_fx: hook='forward' counts forwards outside the graph; with fullgraph=True use hook='optimizer'"
try:
    _count_eagerly = torch.compiler.disable(_count_training_forward, reason=_REASON)
except TypeError:  # torch without disable(reason=...)
    _count_eagerly = torch.compiler.disable(_count_training_forward)


class ForwardCount:
    """The forward pre-hook of ``hook="forward"``: one ``schedule.step()`` per training forward.

    An object, not a closure, so that it pickles and deep-copies with the model: a copy's hook
    holds the copy's schedule, which drives the copy's modules.
    """

    def __init__(self, schedule: Steppable) -> None:
        self.schedule = schedule

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        _count_eagerly(self.schedule, module)


@register_hook("forward", with_model=True)
def _forward(schedule: Steppable, ctx: HookContext) -> Any:
    return ctx.model.register_forward_pre_hook(ForwardCount(schedule))
