"""``apply_dropblock``, ``remove_dropblock``, ``describe``: the plan, applied atomically."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

from torch import nn

from ..graph.splice import unsplice
from ..modules import DropBlockNd, is_inserted
from .actions import Action, new_dropblock
from .exact import check_verify, exact_check
from .plan import Plan, PlanRow, prepare, recipe_and_inputs
from .realise import realise
from .resolution import ResolutionWatch, with_seen_resolutions
from .settings import RecipeLike, resolve_recipe
from .target import ExampleInputs, SurgeryError, check_model, existing_dropblocks

__all__ = ["apply_dropblock", "remove_dropblock", "describe"]


def _make(row: PlanRow, scheduled: Any, parent: nn.Module, watch: Optional[ResolutionWatch]) -> DropBlockNd:
    m = new_dropblock(row, parent.training)
    m.schedule_pending = scheduled
    if watch is not None and m.placement is not None and m.placement.resolution:
        m.resolution_watch = watch
    return m


def _has_ours(model: nn.Module) -> bool:
    return getattr(model, "dropblock_plan", None) is not None or any(is_inserted(m) for m in model.modules())


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
            old = getattr(model, "dropblock_plan", None)
            what = f" (recipe {old.recipe.name!r})" if old is not None and old.recipe.name else ""
            raise SurgeryError(f"{type(model).__name__}: DropBlock was already applied{what}; call "
                               "remove_dropblock(model) first, or pass replace=True")
        previous = getattr(model, "dropblock_plan", None)
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
    # one marker for the whole model: it warns once if it trains before attach_schedule
    from ..schedule.pending import PendingSchedule

    scheduled = PendingSchedule() if p.recipe.schedule is not None else False
    # one watch for the whole model too: it warns once if it trains on maps of another size
    watch = ResolutionWatch(tuple(p.recipe.input_size))
    undo = realise(actions, lambda row, act: _make(row, scheduled, act.module, None if act.varying else watch))
    try:
        if p.rows:
            model.dropblock_plan = p
    except Exception:
        undo()
        raise


def remove_dropblock(model: nn.Module) -> nn.Module:
    """Undo [`apply_dropblock`][dropblock_fx.apply_dropblock]: no DropBlock left, original module classes, same outputs.

    Examples:
        >>> import torchvision
        >>> m = remove_dropblock(torchvision.models.resnet18())   # nothing to undo: no-op
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_dropblock(model): model must be a torch.nn.Module, not {type(model).__name__}")
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
    p = getattr(model, "dropblock_plan", None)
    if p is None:
        ours, foreign = existing_dropblocks(model)
        extra = f" (it has {len(foreign)} foreign DropBlock modules)" if foreign else ""
        raise SurgeryError(f"{type(model).__name__}: no DropBlock plan; call apply_dropblock first{extra}")
    return with_seen_resolutions(p, model)
