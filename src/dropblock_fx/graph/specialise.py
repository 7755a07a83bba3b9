"""Specialised tracing: a unit traced for its recorded call, and traced again for a new one.

A plain trace (``tracing.trace_modes``) feeds every argument as a ``Proxy``. Some forwards ask
Python questions FX cannot answer faithfully: ``isinstance(skip, torch.Tensor)`` is False
for a Proxy, ``int(x.shape[-1])`` or ``len(x.shape)`` raise, a float argument in an ``if``
raises. `trace_specialised` traces such a unit for its recorded call instead: tensors
are proxies that carry a meta value (so ``isinstance``, ``.shape``, ``.size()``, ``.dim()``
answer as in real execution), and non-tensor arguments are the recorded values.

**Sizes.** The batch dim is always symbolic (a ``size(0)`` node): a trace whose code depends
on the batch size is refused. The spatial dims of feature maps are symbolic too when the
forward never reads them in Python (``symbolic=True``); its guard then keys only on what the
forward reads: channels, ranks and the non-tensor arguments. When it does read them
(``int(x.shape[-1])``, TF-style padding), they are concrete and the guard keys on the whole
shape.

**Guards.** The rewritten forward checks each call against the guard (`call_matches`).
A call that differs is traced again for itself (`respecialise`, on meta tensors, once
per call signature): when the new trace is the planned one up to constants (same nodes, same
data flow) it gets the same DropBlock sites, is verified, and runs; otherwise the call runs
the original forward, without DropBlock, and is reported (``splice.guarded_call``).

**Patching, scoped.** ``isinstance(p, torch.Tensor)`` must answer True for a proxy carrying a
tensor, and ``torch.rand(x.size(0), 1)`` must record a node when a size is a proxy. Neither can
be taught to a proxy (a proxy with a lying ``__class__`` crashes C code), so while a
specialised trace runs, ``builtins.isinstance`` and nine torch factory functions are
replaced, under a lock, by wrappers that answer differently only in the tracing thread and
only for this tracer's proxies; every other call, in any thread, goes to the real function.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import threading
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .leaves import checkpoint_functions
from .meta import attr_at, run_checkpointed, run_meta, to_meta, with_batch
from .tracing import InplaceProxy, LeafTracer, trace_lock, trace_modes

__all__ = ["describe_call", "loosen", "call_matches", "trace_specialised", "respecialise", "skeleton"]


def describe_call(value: Any, detail: bool = False) -> Any:
    """A literal (``repr`` round-trips) that specialised code depends on, for one argument:
    tensors by their shape without the batch dim (with ``detail``, their dtype and device
    type too: for code that asked ``x.dtype`` or ``x.device``); lists, tuples, dicts by their
    items; ``None``, bools, numbers and strings by value.

    Raises:
        TypeError: a value that cannot be described (a module, an arbitrary object).

    Examples:
        >>> describe_call([torch.zeros(2, 3, 8, 8), 0.5, None])
        ('list', (('tensor', (3, 8, 8)), ('value', 0.5), ('value', None)))
    """
    if isinstance(value, torch.Tensor):
        dims = tuple(int(s) for s in value.shape[1:])
        if not detail:
            return ("tensor", dims)
        # a meta tensor (planning's own passes) stands for the module's real device
        return ("tensor", dims, str(value.dtype), _ANY_DEVICE if value.is_meta else value.device.type)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return (type(value).__name__, tuple(describe_call(v, detail) for v in value))
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return ("dict", tuple((k, describe_call(v, detail)) for k, v in value.items()))
    if value is None or type(value) in (bool, int, float, str):
        return ("value", value)
    raise TypeError(f"cannot specialise on a {type(value).__name__} argument")


def loosen(desc: Any) -> Any:
    """``desc`` (see `describe_call`) with the spatial dims of feature maps left open
    (``None``): the guard of a trace whose code does not depend on them.

    Examples:
        >>> loosen(('list', (('tensor', (3, 8, 8)), ('tensor', (5,)))))
        ('list', (('tensor', (3, None, None)), ('tensor', (5,))))
    """
    kind, v = desc[:2]
    if kind == "tensor":
        return ("tensor", (v[0], *(None for _ in v[1:])), *desc[2:]) if len(v) in (3, 4) else desc
    if kind in ("list", "tuple"):
        return (kind, tuple(loosen(x) for x in v))
    if kind == "dict":
        return (kind, tuple((k, loosen(x)) for k, x in v))
    return desc


def _open(guard: dict[str, Any]) -> bool:
    """Does a guard leave a size open (a trace with symbolic spatial sizes)?"""
    def one(desc: Any) -> bool:
        kind, v = desc[:2]
        if kind == "tensor":
            return None in v
        if kind in ("list", "tuple"):
            return any(one(x) for x in v)
        return kind == "dict" and any(one(x) for _, x in v)

    return any(one(d) for d in guard.values())


_ANY_DEVICE = "<meta>"


def _matches(want: Any, got: Any) -> bool:
    if want is None or got == _ANY_DEVICE:
        return True
    if isinstance(want, tuple) and isinstance(got, tuple):
        return len(want) == len(got) and all(_matches(w, g) for w, g in zip(want, got))
    return type(want) is type(got) and want == got


def call_matches(guard: dict[str, Any], values: dict[str, Any]) -> bool:
    """Does a call with arguments ``values`` match ``guard`` (``None``: any size there)?

    Examples:
        >>> g = {"x": ("tensor", (3, None, None))}
        >>> call_matches(g, {"x": torch.zeros(2, 3, 7, 9)}), call_matches(g, {"x": torch.zeros(2, 4, 7, 9)})
        (True, False)
    """
    detail = _detailed(guard)
    try:
        return all(_matches(want, describe_call(values[k], detail)) for k, want in guard.items())
    except (TypeError, KeyError):
        return False


def _detailed(guard: dict[str, Any]) -> bool:
    """Does the guard describe tensors with their dtype and device?"""
    def one(desc: Any) -> bool:
        kind, v = desc[:2]
        if kind == "tensor":
            return len(desc) == 4
        if kind in ("list", "tuple"):
            return any(one(x) for x in v)
        return kind == "dict" and any(one(x) for _, x in v)

    return any(one(d) for d in guard.values())


# ---------------------------------------------------------------------------- the tracer


class _MetaProxy(InplaceProxy):
    """A Proxy that answers shape questions like the meta value it carries (and, while a
    specialised trace runs, ``isinstance(p, torch.Tensor)``: see `_patched`).

    The first dim is symbolic (a ``size(0)`` node); with a symbolic tracer, so are the spatial
    dims of feature maps (4-D and 5-D tensors); the others are concrete, and so are all the
    sizes of the module's own parameters and buffers.
    """

    _meta: Any = None
    _fixed = False  # a parameter or buffer of the module: its sizes are constants

    def _symbolic(self, i: int) -> bool:
        if self._fixed:
            return False
        n = self._meta.dim()
        return i == 0 or (self.tracer.symbolic and n in (4, 5) and i >= 2)  # type: ignore[attr-defined]

    def _sizes(self) -> tuple:
        shape = tuple(self._meta.shape)
        return tuple(self.tracer.create_proxy("call_method", "size", (self, i), {}) if self._symbolic(i) else d
                     for i, d in enumerate(shape))

    @property
    def shape(self):  # type: ignore[override]
        return self._sizes() if isinstance(self._meta, torch.Tensor) else self.__getattr__("shape")

    @property
    def ndim(self):
        return self._meta.dim() if isinstance(self._meta, torch.Tensor) else self.__getattr__("ndim")

    @property
    def dtype(self):  # noqa: D102 - answered only by a tracer that guards on it (``answers``)
        if isinstance(self._meta, torch.Tensor) and self.tracer.answers:  # type: ignore[attr-defined]
            return self._meta.dtype
        return self.__getattr__("dtype")

    @property
    def device(self):  # noqa: D102 - the module's own device: meta values have none
        if isinstance(self._meta, torch.Tensor) and self.tracer.answers:  # type: ignore[attr-defined]
            return self.tracer.device  # type: ignore[attr-defined]
        return self.__getattr__("device")

    def size(self, dim: Optional[int] = None):  # noqa: D102
        if isinstance(self._meta, torch.Tensor):
            if dim is None:
                return self._sizes()
            if not self._symbolic(dim % max(self._meta.dim(), 1)):
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
    def __init__(self, extra_leaves: tuple[nn.Module, ...], values: dict[str, Any], cache: dict,
                 symbolic: bool = False, autowrap: tuple[Any, ...] = (), answers: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(extra_leaves, autowrap)
        self._values = values
        self._cache = cache
        self.symbolic = symbolic
        self.answers = answers  # answer x.dtype and x.device (the guard then keys on them)
        self.device = device or torch.device("cpu")
        self._computing = False  # running a leaf on meta values: no nodes, no proxies

    @contextlib.contextmanager
    def _untraced(self) -> Iterator[None]:
        """Run meta values without recording: module calls run as they are, and attribute reads
        bypass the trace's patched ``__getattr__``."""
        self._computing = True
        try:
            yield
        finally:
            self._computing = False

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
                if kind == "call_function" and target in checkpoint_functions():
                    p._meta = run_checkpointed(target, a, k, self._cache)
                elif kind == "call_function":
                    p._meta = target(*a, **k)
                elif kind == "call_method":
                    p._meta = getattr(a[0], target)(*a[1:], **k)
                elif kind == "call_module":
                    with self._untraced():
                        p._meta = run_meta(self.root.get_submodule(target), a, k, self._cache)
                elif kind == "get_attr":
                    # Read past the trace's patched ``__getattr__``: through it, reading a
                    # parameter records another get_attr node, whose meta reads it again.
                    with self._untraced():
                        obj = attr_at(self.root, str(target))
                    p._meta = to_meta(obj) if isinstance(obj, torch.Tensor) else unknown
                    p._fixed = True
        except Exception:  # noqa: BLE001 - no value: shape questions on it stay symbolic
            p._meta = None
        if p._meta is unknown:
            p._meta = None
        return p

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with _patched(self):
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


# ---------------------------------------------------------------------------- the scoped patch

_FACTORIES = ("rand", "randn", "randint", "zeros", "ones", "empty", "full", "arange", "bernoulli")
_TENSOR_TYPES = (torch.Tensor, torch._C.TensorBase)
_LOCK = trace_lock  # the tracing lock: one order of locks whichever thread traces
_LOCAL = threading.local()  # .tracer: the specialising tracer of this thread's trace
_installed = [0]  # how many traces (of this thread, nested) hold the patch


def _tracer() -> Optional[_SpecialisingTracer]:
    return getattr(_LOCAL, "tracer", None)


def _isinstance_for(real: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def isinstance_(obj: Any, cls: Any) -> bool:
        # True for a proxy carrying a tensor, in Python code only: C code keeps checking the
        # real type, so no proxy ever reaches a C function as a tensor
        if type(obj) is _MetaProxy and obj.tracer is _tracer() and real(obj._meta, torch.Tensor):
            classes = cls if real(cls, tuple) else (cls,)
            if any(c in _TENSOR_TYPES for c in classes):
                return True
        return real(obj, cls)

    return isinstance_


def _factory_for(fn: Callable[..., Any]) -> Callable[..., Any]:
    def factory(*args: Any, **kwargs: Any) -> Any:
        tracer = _tracer()
        if tracer is not None:
            found: list[bool] = []
            fx.node.map_aggregate((args, kwargs), lambda v: found.append(isinstance(v, fx.Proxy)))
            if any(found):  # FX only dispatches on tensor arguments, not on a proxy size
                return tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return factory


@contextlib.contextmanager
def _patched(tracer: _SpecialisingTracer) -> Iterator[None]:
    """Install the wrappers (see the module docstring) for ``tracer``'s trace in this thread."""
    with _LOCK:  # one thread at a time installs, uses and removes them
        previous = _tracer()
        saved = None
        if not _installed[0]:
            saved = (builtins.isinstance, {name: getattr(torch, name) for name in _FACTORIES})
            builtins.isinstance = _isinstance_for(saved[0])
            for name, fn in saved[1].items():
                setattr(torch, name, _factory_for(fn))
        _installed[0] += 1
        _LOCAL.tracer = tracer
        try:
            yield
        finally:
            _LOCAL.tracer = previous
            _installed[0] -= 1
            if saved is not None:
                builtins.isinstance = saved[0]
                for name, fn in saved[1].items():
                    setattr(torch, name, fn)


# ---------------------------------------------------------------------------- tracing


def trace_specialised(module: nn.Module, extra_leaves: tuple[nn.Module, ...], bound: dict[str, Any],
                      cache: Optional[dict] = None, symbolic: bool = False, autowrap: tuple[Any, ...] = (),
                      answers: bool = False, device: Optional[torch.device] = None,
                      ) -> tuple[dict[str, fx.Graph], dict[str, Any]]:
    """Train/eval graphs of ``module`` specialised to the recorded arguments ``bound``, and the
    guard (``{name: describe_call(value)}``, spatial dims left open when ``symbolic``) its
    rewritten forward checks. With ``answers``, ``x.dtype`` and ``x.device`` are answered
    (``device``: the module's; default its parameters') and the guard keys on them too.

    Raises:
        TypeError: an argument cannot be described, or the trace depends on the batch size.
        Anything the forward raises on proxies (with ``symbolic``: a Python question about a
        spatial size).
    """
    if device is None:
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        device = torch.device("cpu") if device.type == "meta" else device
    guard = {name: describe_call(v, answers) for name, v in bound.items()}
    if answers:  # the recorded values are meta tensors: the call ran on the module's device
        guard = {k: _on_device(v, device.type) for k, v in guard.items()}
    if symbolic:
        guard = {k: loosen(v) for k, v in guard.items()}
    cache = {} if cache is None else cache
    by_batch = []
    for batch in (1, 2):
        values = {k: with_batch(v, batch) for k, v in bound.items()}
        tracer = lambda: _SpecialisingTracer(extra_leaves, values, cache, symbolic, autowrap,  # noqa: E731
                                             answers, device).trace(module)
        by_batch.append(trace_modes(module, extra_leaves, trace=tracer))
    codes = [{m: g.python_code("self").src for m, g in gs.items()} for gs in by_batch]
    if codes[0] != codes[1]:
        raise TypeError("its traced code depends on the batch size")
    return by_batch[0], guard


def _on_device(desc: Any, device: str) -> Any:
    kind, v = desc[:2]
    if kind == "tensor":
        return (*desc[:3], device)
    if kind in ("list", "tuple"):
        return (kind, tuple(_on_device(x, device) for x in v))
    if kind == "dict":
        return (kind, tuple((k, _on_device(x, device)) for k, x in v))
    return desc


def _node_key(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return ("node", v.name)
    if isinstance(v, (list, tuple)):
        return tuple(_node_key(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _node_key(x)) for k, x in v.items())
    return "#"  # a constant: a size, a padding, a scale


def _target_key(node: fx.Node) -> str:
    t = node.target
    if callable(t) and not isinstance(t, str):
        return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"
    return str(t)


def skeleton(graph: fx.Graph) -> tuple:
    """``graph`` up to its constants: each node's name, kind, target and data flow. Two traces
    of one forward for calls of different sizes with equal skeletons took the same path.

    Examples:
        >>> g = fx.symbolic_trace(nn.Sequential(nn.ReLU())).graph
        >>> [s[1:3] for s in skeleton(g)]
        [('placeholder', 'input'), ('call_module', '0'), ('output', 'output')]
    """
    return tuple((n.name, n.op, _target_key(n), _node_key(n.args), _node_key(n.kwargs)) for n in graph.nodes)


@contextlib.contextmanager
def _as_original(module: nn.Module, original: type) -> Iterator[None]:
    spliced = type(module)
    module.__class__ = original
    try:
        yield
    finally:
        module.__class__ = spliced


def respecialise(module: nn.Module, original: type, values: dict[str, Any], info: dict[str, Any],
                 ) -> Optional[dict[str, fx.Graph]]:
    """The graphs of ``module``'s original forward traced for a new call (``values``), with
    the planned DropBlock sites (``info``: the leaves the plan traced with, the sites and
    the planned graphs' skeletons, per mode), verified on meta tensors; None when the new
    trace is not the planned one up to constants or fails verification."""
    from .preserve import preserved
    from .sites import Site, insert_sites
    from .verify import check_graphs

    bound = {k: to_meta(v) for k, v in values.items()}
    cache: dict = {}
    try:
        leaves = tuple(module.get_submodule(p) for p in info["leaves"])
        with _as_original(module, original), preserved(module):
            graphs, _ = trace_specialised(module, leaves, bound, cache, symbolic=info.get("symbolic", False),
                                          answers=info.get("answers", False))
            expected = run_meta(module, (), bound, cache)
    except Exception:  # noqa: BLE001 - any failure: the call runs the original forward
        return None
    if set(graphs) != set(info["skeleton"]) or any(skeleton(g) != info["skeleton"][m] for m, g in graphs.items()):
        return None
    names: set[str] = set()
    for mode, g in graphs.items():
        sites = [Site("", name, "", (0,) * nd, after, tuple(edge) if edge else None, last)  # type: ignore[arg-type]
                 for name, after, edge, last, nd in info["sites"][mode]]
        names.update(s.name for s in sites)
        insert_sites(g, sites)
    if check_graphs(graphs, module, bound, expected, extra=names, cache=cache) is not None:
        return None
    return graphs


def respec_info(module: nn.Module, graphs: dict[str, fx.Graph], leaves: tuple[nn.Module, ...],
                sites: dict[str, list[Any]], guard: dict[str, Any]) -> dict[str, Any]:
    """What `respecialise` needs, as a literal for the generated source: the paths of the
    leaves the unit was traced with, whether its sizes were symbolic (its ``guard`` leaves
    some open), each mode's planned skeleton and its sites (name, position, layout) in
    ``sites`` (``graph.sites.Site`` lists by mode)."""
    paths = {id(m): n for n, m in module.named_modules()}
    return {
        "leaves": tuple(paths[id(m)] for m in leaves if id(m) in paths),
        "symbolic": _open(guard),
        "answers": _detailed(guard),
        "skeleton": {mode: skeleton(g) for mode, g in graphs.items()},
        "sites": {mode: tuple((s.name, s.after, s.edge, s.channels_last, len(s.shape)) for s in sites[mode])
                  for mode in graphs},
    }
