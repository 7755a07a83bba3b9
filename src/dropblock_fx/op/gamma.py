"""Seed rate (gamma) for DropBlock: the paper's formula, the exact expected drop rate,
and the calibrated gamma that makes the expected drop rate equal the requested one.

All functions here depend only on shapes and floats, so they are cheap, cached and
usable both from eager code and at plan time (``describe`` reports expected real rates).

Geometry, per spatial dimension of size ``S`` with block ``k`` (already clipped to ``S``):

* ``seed_region="valid"``: a seed at ``g`` in ``[0, S - k]`` drops ``[g, g + k - 1]``,
  so every block lies inside the map (the official TF code, torchvision).
* ``seed_region="full"``: a seed at any ``g`` in ``[0, S - 1]`` drops
  ``[g - k // 2, g + (k - 1) // 2]`` clipped to the map (timm).

A unit at position ``p`` is covered by ``n_p = prod_d c_d(p_d)`` seed positions, so with
independent seeds of rate ``gamma`` it is kept with probability ``(1 - gamma) ** n_p``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "clip_block",
    "seed_grid",
    "paper_gamma",
    "gamma_factor",
    "coverage_histogram",
    "expected_drop_rate",
    "calibrated_gamma",
    "seed_rate",
    "expected_scale",
]


def clip_block(spatial: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Clip the block to the feature map, per side.

    Examples:
        >>> clip_block((7, 5), (7, 7))
        (7, 5)
    """
    return tuple([min(k, s) for k, s in zip(block, spatial)])


def seed_grid(spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str) -> tuple[int, ...]:
    """Shape of the grid of possible seed positions.

    Examples:
        >>> seed_grid((14, 14), (7, 7), "valid")
        (8, 8)
    """
    if seed_region == "valid":
        return tuple([s - k + 1 for s, k in zip(spatial, block)])
    return tuple(spatial)


def paper_gamma(
    drop_prob: float, spatial: tuple[int, ...], block: tuple[int, ...], gamma_scale: float = 1.0
) -> float:
    """The paper's seed rate ``drop_prob / k^2 * S^2 / (S - k + 1)^2``, generalised per side.

    It ignores block overlaps, so the real drop rate is below ``drop_prob``
    (see [`expected_drop_rate`][dropblock_fx.expected_drop_rate]). The same formula is used for both seed regions,
    as timm does.

    Examples:
        >>> round(paper_gamma(0.1, (14, 14), (7, 7)), 6)
        0.00625
    """
    return min(1.0, max(0.0, gamma_scale * drop_prob * gamma_factor(spatial, block)))


def gamma_factor(spatial: tuple[int, ...], block: tuple[int, ...]) -> float:
    """``S^2 / (k^2 (S - k + 1)^2)`` generalised per side: the paper's gamma per unit of drop_prob.

    Examples:
        >>> gamma_factor((7, 7), (7, 7))
        1.0
    """
    num = float(math.prod(spatial))
    return num / (float(math.prod(block)) * float(math.prod([s - k + 1 for s, k in zip(spatial, block)])))


def _coverage_1d(size: int, k: int, seed_region: str) -> dict[int, int]:
    """Histogram {count: units} of how many seed positions cover each unit along one dim."""
    hist: dict[int, int] = {}
    for i in range(size):
        if seed_region == "valid":
            c = min(i, size - k) - max(0, i - k + 1) + 1
        else:
            c = min(size - 1, i + k // 2) - max(0, i - (k - 1) // 2) + 1
        hist[c] = hist.get(c, 0) + 1
    return hist


@lru_cache(maxsize=1024)
def coverage_histogram(
    spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Distinct seed-coverage counts ``n`` of the map's units and the fraction of units with each.

    Pure Python on per-dim histograms (at most ``k`` distinct values per dim), so it is
    cheap and ``torch.compile`` folds it into constants.

    Examples:
        >>> coverage_histogram((3,), (3,), "valid")
        ((1,), (1.0,))
    """
    combined: dict[int, int] = {1: 1}
    total = 1
    for s, k in zip(spatial, block):
        per_dim = _coverage_1d(s, k, seed_region)
        nxt: dict[int, int] = {}
        for v1, w1 in combined.items():
            for v2, w2 in per_dim.items():
                nxt[v1 * v2] = nxt.get(v1 * v2, 0) + w1 * w2
        combined = nxt
        total *= s
    values = sorted(combined)
    return tuple(values), tuple([combined[v] / total for v in values])


def expected_drop_rate(
    gamma: float, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str = "valid"
) -> float:
    """Exact expected fraction of dropped units for seed rate ``gamma``, overlaps and edges included.

    Examples:
        >>> g = paper_gamma(0.1, (7, 7), (3, 3))
        >>> round(expected_drop_rate(g, (7, 7), (3, 3)), 4)
        0.0947
    """
    values, weights = coverage_histogram(tuple(spatial), tuple(block), seed_region)
    keep = sum(w * (1.0 - gamma) ** v for v, w in zip(values, weights))
    return 1.0 - keep


@lru_cache(maxsize=65536)
def calibrated_gamma(
    target: float, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str = "valid"
) -> float:
    """Seed rate whose expected drop rate equals ``target`` exactly (solved, cached per shape).

    The expected drop rate is increasing in ``gamma`` and reaches 1 at ``gamma = 1``
    (every unit is covered by at least one seed position), so bisection always converges.

    Examples:
        >>> g = calibrated_gamma(0.1, (14, 14), (5, 5))
        >>> round(expected_drop_rate(g, (14, 14), (5, 5)), 9)
        0.1
    """
    if target <= 0.0:
        return 0.0
    if target >= 1.0:
        return 1.0
    values, weights = coverage_histogram(tuple(spatial), tuple(block), seed_region)
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    keep_target = 1.0 - target
    # Solve in log space of (1 - gamma) for stability; f is decreasing in gamma.
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        keep = float(np.dot(w, np.power(1.0 - mid, v)))
        if keep > keep_target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def calibrated_gamma_tensor(
    target: torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str
) -> torch.Tensor:
    """Tensor version of [`calibrated_gamma`][dropblock_fx.calibrated_gamma] for traced / compiled code (no host sync).

    A fixed number of bisection steps on tensors, so ``torch.compile`` sees a static graph
    and a new ``target`` value needs no recompilation.

    Examples:
        >>> g = calibrated_gamma_tensor(torch.tensor(0.1), (14, 14), (5, 5), "valid")
        >>> abs(float(g) - calibrated_gamma(0.1, (14, 14), (5, 5))) < 1e-6
        True
    """
    # The uncached function: under torch.compile it folds to constants either way, and
    # Dynamo warns about tracing through lru_cache.
    values, weights = coverage_histogram.__wrapped__(tuple(spatial), tuple(block), seed_region)
    v = torch.tensor(values, dtype=torch.float32, device=target.device)
    w = torch.tensor(weights, dtype=torch.float32, device=target.device)
    keep_target = 1.0 - target.float()
    lo = torch.zeros_like(keep_target)
    hi = torch.ones_like(keep_target)
    for _ in range(32):
        mid = 0.5 * (lo + hi)
        keep = (w * torch.pow(1.0 - mid, v)).sum()
        above = keep > keep_target
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def expected_keep_tensor(
    gamma: torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str
) -> torch.Tensor:
    """Tensor version of ``1 - expected_drop_rate`` (for traced / compiled code).

    Examples:
        >>> k = expected_keep_tensor(torch.tensor(0.01), (7, 7), (3, 3), "valid")
        >>> abs(float(k) - (1 - expected_drop_rate(0.01, (7, 7), (3, 3)))) < 1e-6
        True
    """
    # The uncached function: under torch.compile it folds to constants either way, and
    # Dynamo warns about tracing through lru_cache.
    values, weights = coverage_histogram.__wrapped__(tuple(spatial), tuple(block), seed_region)
    v = torch.tensor(values, dtype=torch.float32, device=gamma.device)
    w = torch.tensor(weights, dtype=torch.float32, device=gamma.device)
    return (w * torch.pow(1.0 - gamma.float(), v)).sum()


def seed_rate(
    drop_prob: float | torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], gamma_scale: float,
    calibrate: bool, seed_region: str,
) -> float | torch.Tensor:
    """The seed rate the op uses: the paper's gamma times ``gamma_scale``, or with ``calibrate``
    the gamma whose expected drop rate is ``drop_prob * gamma_scale`` exactly. A float for a
    float rate; a 0-d tensor for a tensor rate (compiled code, no host read).

    Examples:
        >>> round(seed_rate(0.1, (14, 14), (7, 7), 1.0, False, "valid"), 6)
        0.00625
    """
    if isinstance(drop_prob, torch.Tensor):
        target = (drop_prob.to(dtype=torch.float32) * gamma_scale).clamp(0.0, 1.0)
        if calibrate:
            return calibrated_gamma_tensor(target, spatial, block, seed_region)
        return (target * gamma_factor(spatial, block)).clamp(0.0, 1.0)
    if calibrate:
        return calibrated_gamma(min(1.0, drop_prob * gamma_scale), spatial, block, seed_region)
    return paper_gamma(drop_prob, spatial, block, gamma_scale)


def expected_scale(
    gamma: float | torch.Tensor, spatial: tuple[int, ...], block: tuple[int, ...], seed_region: str
) -> float | torch.Tensor:
    """``1 / expected kept fraction`` at seed rate ``gamma``: the normaliser of ``scale="expected"``
    (a float for a float gamma, a 0-d tensor for a tensor one).

    Examples:
        >>> round(expected_scale(paper_gamma(0.1, (7, 7), (3, 3)), (7, 7), (3, 3), "valid"), 4)
        1.1046
    """
    if isinstance(gamma, torch.Tensor):
        return 1.0 / expected_keep_tensor(gamma.reshape(()), spatial, block, seed_region).clamp(min=1e-12)
    return 1.0 / max(1.0 - expected_drop_rate(gamma, spatial, block, seed_region), 1e-12)
