"""DDP on CPU: two real processes (gloo), a scheduled recipe, per-rank masks, resume, compile.

One launch serves the DDP, resume, compile and FSDP tests: two worker processes (``python -c``
running :func:`_worker` of this file) meet through a ``file://`` rendezvous in a temporary
folder (no TCP port to pick, so nothing to collide with) and run each mode in turn, with a
process-group timeout and a subprocess timeout: a hang fails the tests instead of blocking
CI. Each rank writes what it saw in each mode to ``rank<r>_<mode>.json``; the assertions run
here. (Starting the processes costs more than most modes, hence one launch.) Lightning's
``Trainer`` runs last in the same two processes: it finds the process group made and starts no
process of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed

if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

TESTS = Path(__file__).parent
WORLD = 2
TOTAL = 10  # schedule length (optimizer steps)
STOP = 4  # the first run saves its checkpoint after this many steps
RUN_TIMEOUT = 200  # seconds for one two-process run (a hang fails the test)
APPLY = {"input_size": [3, 64, 64], "block_size": 3}  # at 64 px layer3/layer4 are 4x4 and 2x2


# -- worker side ------------------------------------------------------------------------------

def _build(recipe=None, apply=True):
    import timm
    import torch

    import dropblock_fx as dbx

    # The same initial weights on every rank (DDP would broadcast rank 0's anyway), without
    # touching the process's global RNG: that stays as torch seeded it, different per process.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    if not apply:
        return model
    return dbx.apply_dropblock(model, recipe if recipe is not None else "last-two-stages", **APPLY)


def _batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)  # per-rank data; the global RNG is not touched
    return torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 4, (2,), generator=g)


def _train_step(model, opt, rank, step):
    import torch

    x, y = _batch(rank, step)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _probe_masks(modules, seed_fn=None):
    """The drop mask each DropBlock module draws on a ones input at its current rate
    (a list of 0/1 lists; the module's state is left as it was)."""
    import torch

    out = []
    for m in modules:
        prob = m.drop_prob
        m.drop_prob = 0.3
        if seed_fn is not None:
            seed_fn(m)
        y = m(torch.ones(2, 4, 6, 6))
        m.drop_prob = prob
        out.append((y == 0).flatten().int().tolist())
    return out


def _worker(rank: int, cfg: dict) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=cfg["init"], rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    try:
        for mode_cfg in cfg["modes"]:
            result: dict = {"rank": rank}
            try:
                if mode_cfg["mode"] == "lightning":
                    _run_lightning(rank, result)
                else:
                    _run_mode(rank, {**cfg, **mode_cfg}, result)
            except Exception as e:  # noqa: BLE001 - reported by the test that reads this mode
                import traceback

                result["error"] = traceback.format_exc()
                raise
            finally:
                Path(cfg["out"], f"rank{rank}_{mode_cfg['mode']}.json").write_text(json.dumps(result))
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done, results written: leave without the interpreter's teardown, where gloo's threads
    # now and then abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_mode(rank: int, cfg: dict, result: dict) -> None:
    import torch
    import torch.distributed as dist

    import dropblock_fx as dbx

    mode = cfg["mode"]
    if mode == "resume":
        ckpt = torch.load(cfg["ckpt"], weights_only=True)
        model = _build(dbx.Recipe.from_yaml(ckpt["recipe"]))
        model.load_state_dict(ckpt["model"])
    elif cfg.get("wrap_first"):
        # apply_dropblock on a model already wrapped in DDP: it goes through the wrapper
        # (the DropBlocks land in ddp.module, the plan on the wrapper)
        model = _build(apply=False).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        before = {k: v.clone() for k, v in ddp.state_dict().items()}
        dbx.apply_dropblock(ddp, "last-two-stages", **APPLY)
        after = ddp.state_dict()
        result["wrapped_state_unchanged"] = list(before) == list(after) and all(
            torch.equal(before[k], after[k]) for k in before)
    else:
        model = _build()
    model.train()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard  # FSDP2

        for block in [*model.layer3, *model.layer4]:
            fully_shard(block)
        ddp = fully_shard(model)  # the same object, its class swapped for FSDP<cls>
        result["class"] = type(model).__name__
    elif not cfg.get("wrap_first"):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    sched = dbx.attach_schedule(ddp, total_steps=TOTAL, optimizer=opt)
    start = 0
    if mode == "resume":
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["schedule"])
        start = int(sched.count)
    runner = ddp
    if mode == "compile":
        from torch._dynamo.testing import CompileCounterWithBackend
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        backend = CompileCounterWithBackend(cfg["backend"])
        runner = torch.compile(ddp, backend=backend)
    result["plan"] = [r.path for r in dbx.describe(ddp if cfg.get("wrap_first") else model).rows]
    result["rates"] = [sched.rates()]
    for step in range(start, TOTAL):
        _train_step(runner, opt, rank, step)
        result["rates"].append(sched.rates())
        if mode == "compile":
            result.setdefault("frames_per_step", []).append(backend.frame_count)
        if mode == "train" and step + 1 == STOP:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "schedule": sched.state_dict(),
                            "recipe": dbx.describe(model).recipe.to_yaml()}, cfg["ckpt"])
            dist.barrier()  # the checkpoint is complete before anyone goes on
    result["count"] = sched.count
    # DDP semantics: gradients are averaged, so every rank holds the same weights.
    result["checksum"] = float(sum(getattr(p, "full_tensor", lambda p=p: p)().double().sum()
                                   for p in model.parameters()))
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, result["rates"])
    result["rates_equal_across_ranks"] = all(g == result["rates"] for g in gathered)
    if mode == "compile":
        from torch._dynamo.utils import counters

        result["frames"] = backend.frame_count
        result["recompiles"] = dict(counters["recompiles"])
    if mode == "train":
        mods = [m for m in model.modules() if isinstance(m, dbx.DropBlockNd)]
        result["masks_default"] = _probe_masks(mods)
        # the user's choice 1: the same global seed on every rank (as seed_everything does)
        torch.manual_seed(1234)
        result["masks_same_seed"] = _probe_masks(mods)
        # the user's choice 2: one generator for the DropBlock modules, seeded the same on
        # every rank (the global RNG, for dropout and augmentation, stays per rank)
        torch.manual_seed(99 + rank)
        g = torch.Generator().manual_seed(7)
        for m in mods:
            m.generator = g
        result["masks_generator"] = _probe_masks(mods)
        for m in mods:
            m.generator = None
        # ... and seed + rank (timm's train.py) gives per-rank masks again
        torch.manual_seed(1234 + rank)
        result["masks_seed_plus_rank"] = _probe_masks(mods)


def _run_lightning(rank: int, result: dict) -> None:
    """Lightning's ``Trainer(devices=2, strategy="ddp")`` with the callback, in the process
    group this launch made: with ``LOCAL_RANK`` set, Lightning starts no processes of its own
    and takes the group as it finds it."""
    import warnings

    import lightning.pytorch as L
    import torch
    from small_models import lightning_net_class

    from dropblock_fx.integrations.lightning import DropBlockScheduleCallback

    warnings.simplefilter("ignore")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # the group exists: never dialled

    net = lightning_net_class()(32)
    cb = DropBlockScheduleCallback()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[cb])
    trainer.fit(net)
    result.update(world=trainer.world_size, seen=trainer.strategy.all_gather(torch.tensor(net.seen)).tolist(),
                  length=cb.schedule.length, count=cb.schedule.count, final=net.body[1].drop_prob)


# -- test side ---------------------------------------------------------------------------------

def _run(tmp_path: Path, name: str, modes: list[dict], **cfg) -> dict[str, list[dict]]:
    """Run :func:`_worker` in two processes, each mode in turn; returns ``{mode: each rank's
    result}``."""
    out = tmp_path / name
    out.mkdir()
    cfg = {"init": f"file://{out / 'rendezvous'}", "out": str(out), "modes": modes, **cfg}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    for rank in range(WORLD):
        code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_distributed as t; "
                f"t._worker({rank}, {cfg!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + RUN_TIMEOUT
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: the two-process run did not finish in {RUN_TIMEOUT} s (hang?)")
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{name} rank {rank} failed:\n{log[-4000:]}"
    return {m["mode"]: [json.loads((out / f"rank{r}_{m['mode']}.json").read_text()) for r in range(WORLD)]
            for m in modes}


def _has_fsdp2() -> bool:
    from torch.distributed import fsdp

    return hasattr(fsdp, "fully_shard")  # FSDP2 needs torch >= 2.6


EXPECTED_PLAN = [f"layer{s}.0.dropblock_{k}" for s in (3, 4) for k in ("conv1", "conv_last", "shortcut")]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The one two-process launch: train (saving a checkpoint), resume from it, compile, FSDP.
    Session-scoped: a module fixture is set up again whenever a worker of pytest-xdist runs
    another file's test between two of these."""
    tmp = tmp_path_factory.mktemp("ddp")
    ckpt = tmp / "ckpt.pt"
    modes = [{"mode": "train"}, {"mode": "resume"},
             # the recipe applied to the model after it was wrapped in DDP (wrap_first)
             {"mode": "compile", "backend": "aot_eager", "wrap_first": True}]
    if _has_fsdp2():
        modes.append({"mode": "fsdp"})
    if importlib.util.find_spec("lightning") is not None:
        modes.append({"mode": "lightning"})  # last: it sets the launcher's environment variables
    return _run(tmp, "all", modes, ckpt=str(ckpt)), ckpt


def test_ddp_schedule_identical_across_ranks_and_weights_in_sync(runs):
    r0, r1 = runs[0]["train"]
    assert r0["plan"] == r1["plan"] == EXPECTED_PLAN
    assert r0["rates_equal_across_ranks"] and r1["rates_equal_across_ranks"]
    assert r0["rates"] == r1["rates"] and len(r0["rates"]) == TOTAL + 1
    assert r0["count"] == r1["count"] == TOTAL
    # the rates moved: 0 at step 0, the recipe's target at the end (linear schedule)
    assert set(r0["rates"][0].values()) == {0.0}
    final = r0["rates"][-1]
    assert max(final.values()) == pytest.approx(0.1) and min(final.values()) == pytest.approx(0.025)
    assert all(name.startswith("module.") for name in final)  # the schedule was attached to the DDP wrapper
    assert r0["checksum"] == r1["checksum"]


def test_ddp_masks_per_rank_by_default_and_identical_on_request(runs):
    r0, r1 = runs[0]["train"]
    # by default (no seeding: torch seeds each process differently) each rank draws its own masks
    assert r0["masks_default"] != r1["masks_default"]
    assert all(any(mask) for mask in r0["masks_default"])  # something was dropped
    # the same torch.manual_seed on every rank (Lightning's seed_everything does that) -> same masks
    assert r0["masks_same_seed"] == r1["masks_same_seed"]
    # one generator for the DropBlock modules, seeded the same on every rank -> same masks
    assert r0["masks_generator"] == r1["masks_generator"]
    # seed + rank (timm's train.py) -> per-rank masks
    assert r0["masks_seed_plus_rank"] != r1["masks_seed_plus_rank"]


def test_ddp_resume_from_rank0_checkpoint_continues_the_schedule_exactly(runs):
    results, ckpt = runs[0]["train"], runs[1]
    assert ckpt.exists()
    resumed = runs[0]["resume"]
    full = results[0]["rates"]
    for r in resumed:
        assert r["plan"] == results[0]["plan"]  # the same model structure
        assert r["rates"] == full[STOP:]  # the same rate at every later step, bit for bit
        assert r["count"] == TOTAL and r["rates_equal_across_ranks"]
    assert resumed[0]["checksum"] == resumed[1]["checksum"]


def test_torch_compile_with_ddp_on_cpu(runs):
    """torch.compile of a DDP model (dynamo's DDPOptimizer splits the graph at the gradient
    buckets); here the recipe is applied to the model after it was wrapped in DDP. The
    ``aot_eager`` backend runs dynamo and AOTAutograd (forward and backward graphs) without
    generating C++; inductor's code generation does not depend on DDP and is tested on one
    process (tests/test_modules.py)."""
    results = runs[0]["compile"]
    r0, r1 = results
    # this run also applies the recipe to the model *after* wrapping it in DDP, on both ranks:
    # the planning forward goes through DDP, nothing in the state changes, the same 6 sites
    for r in results:
        assert r["wrapped_state_unchanged"]
        assert r["plan"] == ["module." + p for p in EXPECTED_PLAN]
    assert r0["rates"] == r1["rates"] and r0["rates_equal_across_ranks"]
    assert r0["rates"][-1] != r0["rates"][1]  # the schedule moved under the compiled model
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=0, abs=0)
    # Changing the rates every step does not recompile: every frame is compiled at the first
    # step and never again (DDP's own forward wrapper breaks the graph, hence more than one
    # frame: dynamo reports DDP's Logger call and _inside_ddp_forward).
    for r in results:
        assert r["frames"] >= 1 and r["frames_per_step"] == [r["frames"]] * TOTAL, r["frames_per_step"]
        assert not r["recompiles"]


def test_fsdp2_fully_shard_on_cpu(runs):
    """FSDP2 (``fully_shard``) with gloo on CPU: DropBlock applied before sharding (it has no
    parameters, so sharding does not see it), the schedule attached to the sharded model."""
    if "fsdp" not in runs[0]:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    r0, r1 = runs[0]["fsdp"]
    assert r0["class"] == "FSDPResNet"
    assert r0["plan"] == r1["plan"] == EXPECTED_PLAN
    assert r0["rates"] == r1["rates"] and r0["rates_equal_across_ranks"]
    assert set(r0["rates"][0].values()) == {0.0} and max(r0["rates"][-1].values()) == pytest.approx(0.1)
    assert r0["count"] == TOTAL
    assert r0["checksum"] == r1["checksum"]  # the gathered full weights agree


# -- Lightning: Trainer(devices=2, strategy="ddp") on CPU ------------------------------------------


def test_lightning_trainer_ddp_two_cpu_processes(runs):
    if "lightning" not in runs[0]:
        pytest.skip("needs lightning")
    res = runs[0]["lightning"][0]
    assert res["world"] == 2
    steps = 32 // 2 // 2  # 32 samples, batch 2, split over 2 ranks: 8 steps each
    assert res["length"] == steps and res["count"] == steps
    expected = [0.2 * k / steps for k in range(steps)]
    assert len(res["seen"]) == 2
    for per_rank in res["seen"]:
        assert per_rank == pytest.approx(expected)  # both ranks, the same schedule
    assert res["final"] == pytest.approx(0.2)
