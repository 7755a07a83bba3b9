"""Realise a plan's actions on the live model, all or nothing: used by ``apply_dropblock`` (with
DropBlock modules) and by the plan's own run check (with probes, undone at once)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..graph.splice import is_spliced, splice_after, splice_graph, unsplice
from .actions import Action
from .rows import PlanRow
from .target import SurgeryError

__all__ = ["realise"]

ModuleFactory = Callable[[PlanRow, Action], nn.Module]


def realise(actions: list[Action], make: ModuleFactory) -> Callable[[], None]:
    """Do every action, with ``make(row, action)`` building the module of each row; returns
    the function that undoes them all.

    Raises:
        SurgeryError: naming the module; whatever was done is undone first.
    """
    undo: list[Callable[[], None]] = []

    def undo_all() -> None:
        for fn in reversed(undo):
            fn()
        undo.clear()

    current = ""
    try:
        for act in actions:
            current = act.path
            m = act.module
            if act.how == "graph":
                for name, row in zip(act.names, act.rows):
                    if name in m._modules or hasattr(m, name):
                        raise SurgeryError(f"{current}: it already has an attribute {name!r}")
                    m.add_module(name, make(row, act))
                    undo.append(lambda m=m, name=name: m._modules.pop(name, None))
                if is_spliced(m):
                    raise SurgeryError(f"{current}: already rewritten")
                splice_graph(m, act.source)
                undo.append(lambda m=m: unsplice(m))
            elif act.how == "after":
                if "dropblock" in m._modules or is_spliced(m):
                    raise SurgeryError(f"{current}: already rewritten")
                splice_after(m, make(act.rows[0], act))
                undo.append(lambda m=m: (unsplice(m), m._modules.pop("dropblock", None)))
            else:
                attr = act.names[0]
                old = m._modules[attr]
                new = make(act.rows[0], act)
                new.__dict__["_dropblock_replaced"] = old  # not a child: state_dict and repr unchanged
                m._modules[attr] = new
                undo.append(lambda m=m, attr=attr, old=old: m._modules.__setitem__(attr, old))
    except Exception as e:
        undo_all()
        if isinstance(e, SurgeryError):
            raise
        raise SurgeryError(f"{current}: {type(e).__name__}: {e}") from e
    return undo_all
