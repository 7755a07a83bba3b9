"""Constructs of third-party CNNs that a trusted plain trace gets wrong, and what surgery does
with each: verify every rewrite, specialise (with a guard) when a plain trace is unfaithful,
leave no trace of planning, keep units within one stage."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dropblock_fx as dbx
from constructs import (CachingDetector, DropConnectBlock, DropConnectNet, IsinstanceUNet, IsinstanceUp, NestedUNet,
                        SiblingNet)
from dropblock_fx import SurgeryError
from dropblock_fx.graph.stages import stage_of_shape
from dropblock_fx.graph.tracing import trace_modes
from dropblock_fx.graph.verify import check_graphs
from dropblock_fx.testing import module_state

SIZE = (3, 128, 128)
pytestmark = pytest.mark.filterwarnings("ignore:dropblock_fx. this model's recipe has a schedule")


def _x(batch: int = 2, size: tuple[int, ...] = SIZE) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))


def _applied(model: nn.Module, **kw):
    """(original eval output, rewritten model, its plan) on one input."""
    model.eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
    dbx.apply_dropblock(model, input_size=SIZE, **kw)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # eval: bit-identical
    return x, ref, dbx.describe(model)


# 1. a branch on isinstance(skip, torch.Tensor) -----------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["isinstance", "torch.jit.isinstance"])
def test_a_plain_trace_that_drops_a_tensor_argument_fails_verification(jit):
    block = IsinstanceUp(16, 8, 8, jit=jit)
    bound = {"x": torch.empty(1, 16, 8, 8, device="meta"), "skip": torch.empty(1, 8, 16, 16, device="meta")}
    out = block(torch.zeros(1, 16, 8, 8), torch.zeros(1, 8, 16, 16))
    problem = check_graphs(trace_modes(block), block, bound, out.to("meta"))
    assert problem == "the traced forward never uses its tensor argument(s) 'skip'"


@pytest.mark.parametrize("jit", [False, True], ids=["isinstance", "torch.jit.isinstance"])
def test_isinstance_decoder_blocks_are_traced_for_their_call_and_stay_exact(jit):
    model = IsinstanceUNet(jit=jit)
    original = copy.deepcopy(model).eval()
    x, ref, p = _applied(model)
    dec = [r for r in p.rows if r.path.startswith("dec.")]
    assert dec and all(r.mechanism == "graph" for r in dec)  # whole-block graph sites, not fallbacks
    # the forward never reads the spatial size: the guard leaves it open
    assert any(n.startswith("dec.0: traced for calls like the planned one (x=Nx64x*x* tensor, "
                            "skip=Nx32x*x* tensor)") for n in p.notes), p.notes
    # so at another input size the rewritten decoder runs, exactly in eval and with DropBlock in training
    other = _x(size=(3, 96, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(other)
    with torch.no_grad():
        assert torch.equal(got, original(other))
    called = _calls(model)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(no schedule|feature maps differ)")
        model(other).sum().backward()
    assert {r.path for r in dec} <= called
    # the rewritten decoder really uses its skip input: its train forward runs and backprops
    model.zero_grad()
    model(x).sum().backward()
    assert model.dec[0].conv1.weight.grad is not None


def _calls(model: nn.Module) -> set[str]:
    """The paths of the DropBlock modules called from now on (filled as the model runs)."""
    called: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, dbx.DropBlockNd):
            m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
    return called


# 2. planning leaves no trace --------------------------------------------------------------


@pytest.mark.parametrize("make", [CachingDetector, IsinstanceUNet, NestedUNet, DropConnectNet])
def test_plan_and_apply_leave_no_trace_in_the_model(make):
    model = make().eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)  # fills the caches with real tensors of this input
    before = module_state(model)
    rng = torch.get_rng_state()
    dbx.plan(model, input_size=SIZE)
    assert module_state(model) == before
    assert torch.equal(torch.get_rng_state(), rng)

    dbx.apply_dropblock(model, input_size=SIZE)
    after = {k: v for k, v in module_state(model).items()
             if k[1] not in ("_modules", "dropblock_plan") and ".dropblock" not in f".{k[0]}"}
    assert after == {k: v for k, v in before.items() if k[1] != "_modules"}
    with torch.no_grad():  # the next ordinary forward: no meta tensor or proxy left in a cache
        assert torch.equal(model(x), ref)


def test_a_forward_that_caches_on_itself_is_not_rewritten():
    model = CachingDetector()
    p = dbx.plan(model, input_size=SIZE, stages=[3])
    assert any(n.startswith("head: no graph") and "its forward sets grid, shape, strides on itself" in n
               for n in p.notes), p.notes


# 3. a unit never spans stages ---------------------------------------------------------------


def test_nested_unet_skip_blocks_are_descended_so_each_site_has_its_own_stage():
    model = NestedUNet()
    x, ref, p = _applied(model)
    assert len(p.rows) > 0 and {r.stage for r in p.rows} == {3, 4}  # the two deepest stages
    for r in p.rows:  # every site is in the stage of its own feature map
        assert stage_of_shape((1, *SIZE), (1, 1, *r.resolution)) == r.stage, r
    assert all(r.mechanism == "graph" for r in p.rows)


# 4. blocks that trace only with their recorded values ----------------------------------------


def test_call_time_floats_and_shape_arithmetic_get_the_paper_placement():
    model = DropConnectNet()
    original = copy.deepcopy(model).eval()
    x, ref, p = _applied(model)
    for i in (4, 5, 6, 7):  # the blocks of the two deepest stages, each whole
        kinds = sorted(r.kind for r in p.rows if r.path.startswith(f"blocks.{i}."))
        assert kinds == ["conv", "conv", "conv_last", "shortcut"], (i, kinds)
    # the padding is computed inside a conv (a leaf): the block's own code never reads a size
    assert any(n.startswith("blocks.4: traced for calls like the planned one (x=Nx32x*x* tensor, "
                            "drop_connect_rate=0.05)") for n in p.notes), p.notes
    # a call with another rate than traced is traced again for it (the same path, another constant)
    feat = torch.randn(2, 32, 8, 8)
    for rate in (0.3, 0.0):  # 0.0 takes another path: the original forward
        got = model.blocks[4](feat, drop_connect_rate=rate)
        assert torch.equal(got, DropConnectBlock.forward(original.blocks[4], feat, drop_connect_rate=rate))
    # train mode: the specialised code runs, with its DropBlock modules and the drop-connect
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, dbx.DropBlockNd)]
    model.train()
    model(x).sum().backward()
    assert len(calls) == len(p.rows)
    for h in hooks:
        h.remove()


def test_conv_and_norm_in_sibling_containers_are_one_chain():
    model = SiblingNet()
    _, _, p = _applied(model)
    assert [r.path for r in p.rows] == ["layers.3.dropblock_conv", "layers.4.dropblock_conv",
                                        "layers.5.dropblock_conv"]
    assert all(r.mechanism == "graph" and r.anchor == "after conv > adn.A" for r in p.rows), p.rows


# verify="exact" -------------------------------------------------------------------------------


_CALLS: list[int] = []


class CountingBlock(nn.Module):
    """Reads Python state outside the model (a global call count) at every call: a trace bakes
    the count it saw, so its rewrite has the right shapes but not the original's values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        _CALLS.append(1)
        return torch.relu(self.bn(self.conv(x))) * len(_CALLS) + x


class GlobalStateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
                                    for c in (3, 8, 8, 8, 8)], CountingBlock())

    def forward(self, x):
        return self.body(x)


def test_verify_exact_applies_when_outputs_match():
    from small_models import SmallCNN

    model = SmallCNN().eval()
    dbx.apply_dropblock(model, verify="exact", input_size=(3, 64, 64))
    assert len(dbx.describe(model).rows) > 0


def test_verify_exact_undoes_everything_on_a_mismatch():
    model = GlobalStateNet().eval()
    assert len(dbx.plan(model, input_size=SIZE).rows) > 0  # its graph is right in structure and shapes
    before, cls = module_state(model), [type(m) for m in model.modules()]
    rng = torch.get_rng_state()
    with pytest.raises(SurgeryError, match="verify='exact': the rewritten model's eval output differs"):
        dbx.apply_dropblock(model, verify="exact", input_size=SIZE)
    assert module_state(model) == before and [type(m) for m in model.modules()] == cls
    assert not hasattr(model, "dropblock_plan")
    assert torch.equal(torch.get_rng_state(), rng)


def test_verify_rejects_unknown_modes():
    with pytest.raises(SurgeryError, match="verify='bits': must be one of 'graph', 'exact'"):
        dbx.apply_dropblock(SiblingNet(), verify="bits")


def test_cli_plan_verify(capsys):
    from dropblock_fx.cli import main

    assert main(["plan", "torchvision:resnet18", "--recipe", "paper-resnet50", "--set", "stages=[4]",
                 "--verify"]) == 0
    assert "verified: eval outputs bit-identical" in capsys.readouterr().out


def test_specialised_units_pickle_and_are_traced_again_for_other_calls(tmp_path):
    """DropConnectBlock branches on its float ``drop_connect_rate``: traced for the planned
    value. Another truthy rate takes the same path (traced again, with DropBlock); a rate of 0
    takes another one: the original forward runs, and the model warns once, naming it."""
    model = DropConnectNet()
    _, _, p = _applied(model)
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False).eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    block = loaded.blocks[4]
    mine = [r.path for r in p.rows if r.path.startswith("blocks.4.")]
    called = _calls(loaded)
    loaded.train()
    feat = torch.randn(2, 32, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block(feat, drop_connect_rate=0.2)
    assert mine and set(mine) <= called
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        for _ in range(3):
            block(feat, drop_connect_rate=0.0)
    assert sum("did not run" in str(m.message) and mine[0] in str(m.message) for m in w) == 1
    assert dbx.describe(loaded).rows[[r.path for r in p.rows].index(mine[0])].skipped_at == ((8, 8),)


def test_specialised_units_compile_without_graph_breaks():
    model = DropConnectNet()
    x, ref, _ = _applied(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            assert torch.equal(compiled(x), ref)
        model.train()
        compiled(x).sum().backward()
    finally:
        torch._dynamo.reset()


def test_an_argument_traced_as_none_keeps_its_name_and_is_guarded():
    """FX names a None-specialised argument ``mask_1``: a parent calling ``mask=None`` by
    keyword broke. The rewritten forward keeps the name, and a call with a mask runs the
    original forward instead of FX's assertion."""
    from constructs import MaskedBlock, MaskedNet

    model = MaskedNet()
    original = copy.deepcopy(model).eval()
    x, ref, p = _applied(model)  # the parent passes mask=None by keyword
    assert {r.kind for r in p.rows if r.path.startswith("blocks.")} == {"conv", "conv_last", "shortcut"}
    assert any(n.startswith("blocks.0: traced for calls like the planned one (mask=None)") for n in p.notes)
    feat = torch.randn(2, 16, 8, 8)
    mask = torch.rand(2, 16, 8, 8)
    got = model.blocks[0](feat, mask=mask)  # another path: the original forward, exactly
    assert torch.equal(got, MaskedBlock.forward(original.blocks[0], feat, mask=mask))
    with pytest.warns(UserWarning, match=r"did not run .*blocks\.0\.dropblock"):
        model.train().blocks[0](feat, mask=mask)


def test_a_descended_residual_block_keeps_its_shortcut_and_branch_sites():
    from constructs import DownUpNet

    model = DownUpNet()
    _, _, p = _applied(model, stages=[3])
    for i in (0, 1):
        rows = {r.kind: r for r in p.rows if r.path.startswith(f"blocks.{i}.dropblock")}
        assert set(rows) == {"shortcut", "conv_last"}, p.rows
        assert all(r.stage == 3 and r.resolution == (8, 8) and r.mechanism == "graph" for r in rows.values())
