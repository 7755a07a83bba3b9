"""``plan``: where DropBlock goes in a model, computed without touching the model.

A :class:`Plan` is plain data (picklable): its rows say, for every DropBlock module, the
stage, the feature resolution at the recipe's input size, the module path, the site
kind, the block size after clipping, the target rate and the expected real rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..graph.layers import foreign_dropblock, norm_types
from ..graph.shapes import record_calls
from ..graph.sites import Site, find_sites, insert_sites, replay
from ..graph.splice import _compile, graph_source
from ..graph.stages import Stage, call_stages, find_stages, stage_of_shape
from ..graph.units import Unit, bound_args, find_units
from ..modules import DropBlockNd
from ..op.gamma import clip_block, expected_drop_rate, paper_gamma
from ..recipe import resolve_stages
from ..recipe.schema import Recipe, StageSpec

__all__ = ["PlanRow", "Plan", "SurgeryError", "plan", "resolve_recipe"]

_OPTION_NAMES = ("mask", "seed_region", "gamma_scale", "scale", "noise", "calibrate")


class SurgeryError(RuntimeError):
    """``apply_dropblock`` / ``plan`` could not do what was asked; says which module and why."""


def check_model(model: Any, func: str) -> None:
    """Refuse, before anything is touched, what surgery cannot work on."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{func}(model, ...): model must be a torch.nn.Module, not "
                        f"{type(model).__name__} ({model!r:.60})")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise SurgeryError(
            f"{func}: this model is already compiled (torch.compile); apply DropBlock before "
            f"torch.compile, or to the original module: {func}(compiled._orig_mod, ...)"
        )



@dataclass(frozen=True)
class PlanRow:
    """One DropBlock module of a plan."""

    stage: int
    stage_name: str
    resolution: tuple[int, ...]
    path: str
    kind: str
    block_size: tuple[int, ...]
    target_drop_prob: float
    expected_drop_prob: float
    anchor: str
    mechanism: str  # "graph" | "after-norm" | "after-block" | "slot"
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "options"}
        d["options"] = dict(self.options)
        return d


@dataclass
class Plan:
    """Rows, the validated recipe, the model's stages and notes (fallbacks, skipped stages)."""

    rows: list[PlanRow]
    recipe: Recipe
    stages: list[Stage]
    target: str = ""
    input_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def count(self, kind: Optional[str] = None, stage: Optional[int] = None) -> int:
        return sum(1 for r in self.rows if (kind is None or r.kind == kind) and (stage is None or r.stage == stage))

    def __str__(self) -> str:
        head = ["stage", "resolution", "module", "site", "block", "target p", "expected p"]
        body = [[f"{r.stage} {r.stage_name}", "x".join(map(str, r.resolution)), r.path, r.kind,
                 "x".join(map(str, r.block_size)), f"{r.target_drop_prob:.4g}", f"{r.expected_drop_prob:.4g}"]
                for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
        fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
        name = self.recipe.name or "custom recipe"
        lines = [f"DropBlock plan ({name}): {len(self.rows)} modules, input {tuple(self.input_shape)}"
                 + (f", target {self.target!r}" if self.target else "")]
        lines.append("stages: " + ", ".join(f"{s.index}={s.name} (stride {s.stride}, "
                                            f"{'x'.join(map(str, s.resolution))})" for s in self.stages))
        lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self.recipe.name or 'custom'}: {len(self.rows)} DropBlock modules>"


# ---------------------------------------------------------------------------- recipes


RecipeLike = Union[None, str, dict, Recipe]


def resolve_recipe(recipe: RecipeLike = None, **overrides: Any) -> Recipe:
    """A validated :class:`Recipe` from a name, path, dict or Recipe, with ``overrides`` applied."""
    from ..recipe.loader import load_recipe, validate_recipe

    if isinstance(recipe, Recipe):
        base = recipe
    elif recipe is None:
        base = load_recipe(None)
    elif isinstance(recipe, dict):
        base = validate_recipe(recipe)
    elif isinstance(recipe, str) or hasattr(recipe, "__fspath__"):
        base = load_recipe(recipe)
    else:
        raise SurgeryError(f"recipe must be None, a name, a path, a dict or a Recipe, not {type(recipe).__name__}")
    if not overrides:
        return base
    data = base.model_dump(exclude_unset=True)
    if "drop_prob" in overrides:
        data.pop("keep_prob", None)
    if "keep_prob" in overrides:
        data.pop("drop_prob", None)
    if "stages" in overrides and "missing_stages" not in overrides:
        data.pop("missing_stages", None)  # "skip" was about the recipe's own stage list
    data.update(overrides)
    # RecipeError (key path, bad value, allowed values), never a raw pydantic error
    return validate_recipe(data, file="overrides of apply_dropblock")


# ---------------------------------------------------------------------------- planning


@dataclass
class Action:
    """What apply does for one unit / module (internal; holds live modules)."""

    kind: str  # "graph" | "after" | "slot"
    module: nn.Module
    path: str
    rows: list[PlanRow]
    names: list[str]  # child names (graph) / attribute name (slot)
    source: str = ""


@dataclass
class _Candidate:
    stage: int
    block_key: Any
    row_args: dict[str, Any]
    action_key: Any


def _selected(recipe: Recipe, stages: list[Stage], notes: list[str]) -> dict[int, Optional[StageSpec]]:
    skipped: list[Any] = []
    selected = dict(resolve_stages(recipe, stages, skipped=skipped))
    if skipped:
        have = ", ".join(str(s.index) for s in stages)
        notes.append(f"recipe stage(s) {', '.join(map(repr, skipped))} skipped: the model has "
                     f"{len(stages)} stage(s) ({have}) and the recipe says missing_stages: skip")
    return selected


def _stage_settings(recipe: Recipe, stage: Stage, spec: Optional[StageSpec], deepest: int) -> dict[str, Any]:
    opts = {k: getattr(recipe, k) for k in _OPTION_NAMES}
    if spec is not None:
        opts.update({k: getattr(spec, k) for k in _OPTION_NAMES if getattr(spec, k) is not None})
    target = recipe.stage_rate(stage.index, deepest, spec, stage.name)
    return dict(
        options=opts,
        block_size=spec.block_size if spec is not None and spec.block_size is not None else recipe.block_size,
        target=min(1.0, max(0.0, round(target, 12))),
        sites=set(spec.sites if spec is not None and spec.sites is not None else recipe.sites),
        fraction=spec.block_fraction if spec is not None and spec.block_fraction is not None else recipe.block_fraction,
    )


def expected_rate(target: float, shape: tuple[int, ...], block_size: int, options: dict[str, Any]) -> tuple[tuple[int, ...], float]:
    """Block size after clipping and the expected dropped fraction at ``shape``."""
    spatial = tuple(shape[2:])
    block = clip_block(spatial, (block_size,) * len(spatial))
    if options["calibrate"]:
        return block, min(1.0, target * options["gamma_scale"])
    gamma = paper_gamma(target, spatial, block, options["gamma_scale"])
    return block, expected_drop_rate(gamma, spatial, block, options["seed_region"])


def existing_dropblocks(model: nn.Module) -> tuple[list[str], list[str]]:
    """Paths of this library's DropBlock modules and of foreign ones (timm, torchvision)."""
    ours, foreign = [], []
    for name, m in model.named_modules():
        if isinstance(m, DropBlockNd):
            ours.append(name)
        elif foreign_dropblock(m):
            foreign.append(name)
    return ours, foreign


def plan(model: nn.Module, recipe: RecipeLike = None, **overrides: Any) -> Plan:
    """Where ``apply_dropblock(model, recipe, **overrides)`` would put DropBlock; the model is
    not modified.

    Example:
        >>> import torchvision
        >>> p = plan(torchvision.models.resnet50(), "paper-resnet50")   # doctest: +SKIP
        >>> len(p.rows)                                                  # doctest: +SKIP
        36
    """
    check_model(model, "plan")
    return prepare(model, resolve_recipe(recipe, **overrides), keep_foreign=True)[0]


def prepare(model: nn.Module, recipe: Recipe, keep_foreign: bool = False) -> tuple[Plan, list[Action]]:
    target = recipe.target or ""
    try:
        root = model.get_submodule(target) if target else model
    except AttributeError as e:
        raise SurgeryError(f"target {target!r}: no such submodule ({e})") from None
    prefix = f"{target}." if target else ""
    notes: list[str] = []
    _, foreign = existing_dropblocks(root)
    if foreign:
        where = ", ".join(prefix + f for f in foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        if not keep_foreign:
            raise SurgeryError(
                f"{where}: the model already has {len(foreign)} DropBlock module(s) from another library "
                f"(e.g. timm's drop_block_rate); create it without them, or pass keep_foreign=True")
        notes.append(f"the model already has {len(foreign)} foreign DropBlock module(s): {where}")

    try:
        parts = target.split(".") if target else []
        runners = tuple(model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1))
        record = record_calls(root, tuple(recipe.input_size), runners)
    except RuntimeError as e:
        raise SurgeryError(f"{target or type(root).__name__}: {e}") from None
    if record.runner:
        notes.append(f"{target} does not take an image tensor: shapes found by running {record.runner} up to it")
    if record.mode != "meta":
        notes.append(f"shapes found with a {record.mode} forward pass (the meta pass failed)")
    by_call = call_stages(record)
    stages = find_stages(root, record, by_call)
    if not stages:
        raise SurgeryError(f"{target or type(root).__name__}: no spatial feature maps found at input size "
                           f"{tuple(recipe.input_size)}")
    selected = _selected(recipe, stages, notes)
    deepest = max(selected)
    stage_by_index = {s.index: s for s in stages}
    settings = {i: _stage_settings(recipe, stage_by_index[i], spec, deepest) for i, spec in selected.items()}
    all_kinds = set().union(*(s["sites"] for s in settings.values()))
    norm_free = not any(isinstance(m, norm_types()) for m in root.modules())
    if norm_free:
        notes.append("no norm layers: conv sites are after conv -> activation (or the conv, if none)")

    units = find_units(root, record, set(selected), by_call)
    candidates: list[_Candidate] = []
    actions: dict[Any, Action] = {}
    graph_sites: dict[int, dict[str, list[Site]]] = {}

    def unit_stage(u: Unit) -> Optional[int]:
        if u.kind != "block" and not u.was_block:
            return None
        out = u.call.output if u.call is not None else None
        shape = tuple(out.shape) if hasattr(out, "shape") else ()
        return stage_of_shape(record.input_shape, shape) if shape else None

    def candidate(stage: int, key: Any, path: str, kind: str, shape: tuple[int, ...], anchor: str,
                  mechanism: str, action_key: Any) -> None:
        if stage not in settings or kind not in settings[stage]["sites"]:
            return
        candidates.append(_Candidate(stage, key, dict(path=path, kind=kind, shape=shape, anchor=anchor,
                                                      mechanism=mechanism), action_key))

    for u in units:
        ustage = unit_stage(u)
        base = prefix + (f"{u.path}." if u.path else "")
        if u.graphs is not None:
            try:
                bound = bound_args(u.module, u.call) if u.call is not None else {}
                start, end = (u.call.start, u.call.end) if u.call is not None else (0, 0)
                per_mode: dict[str, list[Site]] = {}
                for mode, g in u.graphs.items():
                    values = replay(g, u.module, bound, lambda m: record.outputs_within(m, start, end))
                    per_mode[mode], _ = find_sites(g, u.module, values, all_kinds, norm_free, u.kind == "block")
            except Exception as e:  # noqa: BLE001
                notes.append(f"{prefix + u.path}: could not match sites ({type(e).__name__}: {e})")
                continue
            graph_sites[id(u)] = per_mode
            main = per_mode.get("eval") or per_mode.get("any") or []
            for site in main:
                st = ustage if ustage is not None else stage_of_shape(record.input_shape, site.shape)
                key = u.path if u.kind == "block" else (u.path, site.name)
                candidate(st, key, base + site.name, site.kind, site.shape, site.anchor, "graph", ("graph", id(u)))
            if "train" in u.graphs:
                notes.append(f"{prefix + u.path}: traces differently in train and eval mode; both rewritten")
        else:
            if u.error and (u.loose_norms or u.was_block):
                notes.append(f"{prefix + u.path or type(root).__name__}: no graph ({u.error}); "
                             f"only sites after norm modules" + (" and after the block" if u.was_block else ""))
            for path, norm in u.loose_norms:
                call = record.first(norm)
                out = call.output if call is not None else None
                if not hasattr(out, "shape") or out.dim() not in (4, 5):
                    continue
                shape = tuple(out.shape)
                if stage_of_shape(record.input_shape, shape) is None:
                    continue  # a channels-last norm (N, H, W, C): "after" cannot permute
                st = ustage if ustage is not None else stage_of_shape(record.input_shape, shape)
                candidate(st, (u.path, path), prefix + path + ".dropblock", "conv", shape,
                          f"after {path} (no graph)", "after-norm", ("after", id(norm)))
            if u.was_block and ustage is not None and u.call is not None and hasattr(u.call.output, "shape"):
                candidate(ustage, u.path, base + "dropblock", "block", tuple(u.call.output.shape),
                          "block output (no graph)", "after-block", ("after", id(u.module)))
    if "timm" in all_kinds:
        slots, how = timm_slots(root, units)
        unit_of = sorted(((u.path, u) for u in units if u.path), key=lambda t: -len(t[0]))
        for path in slots:
            slot = root.get_submodule(path)
            call = record.first(slot)
            if not isinstance(slot, nn.Identity) or call is None or not hasattr(call.output, "shape"):
                continue
            owner = next((u for p, u in unit_of if path.startswith(p + ".")), None)
            st = unit_stage(owner) if owner is not None else None
            shape = tuple(call.output.shape)
            if st is None:
                st = stage_of_shape(record.input_shape, shape)
            parent, _, attr = path.rpartition(".")
            candidate(st, owner.path if owner is not None else path, prefix + path, "timm", shape,
                      f"timm's DropBlock slot ({how})", "slot", ("slot", id(root.get_submodule(parent)), attr))
    if "timm" in all_kinds and not any(c.row_args["kind"] == "timm" for c in candidates):
        notes.append("site kind 'timm': this model has no timm drop_block slots in the selected stages")

    # block_fraction: the last fraction of each stage's blocks
    keep: list[_Candidate] = []
    for st, cfg in settings.items():
        mine = [c for c in candidates if c.stage == st]
        keys: list[Any] = []
        for c in mine:
            if c.block_key not in keys:
                keys.append(c.block_key)
        n_keep = math.ceil(cfg["fraction"] * len(keys) - 1e-9)
        kept = set(map(repr, keys[len(keys) - n_keep:])) if n_keep else set()
        keep += [c for c in mine if repr(c.block_key) in kept]
        if not mine:
            notes.append(f"stage {st} ({stage_by_index[st].name}): no sites of kinds {sorted(cfg['sites'])}")
    order = {id(c): i for i, c in enumerate(candidates)}
    keep.sort(key=lambda c: order[id(c)])

    rows: list[PlanRow] = []
    unit_by_id = {id(u): u for u in units}
    module_by_id = {id(u.module): u.module for u in units}
    for u in units:
        for _, norm in u.loose_norms:
            module_by_id[id(norm)] = norm
    for c in keep:
        cfg = settings[c.stage]
        a = c.row_args
        block, exp = expected_rate(cfg["target"], a["shape"], cfg["block_size"], cfg["options"])
        opts = dict(cfg["options"], block_size=cfg["block_size"])
        row = PlanRow(c.stage, stage_by_index[c.stage].name, tuple(a["shape"][2:]), a["path"], a["kind"], block,
                      cfg["target"], exp, a["anchor"], a["mechanism"], tuple(sorted(opts.items())))
        rows.append(row)
        kind, ident = c.action_key[:2]
        act = actions.get(c.action_key)
        if act is None:
            if kind == "graph":
                u = unit_by_id[ident]
                act = Action("graph", u.module, prefix + u.path, [], [])
            elif kind == "after":
                act = Action("after", module_by_id[ident], a["path"].rsplit(".", 1)[0], [], ["dropblock"])
            else:
                parent_path, _, attr = a["path"].rpartition(".")
                act = Action("slot", model.get_submodule(parent_path), parent_path, [], [attr])
            actions[c.action_key] = act
        act.rows.append(row)
        if kind == "graph":
            act.names.append(a["path"].rsplit(".", 1)[1])

    # generate code for the rewritten units now, so apply cannot fail half-way on it
    for key, act in list(actions.items()):
        if act.kind != "graph":
            continue
        u = unit_by_id[key[1]]
        names = set(act.names)
        graphs = {}
        for mode, g in u.graphs.items():  # type: ignore[union-attr]
            g = _copy_graph(g)
            insert_sites(g, [s for s in graph_sites[id(u)][mode] if s.name in names])
            graphs[mode] = g
        try:
            act.source = graph_source(graphs)
            _compile(act.source)
        except Exception as e:  # noqa: BLE001
            raise SurgeryError(f"{act.path}: could not generate its new forward ({type(e).__name__}: {e})") from e
    p = Plan(rows, recipe, stages, target, record.input_shape, notes)
    return p, list(actions.values())


def timm_slots(root: nn.Module, units: list[Unit]) -> tuple[list[str], str]:
    """Paths (under ``root``) where timm's ``drop_block_rate`` would put DropBlock modules.

    A timm model is rebuilt on the meta device with ``drop_block_rate`` (exact for every
    architecture that supports it, when the rebuilt model has the same parameters); else the
    ``drop_block`` slots of timm's ResNet blocks.
    """
    arch = (getattr(root, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        try:
            import timm

            with torch.device("meta"):
                twin = timm.create_model(arch, pretrained=False, drop_block_rate=0.1)
            if list(twin.state_dict()) == list(root.state_dict()):
                return [n for n, m in twin.named_modules() if foreign_dropblock(m)], f"timm {arch}"
        except Exception:  # noqa: BLE001 - the architecture has no drop_block_rate: heuristic below
            pass
    return [f"{u.path}.drop_block" for u in units
            if u.kind == "block" and isinstance(getattr(u.module, "drop_block", None), nn.Identity)], "drop_block"


def _copy_graph(g):
    from torch import fx

    new = fx.Graph()
    out = new.graph_copy(g, {})
    new.output(out)
    return new
