"""The fused op's kernels one by one on a GPU, against the memory floor and ``F.dropout``.

For each shape (bf16, channels-last by default): the device time of every kernel of the
forward (seeds, seed rows, cover + count, apply) and of the backward (grad), measured with
``triton.testing.do_bench`` (CUDA events, median), beside a copy ``x * 1`` (one read and one
write: the floor of the apply and grad kernels) and ``F.dropout``'s forward and backward. The
apply and grad kernels are also timed at other block sizes and warp counts, to choose them.
Last, the host time of the whole op: ``drop_block`` called back to back (what a training
step's Python pays per site), against the device time of its kernels.

    python benchmarks/bench_kernels_gpu.py --json benchmarks/results/bench_kernels_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import dropblock_fx
from dropblock_fx.op import triton_kernels as tk
from dropblock_fx.op.gamma import paper_gamma


DEVICE = ["cuda"]


def _sync() -> None:
    if DEVICE[0] == "cuda":
        torch.cuda.synchronize()


def _ms(fn) -> float:
    if DEVICE[0] == "cuda":
        return float(do_bench(fn, warmup=20, rep=80, return_mode="median"))
    fn()  # a smoke run (TRITON_INTERPRET=1, CPU tensors): one host-timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _apply(xd, out, bits, cnt, scale_in, scale_out, seed, cl, block: int, warps: int) -> None:
    spatial = tuple(int(s) for s in xd.shape[2:])
    _, lw, _ = tk._word_geometry(spatial[-1])
    sn, sc, sr, sm = tk._bit_strides(bits)
    total = xd.numel()
    mask_numel = bits.size(0) * bits.size(1) * math.prod(spatial)
    tk._apply_kernel[(triton.cdiv(total, block),)](
        xd, out, bits, cnt, scale_in, scale_out, seed, total, mask_numel, float(mask_numel), sn, sc, sr, sm,
        C=xd.shape[1], W=spatial[-1], R=math.prod(spatial[:-1]), LW=lw, CL=cl, COUNT=True, NOISE=False,
        FIX_BF16=False, IDX64=total + block >= 2**31, BLOCK=block, num_warps=warps,
    )


def _grad(gd, gi, bits, scale, cl, block: int, warps: int) -> None:
    spatial = tuple(int(s) for s in gd.shape[2:])
    _, lw, _ = tk._word_geometry(spatial[-1])
    sn, sc, sr, sm = tk._bit_strides(bits)
    total = gd.numel()
    tk._grad_kernel[(triton.cdiv(total, block),)](
        gd, gi, bits, scale, total, sn, sc, sr, sm, C=gd.shape[1], W=spatial[-1], R=math.prod(spatial[:-1]),
        LW=lw, CL=cl, FIX_BF16=False, IDX64=total + block >= 2**31, BLOCK=block, num_warps=warps,
    )


def run_shape(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, drop: float, block: int) -> dict:
    dev = torch.device(DEVICE[0])
    torch.manual_seed(0)
    x = torch.randn(*shape, device=dev, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    spatial = tuple(shape[2:])
    ks = tuple(min(block, s) for s in spatial)
    gamma = torch.full((1,), paper_gamma(drop, spatial, ks), device=dev, dtype=torch.float32)
    seed = torch.randint(0, 2**31 - 1, (1,), device=dev, dtype=torch.int64)
    scale_in = torch.ones(1, device=dev, dtype=torch.float32)
    xd, cl = tk.dense_input(x)
    bits, cnt = tk.drop_block_mask(gamma, seed, tuple(xd.shape), cl, ks, "channel", "valid")
    out = torch.empty_like(xd)
    scale_out = xd.new_empty((), dtype=torch.float32)
    g = torch.randn_like(x)
    gi = torch.empty_like(g)
    nbytes = x.numel() * x.element_size()
    r: dict = {"shape": list(shape), "dtype": str(dtype).split(".")[-1], "channels_last": channels_last,
               "copy_floor_ms": _ms(lambda: x.mul(1)),
               "floor_at_measured_bw_note": "copy x*1 reads and writes x once: the apply/grad floor"}
    r["copy_gbps"] = 2 * nbytes / r["copy_floor_ms"] / 1e6
    xg = x.clone().requires_grad_(True)
    r["dropout_fwd_ms"] = _ms(lambda: F.dropout(x, drop, training=True))
    yd = F.dropout(xg, drop, training=True)
    r["dropout_bwd_ms"] = _ms(lambda: torch.autograd.grad(yd, xg, g, retain_graph=True))
    r["mask_ms"] = _ms(lambda: tk.drop_block_mask(gamma, seed, tuple(xd.shape), cl, ks, "channel", "valid"))
    configs = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)]
    r["apply_ms"] = {f"{b}/{w}": _ms(lambda b=b, w=w: _apply(xd, out, bits, cnt, scale_in, scale_out, seed.reshape(1),
                                                          cl, b, w)) for b, w in configs}
    r["grad_ms"] = {f"{b}/{w}": _ms(lambda b=b, w=w: _grad(g, gi, bits, scale_out.reshape(1), cl, b, w))
                    for b, w in configs}
    # the whole op: device time per call (events around 50 calls back to back) and host time
    xg2 = x.clone().requires_grad_(True)
    y = dropblock_fx.drop_block(xg2, drop, block)
    r["op_fwd_ms"] = _ms(lambda: dropblock_fx.drop_block(x, drop, block))
    r["op_bwd_ms"] = _ms(lambda: torch.autograd.grad(y, xg2, g, retain_graph=True))
    _sync()
    t0 = time.perf_counter()
    for _ in range(50):
        dropblock_fx.drop_block(x, drop, block)
    host = (time.perf_counter() - t0) / 50 * 1e3
    _sync()
    r["op_fwd_host_ms"] = host
    t0 = time.perf_counter()
    for _ in range(50):  # one bare Triton launch: the floor of the host time per kernel
        _apply(xd, out, bits, cnt, scale_in, scale_out, seed.reshape(1), cl, 1024, 4)
    r["apply_launch_host_ms"] = (time.perf_counter() - t0) / 50 * 1e3
    _sync()
    with torch.no_grad():
        _sync()
        t0 = time.perf_counter()
        for _ in range(50):
            F.dropout(x, drop, training=True)
        r["dropout_fwd_host_ms"] = (time.perf_counter() - t0) / 50 * 1e3
        _sync()
    return r


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_kernels_gpu.json"))
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU (run with TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.smoke:
        DEVICE[0] = "cpu"
    shapes = [((256, 1024, 14, 14), torch.bfloat16, True), ((256, 256, 14, 14), torch.bfloat16, True),
              ((256, 2048, 7, 7), torch.bfloat16, True), ((256, 1024, 14, 14), torch.float32, False)]
    if args.smoke:
        shapes = [((2, 8, 14, 14), torch.bfloat16, True), ((2, 8, 7, 7), torch.float32, False)]
    name = torch.cuda.get_device_name() if DEVICE[0] == "cuda" else "CPU (interpreter)"
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    rows = []
    for shape, dtype, cl in shapes:
        r = run_shape(shape, dtype, cl, args.drop, args.block)
        rows.append(r)
        best_a = min(r["apply_ms"].items(), key=lambda kv: kv[1])
        best_g = min(r["grad_ms"].items(), key=lambda kv: kv[1])
        print(f"{tuple(shape)} {r['dtype']}{' CL' if cl else ''}: copy {r['copy_floor_ms']:.4f} ms "
              f"({r['copy_gbps']:.0f} GB/s); dropout fwd {r['dropout_fwd_ms']:.4f} bwd {r['dropout_bwd_ms']:.4f}; "
              f"ours mask {r['mask_ms']:.4f}, apply {r['apply_ms']['1024/4']:.4f} (best {best_a[0]} {best_a[1]:.4f}), "
              f"grad {r['grad_ms']['1024/4']:.4f} (best {best_g[0]} {best_g[1]:.4f}); op fwd {r['op_fwd_ms']:.4f} "
              f"bwd {r['op_bwd_ms']:.4f}; host per call: ours {r['op_fwd_host_ms']:.4f} (one bare launch "
              f"{r['apply_launch_host_ms']:.4f}), dropout "
              f"{r['dropout_fwd_host_ms']:.4f}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "triton": triton.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
