"""Splice and un-splice: give one module instance a new ``forward`` without changing anything else.

The module keeps its identity, attributes, children and ``state_dict``; only its class is
swapped for a subclass of the original (same name, same ``__module__``, so ``isinstance``,
methods and the tracers' leaf rules are unchanged). Two kinds:

* ``graph``: ``forward`` is Python generated from a rewritten FX graph of the module (one
  per train/eval mode when tracing the two modes gave different graphs).
* ``after``: ``forward`` is the original one followed by ``self.dropblock`` (sites that need
  no graph: after a norm module, after a whole block).

The generated source is self-contained (imports included), so instances pickle, deep-copy
and ``torch.save`` through `_rebuild`, which recreates the class from the source.
``unsplice`` restores the original class.
"""

from __future__ import annotations

import inspect
import linecache
import warnings
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import fx, nn

__all__ = ["graph_source", "guarded_call", "splice_graph", "splice_after", "unsplice", "is_spliced", "original_class"]

_CLASSES: dict[tuple[type, str, str], type] = {}
_FUNCTIONS: dict[str, Any] = {}
_counter = [0]


def _fn_name(mode: str) -> str:
    return "_forward_" + mode.replace("ckpt:", "ckpt_")


def _picker(modes: list[str], checkpoint: Optional[str]) -> str:
    """Source of ``_pick(self)``: the function for the module's mode (and checkpoint switch)."""
    def pick(prefix: str, indent: str) -> str:
        if f"{prefix}any" in modes:
            return f"{indent}return {_fn_name(prefix + 'any')}\n"
        return (f"{indent}return {_fn_name(prefix + 'train')} if self.training else "
                f"{_fn_name(prefix + 'eval')}\n")

    body = "def _pick(self):\n"
    if checkpoint and any(m.startswith("ckpt:") for m in modes):
        body += f"    if self.{checkpoint}:\n" + pick("ckpt:", "        ")
    return body + pick("", "    ")


def graph_source(graphs: dict[str, fx.Graph], guard: Optional[dict[str, Any]] = None,
                 respec: Optional[dict[str, Any]] = None, checkpoint: Optional[str] = None) -> str:
    """Self-contained source of a ``forward`` for ``{"train": g, "eval": g}`` (or ``{"any": g}``).

    With a ``guard`` (graphs traced for one recorded call, see ``graph.specialise``) the
    forward checks each call against it; a call that differs is traced again for itself with
    ``respec`` (the planned leaves, sites and skeletons, see ``specialise.respecialise``), or
    runs the original forward when that fails. With ``checkpoint`` (the module's gradient
    checkpointing switch) and graphs ``ckpt:train`` / ``ckpt:eval`` (or ``ckpt:any``), the
    forward runs those while the switch is on.

    Raises:
        ValueError: when a global the code needs cannot be imported by name.
    """
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    parts: list[str] = []
    imports: dict[str, str] = {}
    heads: list[str] = []
    modes = list(graphs)
    for mode, graph in graphs.items():
        code = graph.python_code(root_module="self")
        # A string global is a forward annotation under ``from __future__ import annotations``
        # (``x: "torch.Tensor"``). Older torch (2.11, for one) has no import line for one, so write it here.
        strings = {k: v for k, v in code.globals.items() if isinstance(v, str)}
        block = _format_import_block({k: v for k, v in code.globals.items() if k not in strings}, sys_importer)
        for line in [f"{k} = {v!r}" for k, v in strings.items()] + block.splitlines():
            imports.setdefault(line, line)
        src = code.src.replace("def forward(", f"def {_fn_name(mode)}(", 1)
        parts.append(src)
        heads.append(next(ln for ln in code.src.splitlines() if ln.startswith("def forward(")))
    checkpoint = checkpoint if any(m.startswith("ckpt:") for m in modes) else None
    if guard is not None:
        line = "from dropblock_fx.graph.splice import guarded_call as _guarded_call"
        imports.setdefault(line, line)
        body = "\n".join(parts) + "\n" + _picker(modes, checkpoint) + (
            f"_GUARD = {guard!r}\n_RESPEC = {respec!r}\n"
            f"def forward(self, *args, **kwargs):\n"
            f"    return _guarded_call(self, _GUARD, _pick, args, kwargs, _RESPEC, {checkpoint!r})\n"
        )
    elif modes == ["any"]:
        body = parts[0].replace("def _forward_any(", "def forward(", 1)
    else:
        first = graphs.get("train") or graphs.get("any") or next(iter(graphs.values()))
        names = [str(p.target) for p in first.nodes if p.op == "placeholder"]
        call = ", ".join(["self", *names])
        head = heads[modes.index("train") if "train" in modes else 0]
        if checkpoint is None:
            body = "\n".join(parts) + (
                f"\n{head}\n    if self.training:\n        return _forward_train({call})\n"
                f"    return _forward_eval({call})\n"
            )
        else:
            body = "\n".join(parts) + "\n" + _picker(modes, checkpoint) + f"{head}\n    return _pick(self)({call})\n"
    return "\n".join(imports) + "\n" + body


_PARAMS: dict[type, tuple[list[str], dict[str, Any]]] = {}
_MISSING = object()


def _params(cls: type) -> tuple[list[str], dict[str, Any]]:
    got = _PARAMS.get(cls)
    if got is None:
        sig = inspect.signature(cls.forward)
        ps = [p for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        got = _PARAMS[cls] = ([p.name for p in ps], {p.name: p.default for p in ps if p.default is not p.empty})
    return got


def guarded_call(self: nn.Module, guard: dict[str, Any], pick: Any, args: tuple, kwargs: dict,
                 respec: Optional[dict[str, Any]] = None, checkpoint: Optional[str] = None) -> Any:
    """Run a specialised forward (``pick(self)``) when the call matches what it was traced
    for; else the forward traced for this call (`_variant`; not while the module's
    ``checkpoint`` switch is on); else the original forward, without DropBlock, reported by
    `_skipped`."""
    orig = type(self)._dropblock_original_class  # self is spliced (plain lookup: torch.compile traces it)
    names, defaults = _params(orig)
    values = list(args) + [kwargs.get(n, defaults.get(n, _MISSING)) for n in names[len(args):]]
    fn = pick(self)
    if not any(isinstance(v, fx.Proxy) for v in values):  # an FX retrace keeps the specialised code
        from .specialise import call_matches

        bound = {n: v for n, v in zip(names, values) if v is not _MISSING}
        if not call_matches(guard, bound):
            fns = None if checkpoint and getattr(self, checkpoint) else _variant(self, orig, bound, respec)
            if fns is None:
                _skipped(self, orig, guard, bound)
                return orig.forward(self, *args, **kwargs)
            fn = fns[0] if self.training else fns[1]
    return fn(self, *values)


_MAX_VARIANTS = 32  # calls of other sizes traced per rewritten class (multi-scale training uses a few)


def _variant(self: nn.Module, orig: type, bound: dict[str, Any], respec: Optional[dict[str, Any]]) -> Any:
    """``(train_fn, eval_fn)`` of the forward traced for this call's sizes (once per class and
    call signature), or None."""
    if respec is None or torch.compiler.is_compiling():
        return None
    from .specialise import describe_call, respecialise

    try:
        key = tuple((k, describe_call(v)) for k, v in bound.items())
    except TypeError:
        return None
    variants = type(self).__dict__["_dropblock_variants"]
    if key not in variants:
        if len(variants) >= _MAX_VARIANTS:
            return None
        graphs = respecialise(self, orig, bound, respec)
        variants[key] = None if graphs is None else _functions(graphs)
    return variants[key]


def _functions(graphs: dict[str, fx.Graph]) -> tuple[Any, Any]:
    namespace = compile_namespace(graph_source(graphs))
    if "_forward_train" in namespace:
        return namespace["_forward_train"], namespace["_forward_eval"]
    return namespace["forward"], namespace["forward"]


def _skipped(self: nn.Module, orig: type, guard: dict[str, Any], bound: dict[str, Any]) -> None:
    """A call that runs the original forward: each of ``self``'s DropBlock modules notes the
    input size it missed (``describe`` lists them), and the model's watch warns once, with
    how many did not run; without a watch, a warning once per class."""
    from ..modules import DropBlockNd

    first = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
    seen = tuple(int(s) for s in first.shape[2:]) if first is not None else ()
    mine = [c for c in self._modules.values() if isinstance(c, DropBlockNd)]
    watch = None
    for c in mine:
        c.__dict__.setdefault("skipped_at", set()).add(seen)
        watch = watch or (c.placement.watch if c.placement is not None else None)
    if not self.training or not mine:
        return
    if watch is not None and hasattr(watch, "skipped"):
        watch.skipped(mine, seen)
        return
    warnings.warn(  # the same text for every instance of a class: Python shows it once
        f"dropblock_fx: {orig.__name__} was rewritten for calls like the planned one ({guard_text(guard)}); "
        f"this call differs and could not be traced for itself, so it runs its original forward, without its "
        f"{len(mine)} DropBlock module(s). describe(model) lists the modules that did not run.",
        UserWarning, stacklevel=4)


def guard_text(guard: dict[str, Any]) -> str:
    def one(d: Any) -> str:
        kind, v = d[:2]
        if kind == "tensor":
            extra = f" {d[2].replace('torch.', '')} {d[3]}" if len(d) == 4 else ""
            return "x".join("*" if s is None else str(s) for s in ("N", *v)) + extra + " tensor"
        if kind == "value":
            return repr(v)
        if kind == "dict":
            return "{" + ", ".join(f"{k!r}: {one(x)}" for k, x in v) + "}"
        inner = ", ".join(one(x) for x in v)
        return f"[{inner}]" if kind == "list" else f"({inner})"

    return ", ".join(f"{k}={one(d)}" for k, d in guard.items())


def compile_namespace(source: str) -> dict[str, Any]:
    """The globals of ``source`` run once (cached by source; shown in tracebacks)."""
    namespace = _FUNCTIONS.get(source)
    if namespace is None:
        _counter[0] += 1
        filename = f"<dropblock_fx spliced forward {_counter[0]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace = {}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
        _FUNCTIONS[source] = namespace
    return namespace


def compile_source(source: str) -> Any:
    """The ``forward`` defined by ``source``."""
    return compile_namespace(source)["forward"]


def _after_forward(orig: type):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], fx.Proxy):
            # A tracer that does not treat this module as a leaf: record it as one call,
            # so the trace still runs the DropBlock (and obeys train()/eval()).
            tracer = args[0].tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
        return self.dropblock(orig.forward(self, *args, **kwargs))

    return forward


def _hidden(name: str) -> bool:
    return name.startswith("dropblock")


def _container_methods(orig: type) -> dict[str, Any]:
    """Sequential / ModuleDict views that do not show the added DropBlock children."""
    ns: dict[str, Any] = {}
    if issubclass(orig, nn.Sequential):
        def _plain(self):
            return [(k, v) for k, v in self._modules.items() if not _hidden(k)]

        def __len__(self):
            return len(_plain(self))

        def __iter__(self):
            return iter([v for _, v in _plain(self)])

        def __getitem__(self, idx):
            items = _plain(self)
            if isinstance(idx, slice):
                return orig(OrderedDict(items[idx]))
            return items[idx][1]

        ns.update(__len__=__len__, __iter__=__iter__, __getitem__=__getitem__)
    elif issubclass(orig, nn.ModuleDict):
        def keys(self):
            return [k for k in self._modules if not _hidden(k)]

        def items(self):
            return [(k, v) for k, v in self._modules.items() if not _hidden(k)]

        def values(self):
            return [v for k, v in self._modules.items() if not _hidden(k)]

        def __iter__(self):
            return iter(keys(self))

        def __len__(self):
            return len(keys(self))

        ns.update(keys=keys, items=items, values=values, __iter__=__iter__, __len__=__len__)
    return ns


def _spliced_class(orig: type, kind: str, source: str) -> type:
    key = (orig, kind, source)
    cls = _CLASSES.get(key)
    if cls is None:
        forward = compile_source(source) if kind == "graph" else _after_forward(orig)
        ns: dict[str, Any] = {
            "forward": forward,
            "__module__": orig.__module__,
            "__qualname__": orig.__qualname__,
            "__reduce_ex__": _reduce_ex,
            "_dropblock_original_class": orig,
            "_dropblock_kind": kind,
            "_dropblock_source": source,
            "_dropblock_variants": {},  # call signature -> (train_fn, eval_fn) traced for it, or None
        }
        ns.update(_container_methods(orig))
        cls = type(orig.__name__, (orig,), ns)
        _CLASSES[key] = cls
    return cls


def _reduce_ex(self, protocol: int):
    cls = type(self)
    state = self.__dict__.copy()
    return (_rebuild, (cls._dropblock_original_class, cls._dropblock_kind, cls._dropblock_source), state)


def _rebuild(orig: type, kind: str, source: str) -> nn.Module:
    cls = _spliced_class(orig, kind, source)
    return cls.__new__(cls)


def is_spliced(m: nn.Module) -> bool:
    return "_dropblock_original_class" in type(m).__dict__


def original_class(m: nn.Module) -> type:
    return type(m).__dict__.get("_dropblock_original_class", type(m))


def splice_graph(m: nn.Module, source: str) -> None:
    """Give ``m`` the ``forward`` in ``source`` (see `graph_source`)."""
    m.__class__ = _spliced_class(original_class(m), "graph", source)


def splice_after(m: nn.Module, dropblock: nn.Module) -> None:
    """Run ``dropblock`` (registered as ``m.dropblock``) on ``m``'s output."""
    m.add_module("dropblock", dropblock)
    m.__class__ = _spliced_class(original_class(m), "after", "")


def unsplice(m: nn.Module) -> Optional[type]:
    """Restore ``m``'s original class; returns it (None if ``m`` was not spliced)."""
    if not is_spliced(m):
        return None
    orig = original_class(m)
    m.__class__ = orig
    return orig
