"""Meta values: tensors with a shape and a dtype but no data, and the one interpreter that runs
an FX graph of a unit on them.

Planning never computes on real data: the shape pass, verification, site matching and the
specialised tracer all work on meta tensors (``torch.empty(..., device="meta")``), and the
unit's parameters are swapped for meta copies only for the duration of a call
(``torch.func.functional_call``), so the model's own tensors are never touched.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .leaves import checkpoint_functions

__all__ = ["to_meta", "meta_state", "run_meta", "run_checkpointed", "attr_at", "with_batch", "interpret", "replay",
           "memo_meta"]


# ---------------------------------------------------------------------------- memoised meta kernels
#
# Many of aten's meta kernels are Python decompositions: a batch norm on meta tensors costs
# ~0.8-1.9 ms, a layer or group norm ~1.2-1.6 ms, a ReLU 0.5 ms, a hardswish 1.9 ms, against
# ~0.05 ms for a convolution. Planning runs the same few shapes through the same ops hundreds
# of times (every unit's graph is traced, verified and replayed), so the output's metadata is
# remembered per (op, argument metadata): a meta kernel is a pure function of the inputs'
# shapes, strides and dtypes and of the other arguments, and a meta output has no data.

_MEMO: dict[tuple, Any] = {}
_MEMO_MAX = 50_000
_PURE: dict[Any, bool] = {}  # op overload -> no argument or result aliases or is written
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
_active = threading.local()


def _pure(func: Any) -> bool:
    pure = _PURE.get(func)
    if pure is None:
        schema = func._schema
        pure = _PURE[func] = not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns))
    return pure


def _key(v: Any) -> Any:
    """A hashable key for an argument's metadata; raises TypeError for what cannot be keyed."""
    if type(v) is torch.Tensor:
        if v.device.type != "meta" or v.layout != torch.strided:
            raise TypeError
        return (v.shape, v.stride(), v.dtype, v.storage_offset())
    if isinstance(v, (list, tuple)):
        return (type(v), *map(_key, v))
    if type(v) in _SCALARS:
        return (type(v), v)
    raise TypeError  # a SymInt, a tensor subclass (FakeTensor), an object: not memoised


def _spec(out: Any) -> Any:
    """How to rebuild ``out`` (fresh meta tensors), or None when it is not only such tensors."""
    if type(out) is torch.Tensor:
        if out.device.type != "meta" or out.layout != torch.strided or out.storage_offset() != 0:
            return None
        return (tuple(out.shape), out.stride(), out.dtype)
    if type(out) in (tuple, list) and out:
        specs = [_spec(o) for o in out]
        return None if any(sp is None for sp in specs) else (type(out), specs)
    return None


def _rebuild(spec: Any) -> Any:
    if isinstance(spec[0], tuple):
        return torch.empty_strided(spec[0], spec[1], dtype=spec[2], device="meta")
    return spec[0](_rebuild(sp) for sp in spec[1])


class _MetaMemo(TorchDispatchMode):
    """Answers a pure op on plain meta tensors from the memo when it has seen the same
    metadata before; anything else (real or fake tensors, views, in-place ops) runs as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not _pure(func):
            return func(*args, **kwargs)
        try:
            key = (func, _key(args), _key(tuple(kwargs.items())))
            hit = _MEMO.get(key)
        except TypeError:
            return func(*args, **kwargs)
        if hit is not None:
            return _rebuild(hit)
        out = func(*args, **kwargs)
        spec = _spec(out)
        if spec is not None:
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()
            _MEMO[key] = spec
        return out


@contextlib.contextmanager
def memo_meta() -> Iterator[None]:
    """Within it, ops on meta tensors answer from a memo of earlier calls with the same
    metadata (thread-local; re-entrant). Real tensors and fake tensors are unaffected.

    Examples:
        >>> x = torch.empty(2, 8, 4, 4, device="meta")
        >>> with memo_meta():
        ...     a = torch.nn.functional.batch_norm(x, None, None, training=True)
        ...     b = torch.nn.functional.batch_norm(x, None, None, training=True)  # from the memo
        >>> (b.shape, b.stride()) == (a.shape, a.stride())
        True
    """
    if getattr(_active, "on", False):
        yield
        return
    _active.on = True
    try:
        with _MetaMemo():
            yield
    finally:
        _active.on = False


def to_meta(v: Any) -> Any:
    """``v`` with every tensor replaced by an empty meta tensor of its shape and dtype.

    Examples:
        >>> to_meta([torch.zeros(2, 3), 1.5])
        [tensor(..., device='meta', size=(2, 3)), 1.5]
    """
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(to_meta(x) for x in v) if not hasattr(v, "_fields") else type(v)(*map(to_meta, v))
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


def with_batch(value: Any, batch: int) -> Any:
    """``value`` (tensors in lists, tuples, dicts) as meta tensors with a first dim of ``batch``."""
    if isinstance(value, torch.Tensor):
        return torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta") if value.dim() else to_meta(value)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(with_batch(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: with_batch(v, batch) for k, v in value.items()}
    return value


def meta_state(m: nn.Module, cache: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> dict[str, torch.Tensor]:
    """Meta copies of ``m``'s parameters and buffers, for ``torch.func.functional_call``."""
    if cache is not None and id(m) in cache:
        return cache[id(m)]
    # one name per tensor: functional_call ties the other names of a shared one
    state = {k: to_meta(v) for k, v in itertools.chain(m.named_parameters(), m.named_buffers())}
    if cache is not None:
        cache[id(m)] = state
    return state


def run_meta(m: nn.Module, args: tuple, kwargs: dict, cache: Optional[dict] = None) -> Any:
    """``m(*args, **kwargs)`` on meta inputs with meta parameters; ``m``'s own tensors untouched."""
    with torch.no_grad(), memo_meta():
        return torch.func.functional_call(m, meta_state(m, cache), tuple(args), dict(kwargs), strict=False,
                                          tie_weights=True)


def attr_at(root: nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr`` target under ``root``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_checkpointed(fn: Any, args: tuple, kwargs: dict, cache: Optional[dict] = None) -> Any:
    """What a checkpoint function (``torch.utils.checkpoint.checkpoint``, timm's
    ``checkpoint_seq``, ...) returns for meta inputs: the modules it runs, run on meta values.
    Raises TypeError for anything but modules (a closure over real parameters cannot run on
    meta inputs)."""
    import torch.utils.checkpoint as cp

    if fn is cp.checkpoint_sequential:
        functions, x = args[0], args[2] if len(args) > 2 else kwargs["input"]
    elif getattr(fn, "__name__", "") == "checkpoint_seq":
        functions, x = args[0], args[1]
    else:  # checkpoint(function, *args, **kwargs)
        kw = {k: v for k, v in kwargs.items() if k not in ("use_reentrant", "preserve_rng_state", "determinism_check",
                                                           "debug", "context_fn")}
        if not isinstance(args[0], nn.Module):
            raise TypeError("checkpointed a function, not a module")
        return run_meta(args[0], tuple(args[1:]), kw, cache)
    modules = list(functions.children()) if isinstance(functions, nn.Sequential) else list(functions)
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError("checkpointed a function, not a module")
        x = run_meta(m, (x,), {}, cache)
    return x


_MISSING = object()


def _has_missing(v: Any) -> bool:
    found: list[bool] = []
    fx.node.map_aggregate(v, lambda x: found.append(x is _MISSING))
    return any(found)


def interpret(graph: fx.Graph, unit: nn.Module, placeholder: Callable[[fx.Node], Any],
              call_module: Callable[[fx.Node, tuple, dict], Any], strict: bool = True,
              cache: Optional[dict] = None) -> Any:
    """Run ``graph`` of ``unit`` on meta values: ``placeholder(node)`` gives each argument,
    ``call_module(node, args, kwargs)`` each leaf call; functions, methods and
    attributes run as written (no grad). Returns ``(output, values)``: the graph's output and
    every node's value.

    ``strict=False`` keeps going past a failing node: its value and everything computed from
    it is left out of ``values`` (the output is then None).
    """
    with memo_meta():
        return _interpret(graph, unit, placeholder, call_module, strict, cache)


def _interpret(graph: fx.Graph, unit: nn.Module, placeholder: Callable[[fx.Node], Any],
               call_module: Callable[[fx.Node, tuple, dict], Any], strict: bool, cache: Optional[dict]) -> Any:
    env: dict[fx.Node, Any] = {}
    out: Any = None
    for node in graph.nodes:
        try:
            args = fx.node.map_arg(node.args, lambda n: env.get(n, _MISSING))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env.get(n, _MISSING))
            value: Any = _MISSING
            if node.op == "placeholder":
                value = placeholder(node)
            elif node.op == "get_attr":
                value = to_meta(attr_at(unit, str(node.target)))
            elif node.op == "call_module":  # called even on unknown inputs: it may count its calls
                value = call_module(node, args, kwargs)
            elif _has_missing(args) or _has_missing(kwargs):
                continue
            elif node.op == "call_function" and node.target in checkpoint_functions():
                value = run_checkpointed(node.target, args, kwargs, cache)
            elif node.op == "call_function":
                with torch.no_grad():
                    value = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                with torch.no_grad():
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:  # output
                out = args[0]
            if value is not _MISSING:
                env[node] = value
        except Exception:  # noqa: BLE001 - strict callers want the error; others skip the value
            if strict:
                raise
    return out, env


def replay(graph: fx.Graph, unit: nn.Module, bound: dict[str, Any],
           outputs_of: Callable[[nn.Module], list[Any]]) -> dict[fx.Node, Any]:
    """Meta value of every node: leaf calls take the outputs recorded in the shape pass (in
    order), everything else is run on meta tensors. Unknown values are left out."""
    queues: dict[int, list[Any]] = {}

    def placeholder(node: fx.Node) -> Any:
        name = str(node.target).lstrip("*")
        if name in bound:
            return to_meta(bound[name])
        return node.args[0] if node.args else _MISSING

    def leaf(node: fx.Node, args: tuple, kwargs: dict) -> Any:
        mod = unit.get_submodule(str(node.target))
        q = queues.get(id(mod))
        if q is None:
            q = queues[id(mod)] = list(outputs_of(mod))
        return to_meta(q.pop(0)) if q else _MISSING

    return interpret(graph, unit, placeholder, leaf, strict=False)[1]
