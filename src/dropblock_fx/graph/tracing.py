"""Tracing one unit with this library's leaf policy, in train and in eval mode.

A unit is traced with `LeafTracer`: every layer FX users already treat as a leaf
(``torch.nn`` layers, timm's no-trace modules, ``torchvision.ops``, norms, DropBlocks) stays
one call, and a container's child units are leaves too. `trace_modes` traces it once
per mode and refuses a forward that changes its modules while traced. When a plain trace is
not faithful, ``graph.specialise`` traces the unit for its recorded call instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import fx, nn

from ..modes import training_mode
from .leaves import autowrap_functions, is_leaf

__all__ = ["LeafTracer", "SideEffects", "trace_modes"]


class LeafTracer(fx.Tracer):
    """An FX tracer with this library's leaf policy; ``extra_leaves`` are treated as leaves too
    (child units of a container are traced as single calls)."""

    def __init__(self, extra_leaves: tuple[nn.Module, ...] = (), autowrap: tuple[Any, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions() + tuple(autowrap))
        self._extra = {id(m) for m in extra_leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._extra or is_leaf(m)


class SideEffects(TypeError):
    """The forward changed its modules' state while traced: a rewritten forward would not."""


def _modes(module: nn.Module, trace: Callable[[], fx.Graph]) -> dict[str, fx.Graph]:
    """One trace per mode, each starting from the module's own state (a forward that caches
    on itself would otherwise see the previous trace's proxies); refuses a forward that
    changes its modules' attributes, since a graph cannot do that."""
    from .preserve import preserved

    graphs: dict[str, fx.Graph] = {}
    with training_mode(module):
        for mode in ("train", "eval"):
            module.train(mode == "train")
            with preserved(module) as changed:
                graphs[mode] = trace()
            if changed:
                raise SideEffects(f"its forward sets {', '.join(sorted(set(changed))[:3])} on itself")
    if graphs["train"].python_code("self").src == graphs["eval"].python_code("self").src:
        return {"any": graphs["eval"]}
    return graphs


def trace_modes(module: nn.Module, extra_leaves: tuple[nn.Module, ...] = (),
                concrete_args: Optional[dict[str, Any]] = None,
                trace: Optional[Callable[[], fx.Graph]] = None, autowrap: tuple[Any, ...] = ()) -> dict[str, fx.Graph]:
    """Trace ``module`` in train and in eval mode (with ``trace()`` when given, else a
    `LeafTracer`, keeping the ``autowrap`` functions as single calls too);
    ``{"any": g}`` when both give the same code."""
    return _modes(module, trace or (lambda: LeafTracer(extra_leaves, autowrap).trace(module, concrete_args=concrete_args)))
