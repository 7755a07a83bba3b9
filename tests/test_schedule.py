"""Schedules and hooks on hand-built models (no surgery layer needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dropblock_fx as dbx
from dropblock_fx import DropBlock2d, DropBlockNd, attach_schedule, load_recipe, register_schedule
from dropblock_fx.modules import Placement
from dropblock_fx.recipe import RecipeError, ScheduleSpec
from dropblock_fx.schedule import detach_schedule, get_schedule, list_hooks, register_hook, schedule_value
from dropblock_fx.surgery.watch import ModelWatch


def dropblock(stage: int, target: float, recipe_schedule, watch, block: int = 3) -> DropBlock2d:
    """A module as apply_dropblock hands it over: its rate and its contract (Placement)."""
    m = DropBlock2d(target, block)
    m.placement = Placement(stage, "conv", target, recipe_schedule=recipe_schedule, watch=watch)
    return m


def paper_model(recipe_name: str = "paper-resnet50", recipe=None) -> nn.Module:
    """Two 'groups' as apply_dropblock would leave them with the paper recipe: group 3 at a
    quarter of group 4's rate, one watch for the model."""
    recipe = load_recipe(recipe_name) if recipe is None else recipe
    watch = ModelWatch((3, 12, 12))
    torch.manual_seed(0)

    def db(stage):
        return dropblock(stage, recipe.stage_rate(stage, 4), recipe.schedule, watch)

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), db(3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), db(3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), db(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def by_stage(model: nn.Module) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for m in model.modules():
        if isinstance(m, DropBlockNd):
            out.setdefault(m.placement.stage, set()).add(round(m.drop_prob, 12))
    return out


def train_step(model, opt, x=None):
    x = torch.randn(2, 3, 12, 12) if x is None else x
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


# -- the schedules ---------------------------------------------------------------------------

CURVES = [
    ("constant", {}, [(0, 1), (0.5, 1), (1, 1)]),
    ("constant", {"value": 0.5}, [(0, 0.5), (1, 0.5)]),
    ("linear", {}, [(0, 0), (0.25, 0.25), (0.5, 0.5), (1, 1)]),
    ("linear", {"start": 0.2, "end": 0.8}, [(0, 0.2), (0.5, 0.5), (1, 0.8)]),
    ("cosine", {}, [(0, 0), (0.25, (1 - math.cos(math.pi / 4)) / 2), (0.5, 0.5), (1, 1)]),
    ("step", {}, [(0, 0), (0.2, 0), (0.3, 1 / 3), (0.6, 2 / 3), (0.8, 1), (1, 1)]),
    ("step", {"steps": 2}, [(0.49, 0), (0.5, 1)]),
    ("multistep", {}, [(0, 0), (0.49, 0), (0.5, 0.5), (0.8, 1), (1, 1)]),
    ("multistep", {"milestones": [0.1], "values": [0.3, 0.9]}, [(0.05, 0.3), (0.1, 0.9)]),
    ("exponential", {}, [(0, 0), (0.5, math.expm1(-2.5) / math.expm1(-5)), (1, 1)]),
    ("exponential", {"rate": 0}, [(0.3, 0.3)]),
    ("exponential", {"rate": -5}, [(0, 0), (0.5, math.expm1(2.5) / math.expm1(5)), (1, 1)]),
    ("warmup-hold", {"warmup": 0.2}, [(0, 0), (0.1, 0.5), (0.2, 1), (0.9, 1)]),
    ("warmup-hold", {"warmup": 1.0}, [(0.5, 0.5), (1, 1)]),
    ("piecewise-linear", {"points": [[0, 0], [0.5, 1], [1, 0.5]]}, [(0, 0), (0.25, 0.5), (0.5, 1), (0.75, 0.75), (1, 0.5)]),
    ("piecewise-linear", {"points": [[0.2, 0.1], [0.4, 0.3]]}, [(0, 0.1), (0.3, 0.2), (1, 0.3)]),
]


@pytest.mark.parametrize("name, params, points", CURVES)
def test_schedule_curves(name, params, points):
    for progress, expected in points:
        assert schedule_value(name, progress, params) == pytest.approx(expected, abs=1e-12), (name, progress)


def test_builtin_schedule_names_and_aliases():
    assert set(dbx.list_schedules()) >= {
        "constant", "linear", "cosine", "step", "multistep", "exponential", "warmup-hold", "piecewise-linear"
    }
    assert get_schedule("Warmup_Hold").name == "warmup-hold"
    assert ScheduleSpec(name="piecewise_linear").name == "piecewise-linear"
    assert schedule_value("linear", 2.0) == 1.0 and schedule_value("linear", -1) == 0.0  # clamped


def test_register_custom_schedule_used_by_recipe():
    @register_schedule("test-square", overwrite=True)
    def square(p: float, end: float = 1.0) -> float:
        return end * p * p

    recipe = load_recipe({"stages": [4], "schedule": {"name": "test_square", "params": {"end": 0.5}}})
    model = nn.Sequential(dropblock(4, 0.2, recipe.schedule, ModelWatch((3, 8, 8))))
    sched = attach_schedule(model, total_steps=10)
    sched.step(5)
    assert model[0].drop_prob == pytest.approx(0.2 * 0.5 * 0.25)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("test-square")(lambda p: p)
    with pytest.raises(RecipeError, match="no parameter"):
        load_recipe({"schedule": {"name": "test-square", "params": {"start": 0}}})


def test_schedule_with_bad_output_is_rejected_at_load():
    @register_schedule("test-overshoot", overwrite=True)
    def overshoot(p: float, k: float = 2.0) -> float:
        return k * p

    with pytest.raises(RecipeError) as ei:
        load_recipe({"schedule": {"name": "test-overshoot"}})
    assert ei.value.path == "schedule.params" and "[0, 1]" in str(ei.value)
    load_recipe({"schedule": {"name": "test-overshoot", "params": {"k": 1.0}}})


# -- attach_schedule and the paper formula -----------------------------------------------------

def test_paper_formula_per_group():
    model = paper_model()
    sched = attach_schedule(model, total_steps=100)
    assert by_stage(model) == {3: {0.0}, 4: {0.0}}
    sched.step(50)
    assert by_stage(model) == {3: {0.0125}, 4: {0.05}}
    assert sched.value == 0.5 and sched.drop_prob == pytest.approx(0.05) and sched.keep_prob == pytest.approx(0.95)
    kp = 0.9
    for t in range(50, 101):
        sched.set_count(t)
        kp_t = 1 - (t / 100) * (1 - kp)  # resnet_main.py
        for g, rates in by_stage(model).items():
            kp_g = 1 - (1 - kp_t) / 4 ** (4 - g)
            (rate,) = rates
            assert rate == pytest.approx(1 - kp_g, abs=1e-12)
    assert by_stage(model) == {3: {0.025}, 4: {0.1}}
    sched.step(10)  # past the end: holds the target
    assert by_stage(model) == {3: {0.025}, 4: {0.1}}


def test_attach_clears_pending_and_missing_schedule_warns_once():
    model = paper_model().train()
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(UserWarning, match="attach_schedule"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once only
    model = paper_model().train()
    assert all(m.schedule_pending for m in model.modules() if isinstance(m, DropBlockNd))
    attach_schedule(model, total_steps=10)
    assert not any(m.schedule_pending for m in model.modules() if isinstance(m, DropBlockNd))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)


def test_schedule_sources_explicit_over_recipe_over_default():
    model = paper_model()
    assert attach_schedule(model, total_steps=10).spec.name == "linear"
    assert attach_schedule(model, total_steps=10, schedule="cosine").spec.name == "cosine"
    s = attach_schedule(model, total_steps=10, schedule={"name": "warmup_hold", "params": {"warmup": 0.5}})
    assert s.spec.name == "warmup-hold" and s.spec.params == {"warmup": 0.5}
    with pytest.raises(RecipeError) as ei:
        attach_schedule(model, total_steps=10, schedule={"name": "cosine", "params": {"x": 1}})
    assert ei.value.path == "schedule.params.x"
    plain = nn.Sequential(DropBlock2d(0.2, 3))  # no plan, no target attribute
    s = attach_schedule(plain, total_steps=4)
    assert plain[0].target_drop_prob == 0.2 and plain[0].drop_prob == 0.0
    s.step(2)
    assert plain[0].drop_prob == pytest.approx(0.1)


def test_recipe_schedule_found_through_wrappers():
    inner = paper_model(recipe=load_recipe({"stages": [3, 4], "schedule": {"name": "cosine"}}))
    wrapper = nn.Sequential()
    wrapper.module = inner  # like DistributedDataParallel(model).module
    sched = attach_schedule(wrapper, total_steps=10)
    assert sched.spec.name == "cosine" and len(sched.modules) == 3
    other = paper_model(recipe=load_recipe({"stages": [3], "schedule": {"name": "step"}}))
    both = nn.ModuleList([inner, other])
    with pytest.raises(ValueError, match="different schedules"):
        attach_schedule(both, total_steps=10)
    assert attach_schedule(both, total_steps=10, schedule="linear").spec.name == "linear"


def test_schedule_lengths():
    model = paper_model()
    assert attach_schedule(model, total_steps=200).length == 200
    assert attach_schedule(model, epochs=10, steps_per_epoch=30).length == 300
    assert attach_schedule(model, total_steps=200, schedule={"name": "linear", "fraction": 0.25}).length == 50
    assert attach_schedule(model, schedule={"name": "linear", "steps": 40}).length == 40
    assert attach_schedule(model, total_steps=100, epochs=10, schedule={"name": "linear", "epochs": 2}).length == 20
    assert attach_schedule(model, epochs=10, hook="epoch").length == 10
    assert attach_schedule(model, epochs=10, steps_per_epoch=5, hook="epoch",
                           schedule={"name": "linear", "steps": 25}).length == 5
    assert attach_schedule(model, schedule="constant").length is None
    with pytest.raises(ValueError, match="length of the run"):
        attach_schedule(model)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        attach_schedule(model, total_steps=100, schedule={"name": "linear", "epochs": 2})


def test_fraction_schedule_holds_after_its_length():
    model = paper_model()
    sched = attach_schedule(model, total_steps=100, schedule={"name": "linear", "fraction": 0.5})
    sched.step(25)
    assert by_stage(model)[4] == {0.05}
    sched.step(25)
    assert by_stage(model)[4] == {0.1}
    sched.step(50)
    assert by_stage(model)[4] == {0.1}


def test_no_dropblock_modules_warns():
    with pytest.warns(UserWarning, match="no DropBlock modules"):
        sched = attach_schedule(nn.Linear(2, 2), total_steps=5)
    assert sched.rates() == {} and sched.drop_prob == 0.0


# -- hooks ------------------------------------------------------------------------------------

def test_optimizer_hook_advances_once_per_step():
    model = paper_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = attach_schedule(model, total_steps=10, optimizer=opt)  # default hook: optimizer
    assert sched.count == 0
    for i in range(1, 4):
        x = torch.randn(2, 3, 12, 12)
        opt.zero_grad()
        model(x).sum().backward()
        model(x)  # extra forwards do not count
        assert sched.count == i - 1
        opt.step()
        assert sched.count == i
    (rate,) = by_stage(model)[4]
    assert rate == pytest.approx(0.03)
    sched.detach()
    opt.step()
    assert sched.count == 3


def test_reattach_replaces_previous_hook():
    model = paper_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = attach_schedule(model, total_steps=10, optimizer=opt)
    second = attach_schedule(model, total_steps=20, optimizer=opt)
    train_step(model, opt)
    assert first.count == 0 and second.count == 1
    assert detach_schedule(model) is second
    train_step(model, opt)
    assert second.count == 1 and detach_schedule(model) is None


def test_optimizer_hook_needs_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        attach_schedule(paper_model(), total_steps=10, hook="optimizer")


def test_manual_and_epoch_hooks():
    model = paper_model()
    sched = attach_schedule(model, total_steps=10, hook="manual")
    assert sched.step() == pytest.approx(0.1) and sched.step(4) == pytest.approx(0.5)
    sched = attach_schedule(model, epochs=8, hook="epoch")
    assert sched.unit == "epoch"
    sched.step(epoch=2)
    assert sched.value == 0.25 and by_stage(model)[4] == {0.025}
    sched.step(epoch=2.5)  # fractional epochs (timm's step_update style)
    assert sched.value == pytest.approx(2.5 / 8)
    sched.step()
    assert sched.count == 3.5
    stepwise = attach_schedule(model, epochs=8, steps_per_epoch=10)
    stepwise.step(epoch=4)
    assert stepwise.count == 40 and stepwise.value == 0.5
    with pytest.raises(ValueError):
        attach_schedule(model, total_steps=10).step(epoch=1)


def test_forward_hook_counts_training_forwards_only():
    model = paper_model()
    sched = attach_schedule(model, total_steps=10, hook="forward")
    x = torch.randn(2, 3, 12, 12)
    model.train()
    model(x)
    model(x)
    model.eval()
    model(x)
    assert sched.count == 2
    sched.detach()
    model.train()
    model(x)
    assert sched.count == 2


def test_forward_hook_under_compile_counts_or_refuses_loudly():
    from torch._dynamo.testing import CompileCounter

    x = torch.randn(2, 3, 12, 12)
    torch._dynamo.reset()
    model = paper_model().train()
    sched = attach_schedule(model, total_steps=10, hook="forward")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        compiled(x)
    assert sched.count == 3 and counter.frame_count == 1  # the hook runs eagerly, no recompiles
    torch._dynamo.reset()
    model = paper_model().train()
    attach_schedule(model, total_steps=10, hook="forward")
    with pytest.raises(Exception, match="hook='optimizer'"):
        torch.compile(model, backend=CompileCounter(), fullgraph=True)(x)


def test_custom_hook_registry():
    assert {"optimizer", "manual", "epoch", "forward", "lightning"} <= set(list_hooks())

    @register_hook("test-micro-batch", overwrite=True)
    def _install(schedule, ctx):
        accumulate = ctx.options["accumulate"]

        def post(module, args, output):
            if module.training:
                schedule.step(1 / accumulate)

        return ctx.model.register_forward_hook(post)

    model = paper_model().train()
    sched = attach_schedule(model, total_steps=10, hook="test-micro-batch", hook_options={"accumulate": 4})
    for _ in range(8):
        model(torch.randn(1, 3, 12, 12))
    assert sched.count == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown hook"):
        attach_schedule(model, total_steps=10, hook="optimiser")


def test_lightning_hook_without_lightning_is_clear(monkeypatch):
    """Lightning is hidden (None in sys.modules makes its import fail), installed or not, and
    its hook is not registered yet (as in a process that never imported it)."""
    import sys

    from dropblock_fx.schedule.hooks import HOOKS

    monkeypatch.setattr(HOOKS, "_values", {k: v for k, v in HOOKS._values.items() if k != "lightning"})
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "pytorch_lightning",
                 "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("dropblock_fx.integrations.lightning", "dropblock_fx.schedule.lightning"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported afresh, without Lightning
    with pytest.raises(ImportError, match=r"hook='lightning' needs Lightning"):
        attach_schedule(paper_model(), total_steps=10, hook="lightning")


def test_lightning_hook_with_lightning_gives_the_callback():
    pytest.importorskip("lightning")
    sched = attach_schedule(paper_model(), total_steps=10, hook="lightning")
    assert sched.callback is not None and sched.callback.schedule is sched


# -- checkpoint and resume --------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests_dir!r})
    from test_schedule import paper_model, train_step
    import dropblock_fx as dbx
    ckpt = torch.load({path!r}, weights_only=True)
    model = paper_model(recipe=dbx.Recipe.from_yaml(ckpt["recipe"]))  # a fresh model of the same architecture
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.load_state_dict(ckpt["optimizer"])
    sched = dbx.attach_schedule(model, total_steps=999, optimizer=opt)  # the state restores the length
    sched.load_state_dict(ckpt["schedule"])
    rates = [sched.rates()]
    for _ in range({remaining}):
        train_step(model, opt)
        rates.append(sched.rates())
    print(json.dumps(rates))
    """
)


def test_resume_across_torch_save_load_in_a_fresh_process(tmp_path):
    total, stop = 40, 17
    recipe_yaml = load_recipe("paper-resnet50").to_yaml()
    model = paper_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = attach_schedule(model, total_steps=total, optimizer=opt,
                            schedule={"name": "cosine", "params": {"start": 0.1}, "fraction": 0.75})
    for _ in range(stop):
        train_step(model, opt)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "recipe": recipe_yaml}, path)
    expected = [sched.rates()]
    for _ in range(total - stop + 5):
        train_step(model, opt)
        expected.append(sched.rates())

    script = RESUME_SCRIPT.format(tests_dir=str(Path(__file__).parent),
                                  path=str(path), remaining=total - stop + 5)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed == expected
    assert len({tuple(r.values()) for r in expected}) > 5  # the rates did move


def test_state_dict_is_plain_and_restores_everything():
    model = paper_model()
    sched = attach_schedule(model, total_steps=30, schedule={"name": "step", "params": {"steps": 3}})
    sched.step(11)
    state = sched.state_dict()
    assert state["count"] == 11 and state["length"] == 30 and state["schedule"]["name"] == "step"
    other = attach_schedule(paper_model(), total_steps=5)
    other.load_state_dict(state)
    assert other.spec == sched.spec and other.length == 30 and other.count == 11
    assert list(other.rates().values()) == list(sched.rates().values())
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})


# -- torch.compile -----------------------------------------------------------------------------

def test_compiled_scheduled_run_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = paper_model()
    # lr 0: the steps advance the schedule but leave the weights finite (a ramp to rate 1.0 with
    # the count normaliser blows a trained toy model up to inf, where outputs stop comparing)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = attach_schedule(model, total_steps=20, optimizer=opt)
    backend = CompileCounterWithBackend("eager")  # recompiles are decided by dynamo's guards, whatever the backend
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 12, 12)
    seen = []
    for _ in range(20):
        train_step(compiled, opt, x)
        seen.append(sched.value)
    assert backend.frame_count == 1
    assert not counters["recompiles"]
    assert seen[0] == pytest.approx(0.05) and seen[-1] == 1.0
    # The compiled graph reads the live rate: at rate 0 training is the identity, at full
    # rate it is not (same grad mode and train mode as the loop, so no recompilation).
    reference = model.eval()(x).detach()  # eager
    model.train()
    sched.set_count(0)
    assert torch.equal(compiled(x).detach(), reference)
    sched.set_count(20)
    assert not torch.equal(compiled(x).detach(), reference)
    assert backend.frame_count == 1 and not counters["recompiles"]


def test_recipe_without_schedule_runs_constant_and_hand_placed_modules_ramp():
    import timm

    import dropblock_fx as dbx

    model = dbx.apply_dropblock(timm.create_model("resnet10t"), "timm-resnet", input_size=[3, 64, 64])
    sched = dbx.attach_schedule(model, total_steps=10)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, dbx.DropBlockNd)]
    assert sched.value == 1.0 and rates and all(r == m for r, m in zip(rates, [0.1] * len(rates)))
    hand = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dbx.DropBlock2d(0.1, 3))
    s2 = dbx.attach_schedule(hand, total_steps=10)
    assert s2.value == 0.0 and hand[1].drop_prob == 0.0


def test_missing_schedule_warns_once_per_model_not_once_per_process():
    import copy
    import pickle

    from dropblock_fx import apply_dropblock

    def applied():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        return apply_dropblock(net, "paper-resnet50", stages=[-2, -1], input_size=[3, 16, 16])

    x = torch.randn(2, 3, 16, 16)
    first, second = applied().train(), applied().train()
    with pytest.warns(UserWarning, match="attach_schedule"):
        first(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first(x)  # that model has warned
    with pytest.warns(UserWarning, match="attach_schedule"):
        second(x)  # another model still warns
    clone = copy.deepcopy(pickle.loads(pickle.dumps(applied()))).train()
    with pytest.warns(UserWarning, match="attach_schedule"):
        clone(x)  # the marker survives pickling and copying, and is shared by the copy's modules
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone(x)


def test_unscheduled_warning_names_the_fix_for_the_loop_it_runs_in():
    from dropblock_fx.schedule import pending

    def called_from(module_name: str) -> str:
        namespace = {"__name__": module_name, "detect": pending.detect_loop}
        exec("def run():\n    return detect()\n", namespace)
        return namespace["run"]()

    assert called_from("lightning.pytorch.loops.fit_loop") == "lightning"
    assert called_from("transformers.trainer") == "hf"
    assert called_from("my_training_script") == "plain"
    assert "DropBlockScheduleCallback" in pending.unscheduled_message("lightning")
    assert "attach_schedule(model, total_steps=" in pending.unscheduled_message("plain")
