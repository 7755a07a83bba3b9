"""Is a traced (or rewritten) graph of a unit faithful to the unit's recorded call?

Two checks, both on meta tensors, so they cost no real compute:

* every argument that carried a tensor in the recorded call is used by the graph (a trace
  that took the wrong branch of ``isinstance(skip, torch.Tensor)`` drops ``skip``);
* the graph, run through the unit's real leaf modules (with meta parameters) in train and
  in eval mode, returns what the recorded call returned: same structure, shapes, dtypes.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..modes import training_mode
from .meta import interpret, run_meta, to_meta, with_batch

__all__ = ["output_signature", "unused_tensor_args", "check_graphs"]


_PLAIN = {list: "list", tuple: "tuple", dict: "dict", fx.immutable_collections.immutable_list: "list",
          fx.immutable_collections.immutable_dict: "dict"}


def output_signature(value: Any, batch: bool = True) -> Any:
    """Structure, shapes and dtypes of ``value`` (what a faithful graph must reproduce);
    ``batch=False`` leaves out each tensor's first dim (its rank still counts)."""
    if isinstance(value, torch.Tensor):
        shape = tuple(int(s) for s in value.shape)
        return ("tensor", shape if batch or not shape else ("N", *shape[1:]), str(value.dtype))
    if isinstance(value, (list, tuple, dict)):
        # the exact container type: a graph returns a plain dict where the module returned a
        # ModelOutput (transformers), and callers index it by position. FX's own immutable
        # containers stand for the plain ones.
        kind = _PLAIN.get(type(value), type(value).__qualname__)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return (kind, tuple((k, output_signature(v, batch)) for k, v in items))
    return (type(value).__name__,)


def _placeholder_value(node: fx.Node, bound: dict[str, Any]) -> Any:
    name = str(node.target).lstrip("*")
    if name not in bound:  # FX names a specialised argument `skip_1`
        name = re.sub(r"_\d+$", "", name)
    if name in bound:
        return to_meta(bound[name])
    if node.args:
        return node.args[0]
    raise KeyError(f"no value for argument {node.target!r}")


def unused_tensor_args(graph: fx.Graph, bound: dict[str, Any]) -> list[str]:
    """Arguments that carried a tensor in the recorded call but that ``graph`` never reads."""
    used = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.users:
            name = str(node.target).lstrip("*")
            used.update({name, re.sub(r"_\d+$", "", name)})
    out = []
    for name, value in bound.items():
        leaves, _ = tree_flatten(value)
        if any(isinstance(v, torch.Tensor) for v in leaves) and name not in used:
            out.append(name)
    return out


_SHAPE_PRESERVING = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                     nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm,)


def _leaf(m: nn.Module, args: tuple, kwargs: dict, cache: dict) -> Any:
    """A leaf's meta output. Modules whose output is their input's shape by definition skip
    torch's slow meta kernels (a BatchNorm costs ~1 ms on meta), after checking what the
    real module would check (channel count, rank)."""
    x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
    if x is not None and type(m) in _SHAPE_PRESERVING:
        return torch.empty_like(x)
    if x is not None and isinstance(m, _CHANNEL_NORMS) and type(m).forward in _NORM_FORWARDS:
        if x.dim() < 2 or x.shape[1] != m.num_features:
            raise ValueError(f"{type(m).__name__}({m.num_features}) got a {tuple(x.shape)} input")
        return torch.empty_like(x)
    return run_meta(m, args, kwargs, cache)


_NORM_FORWARDS = {cls.forward for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)}


def _run(graph: fx.Graph, unit: nn.Module, bound: dict[str, Any], extra: frozenset[str], cache: dict) -> Any:
    def leaf(node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if str(node.target) in extra:  # a DropBlock module: the input's shape (the op's own tests hold it)
            return torch.empty_like(args[0])
        return _leaf(unit.get_submodule(str(node.target)), args, kwargs, cache)

    return interpret(graph, unit, lambda node: _placeholder_value(node, bound), leaf, cache=cache)[0]


def check_graphs(graphs: dict[str, fx.Graph], unit: nn.Module, bound: dict[str, Any], expected: Any,
                 extra: Iterable[str] = (), cache: Optional[dict] = None) -> Optional[str]:
    """Why ``graphs`` (``{"train"|"eval"|"any": graph}``) are not faithful to the recorded call
    (``bound`` arguments, ``expected`` output), or None when they are.

    ``extra`` names the modules the graphs call that ``unit`` does not have yet (the
    DropBlock modules of a rewritten graph: shape-preserving).
    """
    names = frozenset(extra)
    cache = {} if cache is None else cache
    # at batch 2: a batch norm in train mode needs more than one value per channel (an ASPP
    # pooling branch is 1x1); the recorded call was at batch 1
    want = output_signature(expected, batch=False)
    bound = {k: with_batch(v, 2) for k, v in bound.items()}
    with training_mode(unit):
        for mode, graph in graphs.items():
            unused = unused_tensor_args(graph, bound)
            if unused:
                return f"the traced forward never uses its tensor argument(s) {', '.join(map(repr, unused))}"
            for training in ((True, False) if mode == "any" else (mode == "train",)):
                unit.train(training)
                try:
                    with torch.no_grad():
                        got = _run(graph, unit, bound, names, cache)
                except Exception as e:  # noqa: BLE001
                    return (f"the traced forward does not run in {'train' if training else 'eval'} mode "
                            f"({type(e).__name__}: {str(e)[:160]})")
                if output_signature(got, batch=False) != want:
                    return (f"the traced forward returns {_short(output_signature(got, batch=False))} in "
                            f"{'train' if training else 'eval'} mode, the module {_short(want)}")
    return None


def _short(sig: Any) -> str:
    text = repr(sig)
    return text if len(text) <= 120 else text[:117] + "..."
