"""``ModelWatch``: what the modules of one ``apply_dropblock`` call report from training.

Surgery gives every module it inserts the same watch, in its `dropblock_fx.modules.Placement`.
Each eager training forward calls ``watch(module, spatial_size)``; the watch warns, once for
the whole model:

* when the recipe has a schedule and none is attached (DropBlock would train at its final
  rate from the first step; the text names the fix for the training loop it runs in);
* when a module trains on another feature map than the one it was planned for (images of
  another size than the recipe's ``input_size``); the module then records the map in
  ``seen_resolution``, which ``describe`` reads;
* when a rewritten block runs its original forward for a call it could not be traced for,
  so its DropBlock modules do not run (``graph.splice`` reports it with `ModelWatch.skipped`).

The watch is plain data: it pickles and deep-copies with the model, and a copy's modules
share the copy's watch.
"""

from __future__ import annotations

import sys
import warnings

from ..modules import DropBlockNd
from ..schedule.pending import detect_loop, unscheduled_message

__all__ = ["ModelWatch", "resolution_message"]


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def resolution_message(path: str, planned: tuple[int, ...], seen: tuple[int, ...],
                       input_size: tuple[int, ...]) -> str:
    """The one-line warning for a module at ``path`` planned for a ``planned`` map that
    trains on a ``seen`` one, in a plan made for ``input_size``.

    Examples:
        >>> resolution_message("layer4.0.dropblock_conv1", (7, 7), (1, 1), (3, 224, 224))[:80]
        'dropblock_fx: training feature maps differ from the plan (layer4.0.dropblock_con'
    """
    where = f"{path}: " if path else ""
    return (f"dropblock_fx: training feature maps differ from the plan ({where}planned {_size(planned)}, "
            f"seen {_size(seen)}); the plan was made for input_size={tuple(input_size)}: pass "
            "input_size=... (the size you train at) to apply_dropblock for the rates it reports "
            "(describe(model) shows the rates at the seen sizes)")


_LIBRARIES = ("torch", "dropblock_fx", "torchvision", "timm")
_GENERATED = ("<dropblock_fx", "<eval_with_key")


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside torch, the model zoos and this package (spliced
    and FX-generated forwards included): usually the user's ``model(x)``."""
    frame, level = sys._getframe(2), 2  # the frame that called warnings.warn's caller
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        ours = isinstance(name, str) and name.split(".", 1)[0] in _LIBRARIES
        if not (ours or frame.f_code.co_filename.startswith(_GENERATED)):
            break
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


class ModelWatch:
    """Shared by the DropBlock modules of one ``apply_dropblock`` call (see the module doc).

    Args:
        input_size: the recipe's ``input_size``, for the message.

    Examples:
        >>> from dropblock_fx import DropBlock2d
        >>> from dropblock_fx.modules import Placement
        >>> watch = ModelWatch((3, 224, 224))
        >>> m = DropBlock2d(0.1, 7)
        >>> m.placement = Placement(4, "conv", 0.1, "layer4.0.dropblock_conv1", (7, 7), watch=watch)
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     watch(m, (1, 1)); watch(m, (2, 2))
        >>> len(w), watch.warned_resolution, m.seen_resolution
        (1, True, (2, 2))
    """

    __slots__ = ("input_size", "warned_resolution", "warned_unscheduled", "warned_skip")

    def __init__(self, input_size: tuple[int, ...]) -> None:
        self.input_size = tuple(input_size)
        self.warned_resolution = False
        self.warned_unscheduled = False
        self.warned_skip = False

    def __call__(self, module: DropBlockNd, spatial: tuple[int, ...]) -> None:
        placement = module.placement
        if placement is None:
            return
        planned = placement.resolution
        if planned and spatial != planned and spatial != module.seen_resolution:
            module.seen_resolution = tuple(spatial)
            if not self.warned_resolution:
                self.warned_resolution = True
                warnings.warn(resolution_message(placement.path, planned, spatial, self.input_size),
                              UserWarning, stacklevel=_caller_level())
        if not self.warned_unscheduled and module.schedule_pending and module.drop_prob > 0.0:
            self.warned_unscheduled = True
            warnings.warn(unscheduled_message(detect_loop()), UserWarning, stacklevel=_caller_level())

    def skipped(self, modules: list[DropBlockNd], seen: tuple[int, ...]) -> None:
        """``modules`` (one rewritten block's) did not run in a training call whose input was
        ``seen``: their block was traced for its planned call and could not be traced again
        for this one. Warns once for the whole model."""
        if self.warned_skip:
            return
        self.warned_skip = True
        paths = [m.placement.path for m in modules if m.placement is not None]
        where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        warnings.warn(
            f"dropblock_fx: {len(modules)} DropBlock module(s) did not run in this training call ({where}): "
            f"their block was traced for its planned input and could not be traced again for an input of "
            f"{_size(seen)}, so it ran its original forward; describe(model) lists every module that did not run "
            "and the sizes it missed", UserWarning, stacklevel=_caller_level())

    def __getstate__(self) -> tuple[tuple[int, ...], bool, bool, bool]:
        return (self.input_size, self.warned_resolution, self.warned_unscheduled, self.warned_skip)

    def __setstate__(self, state: tuple) -> None:
        # (input_size, warned) of 0.1.0's ResolutionWatch loads too.
        self.input_size, self.warned_resolution, self.warned_unscheduled, self.warned_skip = (*state, False, False)[:4]
