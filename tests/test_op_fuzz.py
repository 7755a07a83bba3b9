"""Hypothesis fuzzing of drop_block: only ValueError for bad arguments; otherwise a finite
output of the input's shape, dtype and memory format."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dropblock_fx as dbx

finite_or_not = st.one_of(
    st.floats(min_value=-0.5, max_value=1.5),
    st.just(math.nan),
    st.sampled_from([0.0, 1.0, 1e-9, 1 - 1e-9]),
    st.integers(min_value=-1, max_value=2),
    st.just("0.1"),
    st.none(),
)
block = st.one_of(st.integers(min_value=-1, max_value=12), st.tuples(st.integers(0, 6), st.integers(1, 6)),
                  st.just(2.0), st.just(True))


@settings(max_examples=150, deadline=None)
@given(
    nd=st.sampled_from([2, 3]),
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=5, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    channels_last=st.booleans(),
    drop_prob=finite_or_not,
    block_size=block,
    mask=st.sampled_from(["channel", "shared", "batch", "bogus"]),
    seed_region=st.sampled_from(["valid", "full", "edge"]),
    scale=st.sampled_from(["count", "expected", "none", 1]),
    gamma_scale=st.one_of(st.floats(min_value=-1, max_value=4, allow_nan=False), st.just(math.inf)),
    noise=st.booleans(),
    calibrate=st.booleans(),
    backend=st.sampled_from(["sparse", "reference"]),
)
def test_drop_block_fuzz(nd, sizes, dtype, channels_last, drop_prob, block_size, mask, seed_region, scale,
                         gamma_scale, noise, calibrate, backend):
    shape = tuple(sizes[: 2 + nd])
    x = torch.randn(*shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    dbx.set_backend(backend)
    try:
        y = dbx.drop_block(x, drop_prob, block_size, mask=mask, seed_region=seed_region, scale=scale,
                           gamma_scale=gamma_scale, noise=noise, calibrate=calibrate)
    except ValueError as e:
        assert str(e)  # message names the problem
        return
    finally:
        dbx.set_backend("auto")
    assert y.shape == x.shape and y.dtype == x.dtype
    if channels_last and min(shape[1:]) > 1:
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    assert torch.isfinite(y).all()
