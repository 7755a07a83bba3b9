"""The "no schedule attached" warning: a recipe with a schedule must never silently train at
its final rate.

Surgery marks the modules of a scheduled recipe with one `PendingSchedule` per
``apply_dropblock`` call; ``attach_schedule`` clears the mark. The first marked module to run
a training forward warns, once per model, and the warning names the fix for the training loop
it recognises (timm's ``train.py``, the Hugging Face ``Trainer``, Lightning, a plain loop).
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from .. import modules as _modules

__all__ = ["PendingSchedule", "warn_unscheduled", "unscheduled_message", "detect_loop"]

_warned_unscheduled = False  # modules marked pending by hand (schedule_pending = True)


class PendingSchedule:
    """Truthy marker shared by the DropBlock modules of one ``apply_dropblock`` call whose
    recipe has a schedule; the first of them to train unscheduled warns for the whole model."""

    __slots__ = ("warned",)

    def __init__(self) -> None:
        self.warned = False

    def __bool__(self) -> bool:
        return True

    def __getstate__(self) -> tuple[bool]:
        return (self.warned,)  # a tuple: a false state would skip __setstate__

    def __setstate__(self, state: tuple[bool]) -> None:
        (self.warned,) = state


def _frames_mention(*module_prefixes: str) -> Optional[str]:
    """The first module (of the current call stack) whose name starts with one of the prefixes."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if isinstance(name, str) and name.startswith(module_prefixes):
            return name
        frame = frame.f_back
    return None


def _is_timm_train_script() -> bool:
    main = sys.modules.get("__main__")
    path = str(getattr(main, "__file__", "") or "")
    return path.replace("\\", "/").rsplit("/", 1)[-1] == "train.py" and "timm" in sys.modules


def detect_loop() -> str:
    """Which training loop is running this forward: ``"hf"``, ``"lightning"``, ``"timm"`` or
    ``"plain"`` (from the call stack and the main script)."""
    found = _frames_mention("transformers.trainer", "lightning.pytorch", "pytorch_lightning")
    if found is not None:
        return "hf" if found.startswith("transformers") else "lightning"
    if _is_timm_train_script():
        return "timm"
    return "plain"


_FIXES = {
    "plain": (
        "Call dropblock_fx.attach_schedule(model, total_steps=..., optimizer=...) before training."
    ),
    "timm": (
        "In timm's train.py, add `import dropblock_fx.timm` and build the model by a "
        "`<arch>_dropblock` name (the schedule then follows the run's epochs and updates), or "
        "start the script with `python -m dropblock_fx.timm_train train.py ...`."
    ),
    "hf": (
        "With the Hugging Face Trainer, pass "
        "callbacks=[dropblock_fx.integrations.hf.DropBlockScheduleCallback()]."
    ),
    "lightning": (
        "With Lightning, pass callbacks=[dropblock_fx.schedule.lightning.DropBlockScheduleCallback()] "
        "to the Trainer."
    ),
}


def unscheduled_message(loop: str = "plain") -> str:
    """The warning's text, with the fix for ``loop`` (see `detect_loop`)."""
    return (
        "dropblock_fx: this model's recipe has a schedule, but no schedule is attached, so "
        "DropBlock trains at its final rate from the first step. " + _FIXES.get(loop, _FIXES["plain"])
    )


def warn_unscheduled(pending: object) -> None:
    """Warn once per marker (once per model; once per process for hand-set ``True``)."""
    global _warned_unscheduled
    if isinstance(pending, PendingSchedule):
        if pending.warned:
            return
        pending.warned = True
    elif _warned_unscheduled:
        return
    else:
        _warned_unscheduled = True
    # stacklevel: warnings.warn <- here <- DropBlockNd.forward <- the caller of the module
    warnings.warn(unscheduled_message(detect_loop()), UserWarning, stacklevel=3)


_modules.set_unscheduled_handler(warn_unscheduled)
