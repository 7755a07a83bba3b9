"""``DropBlock2d`` / ``DropBlock3d``: parameter-free modules around [`drop_block`][dropblock_fx.drop_block].

Properties the rest of the library relies on:

* ``drop_prob`` can change every step (schedules do) without recompiling under
  ``torch.compile``: it lives in a non-persistent 0-d buffer that the setter updates
  in place, so ``state_dict()`` is unchanged and compiled graphs read the new value.
* The modules survive FX tracing by any tracer: when called on a ``torch.fx.Proxy`` they
  record themselves as one ``call_module`` node, so the traced model still obeys
  ``train()`` / ``eval()`` (timm's DropBlock breaks tracing; torchvision's freezes
  ``training=True`` into the trace).
* They script (``torch.jit.script``), and work under ``torch.func`` (``grad``, ``jvp``,
  ``vmap``, ``functional_call`` with a ``drop_prob_tensor`` of your own).

What surgery tells a module it inserts is one object, its `Placement`; what drives its
rate is the schedule at ``module.schedule`` (set by ``attach_schedule``).
"""

# No ``from __future__ import annotations``: TorchScript reads the class annotation of
# ``_options`` as a type, not as a string.
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.fx
from torch import nn

from .op.functional import drop_block_train
from .op.options import BlockSize, DropBlockOptions, OptionFields, check_drop_prob, normalize_block_size

__all__ = ["DropBlock2d", "DropBlock3d", "DropBlockNd", "Placement", "TrainWatch", "is_inserted",
           "writable_norm_output"]


@runtime_checkable
class TrainWatch(Protocol):
    """What an inserted module reports from each eager training forward: ``watch(module,
    spatial_size)``. Surgery gives the modules of one ``apply_dropblock`` call one shared watch
    (``dropblock_fx.surgery.watch.ModelWatch``), which warns once for the whole model."""

    def __call__(self, module: "DropBlockNd", spatial: tuple[int, ...]) -> None: ...

    def skipped(self, modules: list["DropBlockNd"], spatial: tuple[int, ...]) -> None:
        """``modules`` did not run in a training call: their rewritten block ran its original
        forward for an input of ``spatial`` size (``graph.splice`` reports it)."""


@dataclass(frozen=True)
class Placement:
    """What ``apply_dropblock`` hands each module it inserts (``module.placement``).

    Attributes:
        stage: the stage the module is in.
        site: its site kind (``conv``, ``conv_last``, ``shortcut``, ``block``, ``timm``).
        target_drop_prob: its rate at full schedule strength (the recipe's rate times the
            stage multiplier); schedules scale it.
        path: its path in the model.
        resolution: the spatial size of its input at the recipe's ``input_size`` (``()``:
            none, or several: nothing is compared).
        recipe_schedule: the recipe's schedule (a `dropblock_fx.ScheduleSpec`), the
            default of ``attach_schedule``; ``None``: the recipe has none (a constant rate).
        watch: called by each eager training forward (see `TrainWatch`); shared by
            the modules of one ``apply_dropblock`` call.
        owns_input: the planner found that its input is a norm layer's output that nothing
            else reads, so an eager training forward writes its result into that tensor (no
            new feature map) whenever autograd allows it: the input came from a norm whose
            backward keeps its own input, not its output (`writable_norm_output`). Outputs and
            gradients are the same as out of place; ``False`` turns it off.
        before_relu: the planner found that a ReLU (slope 0) alone reads its output, so the
            gradient reaching it is already zero at every unit it dropped: its backward
            multiplies by the scale only, without applying the mask again (compiled graphs
            then neither keep nor read the mask in the backward). Outputs and gradients are
            the same; ``False`` turns it off. Ignored with ``noise``. It is a promise about
            the model around the module: replacing that ReLU afterwards (by a GELU, say)
            would let gradient through the dropped units, so turn it off first.

    Examples:
        >>> Placement(4, "conv", 0.1, path="layer4.0.dropblock_conv1", resolution=(7, 7)).resolution
        (7, 7)
    """

    stage: int
    site: str
    target_drop_prob: float
    path: str = ""
    resolution: tuple[int, ...] = ()
    recipe_schedule: Any = None
    watch: Optional[TrainWatch] = field(default=None, compare=False, repr=False)
    owns_input: bool = False
    before_relu: bool = False


def is_inserted(m: object) -> bool:
    """Was ``m`` inserted by ``apply_dropblock`` (and so removed by ``remove_dropblock``)?

    Examples:
        >>> is_inserted(DropBlock2d(0.1, 3))
        False
    """
    return isinstance(m, DropBlockNd) and m.placement is not None


# The autograd nodes of norm layers whose backward reads the norm's input and statistics, never
# its output (their saved tensors: input, weight, running stats, mean and inverse std), so
# writing into that output leaves their backward intact.
_NORM_NODES = frozenset({
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
    "NativeGroupNormBackward0",
})


def writable_norm_output(x: torch.Tensor) -> bool:
    """May a DropBlock that is the only reader of ``x`` write its result into ``x``?

    True when ``x`` is a dense, non-view tensor that a batch or group norm just produced
    (its autograd node saves the norm's input, not ``x``), or that needs no gradient; never
    under ``torch.func`` transforms or forward-mode AD. The caller must know that nothing else
    reads ``x`` (surgery does: `Placement.owns_input`).

    Examples:
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> x = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> writable_norm_output(bn(x)), writable_norm_output(torch.relu(bn(x)))
        (True, False)
    """
    if x._base is not None or _forward_ad._current_level >= 0 or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    if x.requires_grad and type(x.grad_fn).__name__ not in _NORM_NODES:
        return False
    if x.is_contiguous():
        return True
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=fmt)


def _option(name: str) -> property:
    def get(self: "DropBlockNd") -> Any:
        return getattr(self._options, name)

    def set_(self: "DropBlockNd", value: Any) -> None:
        self.options = self._options.replace(**{name: value})

    return property(get, set_, doc=f"``options.{name}`` (setting it replaces ``options``, validated).")


class DropBlockNd(nn.Module):
    """Base class of [`DropBlock2d`][dropblock_fx.DropBlock2d] and [`DropBlock3d`][dropblock_fx.DropBlock3d]; see [`drop_block`][dropblock_fx.drop_block].

    Attributes:
        options: the op options (`dropblock_fx.op.options.DropBlockOptions`); each one
            also reads as an attribute (``module.mask``).
        placement: the `Placement` surgery gave it; ``None`` for a module built by hand.
        schedule: the ``DropBlockSchedule`` that drives its rate, or ``None``.
        seen_resolution: the last training feature map that differed from
            ``placement.resolution`` (``None``: none did); ``describe`` reads it.
        generator: the random generator of its masks (``None``: the global one).
    """

    # TorchScript reads this annotation (and nothing else of the class): a scripted module
    # reads its options as a named tuple.
    _options: OptionFields
    n_spatial: int = 2
    placement: Optional[Placement]
    schedule: Optional[Any]  # a DropBlockSchedule (the schedule layer, above this one)
    seen_resolution: Optional[tuple[int, ...]]
    generator: Optional[torch.Generator]
    _target_drop_prob: Optional[float]
    # Attributes TorchScript does not read (it would try to type them from the annotations).
    __jit_ignored_attributes__ = ["placement", "schedule", "seen_resolution", "generator", "_target_drop_prob"]
    # Module properties TorchScript must not compile.
    __jit_unused_properties__ = [
        "options", "drop_prob", "target_drop_prob", "schedule_pending", "block_size", "mask", "seed_region",
        "gamma_scale", "scale", "noise", "calibrate", "inplace",
    ]

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
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        _register_timm_leaves()
        p = check_drop_prob(drop_prob)
        options = DropBlockOptions(block_size, mask, seed_region, gamma_scale, scale, noise, calibrate, inplace)
        normalize_block_size(options.block_size, self.n_spatial)
        self.options = options
        self.generator = generator
        self._drop_prob = p
        self.placement = None
        self.schedule = None
        self.seen_resolution = None
        # The rate at full strength of a module built by hand (an inserted one reads its placement).
        self._target_drop_prob = None
        # Non-persistent: invisible to state_dict(), so weights load strictly both ways.
        self.register_buffer("drop_prob_tensor", torch.tensor(p, dtype=torch.float32), persistent=False)
        # The buffer the drop_prob setter fills: a drop_prob_tensor passed in from outside
        # (torch.func.functional_call) is another tensor, and the forward then reads that one.
        self._own_rate = self.drop_prob_tensor

    @classmethod
    def from_options(cls, drop_prob: float, options: DropBlockOptions,
                     generator: Optional[torch.Generator] = None) -> "DropBlockNd":
        """A module with these options (validated when they were built: not again).

        Examples:
            >>> from dropblock_fx.op.options import DropBlockOptions
            >>> DropBlock2d.from_options(0.1, DropBlockOptions(5, mask="shared"))
            DropBlock2d(drop_prob=0.1, block_size=5, mask='shared')
        """
        m = cls(drop_prob, generator=generator)
        m.options = options
        return m

    block_size = _option("block_size")
    mask = _option("mask")
    seed_region = _option("seed_region")
    gamma_scale = _option("gamma_scale")
    scale = _option("scale")
    noise = _option("noise")
    calibrate = _option("calibrate")
    inplace = _option("inplace")

    @property
    def options(self) -> DropBlockOptions:
        """The op options (frozen); set a new [`DropBlockOptions`][dropblock_fx.DropBlockOptions] to change them."""
        return self._options  # type: ignore[return-value]

    @options.setter
    def options(self, value: DropBlockOptions) -> None:
        if not isinstance(value, DropBlockOptions):
            raise TypeError(f"options must be a DropBlockOptions, not {type(value).__name__}")
        normalize_block_size(value.block_size, self.n_spatial)
        self._options = value

    @property
    def drop_prob(self) -> float:
        """Current drop probability (set it at any time; compiled graphs pick it up)."""
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        p = check_drop_prob(value)
        self._drop_prob = p
        with torch.no_grad():
            self._own_rate.fill_(p)

    @property
    def target_drop_prob(self) -> Optional[float]:
        """The rate at full schedule strength: the placement's for an inserted module; for one
        built by hand, what was set (``attach_schedule`` takes its current rate)."""
        if self.placement is not None:
            return self.placement.target_drop_prob
        return self._target_drop_prob

    @target_drop_prob.setter
    def target_drop_prob(self, value: Optional[float]) -> None:
        value = None if value is None else check_drop_prob(value)
        if self.placement is not None:
            if value is None:
                raise ValueError("an inserted module's target_drop_prob cannot be None")
            self.placement = replace(self.placement, target_drop_prob=value)
        else:
            self._target_drop_prob = value

    @property
    def schedule_pending(self) -> bool:
        """Its recipe has a schedule and none drives it yet (a training forward then warns)."""
        p = self.placement
        return p is not None and p.recipe_schedule is not None and self.schedule is None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.half() / .to(bfloat16) would round the rate (0.1 -> 0.10009765625 in bf16);
        # keep the rate buffer in fp32 and refill it from the exact Python value.
        super()._apply(fn, recurse)
        t = self.drop_prob_tensor
        if t.dtype != torch.float32:
            self.drop_prob_tensor = t = torch.tensor(self._drop_prob, dtype=torch.float32, device=t.device)
        self._own_rate = t
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(x)
        else:  # TorchScript compiles only the branch above
            return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            # Any FX tracer: appear as one leaf call so train()/eval() still applies to the trace.
            tracer = x.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
        if x.dim() != self.n_spatial + 2:
            raise ValueError(
                f"{type(self).__name__} expects a {self.n_spatial + 2}-D input, got shape {tuple(x.shape)}"
            )
        if not self.training:
            return x
        p: float | torch.Tensor
        o = self._options
        inplace = o.inplace
        before_relu = self.placement is not None and self.placement.before_relu
        if torch.compiler.is_compiling():
            p = self.drop_prob_tensor
        else:
            placement = self.placement
            if placement is not None:
                if placement.watch is not None:
                    placement.watch(self, x.shape[2:])  # a torch.Size: a tuple, compared as one
                if placement.owns_input and not inplace:
                    # Nothing else reads x (the planner checked the graph) and autograd does
                    # not need it: write into it, sparing a new map (on the CPU paths and the
                    # fused GPU kernels alike).
                    inplace = writable_norm_output(x)
            rate = self.drop_prob_tensor
            if rate is not self._own_rate:  # functional_call: a rate from outside
                p = rate
            elif self._drop_prob == 0.0:
                return x
            else:
                p = self._drop_prob
        return drop_block_train(
            x, p, normalize_block_size(o.block_size, self.n_spatial), o.mask, o.seed_region, o.gamma_scale,
            o.scale, o.noise, o.calibrate, inplace, self.generator, before_relu=before_relu,
        )

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        # The TorchScript forward: the mask comes from the op the eager code uses (one
        # custom op call), the multiply is differentiated by TorchScript's autograd.
        if not self.training:
            return x
        o = self._options
        bs = o.block_size
        n = x.dim() - 2
        if isinstance(bs, int):
            block = [bs] * n
        elif isinstance(bs, Tuple[int, int]):
            block = [bs[0], bs[1]]
        else:
            block = [bs[0], bs[1], bs[2]]
        keep, factor = torch.ops.dropblock_fx.keep_mask(
            x.detach(), self.drop_prob_tensor, block, o.mask, o.seed_region, o.gamma_scale, o.scale, o.calibrate
        )
        out = x * keep.to(x.dtype) * factor.to(x.dtype)
        if o.noise:
            out = out + torch.randn_like(x).masked_fill(keep, 0.0)
        return out

    def extra_repr(self) -> str:
        parts = [f"drop_prob={self._drop_prob:g}", f"block_size={self._options.block_size}"]
        parts += [f"{name}={value!r}" for name, value in self._options.changed().items()]
        return ", ".join(parts)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Modules pickled before the options / placement contract: their loose attributes.
        if "_options" not in state:
            names = ("block_size", "mask", "seed_region", "gamma_scale", "scale", "noise", "calibrate", "inplace")
            old = {k: state.pop(k) for k in names if k in state}
            state["_options"] = DropBlockOptions(**old)
            target = state.pop("target_drop_prob", None)
            state.pop("schedule_pending", None)
            state.pop("resolution_watch", None)
            state.setdefault("placement", None)
            state.setdefault("schedule", None)
            state.setdefault("seen_resolution", None)
            state["_target_drop_prob"] = None if state["placement"] is not None else target
            state["_own_rate"] = state["_buffers"]["drop_prob_tensor"]
        super().__setstate__(state)


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
