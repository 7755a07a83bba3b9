"""Fused DropBlock kernels in Triton (CUDA; also run by ``TRITON_INTERPRET=1`` on CPU tensors).

The keep mask is never materialised at full precision, nor as one byte per unit. Five
kernels, all indexing with the geometry of `dropblock_fx.op.gamma`:

1. ``_seeds_kernel``: one Philox draw per seed position only (``tl.rand4x``: four uniforms
   per counter, seed position ``4 c + j`` takes output ``j``), so the same key gives the same
   mask on any GPU; one byte per seed position (the seed grid: 1/3 of the units at 14x14,
   block 7). Its first program also zeroes the counter of kernel 3.
2. ``_seed_rows_kernel``: dilates each seed row along the last spatial dim (column ``w`` is
   covered iff the running sum of ``hit[t] - hit[t - k]`` is positive: no ``k``-wide loop)
   and packs it to bits: bit ``w`` of a seed row says "some seed of this row covers column w".
3. ``_cover_rows_kernel``: for every output row, OR the bit words of the ``k`` (``k x k`` in
   3-D) seed rows that cover it: the block expansion, done on words. It stores the packed
   *drop* bits (1 bit per unit; this is all that backward keeps) and adds the row's popcount
   to one int64 counter (one atomic per program).
4. ``_apply_kernel``: ``out = x * keep * scale`` in one read and one write of ``x``, with the
   count normaliser ``numel / kept`` computed in-kernel from the counter; program 0 stores
   the fp32 scale for backward. Optional N(0, 1) fill of dropped units.
5. ``_grad_kernel``: ``grad_in = grad * keep * scale`` from the same bits.

Memory traffic per unit: forward reads ``x`` and writes ``out`` plus 1/8 byte of bits (and
~1/3 byte of seeds, L2-resident); backward reads ``grad`` and writes ``grad_in`` (dropout
also reads and writes a 1-byte mask). Saved for backward: the bits and one fp32 scalar.

Units are addressed through their memory order (contiguous or channels-last, 2-D and 3-D);
with channels-last inputs the bit words are laid out channel-fastest so that the word loads
of a warp are coalesced. The arithmetic matches the reference path exactly: the scale is
``float32(numel) / float32(kept)`` rounded to ``x.dtype``, then ``(x * keep) * scale``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "drop_block_forward", "drop_block_backward", "drop_block_mask", "keep_from_bits", "alloc_outputs",
    "alloc_mask_outputs", "dense_input", "seed_uniforms", "unpack_keep",
]


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _popcount32(v):
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _round(y, DT: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 -> ``DT`` rounding to nearest even (as torch does).

    ``FIX_BF16`` is only set under ``TRITON_INTERPRET=1``, whose fp32 -> bf16 cast truncates;
    compiled kernels use the hardware conversion, which already rounds to nearest even.
    """
    if FIX_BF16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(DT)
    return out


@triton.jit
def _uniforms4(seed, c):
    """Four uniforms per Philox counter ``c``: seed position ``4 c + j`` gets output ``j``."""
    return tl.rand4x(seed, c)


@triton.jit
def _seeds_kernel(seed_ptr, gamma_ptr, seeds_ptr, cnt_ptr, n, BLOCK: tl.constexpr):
    """One uint8 per seed position of the ``(mask planes, *seed grid)`` tensor: ``u < gamma``.

    Program 0 also zeroes the dropped-unit counter that ``_cover_rows_kernel`` (launched
    after this one, on the same stream) adds to: no separate zero-fill launch.
    """
    if tl.program_id(0) == 0:
        tl.store(cnt_ptr, tl.zeros((), dtype=tl.int64))
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    gamma = tl.load(gamma_ptr)
    u0, u1, u2, u3 = _uniforms4(tl.load(seed_ptr), c)
    i = c * 4
    tl.store(seeds_ptr + i, (u0 < gamma).to(tl.uint8), mask=i < n)
    tl.store(seeds_ptr + i + 1, (u1 < gamma).to(tl.uint8), mask=i + 1 < n)
    tl.store(seeds_ptr + i + 2, (u2 < gamma).to(tl.uint8), mask=i + 2 < n)
    tl.store(seeds_ptr + i + 3, (u3 < gamma).to(tl.uint8), mask=i + 3 < n)


@triton.jit
def _seed_rows_kernel(
    seeds_ptr, hd_ptr, n_rows,
    GW: tl.constexpr, W: tl.constexpr, K: tl.constexpr, FULL: tl.constexpr,
    BR: tl.constexpr, BW: tl.constexpr, LW: tl.constexpr, NW: tl.constexpr, KP: tl.constexpr,
):
    """Per seed row (mask plane, seed coords but the last): bits of the columns it covers."""
    pid = tl.program_id(0)
    q = pid.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)  # seed row ids
    row_ok = q < n_rows
    base = q * GW
    t = tl.arange(0, BW)  # lane = output column w
    # Lane t holds the seed whose block starts at column t: g = t (valid), g = t + K//2 (full).
    # Column t is covered iff lanes (t-K, t] hold a seed: a running sum of hit[t] - hit[t-K].
    if FULL:
        g = t + K // 2
    else:
        g = t
    ga = g[None, :]
    gb = ga - K
    a = tl.load(seeds_ptr + base[:, None] + ga, mask=row_ok[:, None] & (ga < GW), other=0)
    b = tl.load(seeds_ptr + base[:, None] + gb, mask=row_ok[:, None] & (gb >= 0) & (gb < GW), other=0)
    in_window = tl.cumsum(a.to(tl.int32) - b.to(tl.int32), axis=1)
    if FULL:
        if K // 2 > 0:
            # Lanes -K..-1 (seeds g < K//2, whose clipped blocks start left of column 0)
            # enter the window sums without leaving them through hit[t - K], t >= 0.
            e = tl.arange(0, KP)
            ge = (e - K + K // 2)[None, :]
            ok_e = row_ok[:, None] & (e < K)[None, :] & (ge >= 0) & (ge < GW)
            v = tl.load(seeds_ptr + base[:, None] + ge, mask=ok_e, other=0)
            in_window += tl.sum(v.to(tl.int32), axis=1)[:, None]
    covered = (in_window > 0) & (t < W)[None, :]
    bits = covered.to(tl.uint32) << (t % LW).to(tl.uint32)[None, :]
    words = tl.sum(tl.reshape(bits, (BR, NW, LW)), axis=2)
    m = tl.arange(0, NW)
    tl.store(hd_ptr + q[:, None] * NW + m[None, :], words.to(tl.int32, bitcast=True), mask=row_ok[:, None])


@triton.jit
def _cover_rows_kernel(
    hd_ptr, bits_ptr, cnt_ptr, n_rows, CM,
    b_sn, b_sc, b_sr, b_sm,
    S0: tl.constexpr, S1: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, ND: tl.constexpr, FULL: tl.constexpr,
    R: tl.constexpr, RG: tl.constexpr, NW: tl.constexpr, BQ: tl.constexpr, NWP: tl.constexpr,
):
    """Per output row: OR the covering seed rows' words; store drop bits; count dropped units."""
    pid = tl.program_id(0)
    q = pid.to(tl.int64) * BQ + tl.arange(0, BQ).to(tl.int64)
    q_ok = q < n_rows
    # Rows plane-major, so that the K seed-row loads of neighbouring rows coalesce and hit
    # the cache; only the (one) store per row follows the bits' layout, channel-fastest for
    # channels-last inputs.
    r = q % R
    tq = q // R
    pc = tq % CM
    pn = tq // CM
    plane = pn * CM + pc
    m = tl.arange(0, NWP)
    m_ok = m < NW
    acc = tl.zeros((BQ, NWP), dtype=tl.uint32)
    if ND == 2:
        h = r
        for j in tl.static_range(K0):
            if FULL:
                gh = h + K0 // 2 - j
            else:
                gh = h - j
            ok = q_ok & (gh >= 0) & (gh < G0)
            ptr = hd_ptr + (plane * RG + gh)[:, None] * NW + m[None, :]
            v = tl.load(ptr, mask=ok[:, None] & m_ok[None, :], other=0)
            acc = acc | v.to(tl.uint32, bitcast=True)
    else:
        d = r // S1
        h = r % S1
        for j0 in tl.static_range(K0):
            if FULL:
                gd = d + K0 // 2 - j0
            else:
                gd = d - j0
            ok0 = q_ok & (gd >= 0) & (gd < G0)
            for j1 in tl.static_range(K1):
                if FULL:
                    gh = h + K1 // 2 - j1
                else:
                    gh = h - j1
                ok = ok0 & (gh >= 0) & (gh < G1)
                ptr = hd_ptr + (plane * RG + gd * G1 + gh)[:, None] * NW + m[None, :]
                v = tl.load(ptr, mask=ok[:, None] & m_ok[None, :], other=0)
                acc = acc | v.to(tl.uint32, bitcast=True)
    out = bits_ptr + (pn * b_sn + pc * b_sc + r * b_sr)[:, None] + m[None, :] * b_sm
    tl.store(out, acc.to(tl.int32, bitcast=True), mask=q_ok[:, None] & m_ok[None, :])
    dropped = tl.sum(tl.sum(_popcount32(acc).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(cnt_ptr, dropped.to(tl.int64))


@triton.jit
def _keep_bit(offs, bits_ptr, b_sn, b_sc, b_sr, b_sm,
              C: tl.constexpr, W: tl.constexpr, R: tl.constexpr, LW: tl.constexpr, CL: tl.constexpr):
    """1 where the unit at memory offset ``offs`` is kept, 0 where it is dropped."""
    if CL:  # memory order (n, *spatial, c)
        c = offs % C
        tq = offs // C
        w = tq % W
        tq = tq // W
        r = tq % R
        n = tq // R
    else:  # (n, c, *spatial)
        w = offs % W
        tq = offs // W
        r = tq % R
        tq = tq // R
        c = tq % C
        n = tq // C
    addr = n * b_sn + c * b_sc + r * b_sr + (w // LW) * b_sm
    word = tl.load(bits_ptr + addr).to(tl.uint32, bitcast=True)
    return 1 - ((word >> (w % LW).to(tl.uint32)) & 1)


@triton.jit
def _apply_kernel(
    x_ptr, out_ptr, bits_ptr, cnt_ptr, scale_in_ptr, scale_out_ptr, seed_ptr,
    total, mask_numel, mask_numel_f, b_sn, b_sc, b_sr, b_sm,
    C: tl.constexpr, W: tl.constexpr, R: tl.constexpr, LW: tl.constexpr, CL: tl.constexpr,
    COUNT: tl.constexpr, NOISE: tl.constexpr, FIX_BF16: tl.constexpr, IDX64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    if COUNT:
        kept = tl.maximum(mask_numel - tl.load(cnt_ptr), 1)
        s = tl.math.div_rn(mask_numel_f, kept.to(tl.float32))  # IEEE division, as torch
    else:
        s = tl.load(scale_in_ptr)
    if pid == 0:
        tl.store(scale_out_ptr, s)
    keep = _keep_bit(tl.where(ok, offs, 0), bits_ptr, b_sn, b_sc, b_sr, b_sm, C, W, R, LW, CL)
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    dt = x.dtype
    # (x * keep) * scale.to(dtype), as the reference: the fp32 product of two values of a
    # 16-bit type is exact, so one rounding gives the same bits as a native 16-bit multiply.
    y = (x.to(tl.float32) * keep.to(tl.float32)) * _round(s, dt, FIX_BF16).to(tl.float32)
    if NOISE:
        z = _round(tl.randn(tl.load(seed_ptr) + 1, offs.to(tl.int64)), dt, FIX_BF16).to(tl.float32)
        y = y + tl.where(keep == 1, 0.0, z)
    tl.store(out_ptr + offs, _round(y, dt, FIX_BF16), mask=ok)


@triton.jit
def _grad_kernel(
    g_ptr, gi_ptr, bits_ptr, scale_ptr, total, b_sn, b_sc, b_sr, b_sm,
    C: tl.constexpr, W: tl.constexpr, R: tl.constexpr, LW: tl.constexpr, CL: tl.constexpr,
    FIX_BF16: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    keep = _keep_bit(tl.where(ok, offs, 0), bits_ptr, b_sn, b_sc, b_sr, b_sm, C, W, R, LW, CL)
    g = tl.load(g_ptr + offs, mask=ok, other=0)
    dt = g.dtype
    s = _round(tl.load(scale_ptr), dt, FIX_BF16).to(tl.float32)
    tl.store(gi_ptr + offs, _round((g.to(tl.float32) * keep.to(tl.float32)) * s, dt, FIX_BF16), mask=ok)


# ---------------------------------------------------------------------------- host side


_APPLY_BLOCK = 1024
_SEED_BLOCK = 256  # Philox counters per program (4 seeds each)


def _apply_config(dtype: torch.dtype) -> tuple[int, int]:
    """Units per program and warps of the apply and grad kernels: 32 bytes of ``x`` per thread.

    Measured on an H200 (bf16 and fp32 maps of 256 x {256, 1024, 2048} channels): 16-bit
    inputs run 5-20% faster at 4096 units and 8 warps than at 1024 and 4; fp32 is fastest
    at 1024 and 4.
    """
    return (4096, 8) if dtype.itemsize == 2 else (_APPLY_BLOCK, 4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and _interpreting()


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the Triton DropBlock kernels need a CUDA tensor (got {t.device}); "
            "set TRITON_INTERPRET=1 to run them on CPU for testing, or use the reference backend"
        )


def _on_input_device(fn):
    """Launch on the first argument's GPU (Triton launches on the current device)."""

    @functools.wraps(fn)
    def wrapper(t: torch.Tensor, *args, **kwargs):
        _check_device(t)
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return wrapper


def is_channels_last(x: torch.Tensor) -> bool:
    """Dense in channels-last order (and not also contiguous): the layout the kernels index."""
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=fmt)


def dense_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` in a memory order the kernels index (contiguous or channels-last), and which."""
    if x.is_contiguous():
        return x, False
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The least power of 2 >= ``n`` (1 for ``n <= 1``); host arithmetic, unlike ``triton.next_power_of_2``
    (a jit function whose Python call costs microseconds, paid per kernel launch)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def _word_geometry(width: int) -> tuple[int, int, int]:
    """Lanes per row (power of 2), bits per word and words per row for a last dim of ``width``."""
    bw = _next_pow2(max(width, 1))
    lw = min(32, bw)
    return bw, lw, bw // lw


def _bit_strides(bits: torch.Tensor) -> tuple[int, int, int, int]:
    # Size-1 mask dims broadcast over the batch / channels of x: stride 0.
    sn = bits.stride(0) if bits.size(0) > 1 else 0
    sc = bits.stride(1) if bits.size(1) > 1 else 0
    return sn, sc, bits.stride(2), bits.stride(3)


def _alloc_bits(shape: Sequence[int], channels_last: bool, mask: str, device: torch.device) -> torch.Tensor:
    n, c = shape[0], shape[1]  # may be symbolic under torch.compile(dynamic=True): no int()
    spatial = tuple(int(s) for s in shape[2:])
    n_m = 1 if mask == "batch" else n
    c_m = c if mask == "channel" else 1
    r = math.prod(spatial[:-1])
    nw = _word_geometry(spatial[-1])[2]
    if channels_last and c_m > 1:
        return torch.empty((n_m, r, nw, c_m), dtype=torch.int32, device=device).permute(0, 3, 1, 2)
    return torch.empty((n_m, c_m, r, nw), dtype=torch.int32, device=device)


def alloc_outputs(
    x: torch.Tensor, mask: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Output, drop-bits and scale tensors of the fused op (shared with the fake impl)."""
    xd, cl = dense_input(x)
    bits = _alloc_bits(xd.shape, cl, mask, xd.device)
    return torch.empty_like(xd), bits, xd.new_empty((), dtype=torch.float32), cl


def alloc_mask_outputs(
    shape: Sequence[int], channels_last: bool, mask: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-bits and dropped-count tensors of `drop_block_mask` (shared with the fake impl)."""
    return _alloc_bits(shape, channels_last, mask, device), torch.empty((1,), dtype=torch.int64, device=device)


@_on_input_device
def drop_block_mask(
    gamma: torch.Tensor,
    seed: torch.Tensor,
    shape: Sequence[int],
    channels_last: bool,
    block: Sequence[int],
    mask: str,
    seed_region: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the mask kernels (seeds, row dilation, cover + count) for an input of ``shape``.

    The input itself is not needed (so that under ``torch.compile`` its producer and the
    multiply can fuse without materialising it); ``gamma``'s device is the device.

    Returns:
        ``(drop_bits, dropped)``: the packed drop bits, ``(n_m, c_m, prod(spatial[:-1]), words)``
        int32 (channel-fastest when ``channels_last``), and the number of dropped units of
        the ``(n_m, c_m, *spatial)`` mask, a 1-element int64 tensor.
    """
    nd = len(shape) - 2
    if nd not in (2, 3):
        raise ValueError(f"expected a 4-D or 5-D shape, got {tuple(shape)}")
    device = gamma.device
    bits, cnt = alloc_mask_outputs(shape, channels_last, mask, device)
    spatial = tuple(int(s) for s in shape[2:])
    ks = tuple(min(int(k), s) for k, s in zip(block, spatial))
    full = seed_region == "full"
    grid_shape = spatial if full else tuple(s - k + 1 for s, k in zip(spatial, ks))
    planes = bits.size(0) * bits.size(1)
    width = spatial[-1]
    bw, lw, nw = _word_geometry(width)
    rg = math.prod(grid_shape[:-1])
    r = math.prod(spatial[:-1])
    gamma = gamma.reshape(1).to(dtype=torch.float32)
    seed = seed.reshape(1).to(device=device, dtype=torch.int64)

    n_seeds = planes * rg * grid_shape[-1]
    seeds = torch.empty(n_seeds, dtype=torch.uint8, device=device)
    _seeds_kernel[(_cdiv(n_seeds, 4 * _SEED_BLOCK),)](seed, gamma, seeds, cnt, n_seeds, BLOCK=_SEED_BLOCK)

    hd = torch.empty((planes * rg, nw), dtype=torch.int32, device=device)
    n_seed_rows = planes * rg
    br = max(1, min(64, 2048 // bw))
    k_last = ks[-1]
    _seed_rows_kernel[(_cdiv(n_seed_rows, br),)](
        seeds, hd, n_seed_rows,
        GW=grid_shape[-1], W=width, K=k_last, FULL=full,
        BR=br, BW=bw, LW=lw, NW=nw, KP=_next_pow2(k_last),
    )

    n_rows = planes * r
    nwp = _next_pow2(nw)
    bq = max(1, 512 // nwp)
    _, _, sr, sm = _bit_strides(bits)
    _cover_rows_kernel[(_cdiv(n_rows, bq),)](
        hd, bits, cnt, n_rows, bits.size(1), bits.stride(0), bits.stride(1), sr, sm,
        S0=spatial[0], S1=spatial[1] if nd == 3 else 1, G0=grid_shape[0], G1=grid_shape[1] if nd == 3 else 1,
        K0=ks[0], K1=ks[1] if nd == 3 else 1, ND=nd, FULL=full, R=r, RG=rg, NW=nw, BQ=bq, NWP=nwp,
    )
    return bits, cnt


@_on_input_device
def drop_block_forward(
    x: torch.Tensor,
    gamma: torch.Tensor,
    seed: torch.Tensor,
    scale_in: torch.Tensor,
    block: tuple[int, ...] | list[int],
    mask: str,
    seed_region: str,
    scale_mode: str,
    noise: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels; returns ``(out, drop_bits, scale)``.

    Args:
        x: ``(N, C, *spatial)`` with 2 or 3 spatial dims; fp32, fp16 or bf16.
        gamma: seed rate, a 1-element fp32 tensor on ``x.device`` (never a constant, so a
            new rate never recompiles).
        seed: 1-element int64 tensor, the Philox key.
        scale_in: 1-element fp32 tensor, the scale used unless ``scale_mode == "count"``.
        block: block size per spatial dim, already clipped to the map.
        mask: ``"channel"``, ``"shared"`` or ``"batch"``.
        seed_region: ``"valid"`` or ``"full"``.
        scale_mode: ``"count"`` (computed on chip), else ``scale_in`` is applied.
        noise: fill dropped units with N(0, 1).
        out: where to write the result: ``x`` itself (dense, contiguous or channels-last) for an
            in-place call. The apply kernel reads each unit of ``x`` before it writes the same
            unit, so writing into ``x`` gives the bits a new tensor would hold. Default: a new
            tensor like ``x``.
    """
    xd, cl = dense_input(x)
    if out is not None and (out is not x or xd is not x):
        raise ValueError("out must be x itself, and x dense (contiguous or channels-last)")
    bits, cnt = drop_block_mask(gamma.to(x.device), seed, tuple(xd.shape), cl, block, mask, seed_region)
    out = torch.empty_like(xd) if out is None else xd
    scale_out = xd.new_empty((), dtype=torch.float32)
    spatial = tuple(int(s) for s in xd.shape[2:])
    width = spatial[-1]
    _, lw, _ = _word_geometry(width)
    sn, sc, sr, sm = _bit_strides(bits)
    total = xd.numel()
    mask_numel = bits.size(0) * bits.size(1) * math.prod(spatial)
    scale_in = scale_in.reshape(1).to(device=x.device, dtype=torch.float32)
    blk, warps = _apply_config(xd.dtype)
    _apply_kernel[(_cdiv(total, blk),)](
        xd, out, bits, cnt, scale_in, scale_out, seed.reshape(1),
        total, mask_numel, float(mask_numel), sn, sc, sr, sm,
        C=xd.shape[1], W=width, R=math.prod(spatial[:-1]), LW=lw, CL=cl, COUNT=scale_mode == "count",
        NOISE=bool(noise), FIX_BF16=_fix_bf16(xd), IDX64=total + blk >= 2**31, BLOCK=blk,
        num_warps=warps,
    )
    return out, bits, scale_out


def keep_from_bits(bits: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bool keep mask ``(n_m, c_m, *spatial)`` from drop bits, in plain torch ops.

    Only broadcasts, shifts and views (no gather), so under ``torch.compile`` inductor fuses
    the unpacking and the multiply using it into the neighbouring pointwise kernels, and the
    partitioner can recompute it in backward from the bits instead of saving a mask.
    """
    _, lw, _ = _word_geometry.__wrapped__(spatial[-1])  # traced by dynamo: not through the cache
    lanes = torch.arange(lw, dtype=torch.int32, device=bits.device)
    dropped = (bits.unsqueeze(-1) >> lanes) & 1  # (n_m, c_m, R, words, lw)
    dropped = dropped.flatten(-2)[..., : spatial[-1]]
    return (dropped == 0).reshape(bits.shape[0], bits.shape[1], *spatial)


@_on_input_device
def drop_block_backward(grad: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad * keep * scale`` from the drop bits saved by `drop_block_forward`."""
    gd, cl = dense_input(grad)
    gi = torch.empty_like(gd)
    spatial = tuple(int(s) for s in gd.shape[2:])
    _, lw, _ = _word_geometry(spatial[-1])
    sn, sc, sr, sm = _bit_strides(bits)
    total = gd.numel()
    blk, warps = _apply_config(gd.dtype)
    _grad_kernel[(_cdiv(total, blk),)](
        gd, gi, bits, scale.reshape(1), total, sn, sc, sr, sm,
        C=gd.shape[1], W=spatial[-1], R=math.prod(spatial[:-1]), LW=lw, CL=cl, FIX_BF16=_fix_bf16(gd),
        IDX64=total + blk >= 2**31, BLOCK=blk, num_warps=warps,
    )
    return gi


@triton.jit
def _uniform_kernel(seed_ptr, u_ptr, n, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    u0, u1, u2, u3 = _uniforms4(tl.load(seed_ptr), c)
    i = c * 4
    tl.store(u_ptr + i, u0, mask=i < n)
    tl.store(u_ptr + i + 1, u1, mask=i + 1 < n)
    tl.store(u_ptr + i + 2, u2, mask=i + 2 < n)
    tl.store(u_ptr + i + 3, u3, mask=i + 3 < n)


@_on_input_device
def seed_uniforms(seed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The uniforms the forward kernels draw on the ``(mask planes, *seed grid)`` tensor.

    Thresholding them at gamma gives the seeds (for tests: the fused masks can then be
    compared bit for bit with the reference expansion of the same seeds).
    """
    u = torch.empty(shape, dtype=torch.float32, device=seed.device)
    n = u.numel()
    _uniform_kernel[(_cdiv(n, 4 * _SEED_BLOCK),)](seed.reshape(1), u, n, BLOCK=_SEED_BLOCK)
    return u


def unpack_keep(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool keep mask ``(n_m, c_m, *spatial)`` of an input of ``shape`` (tests, ``describe``)."""
    return keep_from_bits(bits, tuple(int(s) for s in shape[2:]))
