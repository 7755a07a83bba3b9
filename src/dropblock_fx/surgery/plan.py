"""``plan``: where DropBlock goes in a model, computed without touching the model.

Planning is a pipeline of phases, each in its own module of this package:

1. target (``target.py``): the planned module, what runs it, what it already holds;
2. shape pass (``graph.shapes``): one forward on meta tensors, every module call recorded;
3. stages (``graph.stages``) and the recipe's settings for the selected ones (``settings.py``);
4. units (``graph.units``): the modules to rewrite, each traced and verified against its
   recorded call (plain, else specialised with a guard, else the documented fallback);
5. candidate sites from a registry of site finders (``candidates.py``);
6. selection and ``block_fraction`` (``select.py``);
7. actions (``actions.py``): rewritten graphs verified again, their code generated;
8. the promise (``promise.py``): the rewritten target run once in train mode on meta
   tensors; a row whose DropBlock module is not called, or not on a feature map of its
   stage, is dropped with a note;
9. the [`Plan`][dropblock_fx.Plan].

The whole pipeline runs inside ``graph.preserve.preserved``: whatever the shape pass or
tracing changes on the model's modules (caches, attributes, RNG state) is put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ..graph.leaves import is_conv, norm_types
from ..graph.preserve import preserved
from ..graph.shapes import ShapeRecord, record_calls
from ..graph.splice import guard_text
from ..graph.stages import map_stages
from ..graph.units import Unit, find_units
from ..recipe.schema import Recipe
from .actions import Action, build_actions
from .candidates import SiteContext, find_candidates
from .promise import keep_promises
from .rows import Plan, PlanRow
from .select import select
from .settings import RecipeLike, resolve_recipe, stage_settings
from .target import SurgeryError, Target, backbone_target, check_model, locate

__all__ = ["PlanRow", "Plan", "SurgeryError", "plan", "prepare", "Prepared", "resolve_recipe"]


@dataclass
class Prepared:
    """A plan with what apply needs to realise it (internal: holds live modules)."""

    plan: Plan
    actions: list[Action]
    target: Target
    runner: Optional[nn.Module]


def plan(model: nn.Module, recipe: RecipeLike = None, **overrides: Any) -> Plan:
    """Where ``apply_dropblock(model, recipe, **overrides)`` would put DropBlock; the model is
    not modified.

    Examples:
        >>> import torchvision
        >>> p = plan(torchvision.models.resnet50(), "paper-resnet50")
        >>> len(p.rows), p.count("shortcut"), sorted({r.stage for r in p})
        (36, 9, [3, 4])
    """
    check_model(model, "plan")
    return prepare(model, resolve_recipe(recipe, **overrides), keep_foreign=True).plan


def _shape_pass(target: Target, recipe: Recipe, notes: list[str]) -> ShapeRecord:
    try:
        with preserved(target.model):  # what the forward caches on itself must not reach tracing
            record = record_calls(target.root, tuple(recipe.input_size), target.runners)
    except RuntimeError as e:
        raise SurgeryError(f"{target.label}: {e}; {_target_hint(target.root, recipe)}") from None
    if record.runner:
        notes.append(f"{target.path} does not take an image tensor: shapes found by running {record.runner} up to it")
    if record.mode != "meta":
        notes.append(f"shapes found with a {record.mode} forward pass (the meta pass failed)")
    return record


def _target_hint(root: nn.Module, recipe: Recipe) -> str:
    """What to pass instead: the children holding the most convs (the image backbone is
    usually among them), or the input size."""
    counts = [(sum(is_conv(m) for m in child.modules()), name)
              for name, child in root.named_children()]
    best = [name for n, name in sorted(counts, key=lambda t: -t[0]) if n][:3]
    if not best:
        return f"check the recipe's input_size {tuple(recipe.input_size)}"
    prefix = "" if not recipe.target else recipe.target + "."
    return ("pass target= naming its image backbone, e.g. "
            + " or ".join(f"target={prefix + b!r}" for b in best)
            + f" (or fix input_size {tuple(recipe.input_size)})")


def _target_and_shapes(model: nn.Module, recipe: Recipe, keep_foreign: bool,
                       notes: list[str]) -> tuple[Target, ShapeRecord]:
    """Phases 1-2. A model with a backbone and no target whose forward depends on the data
    (detection post-processing: what a real pass sees depends on the weights) is planned on
    its image backbone instead."""
    target = locate(model, recipe, keep_foreign, notes)
    auto = "" if target.path else backbone_target(model)
    try:
        record = _shape_pass(target, recipe, notes)
        if record.mode != "real" or not auto:
            return target, record
    except SurgeryError:
        if not auto:
            raise
    notes[:] = [f"{type(model).__name__} cannot be planned whole (its forward depends on the data); "
                f"planned on its image backbone {auto!r} (pass target= to choose another)"]
    target = locate(model, recipe, keep_foreign, notes, path=auto)
    return target, _shape_pass(target, recipe, notes)


def _unit_notes(units: list[Unit], target: Target, notes: list[str]) -> None:
    for u in units:
        where = target.prefix + u.path if u.path else target.label
        if u.graphs is None:
            if u.error and (u.loose_norms or u.was_block):
                notes.append(f"{where}: no graph ({u.error}); only sites after norm modules"
                             + (" and after the block" if u.was_block else ""))
            continue
        if u.guard is not None:
            notes.append(f"{where}: traced for calls like the planned one ({guard_text(u.guard)}); "
                         "a call that differs is traced again for itself")
        if "train" in u.graphs:
            notes.append(f"{where}: traces differently in train and eval mode; both rewritten")


def prepare(model: nn.Module, recipe: Recipe, keep_foreign: bool = False) -> Prepared:
    """Every planning phase; nothing of ``model`` is changed (see the module docstring)."""
    notes: list[str] = []
    with preserved(model):
        target, record = _target_and_shapes(model, recipe, keep_foreign, notes)
        smap = map_stages(target.root, record)
        stages = smap.stages
        if not stages:
            raise SurgeryError(f"{target.label}: no spatial feature maps found at input size "
                               f"{tuple(recipe.input_size)}")
        settings = stage_settings(recipe, stages, notes)
        norm_free = not any(isinstance(m, norm_types()) for m in target.root.modules())
        if norm_free:
            notes.append("no norm layers: conv sites are after conv -> activation (or the conv, if none)")
        cache: dict = {}
        units = find_units(target.root, record, set(settings), smap.by_call, cache, rewrite_root=bool(target.path))
        _unit_notes(units, target, notes)
        ctx = SiteContext(target, record, smap, units, settings, norm_free, notes, meta_cache=cache)
        chosen = select(find_candidates(ctx), settings, notes)
        rows, actions = keep_promises(ctx, *build_actions(ctx, chosen))
    p = Plan(rows, recipe, stages, target.path, record.input_shape, notes,
             left_out=list(dict.fromkeys(ctx.left_out)))
    return Prepared(p, actions, target, record.runner_module)
