"""A Lightning ``Callback`` that drives a [`DropBlockSchedule`][dropblock_fx.DropBlockSchedule] (optional extra:
``pip install -e '.[lightning]'`` in a clone of dropblock-fx).

The schedule follows ``trainer.global_step`` (optimizer steps done), so gradient
accumulation, multiple devices and resuming from a Lightning checkpoint need nothing more.
"""

from __future__ import annotations

from typing import Any, Optional

from ..schedule.core import DropBlockSchedule, attach_schedule, schedule_length
from ..schedule.hooks import HookContext, HookHandle, register_hook
from ._optional import require

# Lightning 2.x, then the older package name.
Callback = require(("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"), extra="lightning",
                   needed_by="hook='lightning'", library="Lightning").Callback

__all__ = ["DropBlockScheduleCallback"]


class DropBlockScheduleCallback(Callback):
    """Drive the DropBlock schedule from a Lightning ``Trainer``.

    Either pass the schedule of ``attach_schedule(model, hook="lightning")`` (it is also at
    ``schedule.callback``), or nothing (or a schedule spec): then the callback attaches one
    to the ``LightningModule`` at ``fit`` start, with ``trainer.estimated_stepping_batches``
    as the run length (``attach_kwargs`` go to [`attach_schedule`][dropblock_fx.attach_schedule]).

    Example::

        trainer = L.Trainer(max_epochs=90, callbacks=[DropBlockScheduleCallback()])
    """

    def __init__(self, schedule: Any = None, **attach_kwargs: Any) -> None:
        super().__init__()
        if schedule is not None and not isinstance(schedule, DropBlockSchedule):
            # A schedule spec (name, dict, ScheduleSpec) for the schedule attached at fit start.
            attach_kwargs["schedule"] = schedule
            schedule = None
        self.schedule: Optional[DropBlockSchedule] = schedule
        self.attach_kwargs = attach_kwargs
        self._pending_state: Optional[dict[str, Any]] = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        total = int(trainer.estimated_stepping_batches)
        if self.schedule is None:
            kwargs = dict(self.attach_kwargs)
            kwargs.setdefault("total_steps", total)
            kwargs["hook"] = "manual"
            self.schedule = attach_schedule(pl_module, **kwargs)
        elif self.schedule.length is None and self.schedule.spec.name != "constant":
            self.schedule.length = schedule_length(self.schedule.spec, "step", total, None, None)
        if self._pending_state is not None:
            self.schedule.load_state_dict(self._pending_state)
            self._pending_state = None
        self.schedule.set_count(trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule is not None:
            self.schedule.set_count(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the last batch the rates are those of "global_step steps done", as with the
        # optimizer hook.
        if self.schedule is not None:
            self.schedule.set_count(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)


@register_hook("lightning")
def _install(schedule: DropBlockSchedule, ctx: HookContext) -> HookHandle:
    """``attach_schedule(..., hook="lightning")``: the callback is at ``schedule.callback``."""
    return HookHandle(callback=DropBlockScheduleCallback(schedule))
