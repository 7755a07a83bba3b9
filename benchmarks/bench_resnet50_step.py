"""ResNet-50 training step with DropBlock at the paper's placement, against its anchors.

timm ``resnet50``, SGD (momentum 0.9), bf16 autocast, channels_last, synthetic data; every
variant built from the same weights and fed the same batch, all in one process.

Variants:

* ``baseline``: no DropBlock.
* ``timm drop_block_rate``: ``timm.create_model("resnet50", drop_block_rate=0.1)`` (timm's own
  placement: layer3 and layer4, one site per block after bn2, 9 sites).
* ``paper, ours per-channel``: the paper's placement, 36 sites: in every layer3 and layer4
  bottleneck after act1, after act2, after bn3 (before the add) and on the shortcut (after
  the downsample conv+BN, or on the identity), block 7, drop ``--drop`` in layer4 and
  ``--drop / 4`` in layer3 (the official code's per-group rates at the end of the schedule),
  with ``dropblock_fx.DropBlock2d`` (``mask="channel"``: the paper's choice). On CUDA this
  runs the fused Triton op.
* ``paper, ours in place``: the same sites and values, each DropBlock writing into the norm
  output it follows (the ``act1`` / ``act2`` sites moved before their ReLU, which commutes
  with them); only the identity shortcut stays out of place. What in place can save.
* ``paper, ours shared``: the same with one mask per sample (``mask="shared"``).
* ``paper, timm kernel shared`` / ``per-channel``: the same placement with timm's
  ``DropBlock2d`` (``couple_channels=True`` / ``False``).
* ``paper, apply_dropblock``: only when ``dropblock_fx.apply_dropblock`` exists: the surgery
  engine with the ``paper-resnet50`` recipe.

Each variant runs eager, and with ``--compile`` also under ``torch.compile`` (default mode).
Prints a table (ms/step, % over baseline, peak GiB, % over baseline, warm-up seconds: under
compile, the compile time) per mode and writes JSON after every variant, so a run cut short
keeps what it measured. ``--profile NAME ...`` also profiles a few steps of the variants
whose names contain NAME (``torch.profiler``): device time, kernel launches and the largest
kernels per step, and how much of the step the device was idle (launch gaps).

The GPU run (one command; H100/H200, about 5 to 8 minutes with ``--compile``)::

    python benchmarks/bench_resnet50_step.py --compile

Eager only, about 1 minute::

    python benchmarks/bench_resnet50_step.py

A CPU smoke run (checks that every variant builds and steps)::

    python benchmarks/bench_resnet50_step.py --device cpu --batch 8 --image 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dropblock_fx

BLOCK = 7


# ---------------------------------------------------------------------------- placement


def paper_placement(model: nn.Module, make: Callable[[float], nn.Module], drop: float) -> int:
    """Put ``make(rate)`` at the paper's 4 sites of every layer3 / layer4 bottleneck; return the count.

    Sites: after ``act1``, after ``act2``, after ``bn3`` (before the residual add), and on the
    shortcut: after ``downsample`` when there is one, else as the ``downsample`` slot itself
    (timm's Bottleneck applies ``downsample`` to the identity when it is not None).
    """
    n = 0
    for layer_name, rate in (("layer3", drop / 4), ("layer4", drop)):
        for blk in getattr(model, layer_name):
            blk.act1 = nn.Sequential(blk.act1, make(rate))
            blk.act2 = nn.Sequential(blk.act2, make(rate))
            blk.bn3 = nn.Sequential(blk.bn3, make(rate))
            blk.downsample = make(rate) if blk.downsample is None else nn.Sequential(blk.downsample, make(rate))
            n += 4
    return n


def paper_placement_in_place(model: nn.Module, drop: float) -> int:
    """The paper's 36 sites with ``DropBlock2d(inplace=True)`` wherever that is exact and safe.

    A site after ``act1`` / ``act2`` moves before the ReLU, onto the norm's output: ReLU commutes
    with zeroing and with a positive scale, so the block computes the same values and
    gradients, and the DropBlock can write into the norm's output (the norm's backward reads its
    input, not its output). After ``bn3`` and after ``downsample`` it writes into the norm's
    output too. Only the identity shortcut (the block's input, which ``conv1`` saves) is
    out of place.
    """
    n = 0
    for layer_name, rate in (("layer3", drop / 4), ("layer4", drop)):
        for blk in getattr(model, layer_name):
            def make(inplace: bool, r: float = rate) -> nn.Module:
                return dropblock_fx.DropBlock2d(r, BLOCK, inplace=inplace)

            blk.bn1 = nn.Sequential(blk.bn1, make(True))
            blk.bn2 = nn.Sequential(blk.bn2, make(True))
            blk.bn3 = nn.Sequential(blk.bn3, make(True))
            blk.downsample = make(False) if blk.downsample is None else nn.Sequential(blk.downsample, make(True))
            n += 4
    return n


def _ours(mask: str) -> Callable[[float], nn.Module]:
    return lambda rate: dropblock_fx.DropBlock2d(rate, BLOCK, mask=mask)


def _timm_kernel(couple: bool) -> Callable[[float], nn.Module]:
    from timm.layers import DropBlock2d as TimmDropBlock2d

    return lambda rate: TimmDropBlock2d(drop_prob=rate, block_size=BLOCK, couple_channels=couple)


def build_variants(drop: float) -> dict[str, Callable[[], tuple[nn.Module, int]]]:
    import timm

    def plain(**kw) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("resnet50", **kw)

    def placed(make: Callable[[float], nn.Module]) -> Callable[[], tuple[nn.Module, int]]:
        def build() -> tuple[nn.Module, int]:
            m = plain()
            return m, paper_placement(m, make, drop)

        return build

    def timm_rate() -> tuple[nn.Module, int]:
        m = plain(drop_block_rate=drop)
        return m, sum(1 for mod in m.modules() if type(mod).__name__ == "DropBlock2d")

    def in_place() -> tuple[nn.Module, int]:
        m = plain()
        return m, paper_placement_in_place(m, drop)

    variants: dict[str, Callable[[], tuple[nn.Module, int]]] = {
        "baseline": lambda: (plain(), 0),
        "timm drop_block_rate": timm_rate,
        "paper, ours per-channel": placed(_ours("channel")),
        "paper, ours in place": in_place,
        "paper, ours shared": placed(_ours("shared")),
        "paper, timm kernel shared": placed(_timm_kernel(True)),
        "paper, timm kernel per-channel": placed(_timm_kernel(False)),
    }
    if hasattr(dropblock_fx, "apply_dropblock"):

        def surgery() -> tuple[nn.Module, int]:
            # The recipe has a schedule; measuring at its final rate is what we want here.
            warnings.filterwarnings("ignore", message="dropblock_fx: this model's recipe has a schedule")
            m = plain()
            dropblock_fx.apply_dropblock(m, "paper-resnet50")
            return m, sum(1 for mod in m.modules() if isinstance(mod, dropblock_fx.DropBlockNd))

        variants["paper, apply_dropblock"] = surgery
    return variants


# ---------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, compile_: bool, warmup: int, steps: int,
    profile: bool = False,
) -> dict:
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        samples.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"ms": statistics.median(samples), "ms_min": min(samples), "peak_gib": peak, "warmup_s": warmup_s}
    if profile:
        row["profile"] = profile_steps(step, device, 3)
    return row


def profile_steps(step: Callable[[], None], device: torch.device, n: int) -> dict:
    """Kernel time, launches and the largest kernels per step over ``n`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / n
    kernels = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        if device.type == "cuda" and getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            kernels.append({"name": e.key[:90], "calls": e.count / n, "ms": dev_us / 1e3 / n})
    kernels.sort(key=lambda k: -k["ms"])
    busy = sum(k["ms"] for k in kernels)
    return {"wall_ms": wall_ms, "kernel_ms": busy, "idle_ms": wall_ms - busy,
            "launches": sum(k["calls"] for k in kernels), "top": kernels[:25]}


def _pct(v: float | None, base: float | None) -> str:
    if v is None or base is None:
        return "n/a"
    return f"{100.0 * (v / base - 1.0):+.1f}%"


def print_table(rows: list[dict], mode: str) -> None:
    rows = [r for r in rows if r["mode"] == mode]
    base = next((r for r in rows if r["variant"] == "baseline" and "ms" in r), None)
    print(f"\n{mode}:")
    print(f"| {'variant':32s} | sites | ms/step | vs baseline | peak GiB | vs baseline | warm-up s |")
    print(f"|{'-' * 34}|------:|--------:|------------:|---------:|------------:|----------:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']:32s} | {r.get('sites', '')!s:>5} | error: {r['error']}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(
            f"| {r['variant']:32s} | {r['sites']:5d} | {r['ms']:7.1f} | {_pct(r['ms'], base and base['ms']):>11s} "
            f"| {peak:>8s} | {_pct(r['peak_gib'], base and base['peak_gib']):>11s} | {r['warmup_s']:9.1f} |"
        )
    for r in rows:
        prof = r.get("profile")
        if prof:
            print(f"\n{r['variant']} ({mode}), per step: wall {prof['wall_ms']:.1f} ms, kernels {prof['kernel_ms']:.1f} ms, "
                  f"idle {prof['idle_ms']:.1f} ms, {prof['launches']:.0f} launches; largest kernels:")
            for k in prof["top"][:15]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:6.0f}x  {k['name']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--drop", type=float, default=0.1, help="layer4 rate (layer3 gets a quarter)")
    ap.add_argument("--compile", action="store_true", help="also run every variant under torch.compile")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile runs")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="substrings of variant names to run, in this order (baseline always first)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", nargs="*", default=[], help="substrings of variant names to profile")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (30 if on_gpu else 3)
    warmup = args.warmup or (10 if on_gpu else 1)
    modes = (["compile"] if args.compile_only else ["eager"] + (["compile"] if args.compile else []))
    out_path = args.json or Path(f"benchmarks/results/bench_resnet50_step_{device.type}.json")

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    dev_name = torch.cuda.get_device_name(device) if on_gpu else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    header = (f"device: {dev_name}; torch {torch.__version__}; resnet50 batch {args.batch} at {args.image}px, "
              f"bf16 autocast, channels_last, SGD; drop {args.drop} (layer3 {args.drop / 4:g}), block {BLOCK}; "
              f"median of {steps} steps after {warmup} warm-up")
    print(header)

    variants = build_variants(args.drop)
    if args.variants:  # baseline first, then in the order asked (a run cut short keeps the first ones)
        names = ["baseline"] + [k for sub in args.variants for k in variants if sub in k and k != "baseline"]
        variants = {k: variants[k] for k in dict.fromkeys(names)}
    rows: list[dict] = []
    result = {"device": dev_name, "torch": torch.__version__, "header": header,
              "args": vars(args) | {"json": str(out_path)}, "rows": rows}
    for mode in modes:
        for name, build in variants.items():
            row: dict = {"variant": name, "mode": mode}
            model = None
            try:
                model, row["sites"] = build()
                prof = any(p in name for p in args.profile)
                row.update(measure(model, x, y, device, mode == "compile", warmup, steps, prof))
                print(f"  {mode:7s} {name:32s} {row['ms']:8.1f} ms/step"
                      + (f"  peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else ""), flush=True)
            except Exception as e:  # an anchor failing is a result worth recording
                row["error"] = f"{type(e).__name__}: {e}"[:200]
                print(f"  {mode:7s} {name:32s} error: {row['error']}", flush=True)
            rows.append(row)
            del model
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            if mode == "compile":
                torch._dynamo.reset()
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))
    for mode in modes:
        print_table(rows, mode)
    print(f"\nwrote {out_path}")
    return result


if __name__ == "__main__":
    main()
