"""A Hugging Face ``Trainer`` callback that drives the DropBlock schedule (optional extra:
``pip install -e '.[hf]'`` in a clone of dropblock-fx).

The schedule follows ``state.global_step`` (optimizer updates done) over ``state.max_steps``,
both of which the ``Trainer`` restores from a checkpoint, so ``trainer.train(
resume_from_checkpoint=...)`` continues the schedule exactly where it was; gradient
accumulation and multiple devices need nothing more. Works with the convolutional models of
``transformers`` (ResNet, ConvNeXt, RegNet, MobileNet, EfficientNet, ...) once
``apply_dropblock`` has placed DropBlock in them.

Example::

    model = ResNetForImageClassification(config)
    dropblock_fx.apply_dropblock(model, "last-two-stages")
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DropBlockScheduleCallback()])
    trainer.train()
"""

from __future__ import annotations

from typing import Any, Optional

from ..schedule.core import DropBlockSchedule, attach_schedule
from ._optional import require

TrainerCallback = require("transformers", extra="hf", needed_by="the Hugging Face Trainer callback").TrainerCallback

__all__ = ["DropBlockScheduleCallback"]


class DropBlockScheduleCallback(TrainerCallback):
    """Attach the model's DropBlock schedule at ``train()`` start and keep it at
    ``state.global_step / state.max_steps``.

    Args:
        schedule: overrides the recipe's schedule (a name, dict or ``ScheduleSpec``); default:
            the schedule of the recipe applied to the model.
        **attach_kwargs: more arguments for [`dropblock_fx.attach_schedule`][dropblock_fx.attach_schedule]
            (``total_steps`` overrides the run length).

    Attributes:
        schedule: the attached [`DropBlockSchedule`][dropblock_fx.DropBlockSchedule] (``None`` before
            ``train()`` starts).
    """

    def __init__(self, schedule: Any = None, **attach_kwargs: Any) -> None:
        if schedule is not None:
            attach_kwargs["schedule"] = schedule
        self.attach_kwargs = attach_kwargs
        self.schedule: Optional[DropBlockSchedule] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("DropBlockScheduleCallback: the Trainer passed no model to on_train_begin")
        options = dict(self.attach_kwargs)
        options.setdefault("total_steps", int(state.max_steps))
        epochs = getattr(state, "num_train_epochs", None)
        if epochs and "epochs" not in options and "steps_per_epoch" not in options:
            options["epochs"] = epochs  # for schedules whose own length is in epochs
        options["hook"] = "manual"
        self.schedule = attach_schedule(model, **options)
        self.schedule.set_count(state.global_step)  # a resumed run starts where it stopped

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule is not None:
            self.schedule.set_count(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the update: the rates of "global_step updates done", as the optimizer hook gives.
        if self.schedule is not None:
            self.schedule.set_count(state.global_step)
