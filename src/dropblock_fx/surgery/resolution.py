"""The resolution the model trains at, against the one it was planned at.

A plan is made at the recipe's ``input_size``: every row's block size and expected rate hold
for the feature maps of that size. Each inserted module knows its planned map
(``placement.resolution``); the modules of one ``apply_dropblock`` call share one
`ResolutionWatch`, so the first training forward on other maps warns, once for the
whole model, and `with_seen_resolutions` gives ``describe`` the rates at the maps seen.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

from torch import nn

from ..modules import DropBlockNd, is_inserted
from .rows import Plan, PlanRow
from .settings import expected_rate

__all__ = ["ResolutionWatch", "resolution_message", "row_at", "with_seen_resolutions"]


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


class ResolutionWatch:
    """Shared by the DropBlock modules of one ``apply_dropblock`` call: the first of them to
    train on a feature map other than its planned one warns for the whole model.

    Examples:
        >>> import warnings
        >>> from dropblock_fx import DropBlock2d
        >>> watch = ResolutionWatch((3, 224, 224))
        >>> m = DropBlock2d(0.1, 7)
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     watch(m, (1, 1)); watch(m, (2, 2))
        >>> len(w), watch.warned
        (1, True)
    """

    __slots__ = ("input_size", "warned", "warned_skip")

    def __init__(self, input_size: tuple[int, ...]) -> None:
        self.input_size = tuple(input_size)
        self.warned = False
        self.warned_skip = False

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

    def __call__(self, module: DropBlockNd, seen: tuple[int, ...]) -> None:
        if self.warned:
            return
        self.warned = True
        placement = module.placement
        path = placement.path if placement is not None else ""
        planned = placement.resolution if placement is not None else ()
        warnings.warn(resolution_message(path, planned, seen, self.input_size), UserWarning,
                      stacklevel=_caller_level())

    def __getstate__(self) -> tuple[tuple[int, ...], bool, bool]:
        return (self.input_size, self.warned, self.warned_skip)

    def __setstate__(self, state: tuple) -> None:
        self.input_size, self.warned, self.warned_skip = (*state, False)[:3]


def row_at(row: PlanRow, seen: tuple[int, ...]) -> PlanRow:
    """``row`` with the block size clipped to a ``seen`` map and the expected rate there
    (the same maths as the plan's own columns).

    Examples:
        >>> import torchvision
        >>> from dropblock_fx import plan
        >>> row = plan(torchvision.models.resnet18(), stages=[4]).rows[-1]
        >>> r = row_at(row, (1, 1))
        >>> r.seen_block_size, round(r.seen_expected_drop_prob, 12) == row.target_drop_prob
        ((1, 1), True)
    """
    opts = dict(row.options)
    block_size = opts.get("block_size", max(row.block_size))
    block, rate = expected_rate(row.target_drop_prob, (1, 1, *seen), block_size, opts)
    return dataclasses.replace(row, seen_resolution=tuple(seen), seen_block_size=block,
                               seen_expected_drop_prob=rate)


def with_seen_resolutions(p: Plan, model: nn.Module) -> Plan:
    """``p`` whose rows say, for each module of ``model`` that trained on maps of another size
    than planned, that size and the block size and expected rate there; ``p`` itself when no
    module did (the stored plan is never changed).

    Examples:
        >>> import torch, torchvision
        >>> from dropblock_fx import apply_dropblock, describe
        >>> m = apply_dropblock(torchvision.models.resnet18(), stages=[4], schedule=None)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = m.train()(torch.randn(2, 3, 32, 32))
        >>> p = with_seen_resolutions(m.dropblock_plan, m)
        >>> p.rows[-1].resolution, p.rows[-1].seen_resolution, m.dropblock_plan.rows[-1].seen_resolution
        ((7, 7), (1, 1), ())
    """
    seen: dict[str, tuple[int, ...]] = {}
    skipped: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, DropBlockNd) and is_inserted(m):
            path = m.placement.path or name  # type: ignore[union-attr]
            if m.seen_resolution:
                seen[path] = m.seen_resolution
            if m.__dict__.get("skipped_at"):  # set by graph.splice when its block ran its original forward
                skipped[path] = tuple(sorted(m.__dict__["skipped_at"]))
    if not seen and not skipped:
        return p
    rows = [row_at(r, seen[r.path]) if r.path in seen else r for r in p.rows]
    rows = [dataclasses.replace(r, skipped_at=skipped[r.path]) if r.path in skipped else r for r in rows]
    notes = list(p.notes)
    if seen:
        sizes = sorted({_size(s) for s in seen.values()})
        notes.append(f"trained on other feature maps than planned at input_size={tuple(p.recipe.input_size)} "
                     f"(seen {', '.join(sizes)}): the seen columns give the block size and expected rate there")
    if skipped:
        listed = "; ".join(f"{path} (block input {', '.join(map(_size, at))})" for path, at in skipped.items())
        notes.append(f"{len(skipped)} of {len(p.rows)} DropBlock modules did not run for some calls (their block "
                     f"ran its original forward: it could not be traced for that input): {listed}")
    return dataclasses.replace(p, rows=rows, notes=notes)
