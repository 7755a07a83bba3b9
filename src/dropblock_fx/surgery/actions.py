"""Phases 7-8, rows and actions: what apply does to each module, every rewrite verified first.

A graph action's rewritten graphs (the unit's verified graphs with DropBlock calls inserted)
are run once more on meta tensors, with the new DropBlock modules, in train and eval mode,
and must return what the unit returned in the shape pass; then their ``forward`` source is
generated and compiled, so apply cannot fail half-way on it. A rewrite that fails is dropped
with a note, never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from ..graph.sites import Site, commute_with_relu, feeds_relu_alone, insert_sites, owns_norm_output, writable_norm
from ..graph.leaves import checkpoint_flag
from ..graph.specialise import respec_info
from ..graph.splice import compile_source, graph_source
from ..graph.units import bound_args
from ..graph.verify import check_graphs
from .candidates import Candidate, SiteContext, module_at
from .rows import PlanRow
from .settings import StageSettings

__all__ = ["Action", "build_actions", "without_rows"]


@dataclass
class Action:
    """What apply does to one module (internal: holds live modules)."""

    how: str  # "graph" | "after" | "slot"
    module: nn.Module
    path: str  # the module's path in the model, for messages
    rows: list[PlanRow] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # child names (graph, after) / the slot attribute
    source: str = ""
    # The module is called at several shapes in the planned forward (a head shared by the
    # levels of an FPN): its DropBlock modules have no one planned map to compare with.
    varying: bool = False
    unit: str = ""  # a graph action's unit path (relative to the target)
    # a graph action's sites in each traced graph of its unit, by mode (from its candidates)
    positions: dict[str, list[Site]] = field(default_factory=dict)


def _row(c: Candidate, cfg: StageSettings) -> PlanRow:
    block, exp = cfg.expected(c.shape)
    return PlanRow(c.stage, cfg.stage.name, tuple(c.shape[2:]), c.path, c.kind, block, cfg.target, exp, c.anchor,
                   c.mechanism, cfg.options)


def _called_at_several_shapes(ctx: SiteContext, module: nn.Module) -> bool:
    calls = ctx.record.by_module.get(id(module), ())
    shapes = {tuple(tuple(t.shape) for t in tree_leaves((c.args, c.kwargs, c.output)) if isinstance(t, torch.Tensor))
              for c in calls}
    return len(shapes) > 1


def _copy_graph(g: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(g, {}))
    return new


def build_actions(ctx: SiteContext, chosen: list[Candidate]) -> tuple[list[PlanRow], list[Action]]:
    """Plan rows and the actions that realise them (verified, code generated)."""
    root, prefix = ctx.target.root, ctx.target.prefix
    actions: dict[tuple[str, str], Action] = {}
    rows: list[PlanRow] = []
    for c in chosen:
        row = _row(c, ctx.settings[c.stage])
        how, path = c.action
        act = actions.get(c.action)
        if act is None:
            if how == "slot":
                parent, _, attr = path.rpartition(".")
                act = Action("slot", module_at(root, parent), prefix + parent, names=[attr])
            else:
                act = Action(how, module_at(root, path), (prefix + path) or type(root).__name__,
                             names=["dropblock"] if how == "after" else [], unit=path)
            act.varying = _called_at_several_shapes(ctx, act.module)
            actions[c.action] = act
        if how == "graph":
            act.names.append(c.path.rsplit(".", 1)[-1])
            for mode, site in c.positions:
                act.positions.setdefault(mode, []).append(site)
        act.rows.append(row)
        rows.append(row)

    for act in actions.values():
        if act.how == "graph":
            _rewrite_or_drop(ctx, act)
        elif act.how == "after" and act.rows[0].mechanism == "after-norm" and writable_norm(act.module):
            act.rows = [replace(act.rows[0], owns_input=True)]  # the norm's output goes to it alone
    return _kept(rows, actions.values())


def _rewrite_or_drop(ctx: SiteContext, act: Action) -> None:
    problem = _rewrite(ctx, act)
    if problem:
        ctx.notes.append(f"{act.path}: not rewritten, it keeps its forward ({problem}); "
                         f"{len(act.rows)} site(s) there left out")
        act.rows, act.names, act.source = [], [], ""


def _kept(rows: list[PlanRow], actions: Iterable[Action]) -> tuple[list[PlanRow], list[Action]]:
    """The rows the kept actions realise (as the actions hold them), in plan order."""
    kept = [a for a in actions if a.rows]
    by_path = {r.path: r for a in kept for r in a.rows}
    return [by_path[r.path] for r in rows if r.path in by_path], kept


def without_rows(ctx: SiteContext, rows: list[PlanRow], actions: list[Action],
                 dropped: set[str]) -> tuple[list[PlanRow], list[Action]]:
    """The plan without the rows at ``dropped`` paths: their actions lose them, and a graph
    action that keeps other rows is rewritten (and verified) again without them."""
    for act in actions:
        gone = [i for i, r in enumerate(act.rows) if r.path in dropped]
        if not gone:
            continue
        act.rows = [r for i, r in enumerate(act.rows) if i not in gone]
        if act.how == "graph":
            act.names = [n for i, n in enumerate(act.names) if i not in gone]
            act.positions = {m: [s for s in sites if s.name in act.names] for m, sites in act.positions.items()}
            act.source = ""
            if act.rows:
                _rewrite_or_drop(ctx, act)
    return _kept(rows, actions)


def _rewrite(ctx: SiteContext, act: Action) -> str:
    """Fill ``act.source``; returns why the rewrite was refused ('' when it was not)."""
    unit = next(u for u in ctx.units if u.path == act.unit and u.graphs is not None)
    names = set(act.names)
    graphs, sites = {}, {}
    for mode, g in unit.graphs.items():  # type: ignore[union-attr]
        sites[mode] = act.positions.get(mode, [])
        if mode.startswith("ckpt:") and {s.name for s in sites[mode]} != names:
            continue  # a site the checkpointed trace does not have: no checkpointed forward
        g = _copy_graph(g)
        insert_sites(g, sites[mode])
        if unit.guard is None:
            # A site after a ReLU that alone reads a norm's output runs just before that ReLU,
            # so that it can write into the norm's output: same values and gradients (ReLU
            # commutes with a DropBlock without noise), one map less per site and step.
            for name, row in zip(act.names, act.rows):
                if not row.options.noise:
                    commute_with_relu(g, name, unit.module)
        graphs[mode] = g
    flag = checkpoint_flag(unit.module)
    if flag and not any(m.startswith("ckpt:") for m in graphs):
        ctx.notes.append(f"{act.path}: its rewritten forward does not checkpoint: "
                         f"{flag}=True (set_grad_checkpointing) has no effect there")
    bound = bound_args(unit.module, unit.call) if unit.call is not None else {}
    expected: Any = unit.call.output if unit.call is not None else None
    problem = check_graphs(graphs, unit.module, bound, expected, extra=names, cache=ctx.meta_cache)
    if problem:
        return f"its rewritten forward failed verification: {problem}"
    # A site that alone reads a norm's output in every graph writes into it. Not in a unit
    # traced for one call (a call of another size is traced again: its graph is not seen here).
    # A site that alone feeds a ReLU gets its gradient already zeroed where it dropped: its
    # backward skips the mask (not with noise, whose dropped units are not zero).
    act.rows = [replace(row, owns_input=unit.guard is None and owns_norm_output(graphs.values(), name, unit.module),
                        before_relu=unit.guard is None and not row.options.noise
                        and feeds_relu_alone(graphs.values(), name, unit.module))
                for name, row in zip(act.names, act.rows)]
    try:
        plain = {m: g for m, g in unit.graphs.items() if not m.startswith("ckpt:")}  # type: ignore[union-attr]
        respec = None if unit.guard is None else respec_info(unit.module, plain, unit.extra_leaves, sites, unit.guard)
        act.source = graph_source(graphs, unit.guard, respec, checkpoint=flag)
        compile_source(act.source)
    except Exception as e:  # noqa: BLE001 - e.g. a class made inside forward cannot be imported by name
        act.source = ""
        return f"its new forward could not be generated: {type(e).__name__}: {str(e)[:160]}"
    return ""
