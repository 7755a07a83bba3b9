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

from ..graph.leaves import is_conv, is_norm, looks_like_norm, norm_types, register_norm
from ..graph.meta import to_meta
from ..graph.preserve import preserved
from ..graph.shapes import Inputs, ShapeRecord, input_shape_of, record_calls
from ..graph.splice import guard_text
from ..graph.stages import map_stages
from ..graph.tracing import traces_share_one_patch
from ..graph.units import Unit, find_units
from ..recipe.schema import Recipe
from .actions import Action, build_actions
from .candidates import SiteContext, find_candidates
from .promise import keep_promises
from .rows import Plan, PlanRow
from .select import select
from .settings import RecipeLike, resolve_recipe, small_map_note, stage_settings
from .target import ExampleInputs, SurgeryError, Target, as_inputs, backbone_target, check_model, locate

__all__ = ["PlanRow", "Plan", "SurgeryError", "plan", "prepare", "Prepared", "resolve_recipe"]


@dataclass
class Prepared:
    """A plan with what apply needs to realise it (internal: holds live modules)."""

    plan: Plan
    actions: list[Action]
    target: Target
    runner: Optional[nn.Module]


def plan(model: nn.Module, recipe: RecipeLike = None, *, example_inputs: ExampleInputs = None,
         **overrides: Any) -> Plan:
    """Where ``apply_dropblock(model, recipe, **overrides)`` would put DropBlock; the model is
    not modified.

    ``example_inputs`` (as for [`apply_dropblock`][dropblock_fx.apply_dropblock]): what the
    model is run with, for a model that does not take one image of ``input_size``.

    Examples:
        >>> import torchvision
        >>> p = plan(torchvision.models.resnet50(), "paper-resnet50")
        >>> len(p.rows), p.count("shortcut"), sorted({r.stage for r in p})
        (36, 9, [3, 4])
    """
    check_model(model, "plan")
    recipe, inputs = recipe_and_inputs(recipe, example_inputs, overrides)
    return prepare(model, recipe, keep_foreign=True, inputs=inputs).plan


def recipe_and_inputs(recipe: RecipeLike, example_inputs: ExampleInputs,
                      overrides: dict[str, Any]) -> tuple[Recipe, Optional[Inputs]]:
    """The validated recipe and ``(args, kwargs)``; with example inputs, the recipe's
    ``input_size`` is their image's (first 4-D or 5-D tensor) size."""
    if example_inputs is None:
        return resolve_recipe(recipe, **overrides), None
    inputs = as_inputs(example_inputs)
    size = list(input_shape_of(inputs, 1)[1:])  # type: ignore[index]
    given = overrides.get("input_size")
    if given is not None and list(given) != size:
        raise SurgeryError(f"input_size={tuple(given)} and example_inputs (an image of {tuple(size)}) disagree; "
                           "pass one of them")
    return resolve_recipe(recipe, **{**overrides, "input_size": size}), inputs


def _shape_pass(target: Target, recipe: Recipe, notes: list[str]) -> ShapeRecord:
    try:
        with preserved(target.model):  # what the forward caches on itself must not reach tracing
            record = record_calls(target.root, tuple(recipe.input_size), target.runners, inputs=target.inputs)
    except RuntimeError as e:
        hint = _target_hint(target.root, recipe)
        if hint.startswith("input_size"):  # the real problem first, in one line
            raise SurgeryError(f"{target.label}: {hint}") from None
        raise SurgeryError(f"{target.label}: {e}; {hint}") from None
    if record.runner:
        notes.append(f"{target.path} does not take an image tensor: shapes found by running {record.runner} up to it")
    if record.mode != "meta":
        notes.append(f"shapes found with a {record.mode} forward pass (the meta pass failed)")
    return record


def _target_hint(root: nn.Module, recipe: Recipe) -> str:
    """What to pass instead: the input size when it does not fit the first conv, else the
    children holding the most convs (the image backbone is usually among them)."""
    size = tuple(recipe.input_size)
    first = next(((n, m) for n, m in root.named_modules() if is_conv(m)), None)
    if first is not None and first[1].in_channels != size[0]:
        name, conv = first
        want = (conv.in_channels, *size[1:])
        return (f"input_size {size} has {size[0]} channel(s), but the first conv ({name or type(root).__name__}) "
                f"takes {conv.in_channels}: pass input_size={want}")
    other = f"pass example_inputs= if it takes more or other than one {tuple(recipe.input_size)} image"
    counts = [(sum(is_conv(m) for m in child.modules()), name)  # a ModuleList cannot run: no target
              for name, child in root.named_children() if not isinstance(child, (nn.ModuleList, nn.ModuleDict))]
    best = [name for n, name in sorted(counts, key=lambda t: -t[0]) if n][:3]
    if not best:
        return other
    prefix = "" if not recipe.target else recipe.target + "."
    return (other + ", or target= naming its image backbone, e.g. "
            + " or ".join(f"target={prefix + b!r}" for b in best))


def _target_and_shapes(model: nn.Module, recipe: Recipe, keep_foreign: bool, notes: list[str],
                       inputs: Optional[Inputs] = None) -> tuple[Target, ShapeRecord]:
    """Phases 1-2. A model with a backbone and no target whose forward depends on the data
    (detection post-processing: what a real pass sees depends on the weights) is planned on
    its image backbone instead."""
    target = locate(model, recipe, keep_foreign, notes, inputs=inputs)
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
    target = locate(model, recipe, keep_foreign, notes, path=auto, inputs=inputs)
    return target, _shape_pass(target, recipe, notes)


def _size_warning(recipe: Recipe, settings: dict, merged: bool, notes: list[str]) -> str:
    """One line for ``apply_dropblock`` to warn with when the input is too small for the plan
    to mean what the recipe says: a selected stage's map is 1x1 or smaller than the block, or
    downsampling steps ran on 1x1 maps (the deepest stages merged, so the stages the recipe
    names moved to earlier layers); '' otherwise."""
    size = tuple(recipe.input_size)
    parts = []
    if merged:
        notes.append(f"at input_size {size} some of the model's downsampling steps ran on 1x1 maps: its deepest "
                     "stages merged into one, and the stages the recipe selects are counted from there")
        parts.append("its deepest stages merged (downsampling steps ran on 1x1 maps)")
    small = [f"{'x'.join(map(str, cfg.stage.resolution))} ({cfg.stage.name}, block {cfg.block_size})"
             for cfg in settings.values() if small_map_note(cfg, size)]
    if small:
        parts.append(f"the selected stages' maps are smaller than their blocks: {', '.join(small)}")
    if not parts:
        return ""
    return (f"dropblock_fx: input_size={size} is too small for this plan: {'; '.join(parts)}; pass the size "
            f"you train at (input_size=(C, H, W)); plan(model, ...).notes has the details")


def _recognise_norms(record: ShapeRecord, notes: list[str]) -> set[str]:
    """Register the unregistered norms the shape pass saw right after a conv (see
    ``graph.leaves.looks_like_norm``), with a note each; returns the names of other layers
    there that hold one value per channel (suspects for ``register_norm``)."""
    conv_outputs = {id(c.output) for c in record.calls if is_conv(c.module)}
    found: dict[type, str] = {}
    suspects: set[str] = set()
    for c in record.calls:
        x = c.args[0] if c.args else None
        if id(x) not in conv_outputs or is_norm(c.module) or type(c.module) in found:
            continue
        if looks_like_norm(c.module, x, c.output, after_conv=True):
            found[type(c.module)] = c.path
        elif (next(c.module.children(), None) is None and not is_conv(c.module)
              and any(t.numel() == getattr(x, "shape", (0, 0))[1] for t in c.module.parameters(recurse=False))):
            suspects.add(type(c.module).__name__)
    for cls, path in found.items():
        register_norm(cls)
        notes.append(f"{path}: {cls.__name__} is taken for a norm (named so, right after a conv, one parameter "
                     f"per channel) and registered, as register_norm({cls.__name__}) would")
    return suspects


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


def prepare(model: nn.Module, recipe: Recipe, keep_foreign: bool = False,
            inputs: Optional[Inputs] = None) -> Prepared:
    """Every planning phase; nothing of ``model`` is changed (see the module docstring)."""
    notes: list[str] = []
    with preserved(model), traces_share_one_patch():  # dozens of traces: nn.Module patched once
        target, record = _target_and_shapes(model, recipe, keep_foreign, notes, inputs)
        suspects = _recognise_norms(record, notes)
        smap = map_stages(target.root, record)
        stages = smap.stages
        if not stages:
            raise SurgeryError(f"{target.label}: no spatial feature maps found at input size "
                               f"{tuple(recipe.input_size)}")
        settings = stage_settings(recipe, stages, notes)
        warning = _size_warning(recipe, settings, smap.steps.lost > 0, notes)  # type: ignore[union-attr]
        norm_free = not any(isinstance(m, norm_types()) for m in target.root.modules())
        if norm_free:
            notes.append("no norm layers: conv sites are after conv -> activation (or the conv, if none)")
        cache: dict = {}
        units = find_units(target.root, record, set(settings), smap.by_call, cache, is_model=not target.path)
        _unit_notes(units, target, notes)
        ctx = SiteContext(target, record, smap, units, settings, norm_free, notes, meta_cache=cache)
        chosen = select(find_candidates(ctx), settings, notes)
        rows, actions = keep_promises(ctx, *build_actions(ctx, chosen))
    if not rows and suspects:
        names = ", ".join(sorted(suspects))
        notes.append(f"no site found; the layer after the convs is not a known norm ({names}): if it normalises "
                     f"per channel, register it: dropblock_fx.register_norm({sorted(suspects)[0]})")
    p = Plan(rows, recipe, stages, target.path, record.input_shape, notes,
             left_out=list(dict.fromkeys(ctx.left_out)), warning=warning,
             example_inputs=None if inputs is None else to_meta(inputs))
    return Prepared(p, actions, target, record.runner_module)
