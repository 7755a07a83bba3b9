"""A DropBlock model through its life: removal unhooks the schedule, copies and pickles carry
their own schedule, and the module works under TorchScript and ``torch.func``."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import dropblock_fx as dbx

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
    return dbx.apply_dropblock(net, "paper-resnet50", stages=[-2, -1], input_size=[3, 16, 16], block_size=3)


def rates(model: nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, dbx.DropBlockNd)]


X = torch.randn(2, 3, 16, 16)


# ----------------------------------------------------------------- the schedule's life


@pytest.mark.parametrize("hook", ["optimizer", "forward"])
def test_remove_dropblock_unhooks_the_schedule(hook):
    model = small_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = dbx.attach_schedule(model, total_steps=10, optimizer=opt, hook=hook)
    assert dbx.schedule_of(model) is sched
    model(X).sum().backward()
    opt.step()
    assert sched.count == 1
    dbx.remove_dropblock(model)
    assert not sched.attached and sched.modules == {}
    model(X).sum().backward()
    opt.step()
    assert sched.count == 1  # neither the optimizer's steps nor the forwards count any more
    assert dbx.schedule_of(model) is None
    assert not model._forward_pre_hooks and not opt._optimizer_step_post_hooks


def test_forward_hook_model_pickles_with_its_schedule():
    model = small_model().train()
    sched = dbx.attach_schedule(model, total_steps=10, hook="forward")
    model(X)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    theirs = dbx.schedule_of(loaded)
    assert theirs is not sched and theirs.count == 1 and theirs.attached
    loaded(X)
    loaded(X)
    assert theirs.count == 3 and sched.count == 1
    assert rates(loaded) != rates(model)
    dbx.detach_schedule(loaded)  # the loaded model's hook is its own to remove
    loaded(X)
    assert theirs.count == 3


def test_a_deep_copy_drives_its_own_rates():
    """timm's ModelEmaV3 deep-copies the model: each copy counts its own forwards."""
    from timm.utils import ModelEmaV3

    model = small_model().train()
    sched = dbx.attach_schedule(model, total_steps=10, hook="forward")
    ema = ModelEmaV3(model)
    twin = ema.module.train()
    twin_sched = dbx.schedule_of(twin)
    assert twin_sched is not sched and all(m.schedule is twin_sched for m in twin.modules()
                                           if isinstance(m, dbx.DropBlockNd))
    for _ in range(4):
        twin(X)
    assert (twin_sched.count, sched.count) == (4, 0)
    assert rates(model) == [0.0] * len(rates(model)) and min(rates(twin)) > 0
    model(X)
    assert (twin_sched.count, sched.count) == (4, 1)


def test_a_copy_of_an_optimizer_scheduled_model_is_detached():
    model = small_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = dbx.attach_schedule(model, total_steps=10, optimizer=opt)
    twin = copy.deepcopy(model)
    assert dbx.schedule_of(twin) is not sched and not dbx.schedule_of(twin).attached
    assert not twin.__dict__.get("_forward_pre_hooks")
    opt.step()
    assert sched.count == 1 and dbx.schedule_of(twin).count == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scheduled (detached, at its rates): no "no schedule" warning
        twin(X)


# ----------------------------------------------------------------- TorchScript and torch.func


@pytest.mark.parametrize("options", [{}, {"mask": "shared", "block_size": (3, 5)}, {"noise": True}])
def test_torchscript(options):
    torch.manual_seed(0)
    m = dbx.DropBlock2d(0.3, **{"block_size": 3, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(m)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    for s in (scripted, loaded):
        assert s.eval()(x) is x or torch.equal(s.eval()(x), x)
        s.train()
        y = s(x)
        dropped = (y == 0).float().mean().item()
        assert 0.1 < dropped < 0.6 or options.get("noise")
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None


def test_torch_func_grad_and_jvp():
    m = dbx.DropBlock2d(0.3, 3).train()
    x = torch.randn(4, 8, 12, 12)
    torch.manual_seed(1)
    g = torch.func.grad(lambda t: m(t).sum())(x)
    assert g.shape == x.shape and (g == 0).any()
    # DropBlock is x * keep * scale: the gradient of the sum is keep * scale, y / x where x != 0
    # (one draw of the mask for both: eager code may sample its masks another way than torch.func)
    y, pullback = torch.func.vjp(m, x)
    (g,) = pullback(torch.ones_like(y))
    assert torch.allclose(g * x, y, atol=1e-6) and (g == 0).any()
    torch.manual_seed(2)
    out, tangent = torch.func.jvp(m, (x,), (x,))
    assert torch.allclose(out, tangent)  # linear in x for a fixed mask
    for shared in (dbx.DropBlock2d(0.3, 3, mask="shared").train(),):
        assert torch.func.grad(lambda t: shared(t).sum())(x).shape == x.shape


@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap(channels_last):
    torch.manual_seed(0)
    m = dbx.DropBlock2d(0.3, 3).train()
    x = torch.randn(3, 2, 8, 12, 12).abs() + 1
    if channels_last:  # each entry a channels-last (2, 8, 12, 12) map
        x = (torch.randn(3, 2, 12, 12, 8).abs() + 1).permute(0, 1, 4, 2, 3)
        assert x[0].is_contiguous(memory_format=torch.channels_last) and not x[0].is_contiguous()
    y = torch.func.vmap(m, randomness="different")(x)
    assert y.shape == x.shape
    zeros = (y == 0)
    assert zeros.any() and not torch.equal(zeros[0], zeros[1])  # one mask per entry
    assert torch.func.vmap(m, randomness="same")(x).shape == x.shape


def test_functional_call_with_a_rate_of_its_own():
    torch.manual_seed(0)
    m = dbx.DropBlock2d(0.0, 3).train()
    x = torch.ones(8, 8, 12, 12)
    assert torch.equal(m(x), x)
    y = torch.func.functional_call(m, {"drop_prob_tensor": torch.tensor(0.5)}, (x,))
    assert (y == 0).float().mean().item() > 0.2
    assert m.drop_prob == 0.0 and torch.equal(m(x), x)  # the module's own rate is untouched
    m.drop_prob = 0.5
    y = torch.func.functional_call(m, {"drop_prob_tensor": torch.tensor(0.0)}, (x,))
    assert torch.equal(y, x)


def test_a_module_pickled_with_the_old_loose_attributes_loads():
    """0.1.0 modules kept their options, target rate and schedule mark as loose attributes."""
    m = dbx.DropBlock2d(0.1, 3)
    state = {k: v for k, v in m.__dict__.items() if k not in ("_options", "placement", "schedule", "seen_resolution",
                                                              "_target_drop_prob", "_own_rate")}
    state.update(block_size=5, mask="shared", seed_region="full", gamma_scale=0.25, scale="count", noise=False,
                 calibrate=False, inplace=False, target_drop_prob=0.2, schedule_pending=False, resolution_watch=None)
    old = dbx.DropBlock2d.__new__(dbx.DropBlock2d)
    old.__setstate__(state)
    assert old.options == dbx.DropBlockOptions(5, "shared", "full", 0.25)
    assert old.target_drop_prob == 0.2 and old.placement is None and not old.schedule_pending
    old.drop_prob = 0.3
    torch.manual_seed(0)
    assert old.drop_prob_tensor.item() == pytest.approx(0.3) and (old.train()(torch.ones(8, 4, 16, 16)) == 0).any()
