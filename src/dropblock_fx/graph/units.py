"""Units: the modules that get rewritten, found top-down from the target.

* ``block``: a module whose forward is more than a chain of its children (a residual
  block, a dense block); traced whole (everything but leaf layers inlined). A module with a
  gradient-checkpointing switch (a timm stage) is descended instead, so that its
  checkpointed forward calls its blocks' rewritten forwards.
* ``container``: a module whose forward calls its children in a chain (``nn.Sequential``,
  timm's ``RegStage`` / ``ConvNeXtStage``, ``ConvNormAct``); its child blocks are units of
  their own, and its loose layers (``conv -> norm -> act`` directly inside it) are traced
  with the child units as leaves.
* ``root``: the target itself, a unit like any other: its loose layers (a flat model whose
  own ``forward`` calls its convs, NFNet's head) are traced with its child units as leaves.
  The whole model with norm layers of its own (a timm EfficientNet's ``bn2``) is not: a
  DropBlock after those norms runs from any of its methods. When the trace fails, its
  layers only get sites that need no graph (after norm modules), and the plan says so.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import fx, nn

from .leaves import checkpoint_flag, checkpoint_functions, is_container, is_conv, is_norm, is_walkable
from .preserve import preserved
from .specialise import trace_specialised
from .tracing import LeafTracer, trace_modes
from .verify import check_graphs
from .shapes import Call, ShapeRecord

__all__ = ["Unit", "find_units"]


@dataclass
class Unit:
    path: str
    module: nn.Module
    kind: str  # "block" | "container" | "opaque"
    call: Optional[Call]
    graphs: Optional[dict[str, fx.Graph]] = None
    extra_leaves: tuple[nn.Module, ...] = ()
    error: Optional[str] = None
    loose_norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    was_block: bool = False  # an opaque unit that is a block (its output can take a site)
    guard: Optional[dict[str, Any]] = None  # specialised trace: what every call must match
    note: Optional[str] = None  # how it was traced, when not plainly


def _is_chain(m: nn.Module, children: tuple[nn.Module, ...]) -> bool:
    """Does ``m.forward`` only call its children one after the other? (Asked with gradient
    checkpointing off, as the unit is traced: see ``_trace``.)"""
    flag = checkpoint_flag(m)
    with preserved(m), (_switched(m, flag, False) if flag else contextlib.nullcontext()):
        graph = LeafTracer(children).trace(m)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = [i for i in n.all_input_nodes if i.op != "get_attr"]
        users = [u for u in n.users if u.op != "output"]
        if len(inputs) > 1 or len(users) > 1:
            return False
    return True


def concrete_none_args(m: nn.Module, call: Optional[Call]) -> Optional[dict[str, Any]]:
    """Arguments the recorded call passed as None (traced as constants, guarded by FX)."""
    if call is None:
        return None
    try:
        sig = inspect.signature(type(m).forward)
        bound = sig.bind(m, *call.args, **call.kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return None
    out = {k: None for k, v in list(bound.arguments.items())[1:] if v is None
           and sig.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    return out or None


def bound_args(m: nn.Module, call: Call) -> dict[str, Any]:
    try:
        sig = inspect.signature(type(m).forward)
        bound = sig.bind(m, *call.args, **call.kwargs)
        bound.apply_defaults()
        return dict(list(bound.arguments.items())[1:])
    except (TypeError, ValueError):
        return {}


def tensor_container_arg(m: nn.Module, call: Optional[Call]) -> Optional[str]:
    """Why ``m`` cannot be traced faithfully from its recorded call, or None.

    FX feeds every argument as one Proxy. A forward that received a list / tuple / dict of
    tensors (timm's SelecSLS blocks take ``[x, skip]``) and branches on it
    (``if not isinstance(x, list): x = [x]``) would be traced down the wrong branch, and the
    rewritten forward would hand the list to a conv.
    """
    if call is None:
        return None
    try:
        sig = inspect.signature(type(m).forward)
    except (TypeError, ValueError):
        return None
    import torch
    from torch.utils._pytree import tree_leaves

    for name, value in bound_args(m, call).items():
        param = sig.parameters.get(name)
        if param is None or param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if isinstance(value, (list, tuple, dict)) and any(isinstance(v, torch.Tensor) for v in tree_leaves(value)):
            return (f"its forward was called with a {type(value).__name__} of tensors as `{name}`, "
                    f"which FX traces as one value")
    return None


class TraceFailure(Exception):
    """No faithful graph of a unit (every way of tracing it failed verification)."""


def _trace(m: nn.Module, leaves: tuple[nn.Module, ...], call: Call,
           cache: dict) -> tuple[dict[str, fx.Graph], Optional[dict[str, Any]]]:
    """``m``'s verified train/eval graphs for its recorded ``call``, and the guard of a
    specialised trace (None for a plain one).

    A module with a gradient-checkpointing switch (timm's ``grad_checkpointing``) is traced
    with it off, and again with it on, keeping the checkpoint functions as single calls: the
    second graphs (modes ``ckpt:train``, ``ckpt:eval`` or ``ckpt:any``) are what its rewritten
    forward runs while the switch is on. Without them (the trace fails, or needs another
    guard) the unit's ``note`` says it loses checkpointing.
    """
    flag = checkpoint_flag(m)
    if flag is None:
        return _trace_one(m, leaves, call, cache)
    with _switched(m, flag, False):
        graphs, guard = _trace_one(m, leaves, call, cache)
    try:
        with _switched(m, flag, True):
            ckpt, ckpt_guard = _trace_one(m, leaves, call, cache, checkpoint_functions())
        if ckpt_guard not in (None, guard):
            raise TraceFailure("it needs another guard")
        graphs.update({f"ckpt:{k}": g for k, g in ckpt.items()})
    except TraceFailure:
        pass
    return graphs, guard


@contextlib.contextmanager
def _switched(m: nn.Module, flag: str, value: bool) -> Iterator[None]:
    old = m.__dict__[flag]
    m.__dict__[flag] = value
    try:
        yield
    finally:
        m.__dict__[flag] = old


def _trace_one(m: nn.Module, leaves: tuple[nn.Module, ...], call: Call, cache: dict,
               autowrap: tuple[Any, ...] = ()) -> tuple[dict[str, fx.Graph], Optional[dict[str, Any]]]:
    """A plain trace is tried first; when it fails or is not faithful (see ``verify``), a trace
    specialised to the recorded arguments and shapes. Raises `TraceFailure` with
    every reason when neither is faithful.
    """
    bound = bound_args(m, call)
    reasons: list[str] = []
    why = tensor_container_arg(m, call)
    if why:
        reasons.append(why)
    else:
        try:
            nones = concrete_none_args(m, call)
            graphs = trace_modes(m, leaves, nones, autowrap=autowrap)
            guard = _none_guard(graphs, nones, _has_var_args(m)) if nones else None
            problem = check_graphs(graphs, m, bound, call.output, cache=cache)
            if problem is None:
                return graphs, guard
            reasons.append(problem)
        except Exception as e:  # noqa: BLE001
            reasons.append(f"{type(e).__name__}: {_first_line(e)}")
    # spatial sizes left open first, then concrete; x.dtype / x.device answered (and guarded)
    # only when nothing else traces (see graph.specialise)
    for answers, symbolic in ((False, True), (False, False), (True, True), (True, False)):
        try:
            graphs, guard = trace_specialised(m, leaves, bound, cache, symbolic=symbolic, autowrap=autowrap,
                                              answers=answers)
            problem = check_graphs(graphs, m, bound, call.output, cache=cache)
            if problem is None:
                return graphs, guard
            why = f"specialised: {problem}"
        except Exception as e:  # noqa: BLE001
            why = f"specialised: {type(e).__name__}: {_first_line(e)}"
        if not symbolic and not answers:  # the other tries' failures say nothing more
            reasons.append(why)
    raise TraceFailure("; ".join(dict.fromkeys(reasons)))


def _has_var_args(m: nn.Module) -> bool:
    ps = inspect.signature(type(m).forward).parameters.values()
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps)


def _none_guard(graphs: dict[str, fx.Graph], nones: dict[str, Any], var_args: bool) -> Optional[dict[str, Any]]:
    """A plain trace with the arguments passed as None baked in: give their placeholders back
    their names (FX calls them ``mask_1``, which breaks keyword calls) and drop FX's
    ``_assert_is_none`` (it would raise on another call); the rewritten forward's guard runs
    the original forward on a call that passes something else. With ``*args`` / ``**kwargs``
    (no guard can bind them) FX's assertion stays: another call raises, never runs wrong."""
    for g in graphs.values():
        for node in list(g.nodes):
            if (not var_args and node.op == "call_function"
                    and getattr(node.target, "__name__", "") == "_assert_is_none"):
                g.erase_node(node)
        for node in g.nodes:
            base = re.sub(r"_\d+$", "", str(node.target)) if node.op == "placeholder" else None
            if base in nones:
                node.target = base
    return None if var_args else {name: ("value", None) for name in nones}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _absorbable(c: nn.Module) -> bool:
    """A container of leaves with a norm and no conv (MONAI's ``ADN``): traced inline with
    its parent, so ``conv -> norm -> act`` across the two containers is one chain."""
    kids = list(c.children())
    if not kids or any(is_walkable(k) for k in kids) or any(is_conv(k) for k in kids):
        return False
    if not any(is_norm(k) for k in kids):
        return False
    return is_container(c) or _is_chain(c, ())


def find_units(root: nn.Module, record: ShapeRecord, wanted: set[int], stages_by_call: dict[int, int],
               cache: Optional[dict] = None, is_model: bool = False) -> list[Unit]:
    """Units under ``root`` that hold feature maps of the ``wanted`` stages, in call order.

    The root is rewritten like any container, except the whole model (``is_model``, not a
    plain ``nn.Sequential``) when it has norm layers of its own in those stages: those get a
    DropBlock after them instead, which runs whichever of its methods calls them (timm's
    ``forward_features`` as well as ``forward``); a rewritten ``forward`` would hold it for
    ``forward`` only.

    A block whose inside goes deeper than its output (a nested U-Net's skip block, which
    wraps the whole deeper network and comes back up) is never one unit: it is descended
    like a container, so each part keeps its own stage.
    """
    position = record.position
    units: list[Unit] = []
    cache = {} if cache is None else cache

    def stages_in(m: nn.Module) -> set[int]:
        out: set[int] = set()
        for call in record.by_module.get(id(m), ()):
            i = position[id(call)]
            for j in range(i, len(record.calls)):
                if record.calls[j].start > call.end:
                    break
                if j in stages_by_call:
                    out.add(stages_by_call[j])
        return out

    def spans_stages(m: nn.Module, call: Call) -> bool:
        out = stages_by_call.get(position[id(call)])
        return out is not None and max(stages_in(m), default=out) > out

    def composite_children(m: nn.Module, absorbed: tuple[nn.Module, ...] = ()) -> list[tuple[str, nn.Module]]:
        return [(n, c) for n, c in m.named_children() if is_walkable(c) and c not in absorbed]

    def called_children(m: nn.Module, absorbed: tuple[nn.Module, ...] = ()) -> tuple[nn.Module, ...]:
        """The modules ``m``'s forward calls that tracing ``m`` must keep as single calls: its
        composite children, and for a child that is never called itself (a ``ModuleList``
        the forward iterates: ``for block in self.blocks``), that child's own, recursively.
        Were those traced into, ``m``'s rewritten forward would run their original code and
        never the rewritten one (nor its DropBlock modules)."""
        out: list[nn.Module] = []
        for _, c in composite_children(m, absorbed):
            if record.first(c) is None and next(c.children(), None) is not None:
                out += called_children(c)
            else:
                out.append(c)
        return tuple(out)

    def visit_children(m: nn.Module, path: str, absorbed: tuple[nn.Module, ...] = ()) -> None:
        for name, child in m.named_children():
            if is_walkable(child) and child not in absorbed:
                walk(child, f"{path}.{name}" if path else name)

    def loose_norms(m: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
        out = []
        for name, child in m.named_children():
            if is_norm(child) and stages_in(child) & wanted:
                out.append((f"{path}.{name}" if path else name, child))
        return out

    def has_loose_layers(m: nn.Module, absorbed: tuple[nn.Module, ...]) -> bool:
        return any((not is_walkable(c) or c in absorbed) and stages_in(c) & wanted for c in m.children())

    def container(m: nn.Module, path: str, call: Optional[Call], rewritable: bool, own_ops: bool = False) -> None:
        """``own_ops``: a descended block, whose own forward (a residual add) holds sites even
        without loose layers."""
        absorbed = tuple(c for c in m.children() if is_walkable(c) and _absorbable(c)) if rewritable else ()
        children = called_children(m, absorbed)
        unit_index = len(units)
        visit_children(m, path, absorbed)
        own = own_ops and call is not None and stages_by_call.get(position[id(call)]) in wanted
        if not (own or has_loose_layers(m, absorbed)):
            return
        unit = Unit(path, m, "container", call, extra_leaves=children)
        if rewritable and call is not None:
            try:
                unit.graphs, unit.guard = _trace(m, children, call, cache)
            except Exception as e:  # noqa: BLE001
                unit.kind, unit.error = "opaque", str(e)
        else:
            unit.kind = "opaque"
            unit.error = "not called directly" if path else "the model's own norms get a DropBlock after them"
        if unit.kind == "opaque":
            unit.loose_norms = loose_norms(m, path)
        units.insert(unit_index, unit)

    walked: set[int] = set()

    def walk(m: nn.Module, path: str) -> None:
        if id(m) in walked:  # a module reachable under several names is planned once, at its first
            return
        walked.add(id(m))
        call = record.first(m)
        if call is None:  # a ModuleList, or a module used as a namespace: its children are called by others
            visit_children(m, path)
            return
        if not (stages_in(m) & wanted):
            return
        if is_container(m):
            container(m, path, call, rewritable=True)
            return
        children = tuple(c for _, c in composite_children(m))
        try:
            chain = _is_chain(m, children)
        except Exception:  # noqa: BLE001 - untraceable at one level: a block (tried whole below)
            chain = False
        if chain:
            container(m, path, call, rewritable=True)
            return
        if spans_stages(m, call) or (checkpoint_flag(m) and children):
            # a stage that can checkpoint its blocks (timm's MetaFormerStage): its blocks are
            # units of their own, so its checkpointed forward still calls their rewrites
            container(m, path, call, rewritable=True, own_ops=True)
            return
        unit = Unit(path, m, "block", call)
        try:
            unit.graphs, unit.guard = _trace(m, (), call, cache)
            units.append(unit)
        except Exception as e:  # noqa: BLE001 - fall back: its parts, and norms without a graph
            unit.kind, unit.error, unit.was_block = "opaque", str(e), True
            n_before = len(units)
            container(m, path, call, rewritable=False)
            mine = [u for u in units[n_before:] if u.module is m]
            if mine:
                mine[0].error, mine[0].was_block = unit.error, True
            else:
                units.append(unit)

    call = record.first(root)
    own_norms = any(is_norm(c) and stages_in(c) & wanted for c in root.children())
    container(root, "", call, rewritable=not (is_model and own_norms and not is_container(root)))
    return units
