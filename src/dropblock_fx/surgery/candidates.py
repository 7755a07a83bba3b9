"""Phase 5, candidate sites: a registry of site finders, each turning units into candidates.

Built in: ``graph`` (sites matched on a unit's verified FX graph) and ``fallback`` (after
norm modules and after whole blocks, for units without a graph). The timm integration
registers ``timm`` (timm's own ``drop_block`` slots) when a recipe asks for that kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import fx, nn

from ..graph.shapes import Call, ShapeRecord
from ..graph.sites import Site, find_sites
from ..graph.stages import StageMap
from ..graph.meta import replay
from ..graph.units import Unit, bound_args
from ..registry import Registry
from .settings import StageSettings
from .target import Target

__all__ = ["Candidate", "SiteContext", "register_site_finder", "find_candidates"]


_HOW = {"graph": "graph", "after-norm": "after", "after-block": "after", "slot": "slot"}


@dataclass(frozen=True)
class Candidate:
    """One possible DropBlock module, with everything its action needs.

    ``mechanism`` says how it is put in: ``graph`` (a site in its unit's rewritten graph;
    ``positions`` holds that site in each traced graph of the unit, by mode), ``after-norm`` /
    ``after-block`` (after a module's own forward), ``slot`` (in a timm ``drop_block`` slot);
    ``changes`` is the path (relative to the target) of the module the action changes.
    """

    stage: int
    block: str  # what block_fraction counts: a block's path, or a loose site's own key
    path: str  # the DropBlock module's path in the model
    kind: str  # site kind
    shape: tuple[int, ...]  # channels-first feature map
    anchor: str
    mechanism: str  # "graph" | "after-norm" | "after-block" | "slot"
    changes: str
    unit: Optional[str] = None  # the unit it came from (candidates are ordered by unit)
    positions: tuple[tuple[str, Site], ...] = ()

    @property
    def action(self) -> tuple[str, str]:
        """``(how, module path)``: one action per module changed; how is ``graph``, ``after``
        or ``slot``."""
        return _HOW[self.mechanism], self.changes


@dataclass
class SiteContext:
    """What every site finder may read."""

    target: Target
    record: ShapeRecord
    stages: StageMap
    units: list[Unit]
    settings: dict[int, StageSettings]
    norm_free: bool
    notes: list[str]
    meta_cache: dict = field(default_factory=dict)  # meta copies of leaf weights, shared by the phases
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (position, why): no feature map there

    def __post_init__(self) -> None:
        self.maps = self.stages.feature_maps()

    @property
    def kinds(self) -> set[str]:
        return set().union(*(s.sites for s in self.settings.values()))

    def wants(self, stage: Optional[int], kind: str) -> bool:
        return stage in self.settings and kind in self.settings[stage].sites

    def stage_of(self, shape: tuple[int, ...], near: Optional[Call] = None) -> Optional[int]:
        """The stage of a feature map of ``shape`` computed next to the call ``near``."""
        return self.stages.of_shape(shape, near)

    def unit_stage(self, u: Unit) -> Optional[int]:
        """A block's sites belong to the stage of the block's output; other units' sites to
        the stage of the layer that made their feature map (None here). See ``graph.stages``."""
        if u.kind != "block" and not u.was_block:
            return None
        return self.stages.of_call(u.call)

    def site_stage(self, u: Unit, g: fx.Graph, site: Site) -> Optional[int]:
        """The stage of a site of a unit that is not a block: that of the module call that
        made the site's tensor (block rule and dilation included), else of its shape."""
        nodes = {n.name: n for n in g.nodes}
        node = nodes.get(site.after or (site.edge[0] if site.edge else ""))
        seen = 0
        while node is not None and node.op != "call_module" and seen < 64:
            seen += 1
            node = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
        if node is not None and node.op == "call_module" and u.call is not None:
            try:
                m = u.module.get_submodule(str(node.target))
            except AttributeError:
                m = None
            call = next((c for c in self.record.by_module.get(id(m), ())
                         if u.call.start < c.start and c.end < u.call.end), None) if m is not None else None
            st = self.stages.of_call(call)
            if st is not None and tuple(call.output.shape) == tuple(site.shape):  # type: ignore[union-attr]
                return st
        return self.stage_of(site.shape, u.call)

    def unit_of(self, path: str) -> Optional[Unit]:
        """The innermost unit holding the module at ``path`` (relative to the target)."""
        best = None
        for u in self.units:
            if u.path and path.startswith(u.path + ".") and (best is None or len(u.path) > len(best.path)):
                best = u
        return best


SiteFinder = Callable[[SiteContext], list[Candidate]]
_FINDERS: Registry[SiteFinder] = Registry("site finder")
_FINDERS.lazy("timm", "dropblock_fx.integrations.timm_slots")  # it registers itself when imported


def register_site_finder(name: str) -> Callable[[SiteFinder], SiteFinder]:
    """Register ``finder(ctx) -> [Candidate]`` under ``name`` (a decorator).

    Examples:
        >>> @register_site_finder("nothing")
        ... def _none(ctx):
        ...     return []
        >>> _FINDERS.pop("nothing") is _none
        True
    """
    def deco(fn: SiteFinder) -> SiteFinder:
        return _FINDERS.register(name, fn, overwrite=True)

    return deco


def find_candidates(ctx: SiteContext) -> list[Candidate]:
    """Every finder's candidates, in finder order; a finder for a site kind the recipe does
    not ask for (``timm``) is loaded only when asked."""
    for kind in ctx.kinds & set(_FINDERS.names()):
        _FINDERS.get(kind)  # loads a lazy finder
    out: list[Candidate] = []
    for _, fn in _FINDERS.items():
        out += fn(ctx)
    order = {u.path: i for i, u in enumerate(ctx.units)}
    return sorted(out, key=lambda c: order.get(c.unit, len(order)) if c.unit is not None else len(order))


@register_site_finder("graph")
def _graph_sites(ctx: SiteContext) -> list[Candidate]:
    out: list[Candidate] = []
    kinds = ctx.kinds
    for u in ctx.units:
        if u.graphs is None:
            continue
        base = ctx.target.prefix + (f"{u.path}." if u.path else "")
        bound = bound_args(u.module, u.call) if u.call is not None else {}
        start, end = (u.call.start, u.call.end) if u.call is not None else (0, 0)
        try:
            per_mode = {}
            for mode, g in u.graphs.items():
                values = replay(g, u.module, bound, lambda m: ctx.record.outputs_within(m, start, end))
                rejected: list[tuple[str, str]] = []
                per_mode[mode] = find_sites(g, u.module, values, kinds, ctx.norm_free, u.kind == "block",
                                            ctx.maps, rejected)
                ctx.left_out += [(f"{base.rstrip('.') or ctx.target.label}: {where}", why) for where, why in rejected]
        except Exception as e:  # noqa: BLE001
            ctx.notes.append(f"{base.rstrip('.') or ctx.target.label}: could not match sites ({type(e).__name__}: {e})")
            continue
        ustage = ctx.unit_stage(u)
        g = u.graphs.get("eval") or u.graphs.get("any")
        for site in per_mode.get("eval") or per_mode.get("any") or []:
            st = ustage if ustage is not None else ctx.site_stage(u, g, site)  # type: ignore[arg-type]
            if ctx.wants(st, site.kind):
                block = u.path if u.kind == "block" else f"{u.path}:{site.name}"
                positions = tuple((mode, s) for mode, sites in per_mode.items() for s in sites if s.name == site.name)
                out.append(Candidate(st, block, base + site.name, site.kind, site.shape, site.anchor, "graph",  # type: ignore[arg-type]
                                     u.path, u.path, positions))
    return out


@register_site_finder("fallback")
def _fallback_sites(ctx: SiteContext) -> list[Candidate]:
    out: list[Candidate] = []
    prefix = ctx.target.prefix
    for u in ctx.units:
        if u.graphs is not None:
            continue
        ustage = ctx.unit_stage(u)
        for path, norm in u.loose_norms:
            call = ctx.record.first(norm)
            shape = tuple(call.output.shape) if call is not None and hasattr(call.output, "shape") else ()
            st = ctx.stage_of(shape) if len(shape) in (4, 5) else None
            if st is None:
                continue  # not a feature map, or a channels-last norm (N, H, W, C): "after" cannot permute
            st = ustage if ustage is not None else ctx.stages.of_call(call)
            if ctx.wants(st, "conv"):
                out.append(Candidate(st, f"{u.path}:{path}", prefix + path + ".dropblock", "conv", shape,
                                     f"after {path} (no graph)", "after-norm", path, u.path))
        if u.was_block and ustage is not None and u.call is not None and ctx.wants(ustage, "block"):
            out.append(Candidate(ustage, u.path, prefix + (f"{u.path}." if u.path else "") + "dropblock", "block",
                                 tuple(u.call.output.shape), "block output (no graph)", "after-block",
                                 u.path, u.path))
    return out


def module_at(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root
