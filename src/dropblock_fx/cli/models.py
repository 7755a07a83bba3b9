"""Model specs on the command line: ``resnet50`` (timm), ``torchvision:resnet50``,
``package.module:attr`` or ``path/to/file.py:attr`` (a module instance, a class or a factory)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import closest

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_model", "MODEL_HELP"]

MODEL_HELP = (
    "a timm name (resnet50, hf-hub:... and local-dir:... too), torchvision:NAME, or "
    "package.module:attr / path/to/file.py:attr (an nn.Module, a class or a function returning one)"
)

_TIMM_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:", "timm:")


def load_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build the model a command-line spec names (``kwargs`` go to timm / torchvision builders).

    Examples:
        >>> type(load_model("torchvision:resnet18")).__name__
        'ResNet'
    """
    from torch import nn

    spec = spec.strip()
    if not spec:
        raise ValueError("empty model name")
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        from ..integrations.torchvision import model_task

        task = model_task(name)  # a clear error for unknown names
        if task in ("detection", "segmentation"):
            kwargs.setdefault("weights_backbone", None)  # never download
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if spec.startswith(_TIMM_SOURCES) or ":" not in spec:
        import timm

        name = spec[len("timm:"):] if spec.startswith("timm:") else spec
        if ":" not in name and not timm.is_model(name):
            hint = closest(name, timm.list_models())
            raise ValueError(f"timm has no model {name!r}{hint} (torchvision models: torchvision:NAME)")
        return timm.create_model(name, pretrained=False, **kwargs)
    where, attr = spec.rsplit(":", 1)
    obj = _import_attr(where, attr)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        model = obj()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec}: calling it gave a {type(model).__name__}, not an nn.Module")
        return model
    raise ValueError(f"{spec}: {type(obj).__name__} is neither an nn.Module nor a callable that builds one")


def _import_attr(where: str, attr: str) -> Any:
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise FileNotFoundError(f"no such file: {where}")
        name = "_dropblock_fx_user_" + os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: the user's own package
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f"cannot import {where!r} ({e}); is it installed or in the current directory?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ValueError(f"{where} has no attribute {part!r}{closest(part, names)}")
        obj = getattr(obj, part)
    return obj
