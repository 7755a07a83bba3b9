"""The "no schedule attached" message: a recipe with a schedule must never silently train at
its final rate.

A module whose recipe has a schedule and that no schedule drives yet is pending
(``module.schedule_pending``). Surgery's watch warns with `unscheduled_message` from the
first training forward of such a module, once per model; the text names the fix for the training
loop it recognises (timm's ``train.py``, the Hugging Face ``Trainer``, Lightning, a plain loop).
"""

from __future__ import annotations

import sys
from typing import Optional

__all__ = ["unscheduled_message", "detect_loop"]


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
    ``"plain"`` (from the call stack and the main script).

    Examples:
        >>> detect_loop()
        'plain'
    """
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
        "start the script with `dropblock-fx timm-train train.py ...`."
    ),
    "hf": (
        "With the Hugging Face Trainer, pass "
        "callbacks=[dropblock_fx.integrations.hf.DropBlockScheduleCallback()]."
    ),
    "lightning": (
        "With Lightning, pass callbacks=[dropblock_fx.integrations.lightning.DropBlockScheduleCallback()] "
        "to the Trainer."
    ),
}


def unscheduled_message(loop: str = "plain") -> str:
    """The warning's text, with the fix for ``loop`` (see `detect_loop`).

    Examples:
        >>> "attach_schedule" in unscheduled_message("plain")
        True
    """
    return (
        "dropblock_fx: this model's recipe has a schedule, but no schedule is attached, so "
        "DropBlock trains at its final rate from the first step. " + _FIXES.get(loop, _FIXES["plain"])
    )


class PendingSchedule:
    """Only so that models pickled by dropblock-fx 0.1.0 load (their modules held one)."""

    __slots__ = ("warned",)

    def __setstate__(self, state: tuple[bool]) -> None:
        (self.warned,) = state
