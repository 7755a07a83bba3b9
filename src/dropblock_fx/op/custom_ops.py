"""The fused DropBlock as ``torch.library`` custom ops: ``torch.compile`` and FX see one op.

* ``dropblock_fx::drop_block_fused(x, gamma, seed, scale_in, block, mask, seed_region,
  scale_mode, noise) -> (out, drop_bits, scale)``: the Triton forward. ``gamma`` and
  ``seed`` are tensors, so a new drop rate or a new random draw never recompiles.
* ``dropblock_fx::drop_block_fused_backward(grad, drop_bits, scale) -> grad_in``.
* ``dropblock_fx::drop_block_mask(gamma, seed, shape, channels_last, block, mask,
  seed_region) -> (drop_bits, dropped)``: the mask kernels only (no input tensor). Under
  ``torch.compile`` the op uses this one and applies the mask with plain torch ops, so
  inductor fuses ``x * keep * scale`` (and its backward) into the neighbouring kernels.

Both have fake implementations (shapes, dtypes and strides identical to the real ones) and
the forward has an autograd formula that saves only the 1-bit mask and the fp32 scale.
`drop_block_triton` is what ``drop_block`` calls when the backend is ``"triton"``. In plain
eager code it runs the same kernels through an ``autograd.Function`` (no custom-op dispatch
on the host; see `_plain_eager`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import triton_kernels as tk
from .gamma import expected_scale

__all__ = ["drop_block_fused", "drop_block_fused_backward", "drop_block_mask", "drop_block_triton"]


@torch.library.custom_op("dropblock_fx::drop_block_fused", mutates_args=())
def drop_block_fused(
    x: Tensor,
    gamma: Tensor,
    seed: Tensor,
    scale_in: Tensor,
    block: Sequence[int],
    mask: str,
    seed_region: str,
    scale_mode: str,
    noise: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused DropBlock forward; see `dropblock_fx.op.triton_kernels.drop_block_forward`."""
    return tk.drop_block_forward(x, gamma, seed, scale_in, list(block), mask, seed_region, scale_mode, noise)


@drop_block_fused.register_fake
def _drop_block_fused_fake(x, gamma, seed, scale_in, block, mask, seed_region, scale_mode, noise):
    out, bits, scale, _ = tk.alloc_outputs(x, mask)
    return out, bits, scale


@torch.library.custom_op("dropblock_fx::drop_block_fused_backward", mutates_args=())
def drop_block_fused_backward(grad: Tensor, bits: Tensor, scale: Tensor) -> Tensor:
    """``grad * keep * scale`` from the drop bits of `drop_block_fused`."""
    return tk.drop_block_backward(grad, bits, scale)


@drop_block_fused_backward.register_fake
def _drop_block_fused_backward_fake(grad, bits, scale):
    return torch.empty_like(tk.dense_input(grad)[0])


@torch.library.custom_op("dropblock_fx::drop_block_mask", mutates_args=())
def drop_block_mask(
    gamma: Tensor, seed: Tensor, shape: Sequence[int], channels_last: bool, block: Sequence[int], mask: str,
    seed_region: str,
) -> tuple[Tensor, Tensor]:
    """Drop bits and dropped count; see `dropblock_fx.op.triton_kernels.drop_block_mask`."""
    return tk.drop_block_mask(gamma, seed, list(shape), channels_last, list(block), mask, seed_region)


@drop_block_mask.register_fake
def _drop_block_mask_fake(gamma, seed, shape, channels_last, block, mask, seed_region):
    return tk.alloc_mask_outputs(shape, channels_last, mask, gamma.device)


def _setup_context(ctx, inputs, output) -> None:
    _, bits, scale = output
    ctx.save_for_backward(bits, scale)


def _grad_in(grad: Tensor, bits: Tensor, scale: Tensor) -> Tensor:
    """``grad * keep * scale``: the kernel itself, or the custom op when a graph of the
    backward is being built (double backward: the op has its own autograd formula)."""
    if torch.is_grad_enabled() or not _plain_eager(grad):
        return drop_block_fused_backward(grad, bits, scale)
    return tk.drop_block_backward(grad, bits, scale)


def _backward(ctx, grad_out, _grad_bits, _grad_scale):
    bits, scale = ctx.saved_tensors
    return _grad_in(grad_out, bits, scale), None, None, None, None, None, None, None, None


def _setup_context_bwd(ctx, inputs, output) -> None:
    _, bits, scale = inputs
    ctx.save_for_backward(bits, scale)


def _backward_bwd(ctx, gg):
    # The backward is linear in grad with the same mask: its own derivative is itself.
    bits, scale = ctx.saved_tensors
    return drop_block_fused_backward(gg, bits, scale), None, None


drop_block_fused.register_autograd(_backward, setup_context=_setup_context)
drop_block_fused_backward.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


def _plain_eager(x: Tensor) -> bool:
    """A real tensor in plain eager code: no tracing, no dispatch mode, no tensor subclass.

    Then the fused op runs as an ``autograd.Function`` that calls the kernels directly: a
    custom op's dispatch costs tens of microseconds of host time a call, and a training step
    calls it once per site (the GPU waits for the host when the sites are many). Anything
    that traces or transforms (``torch.compile``, ``make_fx``, FX, ``jit.trace``, fake or
    meta tensors, a ``TorchDispatchMode``) gets the custom op, which it sees as one op.
    """
    return (
        type(x) in (Tensor, torch.nn.Parameter)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
    )


_CONSTANTS: dict[tuple[float, torch.device], Tensor] = {}


def _constant(value: float, device: torch.device) -> Tensor:
    """A 1-element fp32 tensor holding ``value`` on ``device``, made once: the kernels read
    the seed rate and the scale through pointers, and a new tensor per call is one more
    allocation and copy launch per site and step. Never written to."""
    key = (value, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.full((1,), value, dtype=torch.float32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return t  # memory of a CUDA graph being captured: not kept beyond it
        if len(_CONSTANTS) >= 1024:  # a schedule that changes the rate every step
            _CONSTANTS.clear()
        _CONSTANTS[key] = t
    return t


def drop_block_triton(
    x: Tensor,
    gamma: float | Tensor,
    block: tuple[int, ...],
    mask: str,
    seed_region: str,
    scale: str,
    noise: bool,
    inplace: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Training-mode DropBlock through the fused op (called by ``drop_block``'s dispatch).

    ``gamma`` is the seed rate computed by `gamma` (a float in eager code, a 0-d
    tensor under ``torch.compile``); ``block`` is already clipped to the map.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    dev = x.device
    eager = _plain_eager(x)
    if isinstance(gamma, Tensor):
        gamma_t = gamma.to(device=dev, dtype=torch.float32).reshape(1)
    elif eager:
        gamma_t = _constant(float(gamma), dev)
    else:
        gamma_t = torch.full((1,), float(gamma), dtype=torch.float32, device=dev)
    if scale == "expected":
        factor = expected_scale(gamma_t if isinstance(gamma, Tensor) else float(gamma), spatial, block, seed_region)
        if isinstance(factor, Tensor):
            scale_t = factor.reshape(1)
        else:
            scale_t = torch.full((1,), factor, dtype=torch.float32, device=dev)
    elif scale == "none":
        scale_t = _constant(1.0, dev) if eager else torch.ones((1,), dtype=torch.float32, device=dev)
    else:
        scale_t = gamma_t  # unused: the count normaliser is computed on chip
    # The Philox key is drawn from torch's RNG on the device (no host sync, reproducible
    # under torch.manual_seed, and replaced by inductor's own seed handling when compiled).
    seed_t = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=dev, generator=generator)
    if torch.compiler.is_compiling():
        out = _apply_traceable(x, gamma_t, seed_t, scale_t, block, mask, seed_region, scale, noise, generator)
    elif inplace and (x.is_contiguous() or tk.is_channels_last(x)):
        # Eager, in place: the kernels write into x (no second map, no copy). Outside the
        # custom op, which may not mutate its input; the same kernels, bits and backward.
        return _FusedInplace.apply(x, gamma_t, seed_t, scale_t, tuple(block), mask, seed_region, scale, noise)
    elif eager:
        out = _Fused.apply(x, gamma_t, seed_t, scale_t, tuple(block), mask, seed_region, scale, noise)
    else:
        out = drop_block_fused(x, gamma_t, seed_t, scale_t, list(block), mask, seed_region, scale, noise)[0]
    if inplace:
        return x.copy_(out)
    return out


class _Fused(torch.autograd.Function):
    """`drop_block_fused` in plain eager code (see `_plain_eager`): the same kernels, the same
    saved bits and scale and the same backward, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x, gamma_t, seed_t, scale_t, block, mask, seed_region, scale, noise):  # type: ignore[override]
        out, bits, s = tk.drop_block_forward(x, gamma_t, seed_t, scale_t, list(block), mask, seed_region, scale,
                                             noise)
        ctx.save_for_backward(bits, s)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _backward(ctx, grad, None, None)


class _FusedInplace(torch.autograd.Function):
    """`drop_block_fused` writing into its (dense) input: saves the drop bits and the scale,
    and its backward is the fused op's."""

    @staticmethod
    def forward(ctx, x, gamma_t, seed_t, scale_t, block, mask, seed_region, scale, noise):  # type: ignore[override]
        ctx.mark_dirty(x)
        out, bits, s = tk.drop_block_forward(x, gamma_t, seed_t, scale_t, list(block), mask, seed_region, scale,
                                             noise, out=x)
        ctx.save_for_backward(bits, s)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _backward(ctx, grad, None, None)  # the fused op's: same inputs, same saved tensors


def _apply_traceable(x, gamma_t, seed_t, scale_t, block, mask, seed_region, scale, noise, generator) -> Tensor:
    """The compiled-graph form: the mask op, then ``(x * keep) * scale`` in torch ops for inductor.

    Same bits, same scale and the same arithmetic as the fused op; autograd differentiates the
    multiply, and the partitioner can keep the bits (not a full mask) for backward.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    cl = tk.is_channels_last(x)
    bits, dropped = drop_block_mask(gamma_t, seed_t, list(x.shape), cl, list(block), mask, seed_region)
    keep = tk.keep_from_bits(bits, spatial)
    if scale == "count":
        mask_numel = keep.numel()  # symbolic with a dynamic batch: no float(), no recompile
        kept = (mask_numel - dropped).clamp(min=1).to(torch.float32).reshape(())
        s = torch.div(mask_numel, kept)
    else:
        s = scale_t.reshape(())
    out = (x * keep.to(x.dtype)) * s.to(x.dtype)
    if noise:
        fill = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        out = out + fill.masked_fill(keep, 0)
    return out
