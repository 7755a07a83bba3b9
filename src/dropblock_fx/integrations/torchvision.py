"""torchvision integration: ``get_model`` with a recipe.

Classification and video models are rewritten whole. Detection and segmentation models
cannot be traced whole, and the paper puts DropBlock in their backbone, so the recipe is
applied to a submodule: ``backbone.body`` (the ResNet / MobileNet inside an FPN backbone),
``backbone.features`` (SSD's base network, without its extra layers), else ``backbone``
(segmentation). A recipe's own ``target`` (``ppyolo-neck``:
``backbone.fpn``) or an explicit ``target=`` wins.

Examples:
    >>> import dropblock_fx.torchvision as dbtv
    >>> m = dbtv.get_model("resnet50", recipe="paper-resnet50")                       # doctest: +SKIP
    >>> det = dbtv.get_model("retinanet_resnet50_fpn", recipe="retinanet-coco",
    ...                      weights_backbone=None)                                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
import torchvision
from torch import nn

from ..errors import closest
from ..recipe import RecipeLike, load_recipe

__all__ = ["get_model", "default_target", "model_task"]


def model_task(name: str) -> str:
    """``"classification"``, ``"detection"``, ``"segmentation"``, ``"video"``,
    ``"optical_flow"`` or ``"quantization"`` for a torchvision model name."""
    models = torchvision.models
    for task in ("detection", "segmentation", "video", "optical_flow", "quantization"):
        module = getattr(models, task, None)
        if module is not None and name.lower() in models.list_models(module=module):
            return task
    if name.lower() in models.list_models():
        return "classification"
    raise ValueError(f"torchvision has no model {name!r}{closest(name.lower(), models.list_models())}")


def default_target(model: nn.Module, task: str) -> str:
    """The submodule a recipe is applied to by default (``""`` = the whole model)."""
    from ..surgery.target import backbone_target

    return backbone_target(model) if task in ("detection", "segmentation") else ""


def get_model(
    name: str,
    recipe: RecipeLike = None,
    weights: Any = None,
    *,
    target: Optional[str] = None,
    checkpoint_path: Union[str, "os.PathLike[str]", None] = None,
    recipe_overrides: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``torchvision.models.get_model`` followed by ``apply_dropblock``.

    Args:
        name: a torchvision model name (``torchvision.models.list_models()``).
        recipe: a built-in recipe name, a YAML path, a dict or a ``Recipe``; default
            ``"last-two-stages"``.
        weights: torchvision's ``weights`` (an enum, its name, or ``None``); loaded before
            the recipe is applied.
        target: the submodule to modify; default: the recipe's ``target``, else the
            backbone of detection (``backbone.body`` / ``backbone``) and segmentation
            models, else the whole model.
        checkpoint_path: a local ``state_dict`` file (or a checkpoint with ``state_dict`` /
            ``model``) loaded strictly before the recipe is applied.
        recipe_overrides: recipe fields set on top (``{"drop_prob": 0.2}``).
        **kwargs: everything the model builder takes (``num_classes``, ``weights_backbone``, ...).

    Examples:
        >>> m = get_model("resnet18", "paper-resnet50", num_classes=10)   # doctest: +SKIP
    """
    task = model_task(name)
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    rec = load_recipe(recipe)
    overrides = dict(recipe_overrides or {})
    if target is not None:
        overrides["target"] = target
    elif rec.target is None and "target" not in overrides:
        t = default_target(model, task)
        if t:
            overrides["target"] = t
    from ..surgery import apply_dropblock

    return apply_dropblock(model, rec, **overrides)


def load_checkpoint(model: nn.Module, path: Union[str, "os.PathLike[str]"]) -> None:
    """Load a local ``state_dict`` (or ``{"state_dict": ...}`` / ``{"model": ...}``) strictly."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    model.load_state_dict(state, strict=True)
