"""Drawing DropBlock's keep-mask and its normaliser: seed sampling, block expansion, backends.

Three ways to build the mask, picked by `pick_backend` (or forced with
[`set_backend`][dropblock_fx.set_backend] / ``DROPBLOCK_FX_BACKEND``):

* ``"reference"``: dense, plain torch ops (a separable sliding max over the seed grid),
  the official algorithm as written; traceable by ``torch.compile`` and ``torch.func``.
* ``"sparse"`` (the CPU default): samples the seeds' positions directly (the gaps between
  Bernoulli successes are geometric) and scatters their ``k x k`` blocks, so the cost
  follows the number of seeds (gamma is ~0.006 at the paper's settings).
* ``"triton"`` (the CUDA default when Triton is importable): fused kernels, see
  ``custom_ops.py``; they build and apply the mask in one op, so they do not come here.

Given the same seed grid, "reference" and "sparse" expand to bit-identical masks.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .gamma import clip_block, expected_scale, seed_grid, seed_rate
from .sparse import block_positions, dropped_units, seed_positions, strides_of

__all__ = [
    "BACKENDS", "set_backend", "pick_backend", "keep_mask", "dropped_positions", "sampled_keep_mask", "under_functorch",
    "covers_whole_map", "whole_map_keep", "whole_map_scaled_keep", "SparsePlan", "sparse_plan", "sample_dropped",
]

BACKENDS: tuple[str, ...] = ("auto", "reference", "sparse", "triton")

_backend: str = "auto"
# Above this seed rate the geometric sampler draws more numbers than the dense path.
_SPARSE_MAX_GAMMA = 0.25
# Below this many seed positions (shared / batch masks) a few dense ops cost less than
# the sampler's bookkeeping.
_SPARSE_MIN_GRID = 1 << 15
_CPU = torch.device("cpu")


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


def _find_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_HAS_TRITON: bool = _find_triton()
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def under_functorch(x: torch.Tensor) -> bool:
    """Is ``x`` a ``torch.func`` transform's tensor (``vmap``, ``grad``, ``jvp``)? Those need
    the dense path: no host reads, no strides asked, random numbers drawn out of place.
    (Compiled code never is: dynamo traces transforms itself.)

    Examples:
        >>> seen = []
        >>> _ = torch.func.vmap(lambda t: seen.append(under_functorch(t)) or t)(torch.ones(2, 3))
        >>> under_functorch(torch.ones(2)), seen
        (False, [True])
    """
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x)


def pick_backend(x: torch.Tensor) -> str:
    """The backend that builds ``x``'s mask (``set_backend`` wins over the choice by device).

    Examples:
        >>> pick_backend(torch.ones(1, 1, 4, 4))
        'sparse'
    """
    if _backend != "auto":
        return _backend
    if x.device.type == "cuda" and _HAS_TRITON and x.dtype in _TRITON_DTYPES:
        return "triton"  # fused kernels (op/triton_kernels.py), one custom op for compile/FX
    if x.device.type != "cpu":
        return "reference"  # the sparse path reads seed positions on the host: a sync on GPUs
    # Compiled code reaches the sparse sampler through one opaque op (`sampled_keep_mask`).
    return "sparse"


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


def sample_seed_positions(count: int, gamma: float, device: torch.device, generator) -> torch.Tensor:
    """Flat positions of the successes of ``count`` iid Bernoulli(gamma) trials (a tensor on
    ``device``); see `dropblock_fx.op.sparse.seed_positions`.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_seed_positions(10, 1.0, torch.device("cpu"), g).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    return torch.from_numpy(seed_positions(count, gamma, device, generator)).to(device)


def expand_sparse(
    seed_pos: torch.Tensor,
    mask_nc: tuple[int, int],
    grid: tuple[int, ...],
    spatial: tuple[int, ...],
    block: tuple[int, ...],
    seed_region: str,
    fmt: torch.memory_format,
    device: torch.device,
) -> torch.Tensor:
    """Keep-mask by scattering each seed's block: cost proportional to the number of seeds.

    ``seed_pos`` are flat (row-major) positions in the ``mask_nc + grid`` seed tensor.
    """
    shape = tuple(mask_nc) + tuple(spatial)
    keep = torch.empty(shape, dtype=torch.bool, device=device, memory_format=fmt).fill_(True)
    if seed_pos.numel() == 0:
        return keep
    pos = block_positions(seed_pos.cpu().numpy(), mask_nc, grid, spatial, block, seed_region, keep.stride())
    storage = keep.as_strided((keep.numel(),), (1,))
    storage.index_fill_(0, torch.from_numpy(pos.reshape(-1)).to(device), False)
    return keep


def seeds_to_positions(seeds: torch.Tensor) -> torch.Tensor:
    """Flat positions of the seeds of a dense seed tensor (to compare the two expansions)."""
    return seeds.contiguous().reshape(-1).nonzero().squeeze(1)


def expand_dense(
    seeds: torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str,
    fmt: torch.memory_format,
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


def round_to(v: float, dtype: torch.dtype) -> float:
    """``v`` rounded to nearest-even in ``dtype`` (fp32 / fp16 / bf16), as a Python float.

    Dividing two fp32 values in double and rounding once to fp32 gives the IEEE fp32
    quotient (double has more than twice fp32's precision), so this reproduces
    ``torch.div`` on fp32 tensors without launching a kernel.

    Examples:
        >>> round_to(0.1, torch.bfloat16)
        0.10009765625
    """
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", v))[0]
    if dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return v


Scale = Union[float, torch.Tensor]


def count_scale(numel: int, kept: int, dtype: torch.dtype) -> float:
    """The ``"count"`` normaliser ``numel / max(kept, 1)`` as a Python float: the fp32 quotient
    rounded to ``dtype``, bit for bit what the tensor path computes.

    Examples:
        >>> count_scale(100, 90, torch.float32) == float(torch.tensor(100.0) / torch.tensor(90.0))
        True
    """
    q = round_to(float(numel), torch.float32) / round_to(float(max(kept, 1)), torch.float32)
    return round_to(round_to(q, torch.float32), dtype)


def dropped_positions(
    x: torch.Tensor,
    gamma: float,
    block: tuple[int, ...],
    seed_region: str,
    scale: str,
    fmt: torch.memory_format,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Scale]:
    """A per-channel mask of ``x`` as the flat positions (int64, in the storage order of a
    dense tensor of ``x``'s shape in ``fmt``) of the units it drops, and the normaliser.

    A unit may be listed more than once (overlapping blocks): ``index_fill_`` does not mind.
    The sparse path: cost follows the number of seeds, not the size of ``x``.

    Examples:
        >>> x = torch.ones(2, 3, 8, 8)
        >>> pos, s = dropped_positions(x, 0.05, (3, 3), "valid", "count", torch.contiguous_format)
        >>> out = x * s
        >>> _ = out.view(-1).index_fill_(0, pos, 0)
        >>> round(out.sum().item()) == x.numel()   # the count normaliser keeps the sum
        True
    """
    shape = tuple([int(s) for s in x.shape])
    plan = _plan(shape, strides_of(shape, fmt), fmt, True, tuple(block), seed_region, scale, gamma)
    return sample_dropped(plan, seed_region, scale, x.dtype, generator, x.device)


class SparsePlan(NamedTuple):
    """What the CPU per-channel path needs of one input layout, block and rate, worked out once
    (`sparse_plan`): the seed rate, the geometry, and the layout of the positions."""

    gamma: float
    whole_map: bool  # every seed drops its whole map (`covers_whole_map`)
    fmt: torch.memory_format  # the output's memory format (x's when x is dense in one)
    dense: bool  # x is dense in ``fmt``: ``x * s`` has the output's layout
    mask_nc: tuple[int, int]
    spatial: tuple[int, ...]
    block: tuple[int, ...]  # clipped to the map
    grid: tuple[int, ...]
    strides: tuple[int, ...]  # of a dense tensor of x's shape in ``fmt``
    n_seeds: int  # seed positions: maps x grid
    numel: int
    expected: float  # the normaliser of ``scale="expected"`` (1.0 for the other modes)


@lru_cache(maxsize=1024)
def sparse_plan(
    shape: tuple[int, ...], stride: tuple[int, ...], block_req: tuple[int, ...], seed_region: str, scale: str,
    drop_prob: float, gamma_scale: float, calibrate: bool,
) -> Optional[SparsePlan]:
    """The `SparsePlan` of an input of this shape and stride at this rate, or ``None`` when the
    sparse path does not take it (a seed rate of `_SPARSE_MAX_GAMMA` or more). Cached: a
    training loop meets the same few layouts and rates at every step.

    Examples:
        >>> plan = sparse_plan((8, 64, 14, 14), (12544, 196, 14, 1), (7, 7), "valid", "count", 0.1, 1.0, False)
        >>> plan.grid, plan.n_seeds, plan.whole_map, round(plan.gamma, 6)
        ((8, 8), 32768, False, 0.00625)
    """
    spatial = tuple(shape[2:])
    block = clip_block(spatial, block_req)
    gamma = seed_rate(drop_prob, spatial, block, gamma_scale, calibrate, seed_region)
    if not gamma < _SPARSE_MAX_GAMMA:
        return None
    fmt = _memory_format(torch.empty_strided(shape, stride, device="meta"))
    strides = strides_of(shape, fmt)
    return _plan(tuple(shape), strides, fmt, tuple(stride) == strides, block, seed_region, scale, float(gamma))


def _plan(shape: tuple[int, ...], strides: tuple[int, ...], fmt: torch.memory_format, dense: bool,
          block: tuple[int, ...], seed_region: str, scale: str, gamma: float) -> SparsePlan:
    spatial = shape[2:]
    grid = seed_grid(spatial, block, seed_region)
    mask_nc = (shape[0], shape[1])
    expected = float(expected_scale(gamma, spatial, block, seed_region)) if scale == "expected" else 1.0
    return SparsePlan(gamma, covers_whole_map(spatial, block, seed_region), fmt, dense, mask_nc, spatial, block,
                      grid, strides, math.prod(mask_nc + grid), math.prod(shape), expected)


def sample_dropped(plan: SparsePlan, seed_region: str, scale: str, dtype: torch.dtype,
                   generator: Optional[torch.Generator] = None, device: torch.device = _CPU,
                   ) -> tuple[torch.Tensor, float]:
    """A fresh per-channel mask of `plan`'s input as the flat positions it drops (see
    `dropped_positions`, which draws the same) and the normaliser as a float.

    Examples:
        >>> plan = sparse_plan((2, 3, 8, 8), (192, 64, 8, 1), (3, 3), "valid", "count", 0.3, 1.0, False)
        >>> g = torch.Generator().manual_seed(0)
        >>> pos, s = sample_dropped(plan, "valid", "count", torch.float32, g)
        >>> pos2, s2 = dropped_positions(torch.ones(2, 3, 8, 8), plan.gamma, (3, 3), "valid", "count",
        ...                              torch.contiguous_format, torch.Generator().manual_seed(0))
        >>> torch.equal(pos, pos2), s == s2
        (True, True)
    """
    pos, factor = _sample_dropped(plan, seed_region, scale, dtype, generator, device)
    return torch.from_numpy(pos), factor


def _sample_dropped(plan: SparsePlan, seed_region: str, scale: str, dtype: torch.dtype,
                    generator: Optional[torch.Generator], device: torch.device) -> tuple[np.ndarray, float]:
    # `sample_dropped` with the positions left in NumPy (one flat array).
    seeds = seed_positions(plan.n_seeds, plan.gamma, device, generator)
    pos, dropped = dropped_units(seeds, plan.mask_nc, plan.grid, plan.spatial, plan.block, seed_region,
                                 plan.strides, count=scale == "count")
    if scale == "count":
        return pos, count_scale(plan.numel, plan.numel - dropped, dtype)
    return pos, plan.expected


def covers_whole_map(spatial: Sequence[int], block: Sequence[int], seed_region: str) -> bool:
    """Does every seed drop its whole map? (``seed_region="valid"`` and a block, clipped to
    the map, as large as the map: ResNet's last stage at 224 px with the paper's block 7.)
    Then a per-channel mask is one flag per map.

    Examples:
        >>> covers_whole_map((7, 7), (7, 7), "valid"), covers_whole_map((14, 14), (7, 7), "valid")
        (True, False)
    """
    return seed_region == "valid" and tuple(block) == tuple(spatial)


def _whole_map_factor(mask_nc: tuple[int, int], spatial: tuple[int, ...], dropped: int, gamma: float, scale: str,
                      dtype: torch.dtype) -> float:
    area = math.prod(spatial)
    if scale == "count":
        numel = mask_nc[0] * mask_nc[1] * area
        return count_scale(numel, numel - dropped * area, dtype)
    if scale == "expected":
        return float(expected_scale(gamma, spatial, tuple(spatial), "valid"))
    return 1.0


def whole_map_keep(
    mask_nc: tuple[int, int], spatial: tuple[int, ...], gamma: float, scale: str, dtype: torch.dtype,
    device: torch.device, generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, float]:
    """The keep-mask when every seed drops its whole map (`covers_whole_map`): one bool per
    map, shape ``mask_nc + (1,) * len(spatial)``, and the normaliser as a float. The seeds are
    those the sparse path draws (the same random numbers), so the mask, broadcast over each
    map, is the one it gives.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> keep, s = whole_map_keep((2, 3), (7, 7), 0.5, "count", torch.float32, torch.device("cpu"), g)
        >>> keep.shape, s == 6 / keep.sum().item()
        (torch.Size([2, 3, 1, 1]), True)
    """
    size = mask_nc + (1,) * len(spatial)
    if gamma < _SPARSE_MAX_GAMMA:
        seeds = seed_positions(mask_nc[0] * mask_nc[1], gamma, device, generator)
        flags = np.ones(mask_nc[0] * mask_nc[1], dtype=np.bool_)  # NumPy: cheaper than torch on bool
        flags[seeds] = False
        keep = torch.from_numpy(flags).view(size).to(device)
        dropped = len(seeds)
    else:  # as the dense path draws: one uniform per map
        keep = torch.rand(size, dtype=torch.float32, device=device, generator=generator) >= gamma
        dropped = keep.numel() - int(torch.count_nonzero(keep))
    return keep, _whole_map_factor(mask_nc, spatial, dropped, gamma, scale, dtype)


def whole_map_scaled_keep(
    mask_nc: tuple[int, int], spatial: tuple[int, ...], gamma: float, scale: str, dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """`whole_map_keep` (``gamma`` below the sparse limit, on the CPU) already multiplied by
    its normaliser, in ``dtype``: the eager path's one small tensor, built in two ops.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = whole_map_scaled_keep((2, 3), (7, 7), 0.2, "count", torch.float32, g)
        >>> keep, s = whole_map_keep((2, 3), (7, 7), 0.2, "count", torch.float32, torch.device("cpu"),
        ...                          torch.Generator().manual_seed(0))
        >>> torch.equal(m, keep.to(torch.float32) * s)
        True
    """
    seeds = seed_positions(mask_nc[0] * mask_nc[1], gamma, _CPU, generator)
    factor = _whole_map_factor(mask_nc, spatial, len(seeds), gamma, scale, dtype)
    m = torch.full(mask_nc + (1,) * len(spatial), factor, dtype=dtype)
    if len(seeds):
        m.view(-1).index_fill_(0, torch.from_numpy(seeds), 0)
    return m


def keep_mask(
    x: torch.Tensor,
    gamma: Union[float, torch.Tensor],
    block: tuple[int, ...],
    mask: str,
    seed_region: str,
    scale: str,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Scale]:
    """The keep-mask of ``x`` (bool; ``(N, C)``, ``(N, 1)`` or ``(1, 1)`` times the spatial
    size, by ``mask``) and the factor that normalises the kept units (``scale``).

    ``gamma`` is the seed rate (a float in eager code, a 0-d tensor under ``torch.compile``);
    ``block`` is already clipped to the map. Runs without autograd: the mask is data.

    Examples:
        >>> keep, s = keep_mask(torch.ones(2, 3, 8, 8), 0.0, (3, 3), "channel", "valid", "count")
        >>> keep.shape, bool(keep.all()), s
        (torch.Size([2, 3, 8, 8]), True, 1.0)
    """
    spatial = tuple([int(s) for s in x.shape[2:]])
    grid = seed_grid(spatial, block, seed_region)
    n, c = x.shape[0], x.shape[1]
    mask_nc = {"channel": (n, c), "shared": (n, 1), "batch": (1, 1)}[mask]
    functorch = under_functorch(x)
    fmt = _memory_format(x) if mask == "channel" and not functorch else torch.contiguous_format
    with torch.no_grad():
        compiling = torch.compiler.is_compiling()
        backend = "reference" if functorch else pick_backend(x)
        n_seeds = math.prod(mask_nc + grid)
        if (
            backend == "sparse"
            and not isinstance(gamma, torch.Tensor)
            and gamma < _SPARSE_MAX_GAMMA
            and n_seeds >= _SPARSE_MIN_GRID
        ):
            pos = sample_seed_positions(n_seeds, gamma, x.device, generator)
            keep = expand_sparse(pos, mask_nc, grid, spatial, block, seed_region, fmt, x.device)
        else:
            if functorch:  # out of place, so vmap draws one mask per batch entry
                u = torch.rand(mask_nc + grid, dtype=torch.float32, device=x.device, generator=generator)
            else:
                u = _uniform(mask_nc + grid, x, fmt, generator)
            keep = expand_dense(u < gamma, spatial, block, seed_region, fmt)

        factor: Scale
        if scale == "count" and x.device.type == "cpu" and not compiling and not functorch:
            # On the CPU a host read of the count is free; a Python float saves kernels.
            factor = count_scale(keep.numel(), int(torch.count_nonzero(keep)), x.dtype)
        elif scale == "count":
            kept = torch.count_nonzero(keep).clamp(min=1).to(torch.float32)
            factor = torch.div(float(keep.numel()), kept)
        elif scale == "expected":
            factor = expected_scale(gamma, spatial, block, seed_region)
        else:
            factor = 1.0
    return keep, factor


def _mask_layout(shape: Sequence[int], mask: str, channels_last: bool, block: Sequence[int],
                 seed_region: str) -> tuple[tuple, torch.memory_format]:
    n, c = {"channel": (shape[0], shape[1]), "shared": (shape[0], 1), "batch": (1, 1)}[mask]
    spatial = tuple(shape[2:])
    if covers_whole_map(spatial, clip_block(spatial, tuple(block)), seed_region):
        return (n, c, *[1] * len(spatial)), torch.contiguous_format  # broadcast over each map
    fmt = torch.contiguous_format
    if channels_last and mask == "channel":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return (n, c, *shape[2:]), fmt


class MaskBuffers:
    """Bool buffers for the masks of the compiled op, reused once no tensor holds them.

    A compiled graph draws a new mask at every site of every step, and frees it after the
    backward. A fresh buffer of that size comes from the OS each time (glibc returns large
    freed blocks), so the kernel maps and zeroes its pages again: at ResNet-50's layer3 sites
    that is a page fault per 4 KiB of each mask, every step. A buffer here is handed out again
    only when nothing references it but the pool: a tensor made by ``torch.from_numpy`` keeps
    its array alive (and so referenced) until the last tensor or view of its storage is gone,
    whatever still holds it (autograd, a retained graph, the caller). Buffers of the sizes in
    use are kept up to ``limit`` bytes in all; beyond that new buffers are not kept.

    Examples:
        >>> pool = MaskBuffers(limit=1 << 20)
        >>> a = pool.take(100)
        >>> t = torch.from_numpy(a)       # in use: the next take makes another
        >>> b = pool.take(100)
        >>> del a, t
        >>> pool.take(100) is not b       # the first one is free again, b is not (held here)
        True
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: dict[int, list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        # What `_refs` reads for an array that only its list holds: measured, not assumed (what
        # the interpreter adds itself differs between Python versions).
        self._unheld = _refs([np.empty(0, dtype=np.bool_)])[0]

    def take(self, numel: int) -> np.ndarray:
        """A 1-D bool array of ``numel`` elements, contents undefined, that nothing else holds."""
        with self._lock:
            kept = self._free.setdefault(numel, [])
            for arr, refs in zip(kept, _refs(kept)):
                if refs == self._unheld:
                    return arr
            arr = np.empty(numel, dtype=np.bool_)
            if self._bytes + numel > self.limit:
                self._drop_unheld()
            if self._bytes + numel <= self.limit:
                kept.append(arr)
                self._bytes += numel
            return arr

    def _drop_unheld(self) -> None:
        """Forget the buffers nothing holds (those of sizes no longer drawn, say)."""
        for numel, kept in self._free.items():
            busy = [a for a, refs in zip(kept, _refs(kept)) if refs != self._unheld]
            self._bytes -= numel * (len(kept) - len(busy))
            kept[:] = busy


def _refs(arrays: list[np.ndarray]) -> list[int]:
    """The reference count of each array of a list (one code path for the measure and its baseline)."""
    return [sys.getrefcount(a) for a in arrays]


# At most 256 MiB of masks kept between steps (the 24 layer3 masks of ResNet-50 at batch 32 and
# 224 px hold 101 MB: one byte per unit of their maps).
_MASK_BUFFERS = MaskBuffers(256 << 20)


def _sampled_keep_mask(
    drop_prob: torch.Tensor, shape: Sequence[int], channels_last: bool, block: Sequence[int], mask: str,
    seed_region: str, gamma_scale: float, scale: str, calibrate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of `sampled_keep_mask`."""
    size, fmt, strides, plan = _compiled_plan(tuple(shape), channels_last, tuple(block), mask, seed_region, scale,
                                     float(drop_prob), gamma_scale, calibrate)
    device = drop_prob.device
    factor: float
    # The mask is built in NumPy: a NumPy fill and scatter of a bool array cost a fraction of
    # torch's on the CPU (``fill_`` and ``index_fill_`` on bool), and a compiled graph calls
    # this at every site of every step. The positions are those the eager path zeroes.
    if plan is not None and plan.whole_map:  # one flag per map (size ends in 1s)
        keep, factor = whole_map_keep(plan.mask_nc, plan.spatial, plan.gamma, scale, torch.float32, device)
    elif plan is not None:
        # The seeds and blocks of `_sample_dropped` (the same draws), left uncounted: the kept
        # units are counted on the mask (one vectorised pass), not by sorting the positions as
        # the eager path must: the same count in two thirds of the time at ResNet's layer3.
        seeds = seed_positions(plan.n_seeds, plan.gamma, device, None)
        pos = dropped_units(seeds, plan.mask_nc, plan.grid, plan.spatial, plan.block, seed_region, plan.strides,
                            count=False)[0]
        flat = _MASK_BUFFERS.take(plan.numel)
        flat.fill(True)
        flat[pos] = False  # flat positions in storage order (``fmt``'s, or the same one)
        factor = count_scale(plan.numel, int(np.count_nonzero(flat)), torch.float32) if scale == "count" \
            else plan.expected
        keep = torch.from_numpy(flat).as_strided(size, strides).to(device)
    else:  # a seed rate the sparse sampler does not take: the dense draw
        spatial = tuple([int(v) for v in shape[2:]])
        block_t = clip_block(spatial, tuple([int(k) for k in block]))
        gamma = float(seed_rate(float(drop_prob), spatial, block_t, gamma_scale, calibrate, seed_region))
        if covers_whole_map(spatial, block_t, seed_region):
            keep, factor = whole_map_keep(size[:2], spatial, gamma, scale, torch.float32, device)
        else:
            u = torch.empty(size[:2] + seed_grid(spatial, block_t, seed_region), dtype=torch.float32, device=device,
                            memory_format=fmt).uniform_()
            keep = expand_dense(u < gamma, spatial, block_t, seed_region, fmt)
            if scale == "count":
                factor = count_scale(keep.numel(), int(torch.count_nonzero(keep)), torch.float32)
            elif scale == "expected":
                factor = float(expected_scale(gamma, spatial, block_t, seed_region))
            else:
                factor = 1.0
    # uint8, not bool (the same bytes, reinterpreted): inductor's CPU kernels load a bool
    # operand one element at a time (``VecMask::from``), a uint8 one as a vector (a load and a
    # convert): in ResNet-50's compiled CPU step (160 px, batch 8) the same masks cost about 2%
    # of the step more as bool than as uint8. A 0-d tensor from NumPy: a fraction of the cost of
    # ``torch.tensor``.
    return keep.view(torch.uint8), torch.from_numpy(np.array(factor, dtype=np.float32)).to(device)


@lru_cache(maxsize=1024)
def _compiled_plan(
    shape: tuple[int, ...], channels_last: bool, block: tuple[int, ...], mask: str, seed_region: str, scale: str,
    drop_prob: float, gamma_scale: float, calibrate: bool,
) -> tuple[tuple[int, ...], torch.memory_format, tuple[int, ...], Optional[SparsePlan]]:
    """The compiled op's mask size, layout and strides (its fake's), and the `SparsePlan` of its
    full-size mask. The plan's layout can be contiguous where the fake's is channels-last (one
    channel, or 1x1 maps): the two storage orders are then the same, but not all the strides."""
    size, fmt = _mask_layout(shape, mask, channels_last, block, seed_region)
    full = size[:2] + tuple(shape[2:])
    return size, fmt, strides_of(size, fmt), sparse_plan(full, strides_of(full, fmt), block, seed_region, scale,
                                                         drop_prob, gamma_scale, calibrate)


def _sampled_keep_mask_fake(drop_prob, shape, channels_last, block, mask, seed_region, gamma_scale, scale, calibrate):
    size, fmt = _mask_layout(shape, mask, channels_last, block, seed_region)
    keep = torch.empty(size, dtype=torch.uint8, device=drop_prob.device, memory_format=fmt)
    return keep, torch.empty((), dtype=torch.float32, device=drop_prob.device)


# Registered with torch.library's low-level API, not ``torch.library.custom_op``: a compiled
# graph calls the op at every site and step, and custom_op's Python wrapper (its autograd
# check and aliasing checks) cost about 0.1 ms a call inside a training step, more than the
# op's own bookkeeping. The op has no autograd formula: its outputs are a mask and a scale.
#
# The op's name carries the version of its output layout: inductor's on-disk caches key a
# compiled graph on the ops it calls, not on their code, so a graph compiled when the mask was
# always full-size must not be reused now that a block covering its map gives one flag per map
# (v2), nor one that reads a bool mask now that the mask is uint8 (v3).
_LIB = torch.library.Library("dropblock_fx", "FRAGMENT")
_LIB.define(
    "sampled_keep_mask_v3(Tensor drop_prob, SymInt[] shape, bool channels_last, SymInt[] block, str mask, "
    "str seed_region, float gamma_scale, str scale, bool calibrate) -> (Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag, torch.Tag.nondeterministic_seeded),
)
_LIB.impl("sampled_keep_mask_v3", _sampled_keep_mask, "CompositeExplicitAutograd")
torch.library.register_fake("dropblock_fx::sampled_keep_mask_v3", _sampled_keep_mask_fake, lib=_LIB)

sampled_keep_mask = torch.ops.dropblock_fx.sampled_keep_mask_v3.default
"""``torch.ops.dropblock_fx.sampled_keep_mask_v3(drop_prob, shape, channels_last, block, mask,
seed_region, gamma_scale, scale, calibrate) -> (keep, scale)``: the keep-mask (uint8: 1 kept,
0 dropped) of a tensor of ``shape`` and its normaliser (a 0-d fp32 tensor), drawn from torch's
global generator: what a compiled graph calls on the CPU.

One opaque op per site: ``torch.compile`` traces and generates no kernel for the sampling (the
sparse sampler of the eager path runs inside), and fuses the multiply by the mask into the
neighbouring kernels. ``drop_prob`` is a tensor, so a new rate never recompiles; the op is
tagged as seeded random, so compiled graphs neither merge two calls nor recompute one in the
backward. ``block`` is clipped to the map already."""
