"""Phase 1, the target: which module is planned, what runs it, what it already holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..graph.leaves import foreign_dropblock
from ..modules import is_inserted
from ..recipe.schema import Recipe

__all__ = ["SurgeryError", "Target", "ExampleInputs", "as_inputs", "check_model", "locate", "backbone_target",
           "existing_dropblocks"]


class SurgeryError(RuntimeError):
    """``apply_dropblock`` / ``plan`` could not do what was asked; says which module and why."""


@dataclass(frozen=True)
class Target:
    """The planned module (``root``) inside ``model``, with its path, the ancestors that can
    run it when it does not take an image itself (nearest first) and the example inputs it is
    run with (``(args, kwargs)``; None: one image of the recipe's ``input_size``)."""

    model: nn.Module
    root: nn.Module
    path: str
    runners: tuple[nn.Module, ...]
    inputs: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None

    @property
    def prefix(self) -> str:
        return f"{self.path}." if self.path else ""

    @property
    def label(self) -> str:
        return self.path or type(self.root).__name__


ExampleInputs = Any  # a tensor, a tuple of positional arguments, or (args tuple, kwargs dict)


def as_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from what ``example_inputs=`` accepts: one tensor; a tuple of
    positional arguments (a list is one argument: SlowFast takes ``[slow, fast]``); or a pair
    ``(args_tuple, kwargs_dict)``.

    Raises:
        SurgeryError: when no 4-D or 5-D tensor (an image or a clip) is among them.

    Examples:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> as_inputs(x)[0][0] is x, len(as_inputs(([x, x],))[0]), as_inputs(((x,), {"mask": None}))[1]
        (True, 1, {'mask': None})
    """
    from torch.utils._pytree import tree_leaves

    from ..graph.shapes import fresh

    if isinstance(example_inputs, torch.Tensor):
        out: tuple[tuple[Any, ...], dict[str, Any]] = ((example_inputs,), {})
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
          and isinstance(example_inputs[1], dict)):
        out = (example_inputs[0], dict(example_inputs[1]))
    elif isinstance(example_inputs, tuple):
        out = (example_inputs, {})
    else:
        raise SurgeryError(f"example_inputs: a tensor, a tuple of positional arguments or (args, kwargs), not "
                           f"{type(example_inputs).__name__} (a list is one argument: wrap it, ([a, b],))")
    out = fresh(out)  # the caller's lists stay theirs (a forward may write into its input list)
    if not any(isinstance(t, torch.Tensor) and t.dim() in (4, 5) for t in tree_leaves(out)):
        raise SurgeryError("example_inputs: no 4-D or 5-D tensor (N, C, H, W or N, C, D, H, W) among them; "
                           "strides are measured against the first one")
    return out


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
    if isinstance(model, torch.jit.ScriptModule):
        raise SurgeryError(
            f"{func}: this model is a TorchScript module (torch.jit.script or trace), which cannot be "
            f"rewritten; apply DropBlock to the Python model before scripting it")
    if not any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules()):
        raise SurgeryError(
            f"{func}: {type(model).__name__} has no Conv2d or Conv3d layer: DropBlock drops blocks of "
            f"convolutional feature maps, so it applies to CNNs (and the convolutional parts of hybrids)")


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
           path: Optional[str] = None, inputs: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None) -> Target:
    """The recipe's ``target`` (or ``path``) in ``model``; refuses foreign DropBlocks unless
    ``keep_foreign``."""
    path = (recipe.target or "") if path is None else path
    try:
        root = model.get_submodule(path) if path else model
    except AttributeError as e:
        raise SurgeryError(f"target {path!r}: no such submodule ({e})") from None
    parts = path.split(".") if path else []
    runners = tuple(model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1))
    target = Target(model, root, path, runners, inputs)
    _, foreign = existing_dropblocks(root)
    if foreign:
        where = ", ".join(target.prefix + f for f in foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        if not keep_foreign:
            raise SurgeryError(
                f"{where}: the model already has {len(foreign)} DropBlock module(s) from another library "
                f"(e.g. timm's drop_block_rate); create it without them, or pass keep_foreign=True")
        notes.append(f"the model already has {len(foreign)} foreign DropBlock module(s): {where}")
    return target
