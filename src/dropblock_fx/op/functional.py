"""``drop_block``: the DropBlock op (Ghiasi, Lin, Le, NeurIPS 2018).

Defaults follow the official TensorFlow code: seeds only where a whole block fits,
an independent mask per sample and per channel, the paper's gamma, and the output
normalised by the kept fraction actually drawn over the whole tensor.

This file is the op: its validation, the dispatch to a mask backend (``masks.py``: dense
reference, sparse sampler; ``custom_ops.py``: the fused Triton kernels), and the autograd
function that applies the mask saving only the bool mask. The backends agree statistically
(different random streams), which the tests check.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .gamma import clip_block, seed_rate
from .masks import (
    BACKENDS,
    keep_mask,
    pick_backend,
    sample_dropped,
    sampled_keep_mask,
    set_backend,
    sparse_plan,
    under_functorch,
    whole_map_scaled_keep,
)
from .options import (
    MASK_MODES,
    SCALE_MODES,
    SEED_REGIONS,
    BlockSize,
    DropBlockOptions,
    MaskMode,
    ScaleMode,
    SeedRegion,
    check_drop_prob,
    normalize_block_size,
)

__all__ = ["drop_block", "MASK_MODES", "SEED_REGIONS", "SCALE_MODES", "BACKENDS",
           "set_backend"]


# ---------------------------------------------------------------------------- autograd


class _ApplyKeepMask(torch.autograd.Function):
    """``out = x * keep * scale`` (dropped units optionally filled), saving only the bool mask.

    Written with ``setup_context`` (and a ``jvp`` and a generated vmap rule), so it works under
    ``torch.func`` transforms as well as plain autograd.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, keep, scale, fill, inplace):  # type: ignore[override]
        s = scale.to(x.dtype) if isinstance(scale, torch.Tensor) else scale
        if keep.numel() < x.numel() and fill is None:
            # Shared / batch masks are small: fold the scale into them, one pass over x.
            m = keep.to(x.dtype).mul_(s)
            out = x.mul_(m) if inplace else torch.mul(x, m)
        elif inplace:
            out = x.mul_(keep).mul_(s)
        else:
            out = torch.mul(x, keep).mul_(s)
        if fill is not None:
            out.add_(fill.masked_fill(keep, 0))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, keep, scale, fill, inplace = inputs
        if inplace:
            ctx.mark_dirty(x)
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(keep, scale)
            ctx.save_for_forward(keep, scale)
        else:
            ctx.save_for_backward(keep)
            ctx.save_for_forward(keep)
            ctx.scale = scale

    @staticmethod
    def _masked(ctx, t: torch.Tensor) -> torch.Tensor:
        saved = ctx.saved_tensors
        keep = saved[0]
        s = saved[1].to(t.dtype) if len(saved) > 1 else ctx.scale
        if keep.numel() < t.numel():
            return torch.mul(t, keep.to(t.dtype).mul_(s))
        return torch.mul(t, keep).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _ApplyKeepMask._masked(ctx, grad), None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, keep_t, scale_t, fill_t, inplace_t):  # type: ignore[override]
        return _ApplyKeepMask._masked(ctx, x_t)


def _flat(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A 1-D view of ``t`` (dense in ``fmt``) in storage order; autograd follows it."""
    if fmt == torch.channels_last:
        return t.permute(0, 2, 3, 1).view(-1)
    if fmt == torch.channels_last_3d:
        return t.permute(0, 2, 3, 4, 1).view(-1)
    return t.view(-1)


class _ScaleAndDrop(torch.autograd.Function):
    """``out = x * scale`` with the units at ``dropped`` (flat positions in ``x``'s storage
    order for ``fmt``) set to zero: one pass over ``x`` and a scatter of zeros, forward and
    backward. Saves only the positions (int64, or int32 when that keeps them within one byte
    per unit of ``x``); the caller sends larger sets (high drop rates) to `_ApplyKeepMask`.
    ``dense``: ``x`` is dense in ``fmt``, so ``x * scale`` already has the output's layout.

    Written with ``forward(ctx, ...)``: it never runs under ``torch.func`` (the caller sends
    those tensors to the dense path), and ``apply`` then skips binding the arguments to the
    signature, which costs more than the op on small maps.
    """

    @staticmethod
    def forward(ctx, x, dropped, scale, fmt, inplace, dense, before_relu=False):  # type: ignore[override]
        if inplace:
            ctx.mark_dirty(x)
            out = x.mul_(scale)
        elif dense:
            out = x * scale
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
            torch.mul(x, scale, out=out)
        _flat(out, fmt).index_fill_(0, dropped, 0)
        numel = out.numel()
        ctx.narrow = dropped.numel() * 8 > numel and numel < 2**31
        if ctx.narrow:
            dropped = dropped.to(torch.int32)  # the caller checked that 4 bytes each fit
        ctx.save_for_backward(dropped)
        ctx.save_for_forward(dropped)
        ctx.scale, ctx.fmt, ctx.before_relu = scale, fmt, before_relu
        return out

    @staticmethod
    def _masked(ctx, t: torch.Tensor) -> torch.Tensor:
        (dropped,) = ctx.saved_tensors
        out = (t * ctx.scale).contiguous(memory_format=ctx.fmt)
        # Differentiable (double backward): a view and an in-place fill of a new tensor.
        _flat(out, ctx.fmt).index_fill_(0, dropped.long() if ctx.narrow else dropped, 0)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.before_relu:  # the ReLU's backward zeroed the dropped units already
            return grad * ctx.scale, None, None, None, None, None, None
        return _ScaleAndDrop._masked(ctx, grad), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, dropped_t, scale_t, fmt_t, inplace_t, dense_t, before_relu_t):  # type: ignore[override]
        return _ScaleAndDrop._masked(ctx, x_t)


class _ScaleKept(torch.autograd.Function):
    """``(x * keep) * scale`` whose backward is ``grad * scale``, for a DropBlock whose output a
    ReLU alone reads: that ReLU's backward has zeroed the gradient at every dropped unit (a
    dropped unit is 0 after the ReLU), so the mask is not needed again. Under ``torch.compile``
    the backward then neither saves nor reads the mask; the values are bit-identical to the
    plain multiply's gradient (``g * s * 1`` where kept, ``0`` where dropped).
    """

    @staticmethod
    def forward(ctx, x, keep, scale):  # type: ignore[override]
        ctx.save_for_backward(scale)
        return (x * keep.to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None, None


# ---------------------------------------------------------------------------- the op


def drop_block(
    x: torch.Tensor,
    drop_prob: float | torch.Tensor,
    block_size: BlockSize,
    *,
    training: bool = True,
    mask: MaskMode = "channel",
    seed_region: SeedRegion = "valid",
    gamma_scale: float = 1.0,
    scale: ScaleMode = "count",
    noise: bool = False,
    calibrate: bool = False,
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropBlock on a 4-D ``(N, C, H, W)`` or 5-D ``(N, C, D, H, W)`` tensor.

    Args:
        x: input feature map.
        drop_prob: target fraction of dropped units, in ``[0, 1]`` (``1 - keep_prob``).
            A 0-d tensor is accepted (used by the modules so that changing the rate
            never recompiles under ``torch.compile``).
        block_size: side of the dropped blocks (int, or one int per spatial dim);
            clipped per side to the feature map. Even sizes drop exactly ``k x k`` blocks.
        training: when False the input object itself is returned.
        mask: ``"channel"`` (paper: one mask per sample and channel), ``"shared"`` (one
            mask per sample shared by its channels, timm's ``couple_channels``) or
            ``"batch"`` (one mask for the whole batch).
        seed_region: ``"valid"`` (paper: seeds only where the whole block fits) or
            ``"full"`` (seeds anywhere, edge blocks clipped, as timm).
        gamma_scale: multiplies the seed rate (timm's ``gamma_scale``).
        scale: ``"count"`` (paper: divide by the kept fraction actually drawn over the
            whole tensor, in fp32), ``"expected"`` (divide by the exact expected kept
            fraction; no reduction) or ``"none"``.
        noise: fill dropped units with N(0, 1) samples (timm's ``with_noise``).
        calibrate: solve gamma so that the expected dropped fraction equals
            ``drop_prob * gamma_scale`` exactly for this map and block size.
        inplace: write the result into ``x``.
        generator: random generator for the masks (default: the global one).

    Returns:
        A tensor of the shape, dtype and memory format of ``x``.

    Examples:
        >>> x = torch.randn(2, 8, 14, 14)
        >>> y = drop_block(x, 0.1, 7)
        >>> y.shape
        torch.Size([2, 8, 14, 14])
        >>> drop_block(x, 0.1, 7, training=False) is x
        True
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        got = f"a tensor with {x.dim()} dims" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got {got}")
    compiling = torch.compiler.is_compiling()
    p_float: Optional[float] = None
    if isinstance(drop_prob, torch.Tensor):
        if not compiling:
            p_float = check_drop_prob(float(drop_prob))
    else:
        p_float = check_drop_prob(drop_prob)
    block_req = normalize_block_size(block_size, x.dim() - 2)
    if not compiling:  # validated here once; compiled code was validated when it was traced
        DropBlockOptions(block_size, mask, seed_region, gamma_scale, scale, noise, calibrate, inplace)
    if not training or p_float == 0.0:
        return x
    return drop_block_train(
        x, drop_prob if p_float is None else p_float, block_req,
        mask, seed_region, float(gamma_scale), scale, noise, calibrate, inplace, generator,
    )


def drop_block_train(
    x: torch.Tensor,
    drop_prob: Union[float, torch.Tensor],
    block_req: tuple[int, ...],
    mask: str,
    seed_region: str,
    gamma_scale: float,
    scale: str,
    noise: bool,
    calibrate: bool,
    inplace: bool,
    generator: Optional[torch.Generator],
    *,
    before_relu: bool = False,
) -> torch.Tensor:
    """The training-mode op on validated arguments (``block_req`` one size per spatial dim):
    what [`drop_block`][dropblock_fx.drop_block] and the modules call.

    ``before_relu``: the caller guarantees that a ReLU (slope 0) alone reads the output, so the
    gradient reaching it is already zero at every dropped unit, and the backward may skip
    applying the mask again (compiled graphs then do not keep it for the backward; eager
    code skips a scatter). Ignored with ``noise``, whose dropped units are not zero. The
    values and gradients are those without it.

    Examples:
        >>> x = torch.randn(2, 4, 9, 9, requires_grad=True)
        >>> y = drop_block_train(x, 0.2, (3, 3), "channel", "valid", 1.0, "count", False, False, False, None,
        ...                      before_relu=True)
        >>> torch.relu(y).sum().backward()
        >>> bool((x.grad[y == 0] == 0).all())
        True
    """
    if x.numel() == 0:
        return x
    before_relu = before_relu and not noise
    if (
        mask == "channel" and not noise and not isinstance(drop_prob, torch.Tensor) and x.device.type == "cpu"
        and not torch.compiler.is_compiling() and pick_backend(x) == "sparse" and not under_functorch(x)
    ):
        # The CPU path: seeds drawn as positions, the output one multiply by the scale and a
        # scatter of zeros (no mask of x's size, no mixed-dtype multiply). What depends only on
        # the layout and the rate comes from a cache: a training step meets the same few.
        plan = sparse_plan(x.shape, x.stride(), block_req, seed_region, scale, drop_prob, gamma_scale, calibrate)
        if plan is not None and plan.whole_map:
            # Every seed drops its whole map: the mask is one flag per map, and applying it is
            # one multiply by a small scaled mask that autograd saves (N x C values).
            m = whole_map_scaled_keep(plan.mask_nc, plan.spatial, plan.gamma, scale, x.dtype, generator)
            return x.mul_(m) if inplace else x * m
        if plan is not None and (not inplace or plan.dense):
            dropped, factor = sample_dropped(plan, seed_region, scale, x.dtype, generator)
            if dropped.numel() * (4 if plan.numel < 2**31 else 8) <= plan.numel:  # within 1 byte per unit
                return _ScaleAndDrop.apply(x, dropped, factor, plan.fmt, inplace, plan.dense, before_relu)
            keep = torch.empty(x.shape, dtype=torch.bool, memory_format=plan.fmt).fill_(True)
            _flat(keep, plan.fmt).index_fill_(0, dropped, False)
            return _ApplyKeepMask.apply(x, keep, factor, None, inplace)

    spatial = tuple([int(s) for s in x.shape[2:]])
    block = clip_block(spatial, block_req)
    if isinstance(drop_prob, torch.Tensor):
        drop_prob = drop_prob.to(device=x.device)
    if (
        torch.compiler.is_compiling() and x.device.type == "cpu" and generator is None
        and pick_backend(x) == "sparse"
    ):
        # One opaque op draws the mask (no kernels to generate for it); the multiply below is
        # fused by inductor into the neighbouring kernels, forward and backward. The mask is
        # drawn channels-last: the layout inductor gives a CNN's activations on the CPU (the
        # traced x says contiguous either way), so the fused kernels read it in order; and
        # uint8 (why: at the op's return).
        p = drop_prob if isinstance(drop_prob, torch.Tensor) else torch.tensor(drop_prob, dtype=torch.float32)
        keep, factor = sampled_keep_mask(
            p, list(x.shape), True, list(block), mask, seed_region, gamma_scale, scale, calibrate,
        )
        if before_relu:
            out = _ScaleKept.apply(x, keep, factor)
        else:
            out = (x * keep.to(x.dtype)) * factor.to(x.dtype)
        if noise:
            fill = torch.randn(x.shape, dtype=x.dtype, device=x.device)
            out = out + fill.masked_fill(keep.to(torch.bool), 0)
        return x.copy_(out) if inplace else out
    gamma = seed_rate(drop_prob, spatial, block, gamma_scale, calibrate, seed_region)

    if pick_backend(x) == "triton" and not under_functorch(x):
        from .custom_ops import drop_block_triton  # Triton is optional: imported on first use

        return drop_block_triton(x, gamma, block, mask, seed_region, scale, noise, inplace, generator)

    keep, factor = keep_mask(x, gamma, block, mask, seed_region, scale, generator)
    with torch.no_grad():
        fill = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator) if noise else None
    if torch.compiler.is_compiling():
        # Plain ops: inductor fuses them, the partitioner picks what backward saves (and
        # dynamo does not trace an autograd.Function with a jvp).
        out = (x * keep.to(x.dtype)) * (factor.to(x.dtype) if isinstance(factor, torch.Tensor) else factor)
        if fill is not None:
            out = out + fill.masked_fill(keep, 0)
        return x.copy_(out) if inplace else out
    if fill is None and not inplace and keep.numel() * 4 <= x.numel():
        # Shared / batch masks with >= 4 channels: a plain multiply by the small scaled mask
        # (autograd saves it: at most 1 byte per unit of x) beats a Python autograd.Function.
        with torch.no_grad():
            s = factor.to(x.dtype) if isinstance(factor, torch.Tensor) else factor
            m = keep.to(x.dtype).mul_(s)
        return x * m
    return _ApplyKeepMask.apply(x, keep, factor, fill, inplace)


# ---------------------------------------------------------------------------- TorchScript


@torch.library.custom_op("dropblock_fx::keep_mask", mutates_args=())
def script_keep_mask(
    x: torch.Tensor, drop_prob: torch.Tensor, block: list[int], mask: str, seed_region: str, gamma_scale: float,
    scale: str, calibrate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep-mask and the normaliser of a training forward, as one op a scripted module
    calls (``torch.jit.script``): the same masks as eager code, from the global generator."""
    spatial = tuple([int(s) for s in x.shape[2:]])
    clipped = clip_block(spatial, tuple(block))
    gamma = seed_rate(float(drop_prob), spatial, clipped, gamma_scale, calibrate, seed_region)
    keep, factor = keep_mask(x, gamma, clipped, mask, seed_region, scale)
    if not isinstance(factor, torch.Tensor):
        factor = torch.tensor(factor, dtype=torch.float32, device=x.device)
    return keep, factor.reshape(()).to(torch.float32)


@script_keep_mask.register_fake
def _script_keep_mask_fake(x, drop_prob, block, mask, seed_region, gamma_scale, scale, calibrate):
    n, c = {"channel": (x.shape[0], x.shape[1]), "shared": (x.shape[0], 1), "batch": (1, 1)}[mask]
    return x.new_empty((n, c, *x.shape[2:]), dtype=torch.bool), x.new_empty((), dtype=torch.float32)
