"""What a layer is: conv, norm, activation, identity; which modules tracing treats as leaves.

Norms are an extension point: [`register_norm`][dropblock_fx.register_norm] adds a class (``with_act=True`` for
norm+activation modules such as timm's ``BatchNormAct2d``, whose output is already
activated). Leaves follow the tracers users already have: every ``torch.nn`` layer, timm's
``get_notrace_modules()``, every non-container ``torchvision.ops`` module, the registered
norms and convs, and DropBlock modules (ours and foreign ones).
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..modules import DropBlockNd

__all__ = [
    "register_norm",
    "looks_like_norm",
    "norm_types",
    "is_conv",
    "is_norm",
    "is_norm_act",
    "is_act_node",
    "is_identity",
    "is_leaf",
    "is_container",
    "is_walkable",
    "foreign_dropblock",
    "autowrap_functions",
    "CHECKPOINT_FLAGS",
    "checkpoint_flag",
    "checkpoint_functions",
]

_NORMS: dict[type, bool] = {}  # class -> output already activated
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_ACT_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Mish, nn.PReLU, nn.RReLU, nn.Softplus, nn.Hardtanh,
)
_ACT_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish,
    F.selu, F.celu, F.softplus, torch.relu, torch.relu_, torch.selu, torch.celu,
}
_ACT_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}


def register_norm(cls: type, *, with_act: bool = False) -> type:
    """Make ``cls`` a norm for site matching (``conv -> norm (-> act)``) and a tracing leaf.

    Args:
        cls: the norm module class (subclasses match too).
        with_act: the module applies its activation itself, so a site after it is after
            the activation (timm's ``BatchNormAct2d``).

    Examples:
        >>> class MyNorm(nn.GroupNorm): ...
        >>> register_norm(MyNorm) is MyNorm
        True
    """
    _NORMS[cls] = with_act
    return cls


def looks_like_norm(m: nn.Module, x: Any, out: Any, after_conv: bool) -> bool:
    """Does ``m``, called on ``x`` (returning ``out``), do what a per-channel norm does, though
    it is not registered (kornia's ``FilterResponseNorm2d``)? A module without children whose
    class name says norm, right after a conv, that returns a map of its input's shape and holds
    parameters or buffers of one value per channel.

    Examples:
        >>> class FilterNorm(nn.Module):
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> x = torch.zeros(1, 8, 4, 4)
        >>> looks_like_norm(FilterNorm(8), x, x, after_conv=True), looks_like_norm(nn.Identity(), x, x, after_conv=True)
        (True, False)
    """
    if not after_conv or is_norm(m) or next(m.children(), None) is not None or "norm" not in type(m).__name__.lower():
        return False
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dim() in (4, 5) and x.shape == out.shape):
        return False
    channels = x.shape[1]
    tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    return any(t.numel() == channels for t in tensors)


def norm_types() -> tuple[type, ...]:
    _extras()
    return tuple(_NORMS)


_LOADED: set[str] = set()
_TIMM_LEAVES: set[type] = set()
_AUTOWRAP: list[Any] = []
_FOREIGN: list[type] = []


def _extras() -> None:
    """Norms, leaves and DropBlocks of torchvision and timm, once those are imported.

    Importing timm costs seconds, so this never imports a library itself: a model from it can
    only exist once it is loaded, and every predicate here calls this first.
    """
    if "torchvision" in sys.modules and "torchvision" not in _LOADED:
        _LOADED.add("torchvision")
        try:
            from torchvision.ops import DropBlock2d as TvDropBlock2d, DropBlock3d as TvDropBlock3d, FrozenBatchNorm2d

            register_norm(FrozenBatchNorm2d)
            _FOREIGN.extend([TvDropBlock2d, TvDropBlock3d])
        except Exception:  # pragma: no cover - a broken torchvision must not break planning
            pass
    if "timm" in sys.modules and "timm" not in _LOADED:
        _LOADED.add("timm")
        try:
            from timm.layers import DropBlock2d as TimmDropBlock2d, get_notrace_functions, get_notrace_modules
            from timm.layers import norm, norm_act

            for name in ("LayerNorm2d", "LayerNorm", "GroupNorm", "GroupNorm1", "RmsNorm2d"):
                if hasattr(norm, name):
                    register_norm(getattr(norm, name))
            for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "GroupNormAct",
                         "GroupNorm1Act", "LayerNormAct", "LayerNormAct2d"):
                if hasattr(norm_act, name):
                    register_norm(getattr(norm_act, name), with_act=True)
            _TIMM_LEAVES.update(get_notrace_modules())
            _AUTOWRAP.extend(get_notrace_functions())
            _FOREIGN.append(TimmDropBlock2d)
        except Exception:  # pragma: no cover
            pass


for _cls in (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
             nn.InstanceNorm3d, nn.LayerNorm):
    register_norm(_cls)


def autowrap_functions() -> tuple[Any, ...]:
    """Functions tracing keeps as single calls (timm's ``get_notrace_functions()``)."""
    _extras()
    return tuple(_AUTOWRAP)


# A module with one of these boolean attributes switches gradient checkpointing in its forward
# (timm's set_grad_checkpointing, Hugging Face's gradient_checkpointing_enable).
CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


def checkpoint_flag(m: nn.Module) -> Optional[str]:
    """The name of ``m``'s own gradient-checkpointing switch, if it has one."""
    return next((f for f in CHECKPOINT_FLAGS if isinstance(m.__dict__.get(f), bool)), None)


def checkpoint_functions() -> tuple[Any, ...]:
    """The functions that run a module under gradient checkpointing: kept as single calls when
    a forward is traced with checkpointing on, so the rewritten forward still checkpoints."""
    import torch.utils.checkpoint as cp

    found: list[Any] = [cp.checkpoint, cp.checkpoint_sequential]
    if "timm" in sys.modules:
        try:
            from timm.models import _manipulate

            found += [getattr(_manipulate, n) for n in ("checkpoint", "checkpoint_seq") if hasattr(_manipulate, n)]
        except Exception:  # pragma: no cover - a broken timm must not break planning
            pass
    return tuple(found)


def foreign_dropblock(m: nn.Module) -> bool:
    """A DropBlock module from another library (timm, torchvision, the ``dropblock`` package)."""
    _extras()
    if isinstance(m, tuple(_FOREIGN)):
        return True
    cls = type(m)
    return cls.__name__.startswith("DropBlock") and not isinstance(m, DropBlockNd)


def is_conv(m: Any) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Conv3d))


def is_norm(m: Any) -> bool:
    _extras()
    return isinstance(m, tuple(_NORMS))


def is_norm_act(m: Any) -> bool:
    _extras()
    return any(isinstance(m, cls) and act for cls, act in _NORMS.items())


def is_identity(m: Any) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0.0)


def is_act_module(m: Any) -> bool:
    """An activation layer (torch's, or timm's own classes)."""
    if isinstance(m, _ACT_MODULES):
        return True
    return type(m).__module__.startswith("timm.layers.activations")


def is_act_node(node: fx.Node, root: nn.Module) -> bool:
    """An activation call (module, function or method) in a traced graph."""
    if node.op == "call_module":
        return is_act_module(root.get_submodule(node.target))
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    return False


def is_container(m: nn.Module) -> bool:
    """A plain container: its children are called by someone else (or in sequence)."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and type(m).forward is nn.Module.forward:
        return True
    return type(m) in (nn.Sequential,)


def is_leaf(m: nn.Module) -> bool:
    """Never traced into by this library (see module docstring)."""
    _extras()
    if isinstance(m, DropBlockNd) or foreign_dropblock(m):
        return True
    if is_conv(m) or is_norm(m) or is_act_module(m):
        return True
    if type(m) in _TIMM_LEAVES:
        return True
    mod = type(m).__module__
    if isinstance(m, _CONTAINERS):
        return False
    if mod.startswith(("torch.nn", "torch.ao.nn", "torchvision.ops")):
        return True
    return False



def is_walkable(m: nn.Module) -> bool:
    """A module to look inside for units: not a leaf, or a composite timm no-trace module
    (``NormFreeBlock``: other tracers must not enter it, but it can be a unit of its own)."""
    if not is_leaf(m):
        return True
    return type(m) in _TIMM_LEAVES and not (is_norm(m) or is_conv(m)) and next(m.children(), None) is not None
