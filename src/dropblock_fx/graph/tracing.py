"""Tracing one unit with this library's leaf policy: plain, and specialised to a recorded call.

A plain trace (:func:`trace_modes`) feeds every argument as a ``Proxy``. Some forwards ask
Python questions FX cannot answer faithfully: ``isinstance(skip, torch.Tensor)`` is False
for a Proxy, ``int(x.shape[-1])`` or ``len(x.shape)`` raise, a float argument in an ``if``
raises. :func:`trace_specialised` traces such a unit for its recorded call instead: tensors
are proxies that carry a meta value (so ``isinstance``, ``.shape``, ``.size()``, ``.dim()``
answer as in real execution), and non-tensor arguments are the recorded values. The result
is valid only for calls like the recorded one, so it comes with a :func:`describe_call`
guard: the rewritten forward checks it on every call and runs the original forward when a
call differs (see ``splice``). A trace that depends on the batch size is refused.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import itertools
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .leaves import autowrap_functions, is_leaf

__all__ = ["LeafTracer", "trace_modes", "trace_specialised", "describe_call", "replay", "to_meta", "meta_state",
           "attr_at", "with_batch"]


class LeafTracer(fx.Tracer):
    """An FX tracer with this library's leaf policy; ``extra_leaves`` are treated as leaves too
    (child units of a container are traced as single calls)."""

    def __init__(self, extra_leaves: tuple[nn.Module, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions())
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

    flags = [(m, m.training) for m in module.modules()]
    graphs: dict[str, fx.Graph] = {}
    try:
        for mode in ("train", "eval"):
            module.train(mode == "train")
            with preserved(module) as changed:
                graphs[mode] = trace()
            if changed:
                raise SideEffects(f"its forward sets {', '.join(sorted(set(changed))[:3])} on itself")
    finally:
        for m, flag in flags:
            m.training = flag
    if graphs["train"].python_code("self").src == graphs["eval"].python_code("self").src:
        return {"any": graphs["eval"]}
    return graphs


def trace_modes(module: nn.Module, extra_leaves: tuple[nn.Module, ...] = (),
                concrete_args: Optional[dict[str, Any]] = None) -> dict[str, fx.Graph]:
    """Trace ``module`` in train and in eval mode; ``{"any": g}`` when both give the same code."""
    return _modes(module, lambda: LeafTracer(extra_leaves).trace(module, concrete_args=concrete_args))


# ---------------------------------------------------------------------------- meta values


def to_meta(v: Any) -> Any:
    """``v`` with every tensor replaced by an empty meta tensor of its shape and dtype."""
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(to_meta(x) for x in v) if not hasattr(v, "_fields") else type(v)(*map(to_meta, v))
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


def meta_state(m: nn.Module, cache: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> dict[str, torch.Tensor]:
    """Meta copies of ``m``'s parameters and buffers, for ``torch.func.functional_call``."""
    if cache is not None and id(m) in cache:
        return cache[id(m)]
    state = {k: to_meta(v) for k, v in itertools.chain(m.named_parameters(remove_duplicate=False),
                                                        m.named_buffers(remove_duplicate=False))}
    if cache is not None:
        cache[id(m)] = state
    return state


def run_meta(m: nn.Module, args: tuple, kwargs: dict, cache: Optional[dict] = None) -> Any:
    """``m(*args, **kwargs)`` on meta inputs with meta parameters; ``m``'s own tensors untouched."""
    with torch.no_grad():
        return torch.func.functional_call(m, meta_state(m, cache), tuple(args), dict(kwargs), strict=False,
                                          tie_weights=True)


def attr_at(root: nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr`` target under ``root``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def replay(graph: fx.Graph, unit: nn.Module, bound: dict[str, Any],
           outputs_of: Callable[[nn.Module], list[Any]]) -> dict[fx.Node, Any]:
    """Meta value of every node: leaf calls take the outputs recorded in the shape pass (in
    order), everything else is run on meta tensors. Unknown values are left out."""
    env: dict[fx.Node, Any] = {}
    queues: dict[int, list[Any]] = {}
    missing = object()

    def arg(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env.get(n, missing))

    def has_missing(v: Any) -> bool:
        found = []
        fx.node.map_aggregate(v, lambda x: found.append(x is missing))
        return any(found)

    for node in graph.nodes:
        try:
            if node.op == "placeholder":
                name = str(node.target).lstrip("*")
                if name in bound:
                    env[node] = to_meta(bound[name])
                elif node.args:
                    env[node] = node.args[0]
            elif node.op == "get_attr":
                env[node] = to_meta(attr_at(unit, str(node.target)))
            elif node.op == "call_module":
                mod = unit.get_submodule(str(node.target))
                q = queues.get(id(mod))
                if q is None:
                    q = queues[id(mod)] = list(outputs_of(mod))
                if q:
                    env[node] = to_meta(q.pop(0))
            elif node.op in ("call_function", "call_method"):
                a, k = arg(node.args), arg(node.kwargs)
                if has_missing(a) or has_missing(k):
                    continue
                with torch.no_grad():
                    if node.op == "call_function":
                        env[node] = node.target(*a, **k)
                    else:
                        env[node] = getattr(a[0], node.target)(*a[1:], **k)
        except Exception:  # noqa: BLE001 - unknown value; sites depending on it are skipped
            continue
    return env


# ---------------------------------------------------------------------------- specialised tracing


def describe_call(value: Any) -> Any:
    """A literal (``repr`` round-trips) that specialised code depends on, for one argument:
    tensors by their shape without the batch dim; lists, tuples, dicts by their items;
    ``None``, bools, numbers and strings by value.

    Raises:
        TypeError: a value that cannot be described (a module, an arbitrary object).

    Example:
        >>> describe_call([torch.zeros(2, 3, 8, 8), 0.5, None])
        ('list', (('tensor', (3, 8, 8)), ('value', 0.5), ('value', None)))
    """
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(int(s) for s in value.shape[1:]))
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return (type(value).__name__, tuple(describe_call(v) for v in value))
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return ("dict", tuple((k, describe_call(v)) for k, v in value.items()))
    if value is None or type(value) in (bool, int, float, str):
        return ("value", value)
    raise TypeError(f"cannot specialise on a {type(value).__name__} argument")


class _MetaProxy(fx.Proxy):
    """A Proxy that answers shape questions like the meta value it carries (and, while a
    specialised trace runs, ``isinstance(p, torch.Tensor)``: see ``_isinstance_sees_tensors``).

    Sizes are concrete except the first dim, which stays symbolic (a ``size(0)`` node): the
    batch size is never baked in, and nothing else is unguarded (the other dims follow from
    the guarded input shapes).
    """

    _meta: Any = None

    def _sizes(self) -> tuple:
        shape = tuple(self._meta.shape)
        if not shape:
            return shape
        return (self.tracer.create_proxy("call_method", "size", (self, 0), {}), *shape[1:])

    @property
    def shape(self):  # type: ignore[override]
        return self._sizes() if isinstance(self._meta, torch.Tensor) else self.__getattr__("shape")

    @property
    def ndim(self):
        return self._meta.dim() if isinstance(self._meta, torch.Tensor) else self.__getattr__("ndim")

    def size(self, dim: Optional[int] = None):  # noqa: D102
        if isinstance(self._meta, torch.Tensor):
            if dim is None:
                return self._sizes()
            if dim not in (0, -self._meta.dim()):
                return self._meta.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    def dim(self):  # noqa: D102
        if isinstance(self._meta, torch.Tensor):
            return self._meta.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __len__(self) -> int:
        if isinstance(self._meta, (list, tuple)):
            return len(self._meta)
        return super().__len__()

    def __iter__(self):
        if isinstance(self._meta, (list, tuple)):
            return iter([self[i] for i in range(len(self._meta))])
        return super().__iter__()


def _meta_of(a: Any) -> Any:
    """The meta value behind a proxy argument (LookupError when unknown)."""
    if isinstance(a, _MetaProxy):
        if a._meta is None:
            raise LookupError
        return a._meta
    if isinstance(a, fx.proxy.Attribute):  # x.device, x.dtype, ...: not yet a node
        return getattr(_meta_of(a.root), a.attr)
    if isinstance(a, fx.Proxy):
        raise LookupError
    return a


class _SpecialisingTracer(LeafTracer):
    def __init__(self, extra_leaves: tuple[nn.Module, ...], values: dict[str, Any], cache: dict) -> None:
        super().__init__(extra_leaves)
        self._values = values
        self._cache = cache
        self._computing = False  # running a leaf on meta values: no nodes, no proxies

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # noqa: ANN001
        """One placeholder per parameter (so the forward keeps the original's positional
        order); tensors reach the forward as meta-carrying proxies inside the recorded
        containers, everything else as its recorded value."""
        fn = inspect.unwrap(root_fn)
        sig = inspect.signature(fn)
        args: list[Any] = [self.root] if is_module else []
        for name, p in list(sig.parameters.items())[1 if is_module else 0:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError("cannot specialise a forward with *args / **kwargs")
            default = () if p.default is p.empty else (p.default,)
            ph = self.create_proxy("placeholder", name, default, {})
            value = self._values.get(name, p.default)
            ph._meta = value if isinstance(value, torch.Tensor) else None
            args.append(self._feed(ph, value))
        return root_fn, args

    def _feed(self, proxy: fx.Proxy, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            proxy._meta = value
            return proxy
        leaves, _ = tree_flatten(value)
        if not any(isinstance(v, torch.Tensor) for v in leaves):
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self._feed(proxy[i], v) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: self._feed(proxy[k], v) for k, v in value.items()}
        raise TypeError(f"cannot specialise on a {type(value).__name__} of tensors")

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # noqa: ANN001
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind in ("placeholder", "output") or not isinstance(p, _MetaProxy):
            return p
        unknown = object()
        try:
            a = fx.node.map_aggregate(args, _meta_of)
            k = fx.node.map_aggregate(kwargs, _meta_of)
            with torch.no_grad():
                if kind == "call_function":
                    p._meta = target(*a, **k)
                elif kind == "call_method":
                    p._meta = getattr(a[0], target)(*a[1:], **k)
                elif kind == "call_module":
                    self._computing = True
                    try:
                        p._meta = run_meta(self.root.get_submodule(target), a, k, self._cache)
                    finally:
                        self._computing = False
                elif kind == "get_attr":
                    obj = attr_at(self.root, str(target))
                    p._meta = to_meta(obj) if isinstance(obj, torch.Tensor) else unknown
        except Exception:  # noqa: BLE001 - no value: shape questions on it stay symbolic
            p._meta = None
        if p._meta is unknown:
            p._meta = None
        return p

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with _factories_take_proxies(self), _isinstance_sees_tensors():
            return super().trace(root, concrete_args)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):  # before FX's own checks: these proxies pass for tensors
            return a.node
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing:
            return attr_val
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(out, _MetaProxy) and isinstance(attr_val, torch.Tensor):
            out._meta = to_meta(attr_val)
        return out


_FACTORIES = ("rand", "randn", "randint", "zeros", "ones", "empty", "full", "arange", "bernoulli")


@contextlib.contextmanager
def _factories_take_proxies(tracer: fx.Tracer):
    """``torch.rand(x.size(0), 1, 1, 1)`` and friends record a node when a size is a proxy
    (FX only dispatches on tensor arguments)."""
    saved = {name: getattr(torch, name) for name in _FACTORIES}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def factory(*args: Any, **kwargs: Any) -> Any:
            found: list[bool] = []
            fx.node.map_aggregate((args, kwargs), lambda v: found.append(isinstance(v, fx.Proxy)))
            if any(found):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return factory

    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


_TENSOR_TYPES = (torch.Tensor, torch._C.TensorBase)


@contextlib.contextmanager
def _isinstance_sees_tensors():
    """``isinstance(p, torch.Tensor)`` (and ``torch.is_tensor``, ``torch.jit.isinstance``) is
    True for a proxy carrying a tensor, in Python code only: C code keeps checking the real
    type, so no proxy ever reaches a C function as a tensor."""
    real = builtins.isinstance

    def isinstance_(obj: Any, cls: Any) -> bool:
        if type(obj) is _MetaProxy and real(obj._meta, torch.Tensor):
            classes = cls if real(cls, tuple) else (cls,)
            if any(c in _TENSOR_TYPES for c in classes):
                return True
        return real(obj, cls)

    builtins.isinstance = isinstance_
    try:
        yield
    finally:
        builtins.isinstance = real


def with_batch(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta") if value.dim() else to_meta(value)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(with_batch(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: with_batch(v, batch) for k, v in value.items()}
    return value


def trace_specialised(module: nn.Module, extra_leaves: tuple[nn.Module, ...], bound: dict[str, Any],
                      cache: Optional[dict] = None) -> tuple[dict[str, fx.Graph], dict[str, Any]]:
    """Train/eval graphs of ``module`` specialised to the recorded arguments ``bound``, and the
    guard (``{name: describe_call(value)}``) its rewritten forward must check.

    Raises:
        TypeError: an argument cannot be described, or the trace depends on the batch size.
    """
    guard = {name: describe_call(v) for name, v in bound.items()}
    cache = {} if cache is None else cache
    by_batch = []
    for batch in (1, 2):
        values = {k: with_batch(v, batch) for k, v in bound.items()}
        by_batch.append(_modes(module, lambda: _SpecialisingTracer(extra_leaves, values, cache).trace(module)))
    codes = [{m: g.python_code("self").src for m, g in gs.items()} for gs in by_batch]
    if codes[0] != codes[1]:
        raise TypeError("its traced code depends on the batch size")
    return by_batch[0], guard
