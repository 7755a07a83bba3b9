"""What DropBlock at the paper's placement adds to a training step, and to compiling it.

Every variant is the same timm model (same weights, same batch, SGD with momentum) with a
different set of modules at the paper's 36 sites of a ResNet-50 (after ``act1``, after
``act2``, after ``bn3`` and on the shortcut of every layer3 / layer4 bottleneck; block 7;
``--drop`` in layer4 and a quarter of it in layer3, the official per-group rates at the end of
the schedule). They run **round-robin in one process** (every round steps each variant once,
in a rotating order), so a load that comes and goes hits all of them alike; the table gives
the median and the minimum over rounds and the median of the per-round ratios to the
baseline, with the middle half of those ratios (first to third quartile): on a shared
machine that spread says how far one run's median can be trusted.

Variants (``--variants`` picks some by substring; the baseline always runs):

* ``baseline``: no DropBlock.
* ``timm drop_block_rate``: timm's own placement (``drop_block_rate=--drop``, 9 sites).
* ``paper, ours per-channel``: ``dropblock_fx.DropBlock2d`` at the 36 sites (the paper's mask).
* ``paper, apply_dropblock``: the same sites as ``apply_dropblock(model, "paper-resnet50")``
  puts them (``drop_prob=--drop``): what a user gets, with its per-forward checks, and the
  sites after ``bn3`` and the projection norm writing into the norm's output.
* ``paper, ours shared``: the same with ``mask="shared"``.
* ``paper, ours at rate 0``: per-channel at ``drop_prob=0`` (the first step of a schedule).
* ``paper, one multiply``: ``x * 1.0`` at the 36 sites: one read and one write of each map
  forward and backward, the least a DropBlock that returns a new tensor can cost in eager mode.
* ``paper, fixed mask``: at the 36 sites, the multiply by a per-channel mask and its scale drawn
  once and kept: what applying the mask costs (under ``torch.compile``: its reads in the fused
  kernels and what the backward saves) when drawing it costs nothing; held as uint8, as the
  compiled CPU op returns its masks.
* ``paper, fixed mask (bool)``: the same masks held as bool, as the compiled op returned them
  before: inductor's CPU kernels load a bool operand one element at a time.

Modes:

* eager steps (default);
* ``--compile``: the same, each variant under ``torch.compile`` (inductor), after its warm-up;
* ``--compile-time``: for each variant, in alternation ``--repeats`` times, a fresh
  ``torch.compile`` (dynamo reset, inductor's caches off) and the wall time of the first
  training step, which compiles the forward and the backward graphs; with the graphs, the
  generated kernels and dynamo's per-phase times.

CPU, the figures in docs/performance.md::

    python benchmarks/bench_step_overhead.py --batch 8 --rounds 30
    python benchmarks/bench_step_overhead.py --batch 8 --rounds 100 --variants "ours per-channel" "apply_dropblock" "one multiply"
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 \
        python benchmarks/bench_step_overhead.py --batch 8 --rounds 100 --variants "ours per-channel" "apply_dropblock" "one multiply"
    python benchmarks/bench_step_overhead.py --site-times --batch 8 --rounds 20 --variants "ours per-channel" "apply_dropblock" "one multiply"
    python benchmarks/bench_step_overhead.py --batch 32 --rounds 6 --variants timm "ours per-channel" "one multiply"
    python benchmarks/bench_step_overhead.py --compile --image 160 --rounds 100 --variants "ours per-channel" "fixed mask" "one multiply"
    python benchmarks/bench_step_overhead.py --compile-time --image 160 --variants "ours per-channel"
    python benchmarks/bench_step_overhead.py --memory

The step tables come with a second one (on Unix): per variant, the median a step of the
process's minor page faults and of its user and system CPU time (``resource.getrusage``). A
page fault is the kernel mapping and zeroing a 4 KiB page of fresh memory: with glibc's
default settings the large buffers freed at the end of a step go back to the OS, so the new
tensors of the next one (a site's output, its gradient) are faulted in again, and that system
time is part of what each new tensor costs. The header names the allocator settings
(``MALLOC_*``, ``LD_PRELOAD``) and the transparent hugepage mode; to see a step without the
faults, run with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184``
(glibc then keeps freed memory for reuse).

``--memory`` counts, per variant, the fresh memory one eager training step asks for
(``dropblock_fx.testing.fresh_memory``: the bytes of every new storage an operator returns),
forward and backward apart,
and in how many tensors. The count is exact and the same on every run, so it shows what a change
saves where a step's time on a shared machine cannot: each MiB of it is 256 page faults a
step with glibc's defaults.

``--profile`` instead prints, per operator, the CPU time one eager step of each variant
spends beyond the baseline's (``torch.profiler``). ``--site-times`` times, inside ``--rounds``
round-robin eager steps, the forwards of each variant's 36 sites (a clock read before and
after each site module's forward) and prints the median per step: what the sites themselves
cost, which a whole step's time on a shared machine cannot resolve.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F
from torch import nn

import dropblock_fx
from dropblock_fx.testing import fresh_memory
from bench_resnet50_step import BLOCK, paper_placement  # the same 36 sites as the GPU benchmark


class OneMultiply(nn.Module):
    """``x * 1.0``: one pass over the map forward and one backward (the eager floor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class FixedMask(nn.Module):
    """DropBlock's multiply by a mask drawn once, at the first (eager) call, and kept: what
    applying a per-channel mask costs when drawing it costs nothing. ``dtype``: the mask's (uint8
    as the compiled CPU op returns it; bool to see what inductor's one-element-at-a-time bool
    loads cost). ``channels_last``: the mask's layout (a compiled CPU graph keeps its activations
    channels-last)."""

    def __init__(self, rate: float, channels_last: bool, dtype: torch.dtype = torch.uint8) -> None:
        super().__init__()
        self.rate, self.channels_last, self.dtype = rate, channels_last, dtype
        self.keep: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            with torch.no_grad():
                out = dropblock_fx.drop_block(torch.ones_like(x, memory_format=fmt), self.rate, BLOCK)
            self.keep, self.scale = (out != 0).to(self.dtype), out.max()
        return (x * self.keep.to(x.dtype)) * self.scale


def build_variants(model_name: str, drop: float, example: torch.Tensor | None = None, compiled: bool = False,
                   ) -> dict[str, Callable[[], tuple[nn.Module, int]]]:
    """The variants by name; ``example`` (a batch) adds the two ``paper, fixed mask`` ones, whose
    masks are drawn by one eager forward of it (channels-last when ``compiled``)."""
    import timm

    def plain(**kw) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(model_name, **kw)

    def placed(make: Callable[[float], nn.Module]) -> Callable[[], tuple[nn.Module, int]]:
        def build() -> tuple[nn.Module, int]:
            m = plain()
            return m, paper_placement(m, make, drop)

        return build

    def timm_rate() -> tuple[nn.Module, int]:
        m = plain(drop_block_rate=drop)
        return m, sum(1 for mod in m.modules() if type(mod).__name__ == "DropBlock2d")

    def applied() -> tuple[nn.Module, int]:
        m = dropblock_fx.apply_dropblock(plain(), "paper-resnet50", drop_prob=drop)
        return m, len(dropblock_fx.describe(m).rows)

    def fixed(dtype: torch.dtype) -> Callable[[], tuple[nn.Module, int]]:
        def build() -> tuple[nn.Module, int]:
            m = plain()
            sites = paper_placement(m, lambda r: FixedMask(r, compiled, dtype), drop)
            with torch.no_grad():
                m.train()(example)
            return m, sites

        return build

    variants = {
        "baseline": lambda: (plain(), 0),
        "timm drop_block_rate": timm_rate,
        "paper, ours per-channel": placed(lambda r: dropblock_fx.DropBlock2d(r, BLOCK)),
        "paper, apply_dropblock": applied,
        "paper, ours shared": placed(lambda r: dropblock_fx.DropBlock2d(r, BLOCK, mask="shared")),
        "paper, ours at rate 0": placed(lambda r: dropblock_fx.DropBlock2d(0.0, BLOCK)),
        "paper, one multiply": placed(lambda r: OneMultiply()),
    }
    if example is not None:
        variants["paper, fixed mask"] = fixed(torch.uint8)
        variants["paper, fixed mask (bool)"] = fixed(torch.bool)
    return variants


class Runner:
    """One variant: its model, optimizer and step function."""

    def __init__(self, name: str, model: nn.Module, sites: int, x: torch.Tensor, y: torch.Tensor,
                 compile_: bool, channels_last: bool, bf16: bool) -> None:
        self.name, self.sites = name, sites
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.fwd = torch.compile(model) if compile_ else model
        self.x, self.y, self.bf16 = x, y, bf16
        self.samples: list[float] = []
        # Per step: the process's minor page faults and its user and system CPU ms (both threads).
        self.usage: list[tuple[int, float, float]] = []

    def step(self) -> float:
        u0 = _usage()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.fwd(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1e3
        u1 = _usage()
        if u0 is not None and u1 is not None:
            self.usage.append((u1[0] - u0[0], (u1[1] - u0[1]) * 1e3, (u1[2] - u0[2]) * 1e3))
        return ms


def _usage() -> tuple[int, float, float] | None:
    """(minor page faults, user CPU s, system CPU s) of this process so far; None off Unix."""
    if resource is None:  # pragma: no cover - Windows
        return None
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_utime, ru.ru_stime


def _allocator() -> str:
    """The settings that decide whether freed memory goes back to the OS (and is faulted in again)."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "LD_PRELOAD", "THP_"))]
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "n/a"
    return f"allocator env {' '.join(env) or 'default'}; transparent hugepages {thp}"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def run_steps(runners: list[Runner], warmup: int, rounds: int) -> list[dict]:
    for r in runners:
        for _ in range(warmup):
            r.step()
        r.usage.clear()  # the rounds only, as the times
    loads = [_load()]
    for i in range(rounds):
        k = i % len(runners)  # rotate the order: no variant always runs first
        for r in runners[k:] + runners[:k]:
            r.samples.append(r.step())
        if i % 5 == 4:
            loads.append(_load())
    base = runners[0].samples
    rows = []
    for r in runners:
        ratios = [a / b for a, b in zip(r.samples, base)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rows.append({"variant": r.name, "sites": r.sites, "median_ms": statistics.median(r.samples),
                     "min_ms": min(r.samples), "ratio_median": statistics.median(ratios),
                     "ratio_q1": q1, "ratio_q3": q3,
                     "ratio_of_mins": min(r.samples) / min(base), "samples": r.samples})
        if r.usage and runners[0].usage:
            cpu = [u[1] + u[2] for u in r.usage]
            cpu_ratios = [a / b for a, b in zip(cpu, [u[1] + u[2] for u in runners[0].usage])]
            rows[-1].update({
                "faults_median": statistics.median(u[0] for u in r.usage),
                "user_ms_median": statistics.median(u[1] for u in r.usage),
                "sys_ms_median": statistics.median(u[2] for u in r.usage),
                "cpu_ratio_median": statistics.median(cpu_ratios), "usage": r.usage,
            })
    print(f"load average (1, 5, 15 min) during the rounds: {' | '.join(loads)}")
    return rows


def print_steps(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"| {'variant':26s} | sites | median ms | min ms | vs baseline (median of ratios) "
          f"| middle half of ratios | ratio of minimums |")
    print(f"|{'-' * 28}|------:|----------:|-------:|-------------------------------:|----------------------:"
          f"|------------------:|")
    for r in rows:
        spread = f"{100 * (r['ratio_q1'] - 1):+.1f}% .. {100 * (r['ratio_q3'] - 1):+.1f}%"
        print(f"| {r['variant']:26s} | {r['sites']:5d} | {r['median_ms']:9.1f} | {r['min_ms']:6.1f} "
              f"| {100 * (r['ratio_median'] - 1):+29.1f}% | {spread:>21s} | {100 * (r['ratio_of_mins'] - 1):+16.1f}% |")
    if all("faults_median" in r for r in rows):
        print("\nPer step, medians: the process's minor page faults (each a 4 KiB page of fresh memory the"
              "\nkernel maps and zeroes) and its CPU time on both threads, user and system:")
        print(f"| {'variant':26s} | page faults | user CPU ms | system CPU ms | CPU time vs baseline (median of ratios) |")
        print(f"|{'-' * 28}|------------:|------------:|--------------:|---------------------------------------:|")
        for r in rows:
            print(f"| {r['variant']:26s} | {r['faults_median']:11.0f} | {r['user_ms_median']:11.0f} "
                  f"| {r['sys_ms_median']:13.0f} | {100 * (r['cpu_ratio_median'] - 1):+37.1f}% |")


def compile_once(build: Callable[[], tuple[nn.Module, int]], x: torch.Tensor, y: torch.Tensor,
                 channels_last: bool, bf16: bool) -> dict:
    """Compile one variant in this (fresh) process and time its first training step."""
    import torch._inductor.config as iconfig
    import torch._inductor.metrics as metrics
    from torch._dynamo.utils import compile_times, counters

    iconfig.force_disable_caches = True  # every compile from scratch, as at a first start
    # A small compile first: the first compile of a process also pays inductor's imports.
    warm = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    warm(torch.randn(1, 3, 8, 8)).sum().backward()
    torch._dynamo.reset()
    counters.clear()
    metrics.reset()
    model, sites = build()
    r = Runner("", model, sites, x, y, True, channels_last, bf16)
    first = r.step()
    second = r.step()
    phases = compile_times(repr="csv", aggregate=True)
    times = dict(zip(phases[0], phases[1])) if isinstance(phases, tuple) else {}
    keep = ("bytecode_tracing", "aot_trace_joint_graph", "GraphLowering.run", "GraphLowering.codegen",
            "Scheduler.__init__", "Scheduler.codegen", "async_compile.wait", "compile_file",
            "OutputGraph.call_user_compiler")
    return {"sites": sites, "first_step_s": first / 1e3, "second_step_s": second / 1e3,
            "compile_s": (first - second) / 1e3,
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "kernels": metrics.generated_kernel_count,
            "autotune": sum(v for k, v in counters["inductor"].items() if "autotune" in k),
            "phases_s": {k: round(float(v), 2) for k, v in times.items() if k in keep}}


def run_compile_time(variants: dict, argv: list[str], repeats: int) -> list[dict]:
    """Each compile in its own process (no in-memory kernel reuse between variants)."""
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    for i in range(repeats):
        for name in variants:
            proc = subprocess.run([sys.executable, __file__, *argv, "--one-compile", name], env=env,
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"compiling {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(lines[-1]) | {"load": _load()}
            rows[name].append(res)
            print(f"  repeat {i}: {name:26s} compile {res['compile_s']:6.1f} s, graphs {res['graphs']}, "
                  f"breaks {res['graph_breaks']}, kernels {res['kernels']}, autotune {res['autotune']}, "
                  f"load {res['load']}; {res['phases_s']}", flush=True)
    out = []
    for name, runs in rows.items():
        out.append({"variant": name, "sites": runs[0]["sites"],
                    "compile_s": statistics.median(r["compile_s"] for r in runs),
                    "compile_s_all": [r["compile_s"] for r in runs],
                    "graphs": runs[0]["graphs"], "graph_breaks": runs[0]["graph_breaks"],
                    "kernels": runs[0]["kernels"], "autotune": runs[0]["autotune"], "runs": runs})
    base = out[0]["compile_s"]
    print("\n| variant | sites | compile s (median) | vs baseline | graphs | graph breaks | kernels | autotune |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['variant']} | {r['sites']} | {r['compile_s']:.1f} | {100 * (r['compile_s'] / base - 1):+.1f}% "
              f"| {r['graphs']} | {r['graph_breaks']} | {r['kernels']} | {r['autotune']} |")
    return out


def run_site_times(runners: list[Runner], warmup: int, rounds: int) -> list[dict]:
    """Per variant, the summed forward time of its site modules in each of ``rounds`` steps."""
    totals: dict[str, list[float]] = {}
    for r in runners[1:]:
        acc, start = [0.0], [0.0]
        for m in r.model.modules():
            if isinstance(m, (dropblock_fx.DropBlockNd, OneMultiply, FixedMask)):
                m.register_forward_pre_hook(lambda *_, start=start: start.__setitem__(0, time.perf_counter()))
                m.register_forward_hook(
                    lambda *_, start=start, acc=acc: acc.__setitem__(0, acc[0] + time.perf_counter() - start[0]))
        r.site_acc = acc  # type: ignore[attr-defined]
        totals[r.name] = []
    for r in runners:
        for _ in range(warmup):
            r.step()
    for i in range(rounds):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            if r.name in totals:
                r.site_acc[0] = 0.0  # type: ignore[attr-defined]
            r.samples.append(r.step())
            if r.name in totals:
                totals[r.name].append(r.site_acc[0] * 1e3)  # type: ignore[attr-defined]
    print(f"\n| {'variant':26s} | sites | step median ms | sites' forwards, median ms a step | min ms |")
    print(f"|{'-' * 28}|------:|---------------:|----------------------------------:|-------:|")
    rows = []
    for r in runners[1:]:
        t = totals[r.name]
        rows.append({"variant": r.name, "sites": r.sites, "step_median_ms": statistics.median(r.samples),
                     "sites_fwd_median_ms": statistics.median(t), "sites_fwd_min_ms": min(t)})
        print(f"| {r.name:26s} | {r.sites:5d} | {statistics.median(r.samples):14.1f} "
              f"| {statistics.median(t):33.2f} | {min(t):6.2f} |")
    return rows


def run_memory(runners: list[Runner]) -> list[dict]:
    """Per variant, the fresh memory of one eager training step's forward and backward."""
    rows = []
    for r in runners:
        r.step()  # warm-up: lazily built state (optimizer buffers, cached plans) is not counted
        torch.manual_seed(0)
        holder: dict = {}

        def forward() -> None:
            holder["loss"] = F.cross_entropy(r.model(r.x), r.y)

        fwd = fresh_memory(forward)
        bwd = fresh_memory(lambda: holder["loss"].backward())
        r.opt.zero_grad(set_to_none=True)
        rows.append({"variant": r.name, "sites": r.sites, "forward_bytes": fwd.bytes, "forward_tensors": fwd.tensors,
                     "backward_bytes": bwd.bytes, "backward_tensors": bwd.tensors})
    base = rows[0]["forward_bytes"] + rows[0]["backward_bytes"]
    print("\nfresh memory of one training step (new storages returned by operators; forward | backward):")
    print(f"| {'variant':36s} | sites | forward MiB | backward MiB | step MiB | vs baseline | tensors |")
    print(f"|{'-' * 38}|------:|------------:|-------------:|---------:|------------:|--------:|")
    for row in rows:
        total = row["forward_bytes"] + row["backward_bytes"]
        print(f"| {row['variant']:36s} | {row['sites']:5d} | {row['forward_bytes'] / 2**20:11.1f} "
              f"| {row['backward_bytes'] / 2**20:12.1f} | {total / 2**20:8.1f} | {(total - base) / 2**20:+10.1f}  "
              f"| {row['forward_tensors'] + row['backward_tensors']:7d} |")
    return rows


def run_profile(runners: list[Runner], steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    for r in runners:
        r.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                r.step()
        per_op[r.name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    base = per_op[runners[0].name]
    for r in runners[1:]:
        ops = per_op[r.name]
        diff = sorted(((ops.get(k, 0.0) - base.get(k, 0.0), k) for k in set(ops) | set(base)), reverse=True)
        total = sum(ops.values()) - sum(base.values())
        print(f"\n{r.name}: {total:+.1f} ms self CPU per step over the baseline; the operators that add most:")
        for d, k in diff[:15]:
            print(f"  {d:+8.2f} ms  {k}")
    return per_op


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="a timm ResNet with bottleneck blocks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--drop", type=float, default=0.1, help="layer4 rate (layer3 gets a quarter)")
    ap.add_argument("--variants", nargs="*", default=None, help="substrings of variant names to run")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    ap.add_argument("--compile", action="store_true", help="time compiled steps")
    ap.add_argument("--compile-time", action="store_true", help="time compiling the training step")
    ap.add_argument("--repeats", type=int, default=1, help="compiles per variant with --compile-time")
    ap.add_argument("--profile", action="store_true", help="per-operator profile of one eager step")
    ap.add_argument("--site-times", action="store_true", help="time the sites' forwards inside eager steps")
    ap.add_argument("--memory", action="store_true", help="count the fresh memory of one eager step per variant")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one-compile", default=None, help=argparse.SUPPRESS)  # a child of --compile-time
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,))
    mode = ("compile-time" if args.compile_time else "profile" if args.profile else "site-times" if args.site_times
            else "memory" if args.memory else "compiled" if args.compile else "eager")
    header = (f"device: CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads); "
              f"torch {torch.__version__}; timm {args.model} batch {args.batch} at {args.image}px, "
              f"{'bf16 autocast' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''}, SGD; "
              f"drop {args.drop} (layer3 {args.drop / 4:g}), block {BLOCK}; mode {mode}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; load average at start {_load()}; {_allocator()}")
    if not args.one_compile:
        print(header, flush=True)

    variants = build_variants(args.model, args.drop, x, args.compile)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k == "baseline" or any(s in k for s in args.variants)}
    result: dict = {"header": header, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.one_compile:
        print(json.dumps(compile_once(build_variants(args.model, args.drop, x, True)[args.one_compile], x, y,
                                      args.channels_last, args.bf16)))
        return {}
    if args.compile_time:
        child_argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--compile-time"]
        result["rows"] = run_compile_time(variants, child_argv, args.repeats)
    else:
        runners = []
        for name, build in variants.items():
            model, sites = build()
            runners.append(Runner(name, model, sites, x, y, args.compile, args.channels_last, args.bf16))
        if args.profile:
            result["per_op_ms"] = run_profile(runners, steps=2)
        elif args.site_times:
            result["rows"] = run_site_times(runners, args.warmup, args.rounds)
        elif args.memory:
            result["rows"] = run_memory(runners)
        else:
            rows = run_steps(runners, args.warmup, args.rounds)
            print_steps(rows, f"{mode} training step, {args.rounds} rounds after {args.warmup} warm-up steps each:")
            result["rows"] = rows
    out = args.json or Path(f"benchmarks/results/bench_step_overhead_{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
