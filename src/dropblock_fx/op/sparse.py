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
  over the map: blocks of different maps never overlap, and only maps with two or more seeds
  need their positions deduplicated.

The index arithmetic runs in NumPy on the CPU (a few microseconds a call where torch
launches cost more); the random numbers come from torch's generator, so ``torch.manual_seed``
and ``generator=`` decide the masks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

__all__ = ["seed_positions", "block_positions", "distinct_count"]


def seed_positions(count: int, gamma: float, device: torch.device, generator: Optional[torch.Generator]) -> np.ndarray:
    """Sorted flat positions (int64) of the successes of ``count`` iid Bernoulli(``gamma``) trials.

    The failures before each success are ``floor(log(1 - u) / log(1 - gamma))`` for a uniform
    ``u``: the gaps of iid Bernoulli trials are iid geometric, so this is exact, and it draws
    about ``count * gamma`` numbers instead of ``count``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> seed_positions(6, 1.0, torch.device("cpu"), g).tolist()
        [0, 1, 2, 3, 4, 5]
    """
    if gamma <= 0.0 or count == 0:
        return np.empty(0, dtype=np.int64)
    log_q = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    mean = count * gamma
    chunks: list[np.ndarray] = []
    start = 0  # the next trial not yet decided
    while start < count:
        remaining = count - start
        m = int(min(remaining, mean * (remaining / count) + 6.0 * math.sqrt(mean + 1.0) + 16))
        u = torch.rand(m, dtype=torch.float64, device=device, generator=generator).cpu().numpy()
        if gamma < 1.0:
            steps = np.floor(np.log1p(-u) / log_q)
            steps += 1.0
        else:
            steps = np.ones(m)
        pos = np.cumsum(steps)  # exact in float64 below 2**53
        pos += start - 1
        inside = int(np.searchsorted(pos, count))  # pos is increasing: the first `inside` are < count
        chunks.append(pos[:inside].astype(np.int64))
        if inside < m:
            break
        start = int(pos[-1]) + 1
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@lru_cache(maxsize=256)
def _block_offsets(block: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """Flat offsets of a block's units from its first one, for the given spatial strides."""
    off = np.zeros(1, dtype=np.int64)
    for k, s in zip(block, strides):
        off = np.add.outer(off, np.arange(k, dtype=np.int64) * s).reshape(-1)
    off.setflags(write=False)
    return off


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
    coords = np.unravel_index(seeds, tuple(mask_nc) + tuple(grid))
    n_sp = len(spatial)
    base = coords[0] * strides[0] + coords[1] * strides[1]
    if seed_region == "valid":
        for d in range(n_sp):
            base += coords[2 + d] * strides[2 + d]
        return base[:, None] + _block_offsets(tuple(block), tuple(strides[2:]))[None, :]
    flat = base[:, None]
    for d, (k, size) in enumerate(zip(block, spatial)):
        c = coords[2 + d][:, None] + (np.arange(k, dtype=np.int64) - k // 2)[None, :]
        np.clip(c, 0, size - 1, out=c)
        c *= strides[2 + d]
        flat = (flat[:, :, None] + c[:, None, :]).reshape(len(seeds), -1)
    return flat


def distinct_count(
    seeds: np.ndarray, positions: np.ndarray, grid: tuple[int, ...], spatial: tuple[int, ...],
    block: tuple[int, ...], seed_region: str,
) -> int:
    """How many distinct units the blocks at ``positions`` (from `block_positions`) cover.

    Blocks of different maps never overlap, so a seed alone in its map drops a whole block
    (clipped at the border with ``seed_region="full"``); only the maps with several seeds have
    their positions deduplicated.

    Examples:
        >>> seeds = np.array([0, 3, 4])   # map 0: seeds at (0, 0) and (1, 1); map 1: one seed
        >>> pos = block_positions(seeds, (2, 1), (2, 2), (3, 3), (2, 2), "valid", (9, 9, 3, 1))
        >>> distinct_count(seeds, pos, (2, 2), (3, 3), (2, 2), "valid")
        11
    """
    n = len(seeds)
    if n == 0:
        return 0
    if seed_region == "valid":
        sizes = np.full(n, math.prod(block), dtype=np.int64)
    else:  # a full-region block is clipped where it crosses the border
        coords = np.unravel_index(seeds % math.prod(grid), tuple(grid))
        sizes = np.ones(n, dtype=np.int64)
        for g, k, size in zip(coords, block, spatial):
            sizes *= np.minimum(size - 1, g + (k - 1) // 2) - np.maximum(0, g - k // 2) + 1
    plane = seeds // math.prod(grid)
    same = plane[1:] == plane[:-1]  # seeds are sorted: a map's seeds are neighbours
    if not same.any():
        return int(sizes.sum())
    shared = np.zeros(n, dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    # Sorting a few thousand positions beats np.unique's hash table here.
    v = np.sort(positions[shared], axis=None)
    return int(sizes[~shared].sum()) + 1 + int(np.count_nonzero(v[1:] != v[:-1]))
