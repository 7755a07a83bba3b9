"""The op against the paper's official algorithm, its geometry, its options and numerics.

Statistical tolerances: a per-map quantity (dropped fraction, "map untouched") is iid
across the N*C maps of a per-channel draw, so a mean over M maps has standard error
sd/sqrt(M); we allow 5 standard errors (false alarm ~6e-7 per check).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dropblock_fx as dbx
from dropblock_fx.op import functional as fn
from dropblock_fx.op import masks
from dropblock_fx.op.gamma import calibrated_gamma, coverage_histogram, expected_drop_rate, paper_gamma

from tf_reference import tf_drop_block

Z = 5.0


@pytest.fixture(params=["sparse", "reference"])
def backend(request):
    dbx.set_backend(request.param)
    yield request.param
    dbx.set_backend("auto")


def dropped_maps(y: torch.Tensor) -> torch.Tensor:
    """Per-map dropped fraction of an output computed from an all-ones input."""
    return (y == 0).flatten(2).float().mean(-1).flatten()


def assert_mean_close(a: torch.Tensor, b: torch.Tensor | float, what: str) -> None:
    """Two-sample (or one-sample) z-test on per-map values."""
    if isinstance(b, torch.Tensor):
        se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
        diff = a.mean().item() - b.mean().item()
    else:
        se = math.sqrt(a.var().item() / a.numel())
        diff = a.mean().item() - b
    se = max(se, 1e-6)
    assert abs(diff) <= Z * se, f"{what}: difference {diff:.5f} exceeds {Z} x {se:.5f}"


# ----------------------------------------------------------------- the official algorithm


@pytest.mark.parametrize("size,block,keep", [((14, 14), 7, 0.9), ((14, 14), 5, 0.8), ((9, 13), 3, 0.7),
                                             ((7, 7), 7, 0.9), ((12, 12), 4, 0.8)])
def test_dropped_fraction_matches_official_tf(backend, size, block, keep):
    g = torch.Generator().manual_seed(1)
    x = torch.ones(64, 64, *size)
    ours = torch.cat([dropped_maps(dbx.drop_block(x, 1 - keep, block, generator=g)) for _ in range(4)])
    ref = torch.cat([dropped_maps(tf_drop_block(x, keep, block, generator=g)) for _ in range(4)])
    assert_mean_close(ours, ref, "mean dropped fraction vs TF")
    # The fraction of untouched maps is binomial with p = (1 - gamma) ** seed_positions.
    k = (min(block, size[0]), min(block, size[1]))
    gamma = paper_gamma(1 - keep, size, k)
    p0 = (1 - gamma) ** ((size[0] - k[0] + 1) * (size[1] - k[1] + 1))
    m = ours.numel()
    untouched = (ours == 0).float().mean().item()
    assert abs(untouched - p0) <= Z * math.sqrt(p0 * (1 - p0) / m) + 1e-9
    # Both match the exact expected rate derived from the geometry.
    assert_mean_close(ours, expected_drop_rate(gamma, size, k), "mean dropped fraction vs exact")


def test_count_normaliser_is_exact():
    x = torch.rand(4, 8, 14, 14) + 0.5
    torch.manual_seed(3)
    y = dbx.drop_block(x, 0.2, 5)
    keep = y != 0
    scale = keep.numel() / keep.sum().item()
    torch.testing.assert_close(y, x * keep * torch.tensor(scale, dtype=torch.float32), rtol=0, atol=0)


def _is_union_of_blocks(dropped: torch.Tensor, kh: int, kw: int) -> bool:
    """True iff every dropped unit lies in a fully dropped kh x kw window inside the map."""
    d = dropped.float()[None, None]
    full = -F.max_pool2d(-d, (kh, kw), stride=1)  # 1 where a whole inside window is dropped
    cover = F.max_pool2d(F.pad(full, [kw - 1, kw - 1, kh - 1, kh - 1]), (kh, kw), stride=1)
    return torch.equal(cover[0, 0] > 0, dropped)


@pytest.mark.parametrize("size,block", [((14, 14), 7), ((9, 13), 4), ((8, 8), 2), ((5, 12), 6), ((6, 6), 1)])
def test_valid_region_drops_whole_blocks_inside_the_map(backend, size, block):
    torch.manual_seed(0)
    y = dbx.drop_block(torch.ones(8, 16, *size), 0.3, block)
    kh, kw = min(block, size[0]), min(block, size[1])
    dropped = (y == 0)
    assert dropped.any()
    for n in range(8):
        for c in range(16):
            assert _is_union_of_blocks(dropped[n, c], kh, kw)


def test_full_region_clips_edge_blocks(backend):
    # With seeds anywhere, edge units are dropped more often than with valid seeds only.
    torch.manual_seed(0)
    x = torch.ones(64, 64, 14, 14)
    full = (dbx.drop_block(x, 0.1, 7, seed_region="full") == 0).float().mean((0, 1))
    valid = (dbx.drop_block(x, 0.1, 7) == 0).float().mean((0, 1))
    assert full[0, 0] > 3 * valid[0, 0]
    # and the mean follows the exact expectation of the full-region geometry
    gamma = paper_gamma(0.1, (14, 14), (7, 7))
    torch.manual_seed(1)
    maps = dropped_maps(dbx.drop_block(x, 0.1, 7, seed_region="full"))
    assert_mean_close(maps, expected_drop_rate(gamma, (14, 14), (7, 7), "full"), "full region rate")


def test_channel_masks_are_independent_and_shared_masks_identical(backend):
    torch.manual_seed(0)
    x = torch.ones(256, 2, 14, 14)
    d = dbx.drop_block(x, 0.3, 3) == 0
    a, b = d[:, 0].flatten().float(), d[:, 1].flatten().float()
    # Co-dropping of two channels of one sample must match that of two different
    # samples (independent by construction); this cancels the position-dependent rate.
    same = (d[0::2, 0] & d[0::2, 1]).flatten(1).float().mean(1)
    other = (d[0::2, 0] & d[1::2, 1]).flatten(1).float().mean(1)
    assert_mean_close(same, other, "channel independence")
    assert not torch.equal(a, b)
    s = dbx.drop_block(torch.ones(8, 16, 14, 14), 0.3, 3, mask="shared") == 0
    assert torch.equal(s, s[:, :1].expand_as(s)) and s.any()
    assert not torch.equal(s[0], s[1])
    bt = dbx.drop_block(torch.ones(8, 16, 14, 14), 0.3, 3, mask="batch") == 0
    assert torch.equal(bt, bt[:1, :1].expand_as(bt)) and bt.any()


@pytest.mark.parametrize("size", [(7, 7), (14, 14), (56, 56)])
@pytest.mark.parametrize("block", [3, 5, 7])
def test_calibrated_mode_hits_the_requested_rate(size, block):
    target = 0.1
    torch.manual_seed(0)
    n = 4096 // (size[0] * size[1] // 49)  # same number of units per case
    x = torch.ones(n, 16, *size)
    maps = dropped_maps(dbx.drop_block(x, target, block, calibrate=True))
    assert_mean_close(maps, target, f"calibrated {size} block {block}")


def test_calibration_solves_the_exact_expectation_and_paper_gamma_undershoots():
    for size, block in [((7, 7), (3, 3)), ((14, 14), (5, 5)), ((14, 14), (7, 7)), ((9, 13), (4, 6))]:
        g = calibrated_gamma(0.1, size, block)
        assert abs(expected_drop_rate(g, size, block) - 0.1) < 1e-9
        assert expected_drop_rate(paper_gamma(0.1, size, block), size, block) < 0.1
    # histogram weights are fractions of the map
    assert abs(sum(coverage_histogram((14, 14), (7, 7), "valid")[1]) - 1) < 1e-12


def test_gamma_scale_scales_the_seed_rate(backend):
    torch.manual_seed(0)
    x = torch.ones(64, 64, 14, 14)
    maps = dropped_maps(dbx.drop_block(x, 0.1, 5, gamma_scale=0.25))
    gamma = paper_gamma(0.1, (14, 14), (5, 5), 0.25)
    assert_mean_close(maps, expected_drop_rate(gamma, (14, 14), (5, 5)), "gamma_scale")


# ----------------------------------------------------------------- geometry edge cases


@pytest.mark.parametrize("shape,block", [((2, 3, 1, 1), 7), ((2, 3, 5, 17), 7), ((2, 3, 3, 3, 3), 2),
                                         ((2, 3, 4, 9, 6), 5), ((2, 3, 1, 1, 1), 3)])
def test_odd_shapes_and_clipped_blocks(backend, shape, block):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    y = dbx.drop_block(x, 0.5, block)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None


def test_block_as_large_as_the_map_is_spatial_dropout(backend):
    torch.manual_seed(0)
    y = dbx.drop_block(torch.ones(16, 32, 7, 7), 0.3, 7)
    per_map = (y == 0).flatten(2)
    assert torch.equal(per_map.all(-1), per_map.any(-1))  # each map all-or-nothing
    assert 0 < per_map.all(-1).float().mean() < 1


def test_3d_blocks_are_whole_cuboids(backend):
    torch.manual_seed(0)
    y = dbx.drop_block(torch.ones(4, 8, 6, 9, 10), 0.3, 3)
    d = (y == 0).float()
    full = -F.max_pool3d(-d, 3, stride=1)
    cover = F.max_pool3d(F.pad(full, [2] * 6), 3, stride=1)
    assert d.any() and torch.equal(cover > 0, d > 0)


def test_block_size_tuple():
    torch.manual_seed(0)
    y = dbx.drop_block(torch.ones(4, 8, 12, 12), 0.3, (2, 5))
    d = y == 0
    assert all(_is_union_of_blocks(d[n, c], 2, 5) for n in range(4) for c in range(8))


def test_sparse_and_reference_expansions_are_bit_identical():
    for fmt, shape in [(torch.contiguous_format, (3, 4, 9, 11)), (torch.channels_last, (3, 4, 9, 11)),
                       (torch.contiguous_format, (2, 3, 5, 9, 11)), (torch.channels_last_3d, (2, 3, 5, 9, 11))]:
        for region in ("valid", "full"):
            for k in [(1, 1, 1), (2, 3, 2), (4, 4, 4), (5, 9, 11)]:
                k = k[: len(shape) - 2]
                grid = masks.seed_grid(shape[2:], k, region)
                seeds = torch.rand(shape[:2] + grid) < 0.05
                a = masks.expand_dense(seeds.contiguous(memory_format=fmt), shape[2:], k, region, fmt)
                b = masks.expand_sparse(masks.seeds_to_positions(seeds), shape[:2], grid, shape[2:], k, region,
                                      fmt, torch.device("cpu"))
                assert torch.equal(a, b), (fmt, region, k)


@pytest.mark.parametrize("fmt,shape", [(torch.contiguous_format, (3, 5, 9, 11)), (torch.channels_last, (3, 5, 9, 11)),
                                       (torch.channels_last_3d, (2, 3, 5, 9, 11))])
@pytest.mark.parametrize("region", ["valid", "full"])
def test_dropped_positions_count_the_distinct_units(fmt, shape, region):
    """The CPU path's normaliser counts dropped units without a mask: one block per map with a
    single seed, deduplicated positions where seeds share a map. High seed rates, so blocks
    overlap and clip; the positions index the storage of a tensor in ``fmt``."""
    from dropblock_fx.op import sparse

    g = torch.Generator().manual_seed(0)
    for k in [(1, 1, 1), (2, 3, 2), (3, 3, 3), (5, 9, 11)]:
        k = k[: len(shape) - 2]
        grid = masks.seed_grid(shape[2:], k, region)
        for gamma in (0.02, 0.3):
            seeds = sparse.seed_positions(math.prod(shape[:2] + grid), gamma, torch.device("cpu"), g)
            strides = masks.strides_of(shape, fmt)
            assert strides == torch.empty(shape, memory_format=fmt).stride()
            pos = sparse.block_positions(seeds, shape[:2], grid, shape[2:], k, region, strides)
            count = sparse.distinct_count(seeds, grid, shape[2:], k, region)
            assert count == len(set(pos.reshape(-1).tolist())), (k, gamma)
            # the same units as the dense expansion of the same seeds
            dense = torch.zeros(math.prod(shape[:2] + grid), dtype=torch.bool)
            dense[torch.from_numpy(seeds)] = True
            keep = masks.expand_dense(dense.reshape(shape[:2] + grid).contiguous(memory_format=fmt), shape[2:], k,
                                      region, fmt)
            flat = keep.permute(0, *range(2, len(shape)), 1) if fmt != torch.contiguous_format else keep
            dropped = (~flat.reshape(-1)).nonzero().squeeze(1)
            assert set(dropped.tolist()) == set(pos.reshape(-1).tolist()), (k, gamma)


def test_distinct_count_matches_the_set_of_positions_on_random_shapes():
    """The normaliser's count (a bitmap of the maps with several seeds) against the set of the
    positions the blocks cover, over random maps, blocks, seed regions, layouts and rates: maps
    with one seed, many seeds, clipped blocks and blocks as large as the map all occur."""
    from dropblock_fx.op import sparse

    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        nd = int(rng.integers(2, 4))
        spatial = tuple(int(v) for v in rng.integers(1, 13 if nd == 2 else 7, nd))
        k = tuple(int(min(s, v)) for s, v in zip(spatial, rng.integers(1, 8, nd)))
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 6))) + spatial
        region = str(rng.choice(["valid", "full"]))
        fmt = torch.contiguous_format
        if rng.random() < 0.5:
            fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        grid = masks.seed_grid(spatial, k, region)
        gamma = float(rng.choice([0.001, 0.05, 0.3, 0.8, 1.0]))
        seeds = sparse.seed_positions(math.prod(shape[:2] + grid), gamma, torch.device("cpu"), g)
        pos = sparse.block_positions(seeds, shape[:2], grid, spatial, k, region, masks.strides_of(shape, fmt))
        assert pos.shape == (len(seeds), math.prod(k))
        assert sparse.distinct_count(seeds, grid, spatial, k, region) == len(set(pos.reshape(-1).tolist()))


@pytest.mark.parametrize("sort_max", [None, -1])  # the sort, and the bitmap of the shared maps
def test_dropped_units_are_the_blocks_and_count_them(monkeypatch, sort_max):
    """What the op calls per site: the flat positions of the seeds' blocks (as a set, those of
    `block_positions`) and the number of distinct units among them, by either way of counting,
    over random maps, blocks, regions, layouts and rates."""
    from dropblock_fx.op import sparse

    if sort_max is not None:
        monkeypatch.setattr(sparse, "_SORT_MAX", sort_max)
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        spatial = tuple(int(v) for v in rng.integers(1, 13, 2))
        k = tuple(int(min(s, v)) for s, v in zip(spatial, rng.integers(1, 8, 2)))
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 9))) + spatial
        region = str(rng.choice(["valid", "full"]))
        fmt = torch.channels_last if rng.random() < 0.5 else torch.contiguous_format
        strides = masks.strides_of(shape, fmt)
        grid = masks.seed_grid(spatial, k, region)
        gamma = float(rng.choice([0.01, 0.1, 0.5]))
        seeds = sparse.seed_positions(math.prod(shape[:2] + grid), gamma, torch.device("cpu"), g)
        blocks = sparse.block_positions(seeds, shape[:2], grid, spatial, k, region, strides)
        pos, count = sparse.dropped_units(seeds, shape[:2], grid, spatial, k, region, strides)
        assert pos.ndim == 1 and sorted(pos.tolist()) == sorted(blocks.reshape(-1).tolist())
        assert count == len(set(pos.tolist()))
        _, none = sparse.dropped_units(seeds, shape[:2], grid, spatial, k, region, strides, count=False)
        assert none == 0


def test_geometric_sampler_draws_in_chunks_as_in_one(monkeypatch):
    """The seed sampler draws the gaps between seeds in chunks sized to reach the end in one
    draw; when a chunk falls short it draws the next from where it stopped. The gaps are
    one stream, so chunks of 3 give the same positions as one chunk."""
    from dropblock_fx.op import sparse

    cpu = torch.device("cpu")
    for count, gamma in [(1000, 0.05), (50, 0.5), (7, 0.9)]:
        whole = sparse.seed_positions(count, gamma, cpu, torch.Generator().manual_seed(3))
        with monkeypatch.context() as m:
            m.setattr(sparse, "_chunk_size", lambda remaining, count, mean: min(remaining, 3))
            chunked = sparse.seed_positions(count, gamma, cpu, torch.Generator().manual_seed(3))
        assert len(whole) > 3 and whole.dtype == chunked.dtype == np.int64
        assert np.array_equal(whole, chunked)


def test_cpu_path_forward_mode_and_double_backward():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)

    def f(t):
        return dbx.drop_block(t, 0.3, 3, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradgradcheck(f, (x,))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(fwAD.make_dual(x.detach(), x.detach()))
        y, tangent = fwAD.unpack_dual(out)
    assert torch.equal(y, tangent) and (y == 0).any()  # linear in x for a fixed mask


def test_geometric_seed_sampler_is_bernoulli():
    g = torch.Generator().manual_seed(0)
    count, gamma = 200_000, 0.01
    pos = masks.sample_seed_positions(count, gamma, torch.device("cpu"), g)
    assert pos.unique().numel() == pos.numel() and pos.min() >= 0 and pos.max() < count
    n = pos.numel()
    assert abs(n - count * gamma) <= Z * math.sqrt(count * gamma * (1 - gamma))
    # uniform over positions: compare halves
    first = (pos < count // 2).sum().item()
    assert abs(first - n / 2) <= Z * math.sqrt(n / 4)


# ----------------------------------------------------------------- options


def test_eval_and_zero_rate_return_the_input_object():
    x = torch.randn(2, 3, 8, 8)
    assert dbx.drop_block(x, 0.5, 3, training=False) is x
    assert dbx.drop_block(x, 0.0, 3) is x
    m = dbx.DropBlock2d(0.5, 3).eval()
    assert m(x) is x
    m.train()
    m.drop_prob = 0.0
    assert m(x) is x


def test_scale_modes():
    x = torch.rand(4, 8, 14, 14) + 0.5
    torch.manual_seed(0)
    y = dbx.drop_block(x, 0.2, 5, scale="none")
    keep = y != 0
    assert torch.equal(y, x * keep)
    torch.manual_seed(0)
    y = dbx.drop_block(x, 0.2, 5, scale="expected")
    gamma = paper_gamma(0.2, (14, 14), (5, 5))
    s = 1 / (1 - expected_drop_rate(gamma, (14, 14), (5, 5)))
    torch.testing.assert_close(y, x * keep * s)


def test_noise_fills_dropped_units_with_standard_normal():
    torch.manual_seed(0)
    x = torch.full((32, 32, 14, 14), 100.0)
    y = dbx.drop_block(x, 0.3, 5, noise=True, scale="none")
    dropped = y < 50
    vals = y[dropped]
    assert vals.numel() > 1000
    assert abs(vals.mean().item()) < Z / math.sqrt(vals.numel())
    assert abs(vals.std().item() - 1) < 0.05
    assert torch.equal(y[~dropped], x[~dropped])


def test_inplace_writes_into_the_input():
    x = torch.ones(2, 4, 14, 14)
    torch.manual_seed(0)
    y = dbx.drop_block(x, 0.3, 3, inplace=True)
    assert y is x and (x == 0).any()
    # inplace on a non-leaf in an autograd graph
    a = torch.ones(2, 4, 14, 14, requires_grad=True)
    b = a * 2
    dbx.drop_block(b, 0.3, 3, inplace=True).sum().backward()
    assert ((a.grad == 0) == (b == 0)).all()


def test_determinism_with_seed_and_generator(backend):
    x = torch.randn(4, 8, 14, 14)
    torch.manual_seed(7)
    a = dbx.drop_block(x, 0.2, 5)
    torch.manual_seed(7)
    b = dbx.drop_block(x, 0.2, 5)
    assert torch.equal(a, b)
    c = dbx.drop_block(x, 0.2, 5, generator=torch.Generator().manual_seed(3))
    d = dbx.drop_block(x, 0.2, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, d) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,name", [
    (dict(drop_prob=1.5), "drop_prob"), (dict(drop_prob=-0.1), "drop_prob"), (dict(drop_prob=float("nan")), "drop_prob"),
    (dict(block_size=0), "block_size"), (dict(block_size=2.5), "block_size"), (dict(block_size=(3, 3, 3)), "block_size"),
    (dict(mask="pixel"), "mask"), (dict(seed_region="edge"), "seed_region"), (dict(scale="mean"), "scale"),
    (dict(gamma_scale=-1.0), "gamma_scale"), (dict(noise="yes"), "noise"), (dict(calibrate=1), "calibrate"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    args = dict(drop_prob=0.1, block_size=3) | kwargs
    with pytest.raises(ValueError, match=name):
        dbx.drop_block(torch.randn(2, 3, 8, 8), **args)
    if name != "drop_prob" or True:
        ctor = {k: v for k, v in args.items()}
        with pytest.raises(ValueError, match=name):
            dbx.DropBlock2d(**ctor)


def test_wrong_ndim_is_rejected():
    with pytest.raises(ValueError, match="4-D"):
        dbx.drop_block(torch.randn(3, 8, 8), 0.1, 3)
    with pytest.raises(ValueError, match="4-D"):
        dbx.DropBlock2d()(torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="5-D"):
        dbx.DropBlock3d()(torch.randn(2, 3, 8, 8))


# ----------------------------------------------------------------- numerics and memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_fp32_normaliser(backend, dtype):
    # 4 * 64 * 32 * 32 = 262144 units: more than fp16's 65504 maximum.
    x = torch.ones(4, 64, 32, 32, dtype=dtype)
    torch.manual_seed(0)
    y = dbx.drop_block(x, 0.1, 7)
    assert y.dtype == dtype
    keep = y != 0
    assert keep.float().mean() > 0.85  # torchvision would output all zeros in fp16 here
    scale = keep.numel() / keep.sum().item()
    torch.testing.assert_close(y[keep].float(), torch.full_like(y[keep].float(), scale), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["channel", "shared"])
def test_cpu_scale_is_the_fp32_quotient_in_the_input_dtype(backend, dtype, mask):
    """The CPU path uses a Python float for speed; it must be bit for bit what the CUDA and
    compiled paths compute: the mask's numel / kept divided in fp32, then cast to x's dtype.
    33 M units: numel is not exact in fp32 (> 2 ** 24), so a float64 quotient would differ.
    (A shared mask's fraction is counted on the mask, one channel: in fp32 that quotient may
    round differently from the whole tensor's.)"""
    shape = (1, 129, 511, 511) if dtype == torch.float32 else (4, 64, 32, 32)  # 33684609: odd, > 2 ** 25
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.manual_seed(1)
    y = dbx.drop_block(x, 0.1, 7, mask=mask)
    keep = y != 0
    if mask == "shared":  # the fraction is counted on the mask: numel and kept of one channel
        keep = keep.any(dim=1, keepdim=True)
    kept = torch.count_nonzero(keep).to(torch.float32)
    scale = (torch.tensor(float(keep.numel()), dtype=torch.float32) / kept).to(dtype)
    assert torch.equal(y, x * keep * scale)


@pytest.mark.parametrize("mask", ["channel", "shared", "batch"])
def test_memory_format_is_kept(backend, mask):
    x = torch.randn(2, 8, 10, 12).contiguous(memory_format=torch.channels_last)
    y = dbx.drop_block(x, 0.3, 3, mask=mask)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 8, 4, 10, 12).contiguous(memory_format=torch.channels_last_3d)
    assert dbx.drop_block(x3, 0.3, 3, mask=mask).is_contiguous(memory_format=torch.channels_last_3d)
    xs = torch.randn(2, 16, 10, 12)[:, ::2]  # non-contiguous view
    ys = dbx.drop_block(xs, 0.3, 3, mask=mask)
    assert ys.is_contiguous() and ys.shape == xs.shape
    # same result as on a contiguous copy with the same RNG state
    torch.manual_seed(5)
    a = dbx.drop_block(xs, 0.3, 3, mask=mask)
    torch.manual_seed(5)
    b = dbx.drop_block(xs.contiguous(), 0.3, 3, mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mask,channels,drop", [("channel", 8, 0.2), ("channel", 8, 0.05), ("channel", 8, 0.6),
                                                ("shared", 8, 0.2), ("shared", 2, 0.2), ("batch", 3, 0.2)])
def test_backward_saves_at_most_one_byte_per_unit(backend, mask, channels, drop):
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, channels, 14, 14, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dbx.drop_block(x, drop, 5, mask=mask)
    assert saved, "the mask must be saved for backward"
    total = sum(t.numel() * t.element_size() for t in saved)
    assert total <= x.numel() + 8, f"{total} bytes saved for {x.numel()} units"
    for t in saved:  # never a full-precision mask of the input's size
        assert not (t.is_floating_point() and t.numel() >= x.numel()), (t.dtype, t.shape)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, y.detach() / x.detach(), rtol=1e-5, atol=1e-6)


def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)

    def f(inp):
        return dbx.drop_block(inp, 0.3, 3, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradcheck(lambda t: dbx.drop_block(t, 0.3, 3, mask="shared",
                                                             generator=torch.Generator().manual_seed(1)), (x,))


def test_expectation_is_preserved(backend):
    # Units near the border are dropped less often than central ones (valid seeds), so for
    # one fixed x the mean is preserved only on average over inputs: draw x each time.
    torch.manual_seed(0)
    ratios = []
    for _ in range(200):
        x = torch.rand(8, 32, 14, 14) + 0.5
        ratios.append(dbx.drop_block(x, 0.3, 5).mean().item() / x.mean().item())
    assert_mean_close(torch.tensor(ratios), 1.0, "E[out] / E[x]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("drop", [0.1, 0.6])  # seeds as positions; and the dense draw (gamma >= 0.25)
def test_a_block_as_large_as_its_map_drops_whole_maps_from_one_flag_each(dtype, fmt, drop):
    """With valid seeds and a block as large as the map (ResNet's last stage at 224 px with
    block 7) every seed drops its whole map: the CPU path keeps one flag per map. Its output
    and gradient are those of the positions path from the same random numbers (at a seed rate
    the positions path takes; the dense draw above it), in ``x``'s memory format; the count
    normaliser is exact."""
    torch.manual_seed(0)
    x = torch.randn(6, 40, 7, 7).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    gamma = fn.seed_rate(drop, (7, 7), (7, 7), 1.0, False, "valid")
    g = torch.Generator().manual_seed(3)
    out = dbx.drop_block(x, drop, 7, generator=g)
    assert out.is_contiguous(memory_format=fmt)
    maps = out.detach().float().flatten(2)
    dropped = (maps == 0).all(-1)
    assert torch.equal(dropped | (maps != 0).all(-1), torch.ones_like(dropped))  # whole maps, or none of them
    kept = x.numel() - int(dropped.sum()) * 49
    scale = masks.count_scale(x.numel(), kept, dtype)
    assert torch.equal(out.detach(), x.detach() * scale * (~dropped)[..., None, None].to(dtype))
    if gamma < masks._SPARSE_MAX_GAMMA:
        g.manual_seed(3)
        pos, factor = masks.dropped_positions(x.detach(), gamma, (7, 7), "valid", "count", fmt, g)
        ref = (x.detach() * factor).contiguous(memory_format=fmt)
        ref.permute(0, 2, 3, 1).reshape(-1).index_fill_(0, pos, 0) if fmt == torch.channels_last \
            else ref.view(-1).index_fill_(0, pos, 0)
        assert factor == scale and torch.equal(out.detach(), ref)
    else:
        g.manual_seed(3)
        u = torch.rand(6, 40, 1, 1, generator=g)
        assert torch.equal(dropped, (u < gamma)[..., 0, 0])
    grad = torch.randn_like(x)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (~dropped)[..., None, None].to(dtype) * scale)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("seed_region", ["valid", "full"])
@pytest.mark.parametrize("shape", [(3, 5, 12, 11), (3, 1, 12, 11)], ids=["5-channels", "1-channel"])
def test_the_compiled_ops_mask_is_the_eager_one_in_the_layout_its_fake_promises(channels_last, seed_region, shape):
    """The CPU op a compiled graph calls builds its mask (in NumPy) from the seeds the eager
    path draws: for the same seed it keeps exactly the units eager mode keeps (as uint8 0/1, which
    inductor's CPU kernels load as vectors), its dtype and strides are those of its fake (what the
    compiled kernels index with; with one channel a channels-last and a contiguous mask differ in
    a stride, not in storage order), and its scale is eager's."""
    p = 0.15
    fake_keep, _ = masks._sampled_keep_mask_fake(torch.tensor(p), list(shape), channels_last, [3, 3], "channel",
                                                 seed_region, 1.0, "count", False)
    torch.manual_seed(11)
    keep, factor = masks.sampled_keep_mask(torch.tensor(p), list(shape), channels_last, [3, 3], "channel",
                                           seed_region, 1.0, "count", False)
    x = torch.ones(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(11)
    eager = fn.drop_block(x, p, 3, seed_region=seed_region)
    assert keep.dtype == fake_keep.dtype == torch.uint8 and keep.shape == shape and keep.stride() == fake_keep.stride()
    assert torch.equal(keep, (eager != 0).to(torch.uint8)) and not keep.all()
    assert factor.dtype == torch.float32 and factor.dim() == 0
    assert factor.item() == eager.max().item() == np.float32(keep.numel()) / np.float32(int(keep.sum()))


def test_a_mask_buffer_is_handed_out_again_only_when_no_tensor_holds_it():
    """The compiled CPU op's masks come from a pool: a buffer that a tensor (or a view of its
    storage) still holds is never handed out, a free one is, and the pool keeps at most its
    limit in bytes, forgetting free buffers to make room."""
    pool = masks.MaskBuffers(limit=150)
    a = pool.take(100)
    view = torch.from_numpy(a).as_strided((10, 10), (10, 1))
    del a
    b = pool.take(100)  # the first is held by the view: a new one, beyond the limit so not kept
    assert not np.shares_memory(b, view.numpy()) and pool._bytes == 100
    c = pool.take(100)
    assert not np.shares_memory(c, view.numpy()) and not np.shares_memory(c, b)
    del view, b, c
    d = pool.take(100)  # the first buffer again: nothing holds it now
    assert pool._bytes == 100 and len(pool._free[100]) == 1 and pool._free[100][0] is d
    del d
    e = pool.take(60)  # over the limit: the free 100-byte buffer is forgotten to keep this one
    assert pool._bytes == 60 and pool._free[100] == [] and pool._free[60][0] is e


def test_compiled_masks_in_flight_never_share_memory_and_steps_reuse_it(monkeypatch):
    """Two forwards before one backward (two views of a batch, say): each keeps its own mask
    until its backward, so the gradient is the sum of each forward's own mask times its scale;
    the next steps reuse those two buffers instead of asking the OS for new memory."""
    pool = masks.MaskBuffers(limit=1 << 20)
    monkeypatch.setattr(masks, "_MASK_BUFFERS", pool)
    torch._dynamo.reset()
    m = dbx.DropBlock2d(0.2, 3).train()
    compiled = torch.compile(m, fullgraph=True)
    shape = (16, 8, 11, 11)
    numel = math.prod(shape)
    for step in range(3):
        x = (torch.rand(shape) + 0.5).requires_grad_(True)
        y1, y2 = compiled(x), compiled(x)
        (y1.sum() + 3 * y2.sum()).backward()
        k1, k2 = y1 != 0, y2 != 0
        s1, s2 = k1.numel() / k1.sum().item(), k2.numel() / k2.sum().item()
        assert not torch.equal(k1, k2)
        torch.testing.assert_close(x.grad, k1 * s1 + 3 * k2 * s2)
        del y1, y2
        assert len(pool._free[numel]) == 2 and pool._bytes == 2 * numel, f"step {step}"


@pytest.mark.parametrize("drop", [0.2, 0.6])
def test_a_compiled_site_whose_block_covers_its_map_draws_one_flag_per_map(drop):
    """Under torch.compile the CPU op's mask has one flag per map when the block covers the map
    (its fake says so too): the compiled output is the eager one for the same seed, from the
    seed positions or (seed rate >= 0.25) from one uniform per map, as in eager mode."""
    torch._dynamo.reset()
    m = dbx.DropBlock2d(drop, 7).train()
    x = torch.randn(4, 32, 7, 7)
    torch.manual_seed(5)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    assert torch.equal(out, eager) and (eager.flatten(2) == 0).all(-1).any()
    keep, factor = masks.sampled_keep_mask(torch.tensor(drop), [4, 32, 7, 7], True, [7, 7], "channel", "valid",
                                           1.0, "count", False)
    assert keep.shape == (4, 32, 1, 1) and keep.dtype == torch.uint8 and factor.dim() == 0
