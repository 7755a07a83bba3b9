"""``attach_schedule`` and ``DropBlockSchedule``: drive every DropBlock module of a model.

Each module has a ``target_drop_prob`` (its rate at full strength: the recipe's rate times
its stage multiplier). At progress ``p`` the schedule sets
``module.drop_prob = target_drop_prob * f(p)``, so with the paper recipe and ``linear`` the
per-group rates are the official code's ``(1 - kp_t) / 4 ** (4 - g)``. Setting ``drop_prob``
fills a buffer in place, so compiled models are not recompiled.

Each driven module links back to its schedule (``module.schedule``): that link answers
"which schedule drives this model" ([`schedule_of`][dropblock_fx.schedule_of]), lets attaching again replace the
old schedule, and lets ``remove_dropblock`` unhook it. Copies of a model carry the link.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Optional

import torch

from ..modules import DropBlockNd
from .hooks import HookContext, HookDef, get_hook
from .registry import schedule_value
from .spec import ScheduleLike, ScheduleSpec, as_schedule_spec

__all__ = ["DropBlockSchedule", "attach_schedule", "detach_schedule", "schedule_of", "schedule_length"]

_STATE_VERSION = 1


class DropBlockSchedule:
    """The rate schedule of one model's DropBlock modules.

    The state is one counter, ``count`` (optimizer steps, or epochs for the ``epoch`` hook);
    ``progress = count / length`` clamped to ``[0, 1]``; every rate is a pure function of it.

    Attributes:
        spec: the [`ScheduleSpec`][dropblock_fx.ScheduleSpec] (name, params, length).
        length: the schedule's length in ``unit`` s (``None``: not known yet (Lightning reads it
            at fit start) or not needed (constant); it then runs at progress 0).
        unit: ``"step"`` or ``"epoch"``.
        modules: ``{qualified name: module}`` of the driven DropBlock modules.
        hook: the installed hook's handle (``None`` once detached).
        callback: the Lightning callback (``hook="lightning"`` only).

    Examples:
        >>> from dropblock_fx import DropBlock2d, attach_schedule
        >>> model = torch.nn.Sequential(DropBlock2d(0.1, 3))
        >>> sched = attach_schedule(model, total_steps=10)
        >>> sched, model[0].schedule is sched
        (DropBlockSchedule('linear', 1 modules, 0/10 steps, value=0), True)
    """

    def __init__(
        self,
        modules: Mapping[str, DropBlockNd],
        spec: ScheduleSpec,
        length: Optional[float],
        unit: str = "step",
        steps_per_epoch: Optional[float] = None,
    ) -> None:
        self.modules = dict(modules)
        self.spec = spec
        self.length = length
        self.unit = unit
        self.steps_per_epoch = steps_per_epoch
        self.count: float = 0.0
        self.hook: Any = None
        self.callback: Any = None
        self._hook_with_model = False
        self._applied: Optional[float] = None
        for m in self.modules.values():
            if m.target_drop_prob is None:
                # A hand-made module: its current rate is its rate at full strength.
                m.target_drop_prob = float(m.drop_prob)
            m.schedule = self
        self.apply()

    # -- reading -------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction of the schedule done, in ``[0, 1]``."""
        if not self.length:
            return 0.0
        return min(1.0, max(0.0, self.count / self.length))

    @property
    def value(self) -> float:
        """The schedule's factor now: every module runs at ``target_drop_prob * value``."""
        return schedule_value(self.spec.name, self.progress, self.spec.params)

    @property
    def drop_prob(self) -> float:
        """The current recipe-level rate: the largest module rate now (0 without modules)."""
        return max((m.drop_prob for m in self.modules.values()), default=0.0)

    @property
    def keep_prob(self) -> float:
        """``1 - drop_prob``, the paper's ``kp_t``."""
        return 1.0 - self.drop_prob

    def rates(self) -> dict[str, float]:
        """``{module name: current drop_prob}``."""
        return {name: m.drop_prob for name, m in self.modules.items()}

    # -- advancing -----------------------------------------------------------------------
    def step(self, n: float = 1, *, epoch: Optional[float] = None) -> float:
        """Advance by ``n`` units, or jump to ``epoch`` (epochs done; converted to steps when
        the unit is steps and ``steps_per_epoch`` is known). Returns `value`."""
        if epoch is not None:
            if self.unit == "epoch":
                self.set_count(epoch)
            elif self.steps_per_epoch:
                self.set_count(epoch * self.steps_per_epoch)
            else:
                raise ValueError("step(epoch=...) needs hook='epoch' or steps_per_epoch=...")
        else:
            self.set_count(self.count + n)
        return self.value

    def set_count(self, count: float) -> None:
        """Jump to ``count`` units done (Lightning's ``global_step``; exact resume)."""
        count = float(count)
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"count must be a finite number >= 0, got {count!r}")
        self.count = count
        self.apply()

    def apply(self) -> None:
        """Set every module's ``drop_prob`` from the current factor (cheap when unchanged)."""
        value = self.value
        if value == self._applied:
            return
        for m in self.modules.values():
            m.drop_prob = min(1.0, max(0.0, m.target_drop_prob * value))
        self._applied = value

    @property
    def attached(self) -> bool:
        """Whether its hook is installed (``detach`` removes it)."""
        return self.hook is not None

    def detach(self) -> None:
        """Remove the hook; the modules keep their current rates (and their link to this
        schedule: they are not "unscheduled")."""
        if self.hook is not None and hasattr(self.hook, "remove"):
            self.hook.remove()
        self.hook = None

    def release(self, modules: Iterable[DropBlockNd]) -> None:
        """Stop driving ``modules`` (they keep their rates and lose their link); detached once
        it drives none. ``remove_dropblock`` and attaching another schedule call this."""
        gone = {id(m) for m in modules}
        for name, m in list(self.modules.items()):
            if id(m) in gone:
                del self.modules[name]
                if m.schedule is self:
                    m.schedule = None
        if not self.modules:
            self.detach()

    # -- copying -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # A copy of the model (deepcopy, pickle) carries its schedule. A hook on the model
        # (forward) comes along and drives the copy; one elsewhere (the optimizer, Lightning)
        # stays with the original, so the copy's schedule is detached.
        state = dict(self.__dict__)
        if not self._hook_with_model:
            state["hook"] = None
            state["callback"] = None
        return state

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "version": _STATE_VERSION,
            "count": self.count,
            "length": self.length,
            "unit": self.unit,
            "steps_per_epoch": self.steps_per_epoch,
            "schedule": self.spec.model_dump(mode="python"),
            "value": self.value,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counter, length and schedule, and set the rates: later steps then give
        exactly the rates of an uninterrupted run."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown DropBlockSchedule state version {state.get('version')!r}")
        self.spec = ScheduleSpec.model_validate(state["schedule"])
        self.length = state["length"]
        self.unit = state["unit"]
        self.steps_per_epoch = state.get("steps_per_epoch")
        self._applied = None
        self.set_count(state["count"])

    def __repr__(self) -> str:
        length = "run" if self.length is None else f"{self.length:g} {self.unit}s"
        return (
            f"DropBlockSchedule({self.spec.name!r}, {len(self.modules)} modules, "
            f"{self.count:g}/{length}, value={self.value:.4g})"
        )


def schedule_length(
    spec: ScheduleSpec,
    unit: str,
    total_steps: Optional[float],
    epochs: Optional[float],
    steps_per_epoch: Optional[float],
) -> Optional[float]:
    """The length of ``spec`` in ``unit`` s (``"step"`` or ``"epoch"``) for a run of
    ``total_steps`` optimizer steps, or ``epochs`` epochs of ``steps_per_epoch`` steps; the
    spec's own ``steps`` / ``epochs`` / ``fraction`` win. ``None``: a constant schedule on a
    run of unknown length.

    Examples:
        >>> schedule_length(ScheduleSpec(fraction=0.5), "step", 1000, None, None)
        500.0
    """
    spe = steps_per_epoch
    if spe is None and total_steps and epochs:
        spe = total_steps / epochs
    if unit == "epoch":
        total = epochs if epochs else (total_steps / spe if total_steps and spe else None)
    else:
        total = total_steps if total_steps else (epochs * spe if epochs and spe else None)
    if spec.steps is not None:
        if unit == "step":
            return float(spec.steps)
        if not spe:
            raise ValueError(f"a schedule of {spec.steps} steps with hook='epoch' needs steps_per_epoch=...")
        return spec.steps / spe
    if spec.epochs is not None:
        if unit == "epoch":
            return float(spec.epochs)
        if not spe:
            raise ValueError(
                f"a schedule of {spec.epochs:g} epochs needs steps_per_epoch=... (or total_steps and epochs)"
            )
        return spec.epochs * spe
    if total is None:
        if spec.name == "constant":
            return None
        raise ValueError(
            "attach_schedule needs the length of the run: total_steps=..., or epochs=... and "
            "steps_per_epoch=... (or a schedule with its own steps / epochs)"
        )
    return total * (spec.fraction if spec.fraction is not None else 1.0)


def _recipe_schedule(modules: Iterable[DropBlockNd]) -> Optional[ScheduleSpec]:
    """The default schedule of ``modules``: their recipe's (from their placements; found
    through wrappers such as DDP's ``.module`` or torch.compile's ``._orig_mod``); ``constant``
    when the applied recipe has none; the paper's ``linear`` for modules placed by hand."""
    placements = [m.placement for m in modules if m.placement is not None]
    found = [p.recipe_schedule for p in placements if p.recipe_schedule is not None]
    if any(s != found[0] for s in found[1:]):
        raise ValueError(
            "the recipes applied to parts of this model have different schedules; pass "
            "attach_schedule(..., schedule=...) or attach one schedule per part"
        )
    if found:
        return found[0]
    # A recipe without a schedule means a constant rate (its docs say so); modules placed
    # by hand get the paper's linear ramp.
    return ScheduleSpec(name="constant") if placements else ScheduleSpec()


def attach_schedule(
    model: torch.nn.Module,
    total_steps: Optional[int] = None,
    epochs: Optional[float] = None,
    steps_per_epoch: Optional[int] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    hook: Optional[str] = None,
    *,
    schedule: ScheduleLike = None,
    hook_options: Optional[Mapping[str, Any]] = None,
) -> DropBlockSchedule:
    """Drive every DropBlock module of ``model`` with a schedule.

    Args:
        model: a model with DropBlock modules (``apply_dropblock``'s or your own).
        total_steps: optimizer steps in the whole run; or give ``epochs`` and
            ``steps_per_epoch``.
        optimizer: with it, the default hook is ``"optimizer"``: each ``optimizer.step()``
            advances the schedule once; without, ``"manual"``.
        hook: what advances the schedule: ``"optimizer"``, ``"manual"``, ``"epoch"``,
            ``"forward"``, ``"lightning"`` or one you registered ([`register_hook`][dropblock_fx.register_hook]).
        schedule: overrides the recipe's schedule (a name, dict or [`ScheduleSpec`][dropblock_fx.ScheduleSpec]);
            default: the schedule of the recipe ``apply_dropblock`` applied; ``constant``
            when that recipe has none; the paper's ``linear`` for modules placed by hand.
        hook_options: extra options for a custom hook (``HookContext.options``).

    Returns:
        The [`DropBlockSchedule`][dropblock_fx.DropBlockSchedule], already applied at step 0; each module links to it
        (``module.schedule``). Attaching again replaces the previous schedule of these
        modules (unhooked once it drives none).

    Examples:
        >>> from dropblock_fx import DropBlock2d
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DropBlock2d(0.1, 3))
        >>> sched = attach_schedule(model, total_steps=100)
        >>> sched.step(50)
        0.5
        >>> model[1].drop_prob
        0.05
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, DropBlockNd)}
    spec = as_schedule_spec(schedule)
    if spec is None:
        spec = _recipe_schedule(modules.values())
    hook_name = hook if hook is not None else ("optimizer" if optimizer is not None else "manual")
    hdef: HookDef = get_hook(hook_name)
    if hdef.name == "lightning" and total_steps is None and epochs is None:
        length: Optional[float] = None  # the callback reads it from the Trainer
    else:
        length = schedule_length(spec, hdef.unit, total_steps, epochs, steps_per_epoch)
    spe = steps_per_epoch
    if spe is None and total_steps and epochs:
        spe = total_steps / epochs

    if not modules:
        warnings.warn(
            "attach_schedule: the model has no DropBlock modules; nothing to schedule "
            "(call dropblock_fx.apply_dropblock first)",
            UserWarning,
            stacklevel=2,
        )
    for previous in {id(m.schedule): m.schedule for m in modules.values() if m.schedule is not None}.values():
        previous.release(modules.values())
    sched = DropBlockSchedule(modules, spec, length, unit=hdef.unit, steps_per_epoch=spe)
    sched.hook = hdef.install(sched, HookContext(model, optimizer, dict(hook_options or {})))
    sched.callback = getattr(sched.hook, "callback", None)
    sched._hook_with_model = hdef.with_model
    return sched


def _schedules(model: torch.nn.Module) -> list[DropBlockSchedule]:
    found: dict[int, DropBlockSchedule] = {}
    for m in model.modules():
        if isinstance(m, DropBlockNd) and m.schedule is not None:
            found.setdefault(id(m.schedule), m.schedule)
    return list(found.values())


def schedule_of(model: torch.nn.Module) -> Optional[DropBlockSchedule]:
    """The schedule that drives ``model``'s DropBlock modules (``None``: none does).

    Raises:
        ValueError: parts of the model follow different schedules (ask each part).

    Examples:
        >>> from dropblock_fx import DropBlock2d
        >>> model = torch.nn.Sequential(DropBlock2d(0.1, 3))
        >>> schedule_of(model) is None
        True
        >>> sched = attach_schedule(model, total_steps=10)
        >>> schedule_of(model) is sched
        True
    """
    found = _schedules(model)
    if len(found) > 1:
        raise ValueError(f"parts of this model follow {len(found)} different schedules; ask each part "
                         "(schedule_of(model.part))")
    return found[0] if found else None


def detach_schedule(model: torch.nn.Module) -> Optional[DropBlockSchedule]:
    """Unhook the schedule of the model's modules (rates stay where they are); returns it, or
    ``None`` when none is attached.

    Examples:
        >>> from dropblock_fx import DropBlock2d
        >>> model = torch.nn.Sequential(DropBlock2d(0.1, 3))
        >>> sched = attach_schedule(model, total_steps=10)
        >>> detach_schedule(model) is sched, detach_schedule(model)
        (True, None)
    """
    attached = [s for s in _schedules(model) if s.attached]
    for s in attached:
        s.detach()
    return attached[0] if attached else None
