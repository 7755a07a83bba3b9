"""``DropBlock2d`` / ``DropBlock3d``: parameter-free modules around [`drop_block`][dropblock_fx.drop_block].

Two properties the rest of the library relies on:

* ``drop_prob`` can change every step (schedules do) without recompiling under
  ``torch.compile``: it lives in a non-persistent 0-d buffer that the setter updates
  in place, so ``state_dict()`` is unchanged and compiled graphs read the new value.
* The modules survive FX tracing by any tracer: when called on a ``torch.fx.Proxy`` they
  record themselves as one ``call_module`` node, so the traced model still obeys
  ``train()`` / ``eval()`` (timm's DropBlock breaks tracing; torchvision's freezes
  ``training=True`` into the trace).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx
from torch import nn

from .op.functional import (
    BlockSize,
    _drop_block_train,
    check_drop_prob,
    check_options,
    normalize_block_size,
)

__all__ = ["DropBlock2d", "DropBlock3d", "DropBlockNd", "Placement", "OP_OPTIONS", "is_inserted"]

# The op options a recipe sets and a DropBlock module takes, by keyword (see drop_block).
OP_OPTIONS = ("mask", "seed_region", "gamma_scale", "scale", "noise", "calibrate")


@dataclass(frozen=True)
class Placement:
    """Where surgery put a DropBlock module: its stage, site kind and rate at full strength,
    its path in the model and the feature map it was planned for.

    The contract between surgery (which sets ``module.placement``), schedules (which scale
    ``target_drop_prob``) and ``remove_dropblock`` (which removes what [`is_inserted`][dropblock_fx.modules.is_inserted]).
    ``resolution`` is the spatial size of the module's input at the recipe's ``input_size``
    (``()``: unknown, nothing is compared).

    Examples:
        >>> Placement(4, "conv", 0.1, path="layer4.0.dropblock_conv1", resolution=(7, 7)).resolution
        (7, 7)
    """

    stage: int
    site: str
    target_drop_prob: float
    path: str = ""
    resolution: tuple[int, ...] = ()


def is_inserted(m: object) -> bool:
    """Was ``m`` inserted by ``apply_dropblock`` (and so removed by ``remove_dropblock``)?

    Examples:
        >>> is_inserted(DropBlock2d(0.1, 3))
        False
    """
    return isinstance(m, DropBlockNd) and getattr(m, "placement", None) is not None


# What a scheduled module does when it trains with no schedule attached: the schedule layer
# installs it (dropblock_fx.schedule.pending owns the warning and its once-per-model state).
_unscheduled_handler: Optional[Callable[[object], None]] = None


def set_unscheduled_handler(handler: Optional[Callable[[object], None]]) -> None:
    """Install ``handler(mark)``, called by a module marked ``schedule_pending`` when it runs a
    training forward (``mark`` is the module's ``schedule_pending`` value)."""
    global _unscheduled_handler
    _unscheduled_handler = handler


# What an inserted module calls when a training forward's feature map differs from its
# planned one: surgery gives the modules of one apply_dropblock call one shared watch, which
# warns once for the whole model.
ResolutionHandler = Callable[["DropBlockNd", tuple[int, ...]], None]


def __getattr__(name: str) -> Any:
    # The marker moved to the schedule layer; this path still resolves (and old pickles load).
    if name == "PendingSchedule":
        from .schedule.pending import PendingSchedule

        return PendingSchedule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DropBlockNd(nn.Module):
    """Base class of [`DropBlock2d`][dropblock_fx.DropBlock2d] and [`DropBlock3d`][dropblock_fx.DropBlock3d]; see [`drop_block`][dropblock_fx.drop_block]."""

    n_spatial: int = 2
    # Class defaults too: modules pickled before these attributes existed still run.
    resolution_watch: Optional[ResolutionHandler] = None
    seen_resolution: Optional[tuple[int, ...]] = None

    def __init__(
        self,
        drop_prob: float = 0.1,
        block_size: BlockSize = 7,
        *,
        mask: str = "channel",
        seed_region: str = "valid",
        gamma_scale: float = 1.0,
        scale: str = "count",
        noise: bool = False,
        calibrate: bool = False,
        inplace: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _register_timm_leaves()
        p = check_drop_prob(drop_prob)
        normalize_block_size(block_size, self.n_spatial)
        check_options(mask, seed_region, scale, gamma_scale, noise, calibrate, inplace)
        self.block_size = block_size
        self.mask = mask
        self.seed_region = seed_region
        self.gamma_scale = float(gamma_scale)
        self.scale = scale
        self.noise = noise
        self.calibrate = calibrate
        self.inplace = inplace
        self.generator = generator
        self._drop_prob = p
        self.placement: Optional[Placement] = None  # set by surgery (see is_inserted)
        # The rate at full strength, which schedules scale (surgery sets it from the recipe;
        # attach_schedule takes drop_prob for a module built by hand).
        self.target_drop_prob: Optional[float] = None
        # Set by surgery when the recipe has a schedule, cleared by attach_schedule: a
        # scheduled recipe must never silently train at its final rate.
        self.schedule_pending = False
        # Set by surgery: called when a training forward's map differs from
        # placement.resolution, which is then recorded in seen_resolution (describe reads it).
        self.resolution_watch: Optional[ResolutionHandler] = None
        self.seen_resolution: Optional[tuple[int, ...]] = None
        # Non-persistent: invisible to state_dict(), so weights load strictly both ways.
        self.register_buffer("drop_prob_tensor", torch.tensor(p, dtype=torch.float32), persistent=False)

    @property
    def drop_prob(self) -> float:
        """Current drop probability (set it at any time; compiled graphs pick it up)."""
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        p = check_drop_prob(value)
        self._drop_prob = p
        with torch.no_grad():
            self.drop_prob_tensor.fill_(p)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.half() / .to(bfloat16) would round the rate (0.1 -> 0.10009765625 in bf16);
        # keep the rate buffer in fp32 and refill it from the exact Python value.
        super()._apply(fn, recurse)
        t = self.drop_prob_tensor
        if t.dtype != torch.float32:
            self.drop_prob_tensor = torch.tensor(self._drop_prob, dtype=torch.float32, device=t.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            # Any FX tracer: appear as one leaf call so train()/eval() still applies to the trace.
            tracer = x.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
        if x.dim() != self.n_spatial + 2:
            raise ValueError(
                f"{type(self).__name__} expects a {self.n_spatial + 2}-D input, got shape {tuple(x.shape)}"
            )
        if torch.compiler.is_compiling():
            if not self.training:
                return x
            p: float | torch.Tensor = self.drop_prob_tensor
        else:
            if not self.training:
                return x
            watch = self.resolution_watch
            if watch is not None and x.shape[2:] != self.placement.resolution:  # type: ignore[union-attr]
                self._saw_resolution(tuple(x.shape[2:]), watch)
            if self._drop_prob == 0.0:
                return x
            if self.schedule_pending and _unscheduled_handler is not None:
                _unscheduled_handler(self.schedule_pending)
            p = self._drop_prob
        return _drop_block_train(
            x, p, normalize_block_size(self.block_size, self.n_spatial), self.mask, self.seed_region,
            self.gamma_scale, self.scale, self.noise, self.calibrate, self.inplace, self.generator,
        )

    def _saw_resolution(self, seen: tuple[int, ...], watch: ResolutionHandler) -> None:
        # Only on a mismatch; the matching path above allocates nothing beyond the compare.
        if not self.placement.resolution or seen == self.seen_resolution:  # type: ignore[union-attr]
            return
        self.seen_resolution = seen
        watch(self, seen)

    def extra_repr(self) -> str:
        parts = [f"drop_prob={self._drop_prob:g}", f"block_size={self.block_size}"]
        defaults: dict[str, Any] = dict(
            mask="channel", seed_region="valid", gamma_scale=1.0, scale="count",
            noise=False, calibrate=False, inplace=False,
        )
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


class DropBlock2d(DropBlockNd):
    """DropBlock for ``(N, C, H, W)`` feature maps (paper defaults; options as [`drop_block`][dropblock_fx.drop_block]).

    Examples:
        >>> m = DropBlock2d(drop_prob=0.1, block_size=7)
        >>> m
        DropBlock2d(drop_prob=0.1, block_size=7)
        >>> m.drop_prob = 0.05      # schedules do this every step
        >>> m.eval()(torch.ones(1, 4, 14, 14)).sum().item()
        784.0
    """

    n_spatial = 2


class DropBlock3d(DropBlockNd):
    """DropBlock for ``(N, C, D, H, W)`` feature maps (video / volumetric CNNs).

    Examples:
        >>> m = DropBlock3d(drop_prob=0.1, block_size=3)
        >>> m(torch.randn(2, 4, 8, 14, 14)).shape
        torch.Size([2, 4, 8, 14, 14])
    """

    n_spatial = 3


_timm_registered = False


def _register_timm_leaves() -> None:
    """Register the modules as timm no-trace leaves, if timm is loaded.

    Importing timm costs seconds, so this never imports it: it runs at import when timm is
    already loaded and again whenever a module is built. (Tracing works without it: the
    modules record themselves as leaf calls under any FX tracer.)
    """
    global _timm_registered
    if _timm_registered or "timm" not in sys.modules:
        return
    try:
        from timm.layers import register_notrace_module
    except Exception:  # pragma: no cover - a broken timm must not break the op
        return
    for cls in (DropBlock2d, DropBlock3d):
        register_notrace_module(cls)
    _timm_registered = True


_register_timm_leaves()
