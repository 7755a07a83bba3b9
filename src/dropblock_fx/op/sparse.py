"""The sparse path: DropBlock's seeds drawn as positions, their blocks as flat positions.

At the paper's settings a seed is drawn at ~0.6% of the seed positions, so drawing one random
number per position (the official algorithm) and sliding a ``k x k`` max over the grid does
~150x more work than the seeds need. Here:

* the gaps between Bernoulli successes are geometric, so the seeds' positions come from ~one
  random number per seed (exact, not an approximation);
* each seed's block becomes ``prod(block)`` flat positions in the storage of the mask (or of
  the output), in its memory format: the caller zeroes them (``index_fill_``), so applying the
  mask is one multiply by the scale plus a scatter of zeros;
* the number of distinct dropped units (the ``"count"`` normaliser) is known without a pass
  over the map: each unit has one storage position, so it is the number of distinct
  positions, counted by sorting them (or, for large sets, on a small bitmap of the maps with
  two or more seeds: blocks of different maps never overlap).

The index arithmetic runs in NumPy on the CPU (a few microseconds a call where torch
launches cost more; inside a training step, where the convolutions around it evict its code
and data from the caches, 10-40 us a call, so what it costs follows its number of calls);
the random numbers come from torch's generator, so ``torch.manual_seed`` and ``generator=``
decide the masks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

__all__ = ["seed_positions", "block_positions", "distinct_count", "dropped_units", "strides_of"]


def seed_positions(count: int, gamma: float, device: torch.device, generator: Optional[torch.Generator]) -> np.ndarray:
    """Sorted flat positions (int64) of the successes of ``count`` iid Bernoulli(``gamma``) trials.

    The gaps between successes of iid Bernoulli trials are iid geometric, so the positions are
    the running sums of geometric draws (torch's ``geometric_``, one random number each): exact,
    and about ``count * gamma`` numbers instead of ``count``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> seed_positions(6, 1.0, torch.device("cpu"), g).tolist()
        [0, 1, 2, 3, 4, 5]
    """
    if gamma <= 0.0 or count == 0:
        return np.empty(0, dtype=np.int64)
    if gamma >= 1.0:
        return np.arange(count, dtype=np.int64)
    mean = count * gamma
    chunks: list[np.ndarray] = []
    start = 0  # the next trial not yet decided
    while start < count:
        remaining = count - start
        m = _chunk_size(remaining, count, mean)
        # Trials up to and including each success: torch draws each as a float64 and rounds
        # it to the tensor's dtype, so int64 holds the same whole numbers with no cast here.
        w = torch.empty(m, dtype=torch.int64, device=device).geometric_(gamma, generator=generator)
        pos = (w if device.type == "cpu" else w.cpu()).numpy()
        pos[0] += start - 1  # so the running sums are the positions
        pos.cumsum(out=pos)
        inside = int(pos.searchsorted(count))  # pos is increasing: the first `inside` are < count
        if inside < m:
            chunks.append(pos[:inside])
            break
        chunks.append(pos)
        start = int(pos[-1]) + 1
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _chunk_size(remaining: int, count: int, mean: float) -> int:
    """How many gaps to draw for the ``remaining`` of ``count`` trials: their expected number of
    successes plus six standard deviations, so one draw nearly always reaches the end."""
    return int(min(remaining, mean * (remaining / count) + 6.0 * math.sqrt(mean + 1.0) + 16))


# Up to this many positions `dropped_units` counts the distinct ones by sorting them.
_SORT_MAX = 1 << 16


@lru_cache(maxsize=256)
def _block_offsets(block: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """Flat offsets of a block's units from its first one, for the given spatial strides."""
    off = np.zeros(1, dtype=np.int64)
    for k, s in zip(block, strides):
        off = np.add.outer(off, np.arange(k, dtype=np.int64) * s).reshape(-1)
    off.setflags(write=False)
    return off


def _valid_positions(
    seeds: np.ndarray, plane_local: tuple[np.ndarray, np.ndarray], mask_nc: tuple[int, int], grid: tuple[int, ...],
    block: tuple[int, ...], strides: tuple[int, ...],
) -> np.ndarray:
    # A seed's block starts at the seed: its first unit is the map's base plus the seed's
    # offset in the grid (a table per grid and strides), the rest follow at fixed offsets.
    plane, local = plane_local
    lut, offsets = _position_tables(tuple(grid), tuple(block), tuple(strides[2:]))
    if strides[0] == mask_nc[1] * strides[1]:  # maps in storage order (contiguous)
        base = plane * strides[1]
    else:
        n, c = np.divmod(plane, mask_nc[1])
        base = n * strides[0]
        base += c if strides[1] == 1 else c * strides[1]
    base += lut[local]
    return np.add.outer(base, offsets)


@lru_cache(maxsize=256)
def _position_tables(grid: tuple[int, ...], block: tuple[int, ...], strides: tuple[int, ...]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """For these spatial strides: the offset of each seed-grid position, and a block's offsets."""
    return _block_offsets(grid, strides), _block_offsets(block, strides)


def block_positions(
    seeds: np.ndarray, mask_nc: tuple[int, int], grid: tuple[int, ...], spatial: tuple[int, ...],
    block: tuple[int, ...], seed_region: str, strides: tuple[int, ...],
) -> np.ndarray:
    """Flat storage positions of the units each seed drops: ``(seeds, prod(block))`` int64.

    ``seeds`` are flat row-major positions in the ``mask_nc + grid`` seed tensor; ``strides``
    are those of the mask (or output) tensor the positions index, so any memory format works.
    With ``seed_region="full"`` blocks are clipped at the border: clipped units repeat the
    border's position (``index_fill_`` does not mind; `distinct_count` does the counting).

    Examples:
        >>> block_positions(np.array([0, 3]), (1, 1), (2, 2), (3, 3), (2, 2), "valid", (9, 9, 3, 1)).tolist()
        [[0, 1, 3, 4], [4, 5, 7, 8]]
    """
    if seed_region == "valid":
        return _valid_positions(seeds, np.divmod(seeds, math.prod(grid)), mask_nc, grid, block, strides)
    coords = np.unravel_index(seeds, tuple(mask_nc) + tuple(grid))
    flat = (coords[0] * strides[0] + coords[1] * strides[1])[:, None]
    for d, (k, size) in enumerate(zip(block, spatial)):
        c = coords[2 + d][:, None] + (np.arange(k, dtype=np.int64) - k // 2)[None, :]
        np.clip(c, 0, size - 1, out=c)
        c *= strides[2 + d]
        flat = (flat[:, :, None] + c[:, None, :]).reshape(len(seeds), flat.shape[1] * k)
    return flat


def distinct_count(
    seeds: np.ndarray, grid: tuple[int, ...], spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str,
) -> int:
    """How many distinct units the blocks of ``seeds`` (flat, sorted positions in the
    ``maps + grid`` seed tensor, as `seed_positions` gives them) cover.

    Blocks of different maps never overlap, so a seed alone in its map drops a whole block
    (clipped at the border with ``seed_region="full"``); only the maps with several seeds have
    their blocks drawn, on a bitmap of those maps alone, and its set units counted.

    Examples:
        >>> seeds = np.array([0, 3, 4])   # map 0: seeds at (0, 0) and (1, 1); map 1: one seed
        >>> distinct_count(seeds, (2, 2), (3, 3), (2, 2), "valid")
        11
    """
    if len(seeds) == 0:
        return 0
    if seed_region == "valid":
        plane, local = np.divmod(seeds, math.prod(grid))
        return _distinct(seeds, plane, local, grid, spatial, block, seed_region)
    return _distinct(seeds, seeds // math.prod(grid), None, grid, spatial, block, seed_region)


def _distinct(
    seeds: np.ndarray, plane: np.ndarray, local: Optional[np.ndarray], grid: tuple[int, ...], spatial: tuple[int, ...],
    block: tuple[int, ...], seed_region: str,
) -> int:
    # ``plane`` and ``local``: each seed's map and its position in the map's seed grid.
    same = plane[1:] == plane[:-1]  # seeds are sorted: a map's seeds are neighbours
    if not same.any():
        return len(seeds) * math.prod(block) if seed_region == "valid" else _clipped_sizes(seeds, grid, spatial, block)
    shared = np.zeros(len(seeds), dtype=bool)
    shared[1:] = same
    shared[:-1] |= same
    if seed_region == "valid":
        total = (len(seeds) - int(np.count_nonzero(shared))) * math.prod(block)
    else:
        total = _clipped_sizes(seeds[~shared], grid, spatial, block)
    # The maps with several seeds: their blocks drawn again on a bitmap of those maps only
    # (numbered in order), whose set units are counted once each.
    p = plane[shared]
    rank = np.empty(len(p), dtype=np.int64)
    rank[0] = 0
    np.cumsum(p[1:] != p[:-1], out=rank[1:])
    maps = int(rank[-1]) + 1
    area = math.prod(spatial)
    if seed_region == "valid" and local is not None:
        lut, offsets = _position_tables(tuple(grid), tuple(block), strides_of(tuple(spatial), torch.contiguous_format))
        keys = rank * area
        keys += lut[local[shared]]
        keys = np.add.outer(keys, offsets)
    else:
        n_grid = math.prod(grid)
        rank *= n_grid
        rank += seeds[shared] - p * n_grid
        dense = strides_of((maps, 1) + tuple(spatial), torch.contiguous_format)
        keys = block_positions(rank, (maps, 1), grid, spatial, block, seed_region, dense)
    bitmap = np.zeros(maps * area, dtype=bool)
    bitmap[keys.reshape(-1)] = True
    return total + int(np.count_nonzero(bitmap))


def _clipped_sizes(seeds: np.ndarray, grid: tuple[int, ...], spatial: tuple[int, ...], block: tuple[int, ...]) -> int:
    """Units covered by the full-region blocks of ``seeds``, each clipped at the border, summed."""
    coords = np.unravel_index(seeds % math.prod(grid), tuple(grid))
    sizes = np.ones(len(seeds), dtype=np.int64)
    for g, k, size in zip(coords, block, spatial):
        sizes *= np.minimum(size - 1, g + (k - 1) // 2) - np.maximum(0, g - k // 2) + 1
    return int(sizes.sum())


def dropped_units(
    seeds: np.ndarray, mask_nc: tuple[int, int], grid: tuple[int, ...], spatial: tuple[int, ...],
    block: tuple[int, ...], seed_region: str, strides: tuple[int, ...], count: bool = True,
) -> tuple[np.ndarray, int]:
    """The `block_positions` of ``seeds`` as one flat array (a unit may be listed more than
    once; in no set order) and, when ``count``, their `distinct_count` (0 otherwise), sharing
    their arithmetic: what the op calls once per site.

    Examples:
        >>> pos, n = dropped_units(np.array([0, 3, 4]), (2, 1), (2, 2), (3, 3), (2, 2), "valid", (9, 9, 3, 1))
        >>> sorted(set(pos.tolist())), n
        ([0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13], 11)
    """
    if seed_region != "valid":
        pos = block_positions(seeds, mask_nc, grid, spatial, block, seed_region, strides)
        plane_local = None
    else:
        plane_local = np.divmod(seeds, math.prod(grid))
        pos = _valid_positions(seeds, plane_local, mask_nc, grid, block, strides)
    flat = pos.reshape(-1)  # a view: pos is a new array in row-major order
    if not count or len(seeds) == 0:
        return flat, 0
    if flat.size <= _SORT_MAX:
        # Each unit has one storage position (clipped units repeat the border's, a unit the
        # block does drop): the distinct positions are the dropped units. Sorted in place by
        # a stable sort (timsort: each block's positions already increase), which takes fewer
        # NumPy calls than the bitmap below, and in order they are scattered in order.
        flat.sort(kind="stable")
        return flat, flat.size - int(np.count_nonzero(flat[1:] == flat[:-1]))
    if plane_local is None:
        return flat, distinct_count(seeds, grid, spatial, block, seed_region)
    return flat, _distinct(seeds, plane_local[0], plane_local[1], grid, spatial, block, seed_region)


def strides_of(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` in ``fmt`` (contiguous or channels-last).

    Examples:
        >>> strides_of((2, 3, 4, 5), torch.channels_last)
        (60, 1, 15, 3)
    """
    order = list(range(len(shape)))
    if fmt in (torch.channels_last, torch.channels_last_3d):
        order = [0] + order[2:] + [1]  # the channel dim varies fastest
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)
