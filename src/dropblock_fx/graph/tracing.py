"""Tracing one unit with this library's leaf policy, in train and in eval mode.

A unit is traced with `LeafTracer`: every layer FX users already treat as a leaf
(``torch.nn`` layers, timm's no-trace modules, ``torchvision.ops``, norms, DropBlocks) stays
one call, and a container's child units are leaves too. `trace_modes` traces it once
per mode and refuses a forward that changes its modules while traced. When a plain trace is
not faithful, ``graph.specialise`` traces the unit for its recorded call instead.

**One patch of ``nn.Module`` for many traces.** FX's ``Tracer.trace`` replaces
``nn.Module.__call__`` and ``nn.Module.__getattr__`` at the start of every trace and puts them
back at its end. Setting an attribute of a class invalidates the method caches of all its
subclasses: with timm, torchvision and their models loaded that is 0.2-2 ms a time, four
times a trace, and planning one model traces it dozens of times. `traces_share_one_patch`
installs, once for all the traces inside it, two methods that hand each call to the
`LeafTracer` tracing in the calling thread (and to the original methods in any other thread
or when none traces); FX sees them marked as its own patch and leaves ``nn.Module`` alone.
The scope holds `trace_lock` (which every trace takes too), so one thread at a time traces
with it; without the scope a trace is FX's own.

**In-place operators stay in place.** FX's own ``Proxy`` has no ``__iadd__``, so Python runs
``x += shortcut`` as ``x = x + shortcut`` and the rewritten forward would allocate a new map
where the original wrote into ``x`` (a residual block's add: one feature map more per block
and step). `LeafTracer`'s proxies (`InplaceProxy`) record Python's augmented assignments as
``operator.iadd`` and its kin, which FX generates back as ``x += shortcut``: the rewritten
forward does what the original did.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from typing import Any, Callable, Iterator, Optional

import torch.fx._symbolic_trace as _fx_trace
from torch import fx, nn

from ..modes import training_mode
from .leaves import autowrap_functions, is_leaf

__all__ = ["InplaceProxy", "LeafTracer", "SideEffects", "trace_modes", "traces_share_one_patch"]

# ---------------------------------------------------------------------------- one patch

_ORIG_CALL = _fx_trace._orig_module_call  # nn.Module's own methods, as FX keeps them
_ORIG_GETATTR = _fx_trace._orig_module_getattr
_FX_MARK = "__fx_already_patched"  # FX does not patch a method whose mark is set to True
trace_lock = threading.RLock()  # held by a shared-patch scope and by each trace (specialise too)
_LOCAL = threading.local()  # .stack: [(tracer, parameter proxy cache)] of this thread's traces
_held = [0]  # how many scopes (of the thread holding the lock, nested) hold the patch


def _tracing() -> Optional[tuple["LeafTracer", dict]]:
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


def _module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
    top = _tracing()
    if top is None:
        return _ORIG_CALL(mod, *args, **kwargs)
    tracer = top[0]

    def forward(*a: Any, **k: Any) -> Any:
        return _ORIG_CALL(mod, *a, **k)

    patcher = _fx_trace.CURRENT_PATCHER  # the running trace's: functions it wraps are put back
    if patcher is not None:
        _fx_trace._autowrap_check(patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}),
                                  tracer._autowrap_function_ids)
    return tracer.call_module(mod, forward, args, kwargs)


def _module_getattr(mod: nn.Module, attr: str) -> Any:
    value = _ORIG_GETATTR(mod, attr)
    top = _tracing()
    return value if top is None else top[0].getattr(attr, value, top[1])


def _mark(value: bool) -> None:
    setattr(_module_call, _FX_MARK, value)
    setattr(_module_getattr, _FX_MARK, value)


_mark(False)


@contextlib.contextmanager
def traces_share_one_patch() -> Iterator[None]:
    """Let every `LeafTracer` trace inside share one patch of ``nn.Module`` (see the module
    docstring): the same graphs, without the cost of patching a class per trace. Re-entrant;
    other threads' traces wait until the scope ends. When something else has patched
    ``nn.Module`` already (an FX trace in progress), traces inside run as FX's own.

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> with traces_share_one_patch():
        ...     graph = LeafTracer().trace(m)
        >>> [n.op for n in graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
        >>> nn.Module.__call__ is _ORIG_CALL
        True
    """
    with trace_lock:
        install = not _held[0]
        if install and (nn.Module.__dict__["__call__"] is not _ORIG_CALL
                        or nn.Module.__dict__["__getattr__"] is not _ORIG_GETATTR):
            yield  # someone else's patch is on nn.Module: traces inside run as FX's own
            return
        if install:
            nn.Module.__call__ = _module_call  # type: ignore[method-assign]
            nn.Module.__getattr__ = _module_getattr  # type: ignore[method-assign]
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
            if install:
                nn.Module.__call__ = _ORIG_CALL  # type: ignore[method-assign]
                nn.Module.__getattr__ = _ORIG_GETATTR  # type: ignore[method-assign]


# Python's augmented assignments that FX generates back as such (``torch.fx.graph.inplace_methods``).
_INPLACE_OPERATORS = ("add", "and", "floordiv", "lshift", "matmul", "mod", "mul", "or", "pow", "rshift", "sub",
                      "truediv", "xor")


class InplaceProxy(fx.Proxy):
    """FX's ``Proxy`` that records ``x += y`` (and ``-=``, ``*=``, ...) as ``operator.iadd(x, y)``
    rather than ``x + y``: the generated forward then updates ``x`` in place, as the traced one did.

    Examples:
        >>> class Residual(nn.Module):
        ...     def forward(self, x):
        ...         y = x * 2
        ...         y += x
        ...         return y
        >>> print(fx.GraphModule(nn.Module(), LeafTracer().trace(Residual())).code.strip())
        def forward(self, x):
            mul = x * 2
            mul += x;  add = mul;  mul = x = None
            return add
    """


def _augmented(op: Callable[[Any, Any], Any], node_name: str) -> Callable[[fx.Proxy, Any], Any]:
    def method(self: fx.Proxy, other: Any) -> Any:
        # Named as FX names the plain operator's node ("add", not "iadd"): plan anchors such
        # as "shortcut into add" read the same whichever way the model wrote its addition.
        return self.tracer.create_proxy("call_function", op, (self, other), {}, name=node_name)

    method.__name__ = op.__name__
    return method


for _name in _INPLACE_OPERATORS:
    _plain = getattr(operator, f"{_name}_", None) or getattr(operator, _name)  # operator.and_, operator.add
    setattr(InplaceProxy, f"__i{_name}__", _augmented(getattr(operator, f"i{_name}"), _plain.__name__))


class LeafTracer(fx.Tracer):
    """An FX tracer with this library's leaf policy; ``extra_leaves`` are treated as leaves too
    (child units of a container are traced as single calls)."""

    def __init__(self, extra_leaves: tuple[nn.Module, ...] = (), autowrap: tuple[Any, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions() + tuple(autowrap))
        self._extra = {id(m) for m in extra_leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._extra or is_leaf(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceProxy(node, self)

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        """FX's trace; inside `traces_share_one_patch`, through the shared patch."""
        with trace_lock:
            if not (_held[0] and nn.Module.__dict__["__call__"] is _module_call):
                return super().trace(root, concrete_args)
            stack = _LOCAL.__dict__.setdefault("stack", [])
            stack.append((self, {}))
            _mark(True)
            try:
                return super().trace(root, concrete_args)
            finally:
                stack.pop()
                _mark(bool(stack))


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
