"""``drop_block``: the DropBlock op (Ghiasi, Lin, Le, NeurIPS 2018).

Defaults follow the official TensorFlow code: seeds only where a whole block fits,
an independent mask per sample and per channel, the paper's gamma, and the output
normalised by the kept fraction actually drawn over the whole tensor.

Three ways to build the mask, picked by `_pick_backend` (or forced with
[`set_backend`][dropblock_fx.set_backend] / ``DROPBLOCK_FX_BACKEND``):

* ``"reference"``: dense, plain torch ops (a separable sliding max over the seed grid),
  the official algorithm as written; traceable by ``torch.compile``.
* ``"sparse"`` (the CPU default): samples the seeds' positions directly (the gaps between
  Bernoulli successes are geometric) and scatters their ``k x k`` blocks, so the cost
  follows the number of seeds (gamma is ~0.006 at the paper's settings).
* ``"triton"`` (the CUDA default when Triton is importable): fused kernels with Philox
  seeds, on-chip block expansion and count, and a 1-bit mask for backward
  (``triton_kernels.py``, registered as ``torch.library`` ops in ``custom_ops.py``).

Given the same seed grid, "reference" and "sparse" expand to bit-identical masks; the
three paths agree statistically (different random streams), which the tests check.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F

from .gamma import (
    calibrated_gamma,
    calibrated_gamma_tensor,
    clip_block,
    expected_drop_rate,
    expected_keep_tensor,
    gamma_factor,
    paper_gamma,
    seed_grid,
)

__all__ = ["drop_block", "MASK_MODES", "SEED_REGIONS", "SCALE_MODES", "BACKENDS", "set_backend"]

MaskMode = Literal["channel", "shared", "batch"]
SeedRegion = Literal["valid", "full"]
ScaleMode = Literal["count", "expected", "none"]
BlockSize = Union[int, Sequence[int]]

MASK_MODES: tuple[str, ...] = ("channel", "shared", "batch")
SEED_REGIONS: tuple[str, ...] = ("valid", "full")
SCALE_MODES: tuple[str, ...] = ("count", "expected", "none")
BACKENDS: tuple[str, ...] = ("auto", "reference", "sparse", "triton")

_backend: str = "auto"
# Above this seed rate the geometric sampler draws more numbers than the dense path.
_SPARSE_MAX_GAMMA = 0.25
# Below this many seed positions (shared / batch masks) a few dense ops cost less than
# the sampler's bookkeeping.
_SPARSE_MIN_GRID = 1 << 15


def set_backend(name: str) -> None:
    """Force how masks are built: ``"auto"`` (default), ``"reference"``, ``"sparse"`` or ``"triton"``.

    The environment variable ``DROPBLOCK_FX_BACKEND`` sets the same at import time.

    Examples:
        >>> set_backend("reference"); set_backend("auto")
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not valid; choose one of {BACKENDS}")
    _backend = name


set_backend(os.environ.get("DROPBLOCK_FX_BACKEND", "auto") or "auto")


# ---------------------------------------------------------------------------- validation


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def normalize_block_size(block_size: BlockSize, n_spatial: int) -> tuple[int, ...]:
    """Validate ``block_size`` (an int, or one int per spatial dim) and return a tuple.

    Examples:
        >>> normalize_block_size(7, 2)
        (7, 7)
    """
    if isinstance(block_size, bool):
        raise ValueError(f"block_size={block_size!r} is not valid; expected an integer >= 1")
    if isinstance(block_size, int):
        sizes: tuple[int, ...] = (block_size,) * n_spatial
    elif isinstance(block_size, Sequence) and len(block_size) == n_spatial and all(
        [isinstance(b, int) and not isinstance(b, bool) for b in block_size]
    ):
        sizes = tuple(block_size)
    else:
        raise ValueError(
            f"block_size={block_size!r} is not valid; expected an integer >= 1 "
            f"or a sequence of {n_spatial} integers >= 1"
        )
    if any([b < 1 for b in sizes]):
        raise ValueError(f"block_size={block_size!r} is not valid; every size must be >= 1")
    return sizes


def check_drop_prob(drop_prob: float) -> float:
    """Validate a drop probability and return it as a float.

    Examples:
        >>> check_drop_prob(0.1)
        0.1
    """
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)):
        raise ValueError(f"drop_prob={drop_prob!r} is not valid; expected a number in [0, 1]")
    p = float(drop_prob)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(f"drop_prob={drop_prob!r} is not valid; expected a number in [0, 1]")
    return p


def check_options(
    mask: str, seed_region: str, scale: str, gamma_scale: float, noise: bool, calibrate: bool, inplace: bool
) -> None:
    """Validate the option values shared by [`drop_block`][dropblock_fx.drop_block] and the modules."""
    _check_choice("mask", mask, MASK_MODES)
    _check_choice("seed_region", seed_region, SEED_REGIONS)
    _check_choice("scale", scale, SCALE_MODES)
    if isinstance(gamma_scale, bool) or not isinstance(gamma_scale, (int, float)) or not (
        0.0 <= float(gamma_scale) < math.inf
    ):
        raise ValueError(f"gamma_scale={gamma_scale!r} is not valid; expected a finite number >= 0")
    for name, value in (("noise", noise), ("calibrate", calibrate), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is not valid; expected True or False")


# ---------------------------------------------------------------------------- masks


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _uniform(shape: tuple[int, ...], x: torch.Tensor, fmt: torch.memory_format, generator) -> torch.Tensor:
    # float32 noise regardless of x's dtype: bf16 has only 8 bits of mantissa, too coarse
    # for seed rates near 0.006.
    u = torch.empty(shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    return u.uniform_(generator=generator)


def _block_offsets(block: tuple[int, ...], seed_region: str, device: torch.device) -> list[torch.Tensor]:
    """Per-dim offsets from a seed position to the units of its block."""
    offs = []
    for k in block:
        r = torch.arange(k, device=device)
        offs.append(r if seed_region == "valid" else r - k // 2)
    return offs


def _sample_seed_positions(count: int, gamma: float, device: torch.device, generator) -> torch.Tensor:
    """Flat positions of the successes of ``count`` iid Bernoulli(gamma) trials.

    Draws the gaps between successes (geometric) instead of one number per trial, so the
    cost is proportional to the number of seeds: ~150x fewer random numbers at the paper's
    settings. Exact, not an approximation: gaps of iid Bernoulli trials are iid geometric.
    """
    if gamma <= 0.0 or count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    log_q = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    mean = count * gamma
    positions: list[torch.Tensor] = []
    start = 0  # next trial index not yet decided
    while start < count:
        remaining = count - start
        m = int(min(remaining, mean * (remaining / count) + 6.0 * math.sqrt(mean + 1.0) + 16))
        u = torch.rand(m, dtype=torch.float64, device=device, generator=generator)
        # Failures before each success: floor(log(v) / log(1 - gamma)), v in (0, 1].
        gaps = torch.floor(torch.log1p(-u) / log_q) if gamma < 1.0 else torch.zeros_like(u)
        pos = start + torch.cumsum(gaps.to(torch.int64) + 1, 0) - 1
        inside = pos < count
        positions.append(pos[inside])
        if bool(inside.all()):
            start = int(pos[-1]) + 1
        else:
            break
    return torch.cat(positions) if len(positions) > 1 else positions[0]


def _expand_sparse(
    seed_pos: torch.Tensor,
    mask_nc: tuple[int, int],
    grid: tuple[int, ...],
    spatial: tuple[int, ...],
    block: tuple[int, ...],
    seed_region: str,
    fmt,
    device: torch.device,
) -> torch.Tensor:
    """Keep-mask by scattering each seed's block: cost proportional to the number of seeds.

    ``seed_pos`` are flat (row-major) positions in the ``mask_nc + grid`` seed tensor.
    """
    shape = tuple(mask_nc) + tuple(spatial)
    keep = torch.empty(shape, dtype=torch.bool, device=device, memory_format=fmt).fill_(True)
    if seed_pos.numel() == 0:
        return keep
    # Unravel seed positions into (n, c, *grid) coordinates.
    coords: list[torch.Tensor] = []
    rest = seed_pos
    for size in reversed(tuple(mask_nc) + tuple(grid)):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    strides = keep.stride()
    base = coords[0] * strides[0] + coords[1] * strides[1]
    flat = base.unsqueeze(1)
    offs = _block_offsets(block, seed_region, device)
    for d in range(len(spatial)):
        # Clamping folds clipped edge blocks onto the border, which the clipped block covers.
        c = (coords[2 + d].unsqueeze(1) + offs[d].unsqueeze(0)).clamp_(0, spatial[d] - 1)
        c = c * strides[2 + d]
        flat = (flat.unsqueeze(-1) + c.unsqueeze(1)).flatten(1)
    storage = keep.as_strided((keep.numel(),), (1,))
    storage.index_fill_(0, flat.reshape(-1), False)
    return keep


def _seeds_to_positions(seeds: torch.Tensor) -> torch.Tensor:
    return seeds.contiguous().reshape(-1).nonzero().squeeze(1)


def _expand_dense(
    seeds: torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str, fmt
) -> torch.Tensor:
    """Keep-mask by a separable sliding max (any) of the seed grid: the official algorithm.

    ``unfold(...).any(-1)`` per dim is a max-pool with stride 1 and ``k`` taps; on bool
    tensors it needs no float copy and is ~4x faster than ``max_pool2d`` on the CPU.
    """
    s = seeds if seeds.dtype == torch.bool else seeds != 0
    pad: list[int] = []
    for k in reversed(block):  # F.pad lists the last dim first
        if seed_region == "valid":
            pad += [k - 1, k - 1]
        else:
            pad += [(k - 1) // 2, k // 2]
    if any(pad):
        s = F.pad(s, pad)
    for d, k in enumerate(block):
        if k > 1:
            s = s.unfold(2 + d, k, 1).any(-1)
    keep = s.logical_not()
    if fmt != torch.contiguous_format and not keep.is_contiguous(memory_format=fmt):
        keep = keep.contiguous(memory_format=fmt)
    return keep


def _find_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_HAS_TRITON: bool = _find_triton()
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pick_backend(x: torch.Tensor) -> str:
    if _backend != "auto":
        return _backend
    if x.device.type == "cuda" and _HAS_TRITON and x.dtype in _TRITON_DTYPES:
        return "triton"  # fused kernels (op/triton_kernels.py), one custom op for compile/FX
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        # nonzero() would break the graph under torch.compile and sync the host on GPUs.
        return "reference"
    return "sparse"


# ---------------------------------------------------------------------------- autograd


def _round_to(v: float, dtype: torch.dtype) -> float:
    """``v`` rounded to nearest-even in ``dtype`` (fp32 / fp16 / bf16), as a Python float.

    Dividing two fp32 values in double and rounding once to fp32 gives the IEEE fp32
    quotient (double has more than twice fp32's precision), so this reproduces
    ``torch.div`` on fp32 tensors without launching a kernel."""
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", v))[0]
    if dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return v


class _ApplyKeepMask(torch.autograd.Function):
    """``out = x * keep * scale`` (dropped units optionally filled), saving only the bool mask."""

    @staticmethod
    def forward(ctx, x, keep, scale, fill, inplace):  # type: ignore[override]
        s = scale.to(x.dtype) if isinstance(scale, torch.Tensor) else scale
        if keep.numel() < x.numel() and fill is None:
            # Shared / batch masks are small: fold the scale into them, one pass over x.
            m = keep.to(x.dtype).mul_(s)
            out = x.mul_(m) if inplace else torch.mul(x, m)
            if inplace:
                ctx.mark_dirty(x)
        elif inplace:
            out = x.mul_(keep).mul_(s)
            ctx.mark_dirty(x)
        else:
            out = torch.mul(x, keep).mul_(s)
        if fill is not None:
            out.add_(fill.masked_fill(keep, 0))
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(keep, scale)
        else:
            ctx.save_for_backward(keep)
            ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        keep = saved[0]
        s = saved[1].to(grad.dtype) if len(saved) > 1 else ctx.scale
        if keep.numel() < grad.numel():
            return torch.mul(grad, keep.to(grad.dtype).mul_(s)), None, None, None, None
        return torch.mul(grad, keep).mul_(s), None, None, None, None


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
    p_float: float | None = None
    if isinstance(drop_prob, torch.Tensor):
        if not compiling:
            p_float = check_drop_prob(float(drop_prob))
    else:
        p_float = check_drop_prob(drop_prob)
    block_req = normalize_block_size(block_size, x.dim() - 2)
    if not compiling:
        check_options(mask, seed_region, scale, gamma_scale, noise, calibrate, inplace)
    if not training or p_float == 0.0:
        return x
    return _drop_block_train(
        x, drop_prob if p_float is None else p_float, block_req,
        mask, seed_region, float(gamma_scale), scale, noise, calibrate, inplace, generator,
    )


def _drop_block_train(
    x: torch.Tensor,
    drop_prob: float | torch.Tensor,
    block_req: tuple[int, ...],
    mask: str,
    seed_region: str,
    gamma_scale: float,
    scale: str,
    noise: bool,
    calibrate: bool,
    inplace: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    spatial = tuple([int(s) for s in x.shape[2:]])
    if x.numel() == 0:
        return x
    block = clip_block(spatial, block_req)
    grid = seed_grid(spatial, block, seed_region)

    gamma: float | torch.Tensor
    if isinstance(drop_prob, torch.Tensor):
        target = (drop_prob.to(device=x.device, dtype=torch.float32) * gamma_scale).clamp(0.0, 1.0)
        if calibrate:
            gamma = calibrated_gamma_tensor(target, spatial, block, seed_region)
        else:
            gamma = (target * gamma_factor(spatial, block)).clamp(0.0, 1.0)
    elif calibrate:
        gamma = calibrated_gamma(min(1.0, drop_prob * gamma_scale), spatial, block, seed_region)
    else:
        gamma = paper_gamma(drop_prob, spatial, block, gamma_scale)

    if _pick_backend(x) == "triton":
        from .custom_ops import drop_block_triton  # Triton is optional: imported on first use

        return drop_block_triton(x, gamma, block, mask, seed_region, scale, noise, inplace, generator)

    n, c = x.shape[0], x.shape[1]
    mask_nc = {"channel": (n, c), "shared": (n, 1), "batch": (1, 1)}[mask]
    fmt = _memory_format(x) if mask == "channel" else torch.contiguous_format
    with torch.no_grad():
        compiling = torch.compiler.is_compiling()
        backend = _pick_backend(x)
        n_seeds = math.prod(mask_nc + grid)
        if (
            backend == "sparse"
            and not isinstance(gamma, torch.Tensor)
            and gamma < _SPARSE_MAX_GAMMA
            and n_seeds >= _SPARSE_MIN_GRID
        ):
            pos = _sample_seed_positions(n_seeds, gamma, x.device, generator)
            keep = _expand_sparse(pos, mask_nc, grid, spatial, block, seed_region, fmt, x.device)
        else:
            seeds = _uniform(mask_nc + grid, x, fmt, generator) < gamma
            keep = _expand_dense(seeds, spatial, block, seed_region, fmt)

        scale_t: float | torch.Tensor
        if scale == "count" and x.device.type == "cpu" and not compiling:
            # On the CPU a host read of the count is free; a Python float saves kernels. It is
            # the fp32 quotient rounded to x's dtype, bit for bit what the tensor path computes.
            kept_n = max(1, int(torch.count_nonzero(keep)))
            q = _round_to(float(keep.numel()), torch.float32) / _round_to(float(kept_n), torch.float32)
            scale_t = _round_to(_round_to(q, torch.float32), x.dtype)
        elif scale == "count":
            kept = torch.count_nonzero(keep).clamp_(min=1).to(torch.float32)
            scale_t = torch.div(float(keep.numel()), kept)
        elif scale == "expected":
            if isinstance(gamma, torch.Tensor):
                scale_t = 1.0 / expected_keep_tensor(gamma, spatial, block, seed_region).clamp(min=1e-12)
            else:
                keep_rate = 1.0 - expected_drop_rate(gamma, spatial, block, seed_region)
                scale_t = 1.0 / max(keep_rate, 1e-12)
        else:
            scale_t = 1.0
        fill = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator) if noise else None
    if fill is None and not inplace and keep.numel() * 4 <= x.numel():
        # Shared / batch masks with >= 4 channels: a plain multiply by the small scaled mask
        # (autograd saves it: at most 1 byte per unit of x) beats a Python autograd.Function.
        with torch.no_grad():
            s = scale_t.to(x.dtype) if isinstance(scale_t, torch.Tensor) else scale_t
            m = keep.to(x.dtype).mul_(s)
        return x * m
    return _ApplyKeepMask.apply(x, keep, scale_t, fill, inplace)
