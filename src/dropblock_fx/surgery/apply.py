"""``apply_dropblock``, ``remove_dropblock``, ``describe``, ``plan_of``: the plan, applied atomically.

Each module apply inserts gets its contract in one object, its `Placement`: the row's
stage, site, rate and planned map, the recipe's schedule, and the one `ModelWatch` the
modules of this call share. The applied plan is kept at ``model.dropblock_plan``
([`plan_of`][dropblock_fx.plan_of] reads it).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from ..graph.splice import unsplice
from ..modules import DropBlock2d, DropBlock3d, DropBlockNd, Placement, is_inserted
from ..recipe import RecipeLike
from .actions import Action
from .exact import check_verify, exact_check
from .plan import Plan, PlanRow, prepare, recipe_and_inputs
from .realise import realise
from .resolution import with_seen_resolutions
from .target import ExampleInputs, SurgeryError, check_model, existing_dropblocks
from .watch import ModelWatch

__all__ = ["apply_dropblock", "remove_dropblock", "describe", "plan_of"]


def _make(row: PlanRow, p: Plan, watch: ModelWatch, parent: nn.Module, varying: bool) -> DropBlockNd:
    """The module of ``row``, with its contract. A module called at several maps in the
    planned forward (``varying``: a head shared by FPN levels) has no one map to compare."""
    cls = DropBlock3d if len(row.resolution) == 3 else DropBlock2d
    m = cls.from_options(row.target_drop_prob, row.options)
    m.placement = Placement(row.stage, row.kind, row.target_drop_prob, row.path,
                            () if varying else tuple(row.resolution), p.recipe.schedule, watch,
                            owns_input=row.owns_input, before_relu=row.before_relu)
    return m.train(parent.training)


def plan_of(model: nn.Module) -> Optional[Plan]:
    """The plan [`apply_dropblock`][dropblock_fx.apply_dropblock] applied to ``model``, or ``None`` (use [`describe`][dropblock_fx.describe]
    for what training saw, too).

    Examples:
        >>> import torchvision
        >>> m = torchvision.models.resnet18()
        >>> plan_of(m) is None
        True
        >>> plan_of(apply_dropblock(m, stages=[4])).count("conv")
        2
    """
    p = model.__dict__.get("dropblock_plan") if isinstance(model, nn.Module) else None
    return p if isinstance(p, Plan) else None


def _has_ours(model: nn.Module) -> bool:
    return plan_of(model) is not None or any(is_inserted(m) for m in model.modules())


def apply_dropblock(model: nn.Module, recipe: RecipeLike = None, *, replace: bool = False,
                    keep_foreign: bool = False, verify: str = "graph", example_inputs: ExampleInputs = None,
                    **overrides: Any) -> nn.Module:
    """Insert DropBlock modules where ``recipe`` says; modifies ``model`` in place and returns it.

    Args:
        model: any CNN (timm, torchvision, your own). Its class, methods, ``state_dict`` and
            eval outputs are unchanged.
        recipe: a built-in recipe name, a YAML path, a dict, a ``Recipe``, or None for the
            default (last two stages, paper settings).
        replace: the model already went through ``apply_dropblock``: remove that first
            (without it, applying twice is an error).
        keep_foreign: the model has DropBlock modules of another library (timm's
            ``drop_block_rate``): keep them and add these (without it, an error).
        verify: ``"graph"`` (always done): every rewritten module is checked against the
            original on meta tensors before anything is changed, and one that fails keeps
            its original forward (a plan note says why). ``"exact"``: also run the model
            once on a real random input in eval mode before and after, and undo everything
            unless the outputs are bit-identical (costs two forward passes).
        example_inputs: what the model is run with to find its stages and check the plan,
            when it does not take one image of ``input_size``: one tensor, a tuple of
            positional arguments (a list is one argument: SlowFast takes ``([slow, fast],)``)
            or ``(args, kwargs)``. Strides are measured against its first 4-D or 5-D tensor,
            whose size becomes the recipe's ``input_size``; any batch size.
        **overrides: recipe fields applied on top (``drop_prob=0.2``, ``stages=[4]``,
            ``target="backbone.body"``).

    Raises:
        SurgeryError: naming the module and the reason; the model is then unchanged.

    Examples:
        >>> import torchvision, dropblock_fx as dbx
        >>> m = dbx.apply_dropblock(torchvision.models.resnet50(), "paper-resnet50")
        >>> len(dbx.describe(m).rows)
        36
        >>> m = dbx.apply_dropblock(torchvision.models.resnet18(), stages=[4], verify="exact")
        >>> paths = [r.path for r in dbx.describe(m).rows]
        >>> paths[0], paths[1]
        ('layer4.0.dropblock_conv1', 'layer4.0.dropblock_conv_last')
    """
    check_model(model, "apply_dropblock")
    check_verify(verify)
    rec, inputs = recipe_and_inputs(recipe, example_inputs, overrides)
    previous: Optional[Plan] = None
    if _has_ours(model):
        if not replace:
            old = plan_of(model)
            what = f" (recipe {old.recipe.name!r})" if old is not None and old.recipe.name else ""
            raise SurgeryError(f"{type(model).__name__}: DropBlock was already applied{what}; call "
                               "remove_dropblock(model) first, or pass replace=True")
        previous = plan_of(model)
        remove_dropblock(model)
    try:
        prep = prepare(model, rec, keep_foreign=keep_foreign, inputs=inputs)
        p = prep.plan
        if verify == "exact":
            exact_check(prep.target, prep.runner or prep.target.root, p.input_shape,
                        lambda: _apply_actions(model, p, prep.actions), lambda: remove_dropblock(model))
        else:
            _apply_actions(model, p, prep.actions)
        if not p.rows:  # nothing inserted, no plan kept: a corrected call works
            why = p.notes[-1] if p.notes else "no site of the recipe's kinds in its stages"
            warnings.warn(f"apply_dropblock: nothing inserted in {type(model).__name__} ({why[:200]}); "
                          "plan(model, ...) shows every note", UserWarning, stacklevel=2)
        elif p.warning:
            warnings.warn(p.warning, UserWarning, stacklevel=2)
    except Exception:
        if previous is not None:  # put the previous plan back: the model is as it was
            old = prepare(model, previous.recipe, keep_foreign=True, inputs=previous.example_inputs)
            _apply_actions(model, old.plan, old.actions)
        raise
    return model


def _apply_actions(model: nn.Module, p: Plan, actions: list[Action]) -> None:
    # one watch for the whole model: it warns once if it trains before attach_schedule, and
    # once if it trains on maps of another size
    watch = ModelWatch(tuple(p.recipe.input_size))
    undo = realise(actions, lambda row, act: _make(row, p, watch, act.module, act.varying))
    try:
        if p.rows:
            model.dropblock_plan = p
    except Exception:
        undo()
        raise


def remove_dropblock(model: nn.Module) -> nn.Module:
    """Undo [`apply_dropblock`][dropblock_fx.apply_dropblock]: no DropBlock left, original module classes, same outputs.
    The schedule that drove the removed modules lets them go, and is unhooked once it drives
    none (its optimizer or forward hook stops counting).

    Examples:
        >>> import torchvision
        >>> m = remove_dropblock(torchvision.models.resnet18())   # nothing to undo: no-op
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_dropblock(model): model must be a torch.nn.Module, not {type(model).__name__}")
    inserted = [m for m in model.modules() if is_inserted(m)]
    for sched in {id(m.schedule): m.schedule for m in inserted if m.schedule is not None}.values():
        sched.release(inserted)
    for m in list(model.modules()):
        for name, child in list(m._modules.items()):
            if is_inserted(child):
                replaced = child.__dict__.get("_dropblock_replaced")
                if replaced is not None:
                    m._modules[name] = replaced
                else:
                    del m._modules[name]
        unsplice(m)
    model.__dict__.pop("dropblock_plan", None)
    return model


def describe(model: nn.Module) -> Plan:
    """The plan of a model modified by [`apply_dropblock`][dropblock_fx.apply_dropblock] (``print`` it for a table).

    When the model trained on feature maps of another size than the plan's (images of
    another size than the recipe's ``input_size``), the rows of the modules concerned also
    give the map seen, the block size clipped to it and the expected rate there
    (``seen_resolution``, ``seen_block_size``, ``seen_expected_drop_prob``).

    Raises:
        SurgeryError: the model has no DropBlock plan.

    Examples:
        >>> import torchvision
        >>> m = apply_dropblock(torchvision.models.resnet18(), stages=[4])
        >>> p = describe(m)
        >>> p.count("conv"), p.stages[-1].name, p.rows[0].mechanism
        (2, 'layer4', 'graph')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"describe(model): model must be a torch.nn.Module, not {type(model).__name__}")
    p = plan_of(model)
    if p is None:
        ours, foreign = existing_dropblocks(model)
        extra = f" (it has {len(foreign)} foreign DropBlock modules)" if foreign else ""
        raise SurgeryError(f"{type(model).__name__}: no DropBlock plan; call apply_dropblock first{extra}")
    return with_seen_resolutions(p, model)
