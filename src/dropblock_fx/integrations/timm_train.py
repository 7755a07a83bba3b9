"""The recipe's schedule in timm's ``train.py``, with no change to the script but an import.

A model built by name through this library's timm registration (``--model resnet50_dropblock``,
``--model-kwargs recipe=...``) whose recipe has a schedule is *watched*. ``train.py`` tells
timm's scheduler factory the two numbers the DropBlock schedule needs::

    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, ..., updates_per_epoch=...)

so this module wraps ``create_scheduler_v2`` (a pass-through). When it is called with an
optimizer that holds a watched model's parameters, the schedule is attached to that model
over the whole run, ``num_epochs * updates_per_epoch`` optimizer steps, and advanced by each
``optimizer.step()``. It also follows the LR scheduler's own clock: ``step_update(n)`` and
``step(epoch)`` (which ``train.py`` calls after every update and epoch, and once at start-up
to fast-forward after ``--resume``) set the DropBlock schedule to the same position. So
``--resume`` continues the schedule from the checkpoint's epoch, with nothing stored by us.

Installed by ``import dropblock_fx.timm``; the launcher installs it before the script runs::

    dropblock-fx timm-train path/to/train.py --model resnet50_dropblock ...
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..modules import DropBlockNd
from ..schedule.core import DropBlockSchedule, attach_schedule

__all__ = ["install", "watch", "watched", "attach_for_run"]

# Models waiting for the run's length; they leave the set when a schedule is attached.
_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_ORIGINAL: dict[str, Callable[..., Any]] = {}


def _pending(model: nn.Module) -> bool:
    return any(isinstance(m, DropBlockNd) and m.schedule_pending for m in model.modules())


def watch(model: nn.Module) -> nn.Module:
    """Attach ``model``'s recipe schedule when timm's ``create_scheduler_v2`` is called with an
    optimizer over its parameters (done for you by the ``<arch>_dropblock`` models).

    Examples:
        >>> from dropblock_fx import DropBlock2d
        >>> plain = torch.nn.Sequential(DropBlock2d(0.1, 3))   # no recipe schedule: not watched
        >>> watch(plain) is plain, plain in watched()
        (True, False)
    """
    if _pending(model):
        _WATCHED.add(model)
    return model


def watched() -> list[nn.Module]:
    """The models still waiting for a run to attach their schedule to.

    Examples:
        >>> isinstance(watched(), list)
        True
    """
    return list(_WATCHED)


def _trained_by(optimizer: Any) -> list[nn.Module]:
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return []
    ids = {id(p) for g in groups for p in g.get("params", ())}
    out = []
    for model in list(_WATCHED):
        if not _pending(model):
            _WATCHED.discard(model)  # a schedule was attached by hand: leave it alone
        elif any(id(p) in ids for p in model.parameters()):
            out.append(model)
    return out


def _optimizer_steps(optimizer: Any) -> Optional[float]:
    """Optimizer steps already taken, from the state optimizers such as Adam keep per
    parameter (restored by ``--resume``); ``None`` when the state has no step counts (SGD)."""
    steps = []
    for state in getattr(optimizer, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None:
            steps.append(float(step.item() if torch.is_tensor(step) else step))
    return max(steps) if steps else None


# LR scheduler -> (model, schedule, updates per epoch). Kept outside the scheduler: timm's
# Scheduler.state_dict() saves its whole __dict__.
_FOLLOWING: "weakref.WeakKeyDictionary[Any, tuple[Any, DropBlockSchedule, int]]" = weakref.WeakKeyDictionary()
_FOLLOWER_CLASSES: dict[type, type] = {}


def _sync(lr_scheduler: Any, *, epoch: Optional[float] = None, updates: Optional[float] = None) -> None:
    entry = _FOLLOWING.get(lr_scheduler)
    if entry is None:
        return
    model_ref, sched, steps_per_epoch = entry
    model = model_ref()
    if model is None or not any(m.schedule is sched for m in sched.modules.values()):
        return  # a schedule attached by hand later replaced this one: stop following
    if epoch is not None:
        sched.set_count(epoch * steps_per_epoch if sched.unit == "step" else epoch)
    elif updates is not None and sched.unit == "step":
        sched.set_count(updates)


def _follower_class(cls: type) -> type:
    """``cls`` whose ``step(epoch)`` / ``step_update(n)`` also move the DropBlock schedule."""
    sub = _FOLLOWER_CLASSES.get(cls)
    if sub is None:

        def step(self: Any, epoch: int, *args: Any, **kwargs: Any) -> Any:
            _sync(self, epoch=epoch)
            return cls.step(self, epoch, *args, **kwargs)

        def step_update(self: Any, num_updates: int, *args: Any, **kwargs: Any) -> Any:
            _sync(self, updates=num_updates)
            return cls.step_update(self, num_updates, *args, **kwargs)

        def __reduce_ex__(self: Any, protocol: Any) -> Any:
            # Pickles as the plain timm scheduler (the following is not part of its state).
            return (_rebuild, (cls, self.__dict__))

        sub = type(cls.__name__, (cls,), {
            "step": step, "step_update": step_update, "__reduce_ex__": __reduce_ex__,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })
        _FOLLOWER_CLASSES[cls] = sub
    return sub


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _follow(lr_scheduler: Any, model: nn.Module, sched: DropBlockSchedule, steps_per_epoch: int) -> None:
    """Make ``lr_scheduler.step(epoch)`` / ``step_update(n)`` move ``sched`` to the same point."""
    if not (callable(getattr(lr_scheduler, "step", None)) and callable(getattr(lr_scheduler, "step_update", None))):
        return
    _FOLLOWING[lr_scheduler] = (weakref.ref(model), sched, steps_per_epoch)
    cls = type(lr_scheduler)
    if cls not in _FOLLOWER_CLASSES.values():
        lr_scheduler.__class__ = _follower_class(cls)


def attach_for_run(
    optimizer: torch.optim.Optimizer,
    num_epochs: float,
    updates_per_epoch: int = 0,
    lr_scheduler: Any = None,
) -> list[DropBlockSchedule]:
    """Attach the schedule of every watched model that ``optimizer`` trains, over
    ``num_epochs`` epochs of ``updates_per_epoch`` optimizer steps, following
    ``lr_scheduler``'s position if given. What the ``create_scheduler_v2`` wrapper does; call
    it yourself in a loop that builds its schedulers another way.

    Without ``updates_per_epoch`` the schedule moves once per epoch (``lr_scheduler.step``).

    Examples:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> attach_for_run(opt, num_epochs=10, updates_per_epoch=100)   # it trains no watched model
        []
    """
    out = []
    for model in _trained_by(optimizer):
        _WATCHED.discard(model)
        if updates_per_epoch:
            sched = attach_schedule(
                model, total_steps=num_epochs * updates_per_epoch, steps_per_epoch=updates_per_epoch,
                optimizer=optimizer,
            )
            done = _optimizer_steps(optimizer)
            if done:
                sched.set_count(done)  # resumed; the LR scheduler's fast-forward refines it
        else:
            sched = attach_schedule(model, epochs=num_epochs, hook="epoch")
        if lr_scheduler is not None:
            _follow(lr_scheduler, model, sched, updates_per_epoch)
        out.append(sched)
    return out


def _wrap(create_scheduler_v2: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(create_scheduler_v2, "__dropblock_fx__", False):
        return create_scheduler_v2

    signature = inspect.signature(create_scheduler_v2)

    @functools.wraps(create_scheduler_v2)
    def wrapper(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        result = create_scheduler_v2(optimizer, *args, **kwargs)
        if _WATCHED:
            lr_scheduler, num_epochs = result
            given = signature.bind_partial(optimizer, *args, **kwargs).arguments
            attach_for_run(optimizer, num_epochs, given.get("updates_per_epoch") or 0, lr_scheduler)
        return result

    wrapper.__dropblock_fx__ = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap timm's ``create_scheduler_v2`` where a script finds it: ``timm.scheduler``, its
    factory module, and a running script's own binding (``train.py`` imports the name before
    it may import ``dropblock_fx.timm``). Idempotent; the wrapper passes everything through.

    Examples:
        >>> import timm.scheduler
        >>> install(); install()
        >>> timm.scheduler.create_scheduler_v2.__dropblock_fx__
        True
    """
    import timm.scheduler
    import timm.scheduler.scheduler_factory as factory

    original = _ORIGINAL.setdefault("create_scheduler_v2", factory.create_scheduler_v2)
    if getattr(original, "__dropblock_fx__", False):  # pragma: no cover - wrapped elsewhere
        return
    wrapped = _wrap(original)
    factory.create_scheduler_v2 = wrapped
    timm.scheduler.create_scheduler_v2 = wrapped
    main_module = sys.modules.get("__main__")
    if main_module is not None and getattr(main_module, "create_scheduler_v2", None) is original:
        main_module.create_scheduler_v2 = wrapped  # type: ignore[attr-defined]
