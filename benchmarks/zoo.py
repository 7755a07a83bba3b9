"""Zoo coverage: the default recipe on every CNN in timm and torchvision (``pretrained=False``, CPU).

For each model: build it, run it in eval mode on a small input (64x64 unless the model needs
more), ``apply_dropblock(model)`` (the default recipe, ``last-two-stages``; planning at the
same input size), then check

* eval outputs bit-identical to the unmodified model's;
* ``state_dict`` keys (in order) and values identical;
* every DropBlock module is a planned row, in one of the requested stages (the last two of the
  model's stages; its only one for an isotropic net), ``DropBlock3d`` on video models;
* a train forward + backward runs, with finite outputs and gradients;
* at rate 0, a train forward + backward asks for no more fresh memory than the unmodified model's;
* ``remove_dropblock`` restores the original ``repr``, module classes and eval outputs.

Which timm models are CNNs is decided from their modules (built on the meta device, cached
in ``benchmarks/results/zoo_kinds.json``), not from a hand list: a model is a CNN when it has
at least 4 spatial (kernel > 1, not patchify) convolutions and at most one attention module
(a module with a ``num_heads`` attribute or ``nn.MultiheadAttention``) per 4 spatial convs.
Names registered by ``dropblock_fx.timm`` (``*_dropblock``) are skipped. torchvision:
classification, segmentation, video (3-D) and detection models (their ``backbone.body``, or
``backbone.features`` for SSD) go through the same filter.

Usage::

    python benchmarks/zoo.py --jobs 2 --timeout 180 --max-params 300 --log zoo.jsonl   # ~10 min, 2 cores
    python benchmarks/zoo.py --jobs 1 --timeout 900 --min-params 300 --log big.jsonl   # the 26 big ones
    python benchmarks/zoo.py --from-log zoo.jsonl big.jsonl     # the whole table from both logs
    python benchmarks/zoo.py --sample 3 --jobs 2                # up to 3 models per family (seeded)
    python benchmarks/zoo.py --models resnet50 tv:resnet18 'timm:efficientnet_b*'
    python benchmarks/zoo.py --family resnet --family tv-video

Writes ``docs/coverage.md`` (``--out``: the part below its marker line; with a per-family
placement table) and prints ``N passed, M failed``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import fnmatch
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
KINDS_CACHE = ROOT / "benchmarks" / "results" / "zoo_kinds.json"

TV_KINDS = ("classification", "segmentation", "video", "detection")


@dataclass(frozen=True)
class Spec:
    source: str  # "timm" | "tv-classification" | "tv-segmentation" | "tv-video" | "tv-detection"
    name: str

    @property
    def key(self) -> str:
        return f"{'timm' if self.source == 'timm' else 'tv'}:{self.name}"


@dataclass
class Result:
    key: str
    family: str
    status: str  # "passed" | "failed" | "timeout" | "skipped"
    reason: str = ""
    sites: int = 0
    input: str = ""
    seconds: float = 0.0
    stages: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)  # site kind -> count
    fallback: int = 0  # sites placed without a graph (after a norm / a block that FX cannot trace)
    example: list = field(default_factory=list)  # "kind: anchor" of the deepest block's sites


# ----------------------------------------------------------------------------- listing

def timm_family(name: str) -> str:
    import timm.models._registry as reg

    mod = reg._model_to_module.get(name) or reg._model_to_module.get(reg.get_arch_name(name), "?")
    return mod.rsplit(".", 1)[-1]


def family_of(spec: Spec) -> str:
    return timm_family(spec.name) if spec.source == "timm" else spec.source


def list_specs() -> list[Spec]:
    import timm
    import torchvision.models as tvm

    import dropblock_fx.timm  # noqa: F401  (registers the *_dropblock names, skipped below)

    specs = [Spec("timm", n) for n in timm.list_models() if not n.endswith("_dropblock")]
    mods = {"classification": tvm, "segmentation": tvm.segmentation, "video": tvm.video,
            "detection": tvm.detection}
    for kind in TV_KINDS:
        specs += [Spec(f"tv-{kind}", n) for n in tvm.list_models(module=mods[kind])]
    return specs


# ----------------------------------------------------------------------------- building

def build(spec: Spec):
    """(model, target path or '', module the checks run, input sizes to try)."""
    from dropblock_fx.testing import zoo_model

    return zoo_model(spec.source, spec.name)


def count_kinds(model) -> dict[str, int]:
    from torch import nn

    spatial = attn = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Conv1d)) or type(m).__name__.startswith("Conv2d"):
            k = tuple(getattr(m, "kernel_size", (1,)))
            s = tuple(getattr(m, "stride", (1,)))
            if math.prod(k) > 1 and not (k == s and k[0] >= 4):  # patchify stems are not convolutions
                spatial += 1
        if isinstance(m, nn.MultiheadAttention) or (
                isinstance(getattr(m, "num_heads", None), int) and not any(
                    isinstance(getattr(c, "num_heads", None), int) or isinstance(c, nn.MultiheadAttention)
                    for c in m.children())):
            attn += 1
    params = sum(p.numel() for p in model.parameters())
    return {"spatial_convs": spatial, "attention": attn, "mparams": round(params / 1e6, 1)}


def is_cnn(counts: dict[str, int]) -> bool:
    return counts["spatial_convs"] >= 4 and counts["attention"] * 4 <= counts["spatial_convs"]


def classify(spec: Spec) -> tuple[str, dict]:
    """Module counts of the model, built on the meta device (real CPU if that fails)."""
    import torch

    _worker_init()
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(spec)[2]
    except Exception:
        try:
            model = build(spec)[2]
        except Exception as e:  # noqa: BLE001
            return spec.key, {"error": f"{type(e).__name__}: {e}"[:200]}
    return spec.key, count_kinds(model)


# ----------------------------------------------------------------------------- the check

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def check(spec: Spec, timeout: float = 0.0, batch: int = 2) -> Result:
    """Every guarantee on one model; never raises (the reason is in the result)."""
    _worker_init()
    t0 = time.perf_counter()
    res = Result(spec.key, family_of(spec), "failed")
    old = None
    if timeout and hasattr(signal, "SIGALRM"):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        _check(spec, res, batch)
    except _Timeout:
        res.status, res.reason = "timeout", f"over {timeout:.0f} s (at step {res.reason or '?'})"
    except _Skip as e:
        res.status, res.reason = "skipped", str(e)
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "dropblock_fx" in f.filename), "")
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        res.reason = f"[{res.reason}] {msg[:300]}" + (f" ({where})" if where else "")
    finally:
        if old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


class _Skip(Exception):
    pass


# The batch of a second check when a batch of 2 overflows the gradients (see `_check`).
_RETRY_BATCH = 8


def _check(spec: Spec, res: Result, batch: int) -> None:
    import torch

    from dropblock_fx.testing import CheckFailed, check_surgery

    res.reason = "build"
    torch.manual_seed(0)
    model, target, sub, sizes = build(spec)
    counts = count_kinds(model if not target else sub)
    if not is_cnn(counts):
        raise _Skip(f"not a CNN ({counts['spatial_convs']} spatial convs, {counts['attention']} attention)")
    model.eval()

    res.reason = "reference forward"
    err = None
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(batch, *size, generator=g)
        try:
            with torch.no_grad():
                sub(x)
            break
        except _Timeout:
            raise
        except Exception as e:  # noqa: BLE001
            err = e
    else:
        raise RuntimeError(f"the unmodified model does not run: {type(err).__name__}: {err}")
    res.input = "x".join(map(str, size))

    res.reason = "check"
    kw = {"target": target} if target else {}
    try:
        try:
            plan = check_surgery(model, x, runner=sub, **kw)
        except CheckFailed as e:
            if not (e.step == "train forward/backward" and "non-finite" in str(e) and batch < _RETRY_BATCH):
                raise
            # Batch norm in training mode over a batch of 2 on tiny maps (an SE block's
            # pooled features: two values a channel) can amplify the masks' perturbation
            # into overflowing gradients; the same check on a batch of 8 says whether the
            # gradients are really broken.
            x = torch.randn(_RETRY_BATCH, *size, generator=g)
            res.input += f", batch {_RETRY_BATCH}"
            plan = check_surgery(model, x, runner=sub, **kw)
    except CheckFailed as e:
        res.reason = e.step
        raise AssertionError(str(e).split("] ", 1)[1]) from None
    res.sites = len(plan.rows)
    res.stages = sorted({r.stage for r in plan.rows})
    res.kinds = dict(sorted(Counter(r.kind for r in plan.rows).items()))
    res.fallback = sum(r.mechanism != "graph" for r in plan.rows)
    owner = plan.rows[-1].path.rsplit(".", 1)[0]
    res.example = [f"{r.kind}: {r.anchor}" for r in plan.rows if r.path.rsplit(".", 1)[0] == owner]
    if spec.source == "tv-video" and any(len(r.resolution) != 3 for r in plan.rows):
        raise AssertionError("a video model got a 2-D DropBlock")
    res.status, res.reason = "passed", ""


# ----------------------------------------------------------------------------- driver

def _load_kinds() -> dict:
    import timm

    try:
        d = json.loads(KINDS_CACHE.read_text())
        if d.get("timm") == timm.__version__:
            return d["models"]
    except (OSError, ValueError, KeyError):
        pass
    return {}


def _save_kinds(kinds: dict) -> None:
    import timm

    KINDS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    KINDS_CACHE.write_text(json.dumps({"timm": timm.__version__, "models": kinds}, indent=0, sort_keys=True))


def _pool(jobs: int):
    # no max_tasks_per_child: with it, Python 3.11's executor can hang when it replaces a worker
    import multiprocessing as mp

    return cf.ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, mp_context=mp.get_context("spawn"))


def classify_all(specs: list[Spec], jobs: int, progress: bool = True) -> dict:
    from tqdm import tqdm

    kinds = _load_kinds()
    todo = [s for s in specs if s.key not in kinds]
    if todo:
        with _pool(jobs) as ex, tqdm(total=len(todo), desc="classify", disable=not progress) as bar:
            for key, counts in ex.map(classify, todo, chunksize=8):
                kinds[key] = counts
                bar.update()
        _save_kinds(kinds)
    return kinds


def select(specs: list[Spec], kinds: dict, models: Optional[list[str]], families: Optional[list[str]],
           sample: Optional[int], seed: int, max_params: float = 0,
           min_params: float = 0) -> tuple[list[Spec], list[Result]]:
    """The CNNs to check (and the non-CNNs excluded, as skipped results)."""
    if models:
        def hit(s: Spec) -> bool:
            for pat in models:
                src, _, pat2 = pat.rpartition(":")
                if src and not (s.key.startswith(src + ":")):
                    continue
                if fnmatch.fnmatch(s.name, pat2):
                    return True
            return False
        specs = [s for s in specs if hit(s)]
    if families:
        specs = [s for s in specs if family_of(s) in families]
    chosen, skipped = [], []
    for s in specs:
        c = kinds.get(s.key)
        if c is None or "error" in c or is_cnn(c):
            if c is not None and max_params and c.get("mparams", 0) > max_params:
                skipped.append(Result(s.key, family_of(s), "not run", f"{c['mparams']} M params"))
            elif c is not None and min_params and c.get("mparams", 0) <= min_params:
                continue  # a run of the big ones only (--min-params): the others are not listed
            else:
                chosen.append(s)
        else:
            skipped.append(Result(s.key, family_of(s), "skipped",
                                  f"not a CNN ({c['spatial_convs']} spatial convs, {c['attention']} attention)"))
    select.totals = defaultdict(int)  # CNNs per family before sampling
    for s in chosen:
        select.totals[family_of(s)] += 1
    if sample:
        rng = random.Random(seed)
        by_fam = defaultdict(list)
        for s in chosen:
            by_fam[family_of(s)].append(s)
        chosen = []
        for fam in sorted(by_fam):
            group = by_fam[fam]
            chosen += group if fam.startswith("tv-") else rng.sample(group, min(sample, len(group)))
    return chosen, skipped


def run(specs: list[Spec], jobs: int, timeout: float, progress: bool = True,
        log: Optional[Path] = None) -> list[Result]:
    """Check every spec in ``jobs`` processes; each result is also appended to ``log`` (JSON lines)
    as it arrives, so an interrupted run keeps what it measured (``--from-log`` rebuilds the table)."""
    from tqdm import tqdm

    results = []
    # big models last, so one slow model does not hold the bar at the start
    with _pool(jobs) as ex, tqdm(total=len(specs), desc="zoo", disable=not progress) as bar:
        futs = {ex.submit(check, s, timeout): s for s in specs}
        for f in cf.as_completed(futs):
            s = futs[f]
            try:
                r = f.result()
            except Exception as e:  # noqa: BLE001  (a worker died: out of memory, segfault)
                r = Result(s.key, family_of(s), "failed", f"worker died: {type(e).__name__}: {e}"[:200])
            results.append(r)
            if log is not None:
                with open(log, "a") as fh:
                    fh.write(json.dumps(asdict(r)) + "\n")
            bar.set_postfix_str(f"{sum(x.status == 'passed' for x in results)} ok "
                                f"{sum(x.status == 'failed' for x in results)} failed")
            bar.update()
    return results


def placement_table(results: list[Result]) -> list[str]:
    """Where the default recipe put DropBlock, per family: the site mix, the fallbacks, and the
    sites of one block of a representative (the family's first passed model by name)."""
    fams = defaultdict(list)
    for r in results:
        if r.status == "passed" and r.kinds:
            fams[r.family].append(r)
    if not fams:
        return []
    lines = ["", "### Placement by family", "",
             "Site kinds summed over the family's passed models (`conv` after conv -> norm (-> act), `conv_last` "
             "at the end of a residual branch, `shortcut` on the identity / projection, `block` on a block's "
             "output); *no graph*: sites placed after a norm or a block that FX could not trace; the last "
             "column is the deepest block of the representative.", "",
             "| family | passed | sites per model | conv / conv_last / shortcut / block | no graph | "
             "representative: its deepest block's sites |", "|---|---:|---:|---|---:|---|"]
    for fam in sorted(fams, key=lambda f: (not f.startswith("tv-"), f)):
        rs = sorted(fams[fam], key=lambda r: r.key)
        tot = Counter()
        for r in rs:
            tot.update(r.kinds)
        sites = sorted(r.sites for r in rs)
        span = f"{sites[0]}" if sites[0] == sites[-1] else f"{sites[0]}-{sites[-1]}"
        mix = " / ".join(str(tot.get(k, 0)) for k in ("conv", "conv_last", "shortcut", "block"))
        rep = rs[0]
        example = ("; ".join(rep.example[:4]) + (" ..." if len(rep.example) > 4 else "")).replace("|", "\\|")
        lines.append(f"| {fam} | {len(rs)} | {span} | {mix} | {sum(r.fallback for r in rs)} | "
                     f"`{rep.key.split(':', 1)[1]}`: {example} |")
    return lines


def write_markdown(results: list[Result], path: Path, header: str, totals: Optional[dict] = None) -> str:
    fams = defaultdict(list)
    for r in results:
        fams[r.family].append(r)
    tested = [r for r in results if r.status not in ("skipped", "not run")]
    n = {k: sum(r.status == k for r in results) for k in ("passed", "failed", "timeout", "not run", "skipped")}
    summary = f"{n['passed']} passed, {n['failed']} failed" + (f", {n['timeout']} timed out" if n["timeout"] else "")
    lines = [header, "", f"**{summary}** of {len(tested)} CNNs run"
             + (f" (of {sum(totals.values())} CNNs selected)" if totals else "")
             + (f"; {n['not run']} CNNs not run (over --max-params)" if n["not run"] else "")
             + f"; {n['skipped']} models skipped as not CNNs", "",
             "| family | CNNs selected | run | passed | failed / timed out (reason) |", "|---|---:|---:|---:|---|"]
    for fam in sorted(fams, key=lambda f: (not f.startswith("tv-"), f)):
        rs = [r for r in fams[fam] if r in tested]
        if not rs:
            continue
        bad = [r for r in rs if r.status != "passed"]
        why = "; ".join(f"`{r.key}`: {r.status} - {r.reason}".replace("|", "\\|") for r in bad) or "-"
        total = (totals or {}).get(fam, len(rs))
        lines.append(f"| {fam} | {total} | {len(rs)} | {len(rs) - len(bad)} | {why} |")
    lines += placement_table(results)
    for status, title in (("not run", "CNNs not run: over --max-params"), ("skipped", "Skipped as not CNNs")):
        by = defaultdict(list)
        for r in results:
            if r.status == status:
                by[r.family].append(r.key.split(":", 1)[1])
        if by:
            lines += ["", f"<details><summary>{title} ({sum(map(len, by.values()))}, by family)</summary>", ""]
            lines += [f"- {f}: {len(v)} ({', '.join(sorted(v)[:8])}{', ...' if len(v) > 8 else ''})"
                      for f, v in sorted(by.items())]
            lines += ["", "</details>"]
    text = "\n".join(lines) + "\n"
    marker = "<!-- zoo table: generated below this line by benchmarks/zoo.py -->"
    try:  # keep the hand-written part above the marker
        old = path.read_text()
        if marker in old:
            text = old.split(marker)[0] + marker + "\n" + text
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    ap.add_argument("--sample", type=int, default=None, help="at most N models per timm family (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-params", type=float, default=0, help="do not run CNNs over this many million "
                                                                 "parameters (memory); 0 = no limit")
    ap.add_argument("--min-params", type=float, default=0, help="only CNNs over this many million parameters "
                                                                 "(the complement of --max-params, e.g. with --jobs 1)")
    ap.add_argument("--models", nargs="*", help="names or globs; prefix timm: or tv: to pick a zoo")
    ap.add_argument("--family", action="append", help="a timm module name (resnet, efficientnet, ...) or "
                                                        "tv-classification / tv-segmentation / tv-video / tv-detection")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every result as JSON")
    ap.add_argument("--log", type=Path, default=None, help="append each result to this JSON-lines file")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None,
                    help="do not run: write the table from --log files (an interrupted run; later files win)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.time()
    specs = list_specs()
    kinds = classify_all(specs, a.jobs, not a.no_progress)
    chosen, skipped = select(specs, kinds, a.models, a.family, a.sample, a.seed, a.max_params, a.min_params)
    if a.from_log:
        done = {}
        for f in a.from_log:
            for line in f.read_text().splitlines():
                r = Result(**json.loads(line))
                done[r.key] = r
        results = [done[s.key] for s in chosen if s.key in done] + skipped
    else:
        results = run(chosen, a.jobs, a.timeout, not a.no_progress, a.log) + skipped
    cmd = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import timm
    import torch
    import torchvision

    header = (f"<!-- generated by `{cmd.strip()}` in {time.time() - t0:.0f} s, "
              f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, timm {timm.__version__}, "
              f"torchvision {torchvision.__version__} -->")
    summary = write_markdown(results, a.out, header, dict(select.totals))
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(summary)
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
