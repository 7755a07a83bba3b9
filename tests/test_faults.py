"""Bad input and faults: surgery on models it cannot handle, and a run interrupted mid-epoch.

Every refused model is compared before and after (``repr``, module classes, ``state_dict``
keys and values, train/eval flags): a failed ``apply_dropblock`` leaves no trace.
"""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from small_models import SmallCNN, WithUntraceable

import dropblock_fx as dbx
from dropblock_fx import RecipeError, SurgeryError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = {"input_size": [3, 64, 64]}


def snapshot(model: nn.Module) -> dict:
    return {
        "repr": repr(model),
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "plan": getattr(model, "dropblock_plan", None),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["repr"] == before["repr"]
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["plan"] is before["plan"]
    assert not any(isinstance(m, dbx.DropBlockNd) for m in model.modules())


def refuse(model: nn.Module, error: type, match: str, *args, **kwargs) -> Exception:
    """apply_dropblock (and plan) raise ``error`` and leave ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=match) as ei:
        dbx.plan(model, *args, **kwargs)
    assert_unchanged(model, before)
    with pytest.raises(error, match=match) as ei:
        dbx.apply_dropblock(model, *args, **kwargs)
    assert_unchanged(model, before)
    return ei.value


# -- models it cannot handle -------------------------------------------------------------------

def test_model_without_conv_is_refused_unchanged():
    """An MLP (or a text model) is no CNN: said before anything runs."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    refuse(model, SurgeryError, "has no Conv2d or Conv3d layer", input_size=[3, 8, 8])


def test_model_that_does_not_take_images_is_refused_unchanged():
    """Convs behind a linear layer: it takes vectors, so one image cannot run it."""
    model = nn.Sequential(nn.Linear(10, 3 * 8 * 8), nn.Unflatten(1, (3, 8, 8)), nn.Conv2d(3, 4, 3))
    err = refuse(model, SurgeryError, "could not run Sequential")
    assert "example_inputs=" in str(err)  # says what to pass instead


@pytest.mark.parametrize("stages", [[9], [-9], ["layer9"], [{"stage": 7, "block_size": 3}]])
def test_stage_out_of_range_is_refused_unchanged(stages):
    err = refuse(SmallCNN(), RecipeError, "this model has no stage", stages=stages, **SIZE)
    assert err.path.startswith("stages[0]")  # "stages[0].stage" for the mapping form
    assert "stages.3" in str(err) and "stride 32" in str(err)  # lists the model's real stages


def test_missing_target_is_refused_unchanged():
    refuse(SmallCNN(), SurgeryError, "no such submodule", target="backbone.body", **SIZE)


def test_untraceable_block_falls_back_documented_and_removal_restores():
    """Documented behaviour, not an error: a block FX cannot trace gets DropBlock after its
    norms and on its output, and plan.notes says which block and why."""
    torch.manual_seed(0)
    model = WithUntraceable().eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    dbx.apply_dropblock(model, stages=[-3, -2, -1], **SIZE)
    p = dbx.describe(model)
    odd = [r for r in p.rows if r.path.startswith("odd.")]
    assert odd and {r.mechanism for r in odd} <= {"after-norm", "after-block"}
    assert any("odd" in note for note in p.notes)
    assert list(model.state_dict()) == list(before["state"])
    assert torch.equal(model(x), ref)  # eval: identity
    dbx.remove_dropblock(model)
    assert_unchanged(model, before)


def test_remove_dropblock_clears_the_plan():
    model = SmallCNN()
    dbx.apply_dropblock(model, **SIZE)
    dbx.remove_dropblock(model)
    assert getattr(model, "dropblock_plan", None) is None
    dbx.apply_dropblock(model, **SIZE)  # and it can be applied again without replace=True


def test_ddp_wrapped_model_goes_through_the_wrapper(tmp_path):
    """Documented behaviour: ``apply_dropblock(DistributedDataParallel(model))`` works (the
    DropBlocks go into ``.module``; DropBlock adds no parameters, so DDP's buckets are still
    right), state and outputs unchanged; the two-process version is in test_distributed.py."""
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(SmallCNN())
        before = snapshot(ddp)
        x = torch.randn(2, 3, 64, 64)
        ddp.eval()
        ref = ddp(x)
        dbx.apply_dropblock(ddp, "paper-resnet50", **SIZE)
        p = dbx.describe(ddp)
        assert len(p.rows) == 12 and all(r.path.startswith("module.stages.") for r in p.rows)
        assert list(ddp.state_dict()) == list(before["state"])
        assert torch.equal(ddp(x), ref)
        # the inner model says it already has DropBlock: no double application
        with pytest.raises(SurgeryError, match="already applied"):
            dbx.apply_dropblock(ddp.module, **SIZE)
        ddp.train()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        sched = dbx.attach_schedule(ddp, total_steps=4, optimizer=opt)
        for _ in range(2):
            opt.zero_grad()
            ddp(x).sum().backward()
            opt.step()
        assert sched.count == 2 and sched.value == 0.5
        dbx.remove_dropblock(ddp)
        ddp.eval()
        assert repr(ddp) == before["repr"]
        assert [(n, type(m)) for n, m in ddp.named_modules()] == before["modules"]
    finally:
        dist.destroy_process_group()


def test_compiled_model_is_refused_unchanged_and_orig_mod_works():
    torch._dynamo.reset()
    inner = SmallCNN()
    compiled = torch.compile(inner, backend="eager")
    before = snapshot(inner)
    with pytest.raises(SurgeryError, match="already compiled"):
        dbx.apply_dropblock(compiled, **SIZE)
    assert_unchanged(inner, before)
    assert getattr(compiled, "dropblock_plan", None) is None
    # what works: apply to the original module (or before compiling); the compiled wrapper
    # recompiles on the new module tree and drops in train mode
    dbx.apply_dropblock(compiled._orig_mod, **SIZE)
    dbx.attach_schedule(compiled, schedule="constant")
    compiled.train()
    compiled(torch.randn(2, 3, 64, 64)).sum().backward()
    torch._dynamo.reset()


def test_compiled_model_error_says_what_to_do():
    torch._dynamo.reset()
    try:
        with pytest.raises(SurgeryError) as ei:
            dbx.apply_dropblock(torch.compile(SmallCNN(), backend="eager"), **SIZE)
        msg = str(ei.value)
        assert "_orig_mod" in msg or "before torch.compile" in msg
        assert "Traceback" not in msg and "TORCHDYNAMO_VERBOSE" not in msg
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("call", ["apply_dropblock", "plan"])
@pytest.mark.parametrize("bad", ["resnet50", None])
def test_not_a_module_is_a_type_error(bad, call):
    with pytest.raises(TypeError, match="Module"):
        getattr(dbx, call)(bad)


# -- a run interrupted mid-epoch ----------------------------------------------------------------

EPOCHS, PER_EPOCH, EVERY = 2, 5, 4  # 10 steps; checkpoints after steps 4 and 8 (both mid-epoch)


class Crash(RuntimeError):
    pass


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 4, (2,), generator=g))
            for _ in range(PER_EPOCH)]


def _model(recipe=None):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    if recipe is None:  # a scheduled recipe: cosine over the first 1.5 epochs, then held
        return dbx.apply_dropblock(model, "last-two-stages", block_size=3, input_size=[3, 64, 64],
                                   schedule={"name": "cosine", "epochs": 1.5})
    return dbx.apply_dropblock(model, recipe)


def _train(model, opt, sched, start_step, rates, ckpt_path=None, crash_at=None):
    """Train from ``start_step`` to the end; per step record the rates the forward ran with."""
    data = _batches()
    for step in range(start_step, EPOCHS * PER_EPOCH):
        epoch, i = divmod(step, PER_EPOCH)  # resume in the middle of the epoch
        x, y = data[i]
        rates.append(sched.rates())
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step + 1 == crash_at:
            raise Crash(f"killed during step {step + 1} (epoch {epoch}, batch {i})")
        opt.step()
        if ckpt_path is not None and (step + 1) % EVERY == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": sched.state_dict(), "recipe": dbx.describe(model).recipe.to_yaml(),
                        "step": step + 1, "rng": torch.get_rng_state()}, ckpt_path)


def _start(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = dbx.attach_schedule(model, epochs=EPOCHS, steps_per_epoch=PER_EPOCH, optimizer=opt)
    return opt, sched


def test_interrupted_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the reference: one uninterrupted run
        full = _model().train()
        opt, sched = _start(full)
        torch.manual_seed(42)
        full_rates: list = []
        _train(full, opt, sched, 0, full_rates)

        # the same run, killed during step 10 (epoch 1, batch 4); the last checkpoint is step 8
        ckpt = tmp_path / "last.pt"
        first = _model().train()
        opt, sched = _start(first)
        torch.manual_seed(42)
        seen: list = []
        with pytest.raises(Crash):
            _train(first, opt, sched, 0, seen, ckpt_path=ckpt, crash_at=10)
        del first, opt, sched

        # a new process would do exactly this: everything comes from the checkpoint
        state = torch.load(ckpt, weights_only=True)
        assert state["step"] == 8 and state["step"] % PER_EPOCH != 0  # mid-epoch
        resumed = _model(dbx.Recipe.from_yaml(state["recipe"])).train()
        resumed.load_state_dict(state["model"])
        opt, sched = _start(resumed)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        rates: list = []
        _train(resumed, opt, sched, state["step"], rates)

    assert seen[:9] == full_rates[:9]
    assert rates == full_rates[8:]  # the same rate at every remaining step, bit for bit
    assert len({tuple(r.values()) for r in full_rates}) >= 8  # the schedule did move
    assert sched.count == EPOCHS * PER_EPOCH and sched.value == 1.0
    # the same structure: same plan, same module tree, same state_dict keys
    assert dbx.describe(resumed).as_dicts() == dbx.describe(full).as_dicts()
    assert repr(resumed) == repr(full)
    assert [(n, type(m).__name__) for n, m in resumed.named_modules()] == \
        [(n, type(m).__name__) for n, m in full.named_modules()]
    # and, since the RNG state was saved too, the same masks and so the same weights
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_call_that_inserts_nothing_leaves_no_plan_and_a_corrected_call_works():
    model = SmallCNN()
    with pytest.warns(UserWarning, match=r"^apply_dropblock: nothing inserted in SmallCNN \(") as rec:
        dbx.apply_dropblock(model, sites=["timm"], **SIZE)  # a plain CNN has no timm slots
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert not hasattr(model, "dropblock_plan")
    dbx.apply_dropblock(model, **SIZE)  # the corrected call is not refused as "already applied"
    assert len(dbx.describe(model).rows) > 0
