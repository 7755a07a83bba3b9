"""The resolution the model trains at, against the one it was planned at.

A plan is made at the recipe's ``input_size``: every row's block size and expected rate hold
for the feature maps of that size. Each inserted module knows its planned map
(``placement.resolution``); the model's watch (``watch.py``) records the maps a module trains
on when they differ, and `with_seen_resolutions` gives ``describe`` the rates there.
"""

from __future__ import annotations

import dataclasses
import warnings  # noqa: F401 - the examples use it

from torch import nn

from ..modules import DropBlockNd, is_inserted
from .rows import Plan, PlanRow
from .settings import expected_rate
from .watch import ModelWatch, resolution_message

__all__ = ["resolution_message", "row_at", "with_seen_resolutions"]

# 0.1.0's name of the watch: models pickled then hold one.
ResolutionWatch = ModelWatch


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


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
    block_size = row.options.block_size
    block_size = block_size if isinstance(block_size, int) else max(block_size)
    block, rate = expected_rate(row.target_drop_prob, (1, 1, *seen), block_size, row.options)
    return dataclasses.replace(row, seen_resolution=tuple(seen), seen_block_size=block,
                               seen_expected_drop_prob=rate)


def with_seen_resolutions(p: Plan, model: nn.Module) -> Plan:
    """``p`` whose rows say, for each module of ``model`` that trained on maps of another size
    than planned, that size and the block size and expected rate there; ``p`` itself when no
    module did (the stored plan is never changed).

    Examples:
        >>> import torch, torchvision
        >>> from dropblock_fx import apply_dropblock, plan_of
        >>> m = apply_dropblock(torchvision.models.resnet18(), stages=[4], schedule=None)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = m.train()(torch.randn(2, 3, 32, 32))
        >>> p = with_seen_resolutions(plan_of(m), m)
        >>> p.rows[-1].resolution, p.rows[-1].seen_resolution, plan_of(m).rows[-1].seen_resolution
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
