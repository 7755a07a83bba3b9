"""DropBlock that writes into a norm's output when it is that output's only reader.

The planner marks such rows (``PlanRow.owns_input``); their modules' eager training forwards
write the result into the input tensor, where autograd allows it. Outputs, gradients and the
norms' running statistics must be bit-identical to the out-of-place forward, and nothing that
another node reads, that autograd saved, or that is a view may ever be written.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import dropblock_fx as dbx
from dropblock_fx.graph.sites import Site, insert_sites, owns_norm_output, writable_norm
from dropblock_fx.modules import DropBlockNd, Placement, is_inserted, writable_norm_output

from small_models import WithUntraceable

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*no schedule is attached")]


def _inserted(model: nn.Module) -> dict[str, DropBlockNd]:
    return {n: m for n, m in model.named_modules() if is_inserted(m)}


def _owned_off(model: nn.Module) -> nn.Module:
    for m in _inserted(model).values():
        m.placement = dataclasses.replace(m.placement, owns_input=False)
    return model


def _wrote_in_place(model: nn.Module, x: torch.Tensor, backward: bool = True) -> dict[str, bool]:
    """Per inserted module: did its training forward return its input tensor (written in place)?"""
    seen: dict[str, bool] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out is args[0]))
             for name, m in _inserted(model).items()]
    try:
        out = model.train()(x)
        if backward:
            out.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    torch.manual_seed(seed)
    out = model.train()(x)
    (out.float() ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def _same_step(a: nn.Module, b: nn.Module, x: torch.Tensor, seed: int = 3) -> None:
    oa, ga, sa = _step(a, x, seed)
    ob, gb, sb = _step(b, x, seed)
    assert torch.equal(oa, ob)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # BN running statistics too


# ---------------------------------------------------------------------------- planner


@pytest.mark.parametrize("make", [lambda: tv.models.resnet50(), lambda: timm.create_model("resnet50")])
def test_the_paper_resnet50_writes_in_place_on_every_norm_output(make):
    """29 of the 36 sites: after act1 and act2 (run before the ReLU, on bn1's and bn2's
    output), after bn3 and after the projection's norm. The identity shortcuts read the block's
    input, which conv1 reads too: those 7 make a new tensor."""
    model = dbx.apply_dropblock(make(), "paper-resnet50")
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    expected = {f"layer{s}.{b}.dropblock_{k}" for s, n in ((3, 6), (4, 3)) for b in range(n)
                for k in ("conv1", "conv2", "conv_last")}
    expected |= {"layer3.0.dropblock_shortcut", "layer4.0.dropblock_shortcut"}
    assert owned == expected and len(expected) == 29
    assert all(m.placement.owns_input == (name in expected) for name, m in _inserted(model).items())
    assert all(r["owns_input"] == (r["path"] in expected) for r in dbx.describe(model).as_dicts())


def _without_commuting(make_model, *args, **kwargs) -> nn.Module:
    """``apply_dropblock`` with every DropBlock left after its ReLU (the planner before it commuted them)."""
    import dropblock_fx.surgery.actions as actions

    orig = actions.commute_with_relu
    actions.commute_with_relu = lambda *a: False
    try:
        return dbx.apply_dropblock(make_model(), *args, **kwargs)
    finally:
        actions.commute_with_relu = orig


@pytest.mark.parametrize("name", ["tv-resnet50", "timm-resnet50", "timm-resnet18d", "smp-unet"])
def test_sites_after_a_relu_run_before_it_and_the_step_is_bit_identical(name):
    """A site after a ReLU that alone reads a norm's output runs before that ReLU and writes
    into the norm's output: the training step (outputs, every gradient, the running statistics)
    is bit-identical to the DropBlock after the ReLU, and asks for less memory. Also on a
    segmentation U-Net of another library (its decoder's conv -> BN -> ReLU blocks)."""
    from dropblock_fx.testing import fresh_memory

    smp = pytest.importorskip("segmentation_models_pytorch") if name == "smp-unet" else None

    def make() -> nn.Module:
        torch.manual_seed(0)
        if name == "tv-resnet50":
            return tv.models.resnet50(num_classes=10)
        if smp is not None:
            return smp.Unet("resnet34", encoder_weights=None, classes=2)
        return timm.create_model(name[len("timm-"):], num_classes=10)

    recipe = "paper-resnet50" if name.endswith("resnet50") else None
    kw: dict[str, Any] = {"block_size": 3} if recipe else {
        "stages": [3, 4], "sites": ["conv", "conv_last", "shortcut"], "drop_prob": 0.3, "block_size": 3}
    model = dbx.apply_dropblock(make(), recipe, input_size=[3, 96, 96], **kw)
    before = _without_commuting(make, recipe, input_size=[3, 96, 96], **kw)
    moved = {r.path for r in dbx.describe(model).rows if r.owns_input} - {
        r.path for r in dbx.describe(before).rows if r.owns_input}
    assert moved and (smp is not None or all(
        p.rsplit(".", 1)[-1] in ("dropblock_conv1", "dropblock_conv2", "dropblock_conv") for p in moved))
    x = torch.randn(4, 3, 96, 96)
    _same_step(model, before, x, seed=5)
    assert {n for n, w in _wrote_in_place(model, x).items() if w} >= moved

    def step(net: nn.Module):
        def run() -> None:
            torch.manual_seed(1)
            net.train()(x).sum().backward()
        return run

    model.zero_grad(set_to_none=True)
    before.zero_grad(set_to_none=True)
    assert fresh_memory(step(model)).bytes < fresh_memory(step(before)).bytes


def test_the_rewritten_resnet_compiles_to_one_graph_and_steps_as_in_eager_mode():
    """The rewritten timm ResNet (sites moved before their ReLU, sites writing into their norm's
    output) under ``torch.compile`` with autograd: no graph break, one graph for three batch
    sizes and four rates (the rate is read at run time), and each compiled training step draws
    the masks eager mode draws for the same seed: the same output and gradients."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = dbx.apply_dropblock(timm.create_model("resnet26", num_classes=10), "paper-resnet50", block_size=3,
                                input_size=[3, 64, 64])
    assert sum(r.owns_input for r in dbx.describe(model).rows) > 0
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n, p in ((2, 0.1), (3, 0.2), (5, 0.3), (3, 0.05)):
        for m in _inserted(model).values():
            m.drop_prob = p
        x = torch.randn(n, 3, 64, 64)
        out = []
        for fwd in (model, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(n)
            y = fwd(x)
            (y ** 2).sum().backward()
            out.append((y.detach(), [q.grad.clone() for q in model.parameters()]))
        (ye, ge), (yc, gc) = out
        assert torch.equal(ye, yc), f"batch {n}, rate {p}: compiled output differs"
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(ge, gc))
    # (dynamo may trace the first call twice, a restart of its analysis: still one graph)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])


def test_a_dropblock_with_noise_stays_after_its_relu():
    """Filling dropped units with noise does not commute with a ReLU: such sites are not moved."""
    model = dbx.apply_dropblock(tv.models.resnet18(), stages=[4], sites=["conv"], drop_prob=0.3, block_size=3,
                                noise=True, input_size=[3, 96, 96])
    rows = dbx.describe(model).rows
    assert rows and all(r.options.noise and not r.owns_input for r in rows)


def test_owned_rows_write_into_their_input_and_the_step_is_bit_identical():
    torch.manual_seed(0)
    model = dbx.apply_dropblock(tv.models.resnet18(), stages=[3, 4], sites=["conv", "conv_last", "shortcut"],
                                drop_prob=0.3, block_size=3, input_size=[3, 128, 128])
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    assert owned == {f"layer{s}.{b}.dropblock_{k}" for s in (3, 4) for b in (0, 1) for k in ("conv1", "conv_last")} | {
        "layer3.0.dropblock_shortcut", "layer4.0.dropblock_shortcut"}
    reference = _owned_off(copy.deepcopy(model))
    x = torch.randn(4, 3, 128, 128)
    _same_step(model, reference, x)
    wrote = _wrote_in_place(model, x)
    assert {n for n, w in wrote.items() if w} == owned and len(wrote) == 12
    assert not any(_wrote_in_place(reference, x).values())


def test_no_grad_training_forward_writes_in_place_and_matches():
    torch.manual_seed(0)
    model = dbx.apply_dropblock(tv.models.resnet18(), stages=[4], drop_prob=0.3, block_size=3,
                                input_size=[3, 128, 128])
    reference = _owned_off(copy.deepcopy(model))
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.train()(x)
        torch.manual_seed(1)
        b = reference.train()(x)
        assert torch.equal(a, b)
        assert all(torch.equal(u, v) for u, v in zip(model.state_dict().values(), reference.state_dict().values()))
        wrote = _wrote_in_place(model, x, backward=False)
    assert {n for n, w in wrote.items() if w} == {r.path for r in dbx.describe(model).rows if r.owns_input} != set()


class SharedNormBlock(nn.Module):
    """A residual block whose projection norm's output is read twice: by the add and by a
    second branch that is added to the block's output."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.proj, self.proj_bn = nn.Conv2d(cin, c, 1, 2, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.proj_bn(self.proj(x))
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + s) + 0.5 * s


class SharedNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = SharedNormBlock(8, 16)
        self.b2 = SharedNormBlock(16, 32)
        self.b3 = SharedNormBlock(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b3(self.b2(self.b1(self.stem(x))))


def test_a_norm_output_with_a_second_reader_is_not_written():
    torch.manual_seed(0)
    model = dbx.apply_dropblock(SharedNormNet(), stages=[2, 3], sites=["conv_last", "shortcut"],
                                drop_prob=0.3, block_size=3, input_size=[3, 64, 64])
    rows = {r.path: r for r in dbx.describe(model).rows}
    assert rows["b3.dropblock_conv_last"].owns_input  # bn2's output goes to the add only
    shortcuts = [r for p, r in rows.items() if p.endswith("shortcut")]
    assert shortcuts and not any(r.owns_input for r in shortcuts)  # proj_bn's also to "+ 0.5 * s"
    reference = _owned_off(copy.deepcopy(model))
    forced = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    _same_step(model, reference, x)
    # what the rule prevents: writing the shared output changes what "+ 0.5 * s" reads
    for name, m in _inserted(forced).items():
        m.placement = dataclasses.replace(m.placement, owns_input=True)
    torch.manual_seed(3)
    assert not torch.equal(forced.train()(x), _step(reference, x, 3)[0])


def test_a_norm_with_a_forward_hook_is_not_written():
    net = tv.models.resnet18()
    net.layer4[0].bn2.register_forward_hook(lambda m, a, out: None)
    model = dbx.apply_dropblock(net, stages=[4], block_size=3, input_size=[3, 128, 128])
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    assert "layer4.0.dropblock_conv_last" not in owned and "layer4.1.dropblock_conv_last" in owned


def test_a_norm_site_without_a_graph_writes_in_place():
    torch.manual_seed(0)
    model = dbx.apply_dropblock(WithUntraceable(), {"stages": [2, 3], "sites": ["conv", "block"]},
                                input_size=[3, 64, 64], drop_prob=0.3, block_size=3)
    rows = {r.path: r for r in dbx.describe(model).rows}
    assert rows["odd.bn.dropblock"].mechanism == "after-norm" and rows["odd.bn.dropblock"].owns_input
    assert not rows["odd.dropblock"].owns_input  # a block's output: not a norm's
    x = torch.randn(2, 3, 64, 64)
    _same_step(model, _owned_off(copy.deepcopy(model)), x)
    assert _wrote_in_place(model, x)["odd.bn.dropblock"]


# ---------------------------------------------------------------------------- graph rule


def _graph(*users: str, functional: bool = False) -> tuple[fx.Graph, nn.Module]:
    unit = nn.Module()
    unit.bn = nn.BatchNorm2d(4)
    g = fx.Graph()
    x = g.placeholder("x")
    bn = g.call_function(F.batch_norm, (x, None, None)) if functional else g.call_module("bn", (x,))
    outs = [g.call_module("dropblock", (bn,))]
    if "add" in users:
        outs.append(g.call_function(torch.add, (bn, outs[0])))
    g.output(outs[-1])
    return g, unit


def test_the_graph_rule_wants_a_norm_read_by_the_dropblock_alone():
    g, unit = _graph()
    assert owns_norm_output([g], "dropblock", unit)
    g, unit = _graph("add")
    assert not owns_norm_output([g], "dropblock", unit)
    g, unit = _graph(functional=True)
    assert owns_norm_output([g], "dropblock", unit)
    assert not owns_norm_output([g], "missing", unit)
    # through a channels-last site's permute: the DropBlock reads a view, not the norm
    g, unit = fx.Graph(), nn.Module()
    unit.bn = nn.BatchNorm2d(4)
    bn = g.call_module("bn", (g.placeholder("x"),))
    g.output(bn)
    insert_sites(g, [Site("conv", "dropblock", "after bn", (1, 4, 8, 8), after=bn.name, channels_last=True)])
    assert not owns_norm_output([g], "dropblock", unit)
    assert writable_norm(nn.GroupNorm(2, 4)) and writable_norm(nn.SyncBatchNorm(4))
    assert not writable_norm(nn.LayerNorm(4)) and not writable_norm(nn.InstanceNorm2d(4))


def _relu_graph(act: Any, *, norm_readers: int = 1, act_readers: int = 1,
                identity: bool = False) -> tuple[fx.Graph, nn.Module]:
    """``bn (-> identity) -> act -> dropblock``; ``act`` is a module, or ``("function", f, args, kwargs)``
    or ``("method", name)``; extra readers of the norm's or the activation's output on demand."""
    unit = nn.Module()
    unit.bn, unit.ident = nn.BatchNorm2d(4), nn.Identity()
    g = fx.Graph()
    bn = g.call_module("bn", (g.placeholder("x"),))
    src = g.call_module("ident", (bn,)) if identity else bn
    if isinstance(act, nn.Module):
        unit.act = act
        a = g.call_module("act", (src,))
    elif act[0] == "function":
        a = g.call_function(act[1], (src, *act[2]), act[3])
    else:
        a = g.call_method(act[1], (src,))
    out = g.call_module("dropblock", (a,))
    extra = [g.call_function(torch.add, (bn, bn)) for _ in range(norm_readers - 1)]
    extra += [g.call_function(torch.add, (a, a)) for _ in range(act_readers - 1)]
    g.output((out, *extra))
    return g, unit


def _order(g: fx.Graph) -> list[str]:
    return [str(n.target) for n in g.nodes if n.op in ("call_module", "call_function", "call_method")]


def test_only_a_commuting_relu_over_a_norm_read_by_it_alone_lets_the_dropblock_move():
    from dropblock_fx.graph.sites import commute_with_relu

    for act in (nn.ReLU(inplace=True), nn.LeakyReLU(0.1), ("function", F.relu, (), {"inplace": True}),
                ("function", F.leaky_relu, (0.2,), {}), ("method", "relu")):
        g, unit = _relu_graph(act)
        assert commute_with_relu(g, "dropblock", unit), act
        assert _order(g)[:2] == ["bn", "dropblock"] and owns_norm_output([g], "dropblock", unit)
    g, unit = _relu_graph(nn.ReLU(), identity=True)  # timm's empty drop_block slot between bn2 and act2
    assert commute_with_relu(g, "dropblock", unit) and _order(g)[:3] == ["bn", "dropblock", "ident"]
    # activations that do not commute with zeroing and scaling, or slopes below zero
    for act in (nn.ReLU6(), nn.GELU(), nn.SiLU(), nn.LeakyReLU(-0.5), ("function", F.leaky_relu, (-0.5,), {}),
                ("function", F.gelu, (), {})):
        g, unit = _relu_graph(act)
        assert not commute_with_relu(g, "dropblock", unit), act
    # another reader of the norm's output or of the activation's: nothing moves
    for kw in ({"norm_readers": 2}, {"act_readers": 2}):
        g, unit = _relu_graph(nn.ReLU(), **kw)
        before = _order(g)
        assert not commute_with_relu(g, "dropblock", unit) and _order(g) == before
    # a norm that may not be written (a layer norm), or a hooked ReLU
    g, unit = _relu_graph(nn.ReLU())
    unit.bn = nn.LayerNorm([4, 8, 8])
    assert not commute_with_relu(g, "dropblock", unit)
    relu = nn.ReLU()
    relu.register_forward_hook(lambda m, a, out: None)
    g, unit = _relu_graph(relu)
    assert not commute_with_relu(g, "dropblock", unit)


def test_only_a_plain_relu_reading_a_dropblock_alone_spares_its_backward_the_mask():
    from dropblock_fx.graph.sites import commute_with_relu, feeds_relu_alone

    # moved before a ReLU of slope 0 (module, function, method, through an empty slot): marked
    for act in (nn.ReLU(inplace=True), nn.LeakyReLU(0.0), ("function", F.relu, (), {"inplace": True}),
                ("function", F.leaky_relu, (0.0,), {}), ("method", "relu"), ("method", "relu_")):
        g, unit = _relu_graph(act)
        assert commute_with_relu(g, "dropblock", unit) and feeds_relu_alone([g], "dropblock", unit), act
    g, unit = _relu_graph(nn.ReLU(), identity=True)
    assert commute_with_relu(g, "dropblock", unit) and feeds_relu_alone([g], "dropblock", unit)
    unit.ident.register_forward_hook(lambda m, a, out: None)  # a hook could change what the ReLU gets
    assert not feeds_relu_alone([g], "dropblock", unit)
    # a leaky ReLU lets gradient through the zeros: moved (it commutes) but not marked
    for act in (nn.LeakyReLU(0.1), ("function", F.leaky_relu, (0.2,), {})):
        g, unit = _relu_graph(act)
        assert commute_with_relu(g, "dropblock", unit) and not feeds_relu_alone([g], "dropblock", unit), act
    # left after its ReLU (the graph's output reads it), or in no graph: not marked
    g, unit = _relu_graph(nn.ReLU(), act_readers=2)
    assert not feeds_relu_alone([g], "dropblock", unit) and not feeds_relu_alone([], "dropblock", unit)
    # a second reader beside the ReLU
    g, unit = _relu_graph(nn.ReLU())
    assert commute_with_relu(g, "dropblock", unit)
    db = next(n for n in g.nodes if n.target == "dropblock")
    with g.inserting_after(db):
        g.call_function(torch.add, (db, db))
    assert not feeds_relu_alone([g], "dropblock", unit)


def _relu_flag_off(model: nn.Module) -> nn.Module:
    for m in _inserted(model).values():
        m.placement = dataclasses.replace(m.placement, before_relu=False)
    return model


@pytest.mark.parametrize("make", [lambda: tv.models.resnet50(), lambda: timm.create_model("resnet50")])
def test_the_paper_resnet50_sites_before_a_relu_are_the_moved_ones(make):
    """The 18 sites after act1 and act2 run before their ReLU and feed it alone; the sites
    before a residual add or on a shortcut do not."""
    model = dbx.apply_dropblock(make(), "paper-resnet50")
    marked = {r.path for r in dbx.describe(model).rows if r.before_relu}
    assert marked == {f"layer{s}.{b}.dropblock_{k}" for s, n in ((3, 6), (4, 3)) for b in range(n)
                      for k in ("conv1", "conv2")}
    assert all(m.placement.before_relu == (name in marked) for name, m in _inserted(model).items())
    noisy = dbx.apply_dropblock(make(), "paper-resnet50", noise=True)
    assert not any(r.before_relu for r in dbx.describe(noisy).rows)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_sites_before_a_relu_step_bit_identically_without_their_mask_in_the_backward(backend):
    """A site that feeds a ReLU alone skips its mask in the backward: the training step
    (output, every gradient, running statistics) is bit-identical to applying it, in eager
    mode and compiled; the compiled backward takes one saved tensor less per such site."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    model = dbx.apply_dropblock(tv.models.resnet18(num_classes=10), stages=[3, 4],
                                sites=["conv", "conv_last", "shortcut"], drop_prob=0.2, block_size=3,
                                input_size=[3, 96, 96])
    marked = sum(m.placement.before_relu for m in _inserted(model).values())
    assert marked == 4
    reference = _relu_flag_off(copy.deepcopy(model))
    x = torch.randn(4, 3, 96, 96)
    if backend == "eager":
        _same_step(model, reference, x)
        return
    saved = []
    for net in (model, reference):
        torch._dynamo.reset()
        inputs: list[int] = []
        capture = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward),
                               bw_compiler=lambda gm, ex: inputs.append(len(ex)) or make_boxed_func(gm.forward),
                               partition_fn=min_cut_rematerialization_partition)
        torch.manual_seed(1)  # the same masks (the norms' running statistics move alike)
        torch.compile(net, backend=capture, fullgraph=True)(x).sum().backward()
        saved.append(inputs[0])
        net.zero_grad(set_to_none=True)
    assert saved[0] == saved[1] - marked, saved
    torch._dynamo.reset()
    _same_step(torch.compile(model, backend=backend, fullgraph=True),
               torch.compile(reference, backend=backend, fullgraph=True), x)


# ---------------------------------------------------------------------------- run-time rule


def test_the_run_time_rule_writes_only_a_norm_output_autograd_does_not_keep():
    bn, gn = nn.BatchNorm2d(4), nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert writable_norm_output(bn(x)) and writable_norm_output(gn(x))
    assert writable_norm_output(bn.eval()(x)) and writable_norm_output(bn.train()(x.to(memory_format=torch.channels_last)))
    assert not writable_norm_output(torch.relu(bn(x)))  # ReLU's backward reads its output
    assert not writable_norm_output(x)  # a leaf that needs a gradient
    assert not writable_norm_output(bn(x)[:, :2])  # a view
    assert not writable_norm_output(nn.LayerNorm([8, 8])(x))
    assert writable_norm_output(torch.randn(2, 4, 8, 8))  # no autograd: the caller's graph rule decides
    assert not writable_norm_output(torch.randn(2, 4, 8, 16)[..., ::2])  # not dense
    seen = []
    torch.func.vmap(lambda t: seen.append(writable_norm_output(t)) or t)(torch.randn(3, 2, 4, 8, 8))
    assert seen == [False]
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))
        assert not writable_norm_output(bn(dual))


def test_an_owning_module_fed_what_it_may_not_write_returns_a_new_tensor():
    m = dbx.DropBlock2d(0.3, 3)
    m.placement = Placement(4, "conv_last", 0.3, owns_input=True)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    a = torch.relu(bn(x))
    torch.manual_seed(0)
    out = m(a)
    assert out is not a and a.min() >= 0 and (out == 0).sum() > (a == 0).sum()
    out.sum().backward()  # ReLU's saved output was left alone
    b = bn(x)
    torch.manual_seed(0)
    out = m(b)
    assert out is b
    out.sum().backward()
    m.placement = dataclasses.replace(m.placement, owns_input=False)
    b = bn(x)
    assert m(b) is not b


def test_compiled_owning_modules_do_not_break_the_graph():
    model = dbx.apply_dropblock(tv.models.resnet18(), stages=[4], drop_prob=0.2, block_size=1,
                                input_size=[3, 64, 64])
    assert any(m.placement.owns_input for m in _inserted(model).values())
    explain = torch._dynamo.explain(model.train())(torch.randn(2, 3, 64, 64))
    assert explain.graph_break_count == 0


@pytest.mark.parametrize("name", ["efficientnet_b0", "repvgg_a0", "res2net50_14w_8s", "regnety_002", "densenet121"])
def test_timm_models_write_exactly_their_owning_rows_and_step_bit_identically(name):
    """SE gates read a tensor beside the site, RepVGG sums normed branches, Res2Net splits maps
    into views, timm's norm + act layers with no act (EfficientNet's bn3) are plain norms, and
    DenseNet's norm2 is BatchNormAct2d with a ReLU: not a norm's output, so no owning row."""
    torch.manual_seed(0)
    model = dbx.apply_dropblock(timm.create_model(name, num_classes=10), input_size=[3, 96, 96], block_size=3,
                                drop_prob=0.2, stages=[-2, -1])
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    assert (owned == set()) == (name == "densenet121")
    reference = _owned_off(copy.deepcopy(model))
    x = torch.randn(2, 3, 96, 96)
    _same_step(model, reference, x, seed=1)
    assert {n for n, w in _wrote_in_place(model, x).items() if w} == owned  # every owning row writes


@pytest.mark.parametrize("name", ["smp-unet", "efficientnet-pytorch", "monai-resnet18"])
def test_third_party_models_write_exactly_their_owning_rows_and_step_bit_identically(name):
    """Models from other libraries: a segmentation U-Net with a timm-free encoder and decoder
    (segmentation_models_pytorch), lukemelas' EfficientNet (its own BN and swish), MONAI's ResNet."""
    if name == "smp-unet":
        smp = pytest.importorskip("segmentation_models_pytorch")
        make = lambda: smp.Unet("resnet34", encoder_weights=None, classes=2)  # noqa: E731
    elif name == "efficientnet-pytorch":
        effnet = pytest.importorskip("efficientnet_pytorch")
        make = lambda: effnet.EfficientNet.from_name("efficientnet-b0", num_classes=10)  # noqa: E731
    else:
        nets = pytest.importorskip("monai.networks.nets")
        make = lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=4)  # noqa: E731
    torch.manual_seed(0)
    model = dbx.apply_dropblock(make(), input_size=[3, 128, 128], block_size=3, drop_prob=0.2)
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    assert owned
    reference = _owned_off(copy.deepcopy(model))
    x = torch.randn(2, 3, 128, 128)
    _same_step(model, reference, x, seed=1)
    assert {n for n, w in _wrote_in_place(model, x).items() if w} == owned
