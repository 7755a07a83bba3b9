"""Phase 8, the promise: every row of a plan is a DropBlock module that runs, on a feature map of
its stage. Checked by running it, not inferred.

The actions are realised with a probe in place of each DropBlock module, the target (or the
ancestor that runs it) is run once in train mode on meta tensors at the planned input size
(batch 2), and everything is undone. A row whose probe was never called (its unit's code is
not what runs: a parent that inlines it, a shared module called only through another one)
or that saw something other than a feature map of its stage (``graph.feature_maps``) is
dropped, with a note saying why; the actions that held it are rewritten without it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..graph.shapes import record_calls
from .actions import Action, without_rows
from .candidates import SiteContext
from .realise import realise
from .rows import PlanRow

__all__ = ["keep_promises"]

CHECK_BATCH = 2  # a batch norm in train mode needs more than one value per channel


class _Probe(nn.Module):
    """Stands for a DropBlock module during the check: records the shape of every input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: Any) -> Any:
        self.seen.append(tuple(x.shape) if isinstance(x, torch.Tensor) else ())
        return x


def _why_broken(row: PlanRow, seen: list[tuple[int, ...]], ctx: SiteContext, varying: bool) -> Optional[str]:
    if not seen:
        return "it is never called in a training forward (the code that runs does not reach it)"
    maps = ctx.maps.with_batch(CHECK_BATCH)
    for shape in dict.fromkeys(seen):
        why = maps.why_not(shape, None if varying else row.stage)
        if why is not None:
            return f"its input {'x'.join(map(str, shape))} is no feature map: {why}"
    return None


def keep_promises(ctx: SiteContext, rows: list[PlanRow], actions: list[Action]) -> tuple[list[PlanRow], list[Action]]:
    """The rows (and actions) that run, each on a feature map of its stage; notes the others."""
    if not rows:
        return rows, actions
    probes: dict[str, _Probe] = {}

    def make(row: PlanRow, act: Action) -> nn.Module:
        probes[row.path] = _Probe()
        return probes[row.path]

    target = ctx.target
    input_size = tuple(ctx.record.input_shape[1:])
    undo = realise(actions, make)
    try:
        record = record_calls(target.root, input_size, target.runners, batch=CHECK_BATCH, training=True,
                              follow=False, inputs=target.inputs)
    except RuntimeError as e:
        ctx.notes.append(f"could not check the plan by running it ({str(e)[:200]})")
        return rows, actions
    finally:
        undo()
    varying = {r.path for a in actions if a.varying for r in a.rows}
    broken = {r.path: why for r in rows
              if (why := _why_broken(r, probes[r.path].seen, ctx, r.path in varying)) is not None}
    if record.mode == "real":
        ctx.notes.append("the plan was checked by running it in eval mode (a training pass on meta or fake "
                         "tensors failed)")
    if not broken:
        return rows, actions
    for path, why in broken.items():
        ctx.notes.append(f"{path}: left out, {why}")
    return without_rows(ctx, rows, actions, set(broken))
