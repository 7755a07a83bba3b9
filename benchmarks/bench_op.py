"""Benchmark the DropBlock op against its anchors, side by side in one process.

Anchors: ``F.dropout`` (the cost floor), timm's ``drop_block_2d`` (``couple_channels``
True = shared mask, False = per-channel mask) and torchvision's ``ops.drop_block2d``
(per-channel). Ours: ``dropblock_fx.drop_block`` with ``mask="channel"`` (paper) and
``mask="shared"``. Prints a table of forward and forward+backward times and ratios,
and writes JSON.

Usage (CPU, the numbers in docs/performance.md)::

    python benchmarks/bench_op.py --shape 32 256 14 14

On a GPU (bf16, the shape of the GPU tables in docs/performance.md)::

    python benchmarks/bench_op.py --device cuda --dtype bf16 --shape 256 1024 14 14 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dropblock_fx

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _variants(drop: float, block: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from timm.layers.drop import drop_block_2d
    from torchvision.ops import drop_block2d

    return {
        "copy x*1 (floor)": lambda x: x * 1,
        "F.dropout": lambda x: F.dropout(x, drop, training=True),
        "timm shared (couple_channels)": lambda x: drop_block_2d(x, drop, block, couple_channels=True),
        "timm per-channel": lambda x: drop_block_2d(x, drop, block, couple_channels=False),
        "torchvision drop_block2d": lambda x: drop_block2d(x, drop, block),
        "ours shared": lambda x: dropblock_fx.drop_block(x, drop, block, mask="shared"),
        "ours per-channel (paper)": lambda x: dropblock_fx.drop_block(x, drop, block),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 256, 14, 14])
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None, help="calls per sample (default: 10 on a GPU, 1 on the CPU)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_op.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    reps = args.reps or (50 if device.type == "cuda" else 20)
    torch.manual_seed(0)
    x = torch.randn(*args.shape, device=device, dtype=dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    # Round-robin: every round runs each variant once, so a transient load on the machine
    # hits all variants alike; the median over rounds is reported.
    variants = _variants(args.drop, args.block)
    errors: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in variants}

    def fwd_bwd(fn) -> None:
        fn(xg).backward(g)
        xg.grad = None

    # On a GPU each sample is `inner` calls back to back between two synchronisations, per call:
    # the host's launch work overlaps the device's, as in a network (one call between two
    # synchronisations would add the sync and launch latency to every variant).
    inner = args.inner or (10 if device.type == "cuda" else 1)
    for rnd in range(reps + 3):
        for name, fn in variants.items():
            if name in errors:
                continue
            try:
                for kind, call in (("fwd", lambda: fn(x)), ("fwd_bwd", lambda: fwd_bwd(fn))):
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        call()
                    _sync(device)
                    if rnd >= 3:  # warm-up rounds
                        samples[name][kind].append((time.perf_counter() - t0) * 1e3 / inner)
            except Exception as e:  # an anchor crashing is a result worth printing
                errors[name] = f"{type(e).__name__}: {e}"[:120]
    rows = []
    for name in variants:
        if name in errors:
            rows.append({"variant": name, "error": errors[name]})
        else:
            rows.append({"variant": name, "fwd_ms": statistics.median(samples[name]["fwd"]),
                         "fwd_bwd_ms": statistics.median(samples[name]["fwd_bwd"])})

    base = {r["variant"]: r for r in rows}
    drop_fb = base["F.dropout"].get("fwd_bwd_ms")
    timm_pc = base["timm per-channel"].get("fwd_bwd_ms")
    timm_sh = base["timm shared (couple_channels)"].get("fwd_bwd_ms")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"device: {dev_name}; torch {torch.__version__}; shape {tuple(args.shape)} {args.dtype}"
          f"{' channels_last' if args.channels_last else ''}; drop {args.drop}, block {args.block}; median of "
          f"{reps} rounds, {inner} call(s) a sample")
    print(f"| {'variant':32s} | fwd ms | fwd+bwd ms | x dropout (fwd+bwd) | timm per-channel / this |")
    print(f"|{'-' * 34}|-------:|-----------:|--------------------:|------------------------:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']:32s} | error: {r['error']}")
            continue
        fb = r["fwd_bwd_ms"]
        vs_drop = fb / drop_fb if drop_fb else float("nan")
        speedup = timm_pc / fb if timm_pc else float("nan")
        print(f"| {r['variant']:32s} | {r['fwd_ms']:6.3f} | {fb:10.3f} | {vs_drop:19.2f} | {speedup:23.2f} |")
    ours_pc = base["ours per-channel (paper)"].get("fwd_bwd_ms")
    ours_sh = base["ours shared"].get("fwd_bwd_ms")
    summary = {
        "per_channel_speedup_vs_timm_per_channel": timm_pc / ours_pc if timm_pc and ours_pc else None,
        "shared_speedup_vs_timm_shared": timm_sh / ours_sh if timm_sh and ours_sh else None,
        "per_channel_vs_dropout": ours_pc / drop_fb if ours_pc and drop_fb else None,
    }
    print("summary:", ", ".join(f"{k} = {v:.2f}" for k, v in summary.items() if v is not None))
    result = {"device": dev_name, "torch": torch.__version__, "args": vars(args) | {"json": str(args.json)},
              "rows": rows, "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
