"""Phase 1, the target: which module is planned, what runs it, what it already holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..graph.leaves import foreign_dropblock
from ..modules import is_inserted
from ..recipe.schema import Recipe

__all__ = ["SurgeryError", "Target", "check_model", "locate", "backbone_target", "existing_dropblocks"]


class SurgeryError(RuntimeError):
    """``apply_dropblock`` / ``plan`` could not do what was asked; says which module and why."""


@dataclass(frozen=True)
class Target:
    """The planned module (``root``) inside ``model``, with its path and the ancestors that can
    run it when it does not take an image itself (nearest first)."""

    model: nn.Module
    root: nn.Module
    path: str
    runners: tuple[nn.Module, ...]

    @property
    def prefix(self) -> str:
        return f"{self.path}." if self.path else ""

    @property
    def label(self) -> str:
        return self.path or type(self.root).__name__


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


def existing_dropblocks(model: nn.Module) -> tuple[list[str], list[str]]:
    """Paths of the DropBlock modules surgery inserted and of foreign ones (timm, torchvision)."""
    ours, foreign = [], []
    for name, m in model.named_modules():
        if is_inserted(m):
            ours.append(name)
        elif foreign_dropblock(m):
            foreign.append(name)
    return ours, foreign


def backbone_target(model: nn.Module) -> str:
    """The image backbone of a detection or segmentation model: ``backbone.body`` (the CNN
    inside a torchvision FPN backbone), ``backbone.features`` (the base network of an SSD
    feature extractor, without its ``extra`` layers), else ``backbone``; ``""`` when it has none.

    Examples:
        >>> import torchvision
        >>> backbone_target(torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights_backbone=None))
        'backbone.features'
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return ""
    if isinstance(getattr(backbone, "body", None), nn.Module):
        return "backbone.body"
    if all(isinstance(getattr(backbone, n, None), nn.Module) for n in ("features", "extra")):
        return "backbone.features"
    return "backbone"


def locate(model: nn.Module, recipe: Recipe, keep_foreign: bool, notes: list[str],
           path: Optional[str] = None) -> Target:
    """The recipe's ``target`` (or ``path``) in ``model``; refuses foreign DropBlocks unless
    ``keep_foreign``."""
    path = (recipe.target or "") if path is None else path
    try:
        root = model.get_submodule(path) if path else model
    except AttributeError as e:
        raise SurgeryError(f"target {path!r}: no such submodule ({e})") from None
    parts = path.split(".") if path else []
    runners = tuple(model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1))
    target = Target(model, root, path, runners)
    _, foreign = existing_dropblocks(root)
    if foreign:
        where = ", ".join(target.prefix + f for f in foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        if not keep_foreign:
            raise SurgeryError(
                f"{where}: the model already has {len(foreign)} DropBlock module(s) from another library "
                f"(e.g. timm's drop_block_rate); create it without them, or pass keep_foreign=True")
        notes.append(f"the model already has {len(foreign)} foreign DropBlock module(s): {where}")
    return target
