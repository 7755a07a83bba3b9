"""The graph layer on small hand-made modules: leaf policy, shape pass, stages, site matching,
splicing (class kept, pickling, containers), train/eval traces, untraceable blocks."""

from __future__ import annotations

import copy
import warnings
import io
import pickle

import pytest
import torch
from torch import nn

from dropblock_fx import DropBlock2d
from dropblock_fx.graph import (
    is_leaf,
    is_spliced,
    original_class,
    record_calls,
    register_norm,
    stage_of_shape,
    splice_after,
    trace_modes,
    unsplice,
)
from dropblock_fx.graph.leaves import is_norm, is_norm_act
from dropblock_fx.graph.shapes import ShapeRecord
from dropblock_fx.graph.sites import find_sites, insert_sites
from dropblock_fx.graph.meta import replay
from dropblock_fx.graph.stages import map_stages
from dropblock_fx.graph.splice import graph_source, splice_graph
from dropblock_fx.graph.units import bound_args

from small_models import Residual, SmallCNN, TrainBranch


pytestmark = pytest.mark.usefixtures("one_thread")


def sites_of(block: nn.Module, shape, kinds=("conv", "conv_last", "shortcut", "block"), norm_free=False):
    record = record_calls(block, shape)
    call = record.first(block)
    graphs = trace_modes(block)
    g = graphs.get("any") or graphs["eval"]
    values = replay(g, block, bound_args(block, call), lambda m: record.outputs_within(m, call.start, call.end))
    maps = map_stages(block, record).feature_maps()
    sites = find_sites(g, block, values, set(kinds), norm_free, True, maps)
    return g, sites


def test_stage_numbering_convention():
    assert stage_of_shape((1, 3, 224, 224), (1, 64, 112, 112)) == 0
    assert stage_of_shape((1, 3, 224, 224), (1, 1024, 14, 14)) == 3
    assert stage_of_shape((1, 3, 224, 224), (1, 2048, 7, 7)) == 4
    assert stage_of_shape((1, 3, 224, 224), (1, 8, 224, 224)) == 0  # stride 1 counts as stage 0
    assert stage_of_shape((1, 3, 224, 160), (1, 8, 14, 10)) == 3  # non-square inputs
    # channels-last tensors are not feature maps of a stage
    assert stage_of_shape((1, 3, 224, 224), (1, 56, 56, 96)) is None
    assert stage_of_shape((1, 3, 224, 224), (1, 1000)) is None


def test_leaf_policy():
    assert is_leaf(nn.Conv2d(1, 1, 1)) and is_leaf(nn.BatchNorm2d(1)) and is_leaf(nn.ReLU())
    assert is_leaf(DropBlock2d())
    assert not is_leaf(nn.Sequential(nn.ReLU())) and not is_leaf(Residual(2, 2))
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops.misc import Conv2dNormActivation

    assert is_leaf(torchvision.ops.StochasticDepth(0.1, "row"))
    assert not is_leaf(Conv2dNormActivation(2, 2))  # a Sequential: sites inside it are found
    timm = pytest.importorskip("timm")
    bn_act = timm.layers.BatchNormAct2d(4)
    assert is_leaf(bn_act) and is_norm(bn_act) and is_norm_act(bn_act)


def test_register_norm_extension_point():
    class MyNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1, c, 1, 1))

        def forward(self, x):
            return x * self.w

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 1, 1)
            self.norm = MyNorm(4)
            self.act = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv2(self.act(self.norm(self.conv(x))))

    _, before = sites_of(Block(), (4, 16, 16), kinds=("conv",))
    assert before == []
    register_norm(MyNorm)
    _, after = sites_of(Block(), (4, 16, 16), kinds=("conv",))
    assert [(s.kind, s.name, s.after) for s in after] == [("conv", "dropblock_conv", "act")]


def test_basic_block_sites_projection_and_identity():
    g, sites = sites_of(Residual(4, 8, 2), (4, 16, 16))
    assert [(s.kind, s.name) for s in sites] == [
        ("conv", "dropblock_conv1"), ("conv_last", "dropblock_conv_last"), ("shortcut", "dropblock_shortcut"),
        ("block", "dropblock_block"),
    ]
    conv1 = sites[0]
    assert conv1.after == "relu" and conv1.shape == (1, 8, 8, 8)  # after BN *and* ReLU (official code)
    shortcut = sites[2]
    assert shortcut.edge[0] == "proj_1"  # after the projection conv+norm
    _, sites = sites_of(Residual(4, 4), (4, 16, 16), kinds=("shortcut",))
    assert [s.edge[0] for s in sites] == ["x"]  # the identity itself


def test_insert_sites_only_reroutes_that_edge():
    block = Residual(4, 4)
    g, sites = sites_of(block, (4, 8, 8), kinds=("shortcut", "conv"))
    insert_sites(g, sites)
    x = next(n for n in g.nodes if n.op == "placeholder")
    users = {u.op + ":" + str(u.target) for u in x.users}
    assert users == {"call_module:conv1", "call_module:dropblock_shortcut"}


def test_splice_keeps_class_state_and_pickles():
    block = Residual(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    ref = block(x)
    g, sites = sites_of(block, (4, 8, 8))
    insert_sites(g, sites)
    for s in sites:
        block.add_module(s.name, DropBlock2d(0.3, 3).eval())
    keys = list(block.state_dict())
    splice_graph(block, graph_source({"any": g}))
    assert isinstance(block, Residual) and type(block).__name__ == "Residual" and is_spliced(block)
    assert block.extra_method() == "still here"
    assert torch.equal(block(x), ref) and list(block.state_dict()) == keys
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert is_spliced(clone) and torch.equal(clone(x), ref)
        assert clone.train()(x).shape == ref.shape  # train mode runs the DropBlocks
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), ref)
    assert unsplice(block) is Residual and type(block) is Residual and original_class(block) is Residual


def test_splice_after_and_containers_hide_added_children():
    seq = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU())
    bn = seq[1]
    splice_after(bn, DropBlock2d(0.5, 1))
    assert isinstance(bn, nn.BatchNorm2d) and is_spliced(bn)
    seq.train()
    y = seq(torch.randn(2, 2, 8, 8))
    assert (y == 0).any()
    unsplice(bn)
    del bn._modules["dropblock"]
    assert type(bn) is nn.BatchNorm2d

    seq = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU()).eval()
    graphs = trace_modes(seq)
    g = graphs["any"]
    relu = next(n for n in g.nodes if n.target == "2")
    from dropblock_fx.graph.sites import Site

    insert_sites(g, [Site("conv", "dropblock_0", "", (1, 2, 8, 8), after=relu.name)])
    seq.add_module("dropblock_0", DropBlock2d(0.1, 3))
    splice_graph(seq, graph_source({"any": g}))
    assert len(seq) == 3 and isinstance(seq[-1], nn.ReLU) and [type(m) for m in seq] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert type(seq[0:2]) is nn.Sequential and len(seq[0:2]) == 2
    assert "dropblock_0" in dict(seq.named_children())


def test_train_and_eval_traces_differ():
    block = TrainBranch(4)
    graphs = trace_modes(block)
    assert set(graphs) == {"train", "eval"}
    assert block.training  # flags restored
    block.eval()
    assert set(trace_modes(block)) == {"train", "eval"} and not block.training


def test_meta_shape_pass_records_calls_without_compute():
    model = SmallCNN()
    flags = [m.training for m in model.modules()]
    record = record_calls(model, (3, 64, 64))
    assert isinstance(record, ShapeRecord) and record.mode == "meta"
    assert [m.training for m in model.modules()] == flags
    assert all(p.device.type == "cpu" for p in model.parameters())
    out = record.first(model.stages[3]).output
    assert out.device.type == "meta" and tuple(out.shape) == (1, 64, 2, 2)
    stages = map_stages(model, record).stages
    assert [(s.index, s.name, s.stride) for s in stages] == [
        (0, "stem", 2), (1, "stages.0", 4), (2, "stages.1", 8), (3, "stages.2", 16), (4, "stages.3", 32)
    ]


def test_resnet152_plan_needs_no_real_compute():
    torchvision = pytest.importorskip("torchvision")
    from dropblock_fx import plan

    model = torchvision.models.resnet152()
    p = plan(model, {"stages": [3, 4]})
    assert p.count("shortcut") == 36 + 3 and p.count("conv_last") == 39


class _ListBlock(nn.Module):
    """A SelecSLS-style block: takes ``[x, skip]`` (or a bare tensor) and returns a list.

    FX feeds ``x`` as one Proxy, so a trace takes the ``not isinstance(x, list)`` branch;
    a forward generated from that trace would pass the list to the conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.proj = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        y = self.conv(x[0])
        skip = x[1] if len(x) == 2 else y
        return [self.bn(self.proj(torch.cat([y, skip], 1))), skip]


class _ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = _ListBlock(8)
        self.b2 = _ListBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        out = self.b2(self.b1(self.stem(x)))
        return self.down(out[0]).mean((2, 3))


def test_blocks_called_with_a_list_of_tensors_are_traced_for_that_call():
    """b2 gets ``[x, skip]``: a plain trace would feed the list as one Proxy and take the
    bare-tensor branch; the specialised trace feeds a real list of proxies, and the rewritten
    forward guards on that structure (a bare tensor runs the original forward)."""
    from dropblock_fx import apply_dropblock, describe, plan, remove_dropblock

    torch.manual_seed(0)
    model = _ListNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    p = plan(model, stages=[-2, -1], input_size=(3, 16, 16))
    # the forward never reads the spatial size: the guard leaves it open
    assert any(n.startswith("b2: traced for calls like the planned one (x=[Nx8x*x* tensor, Nx8x*x* tensor])")
               for n in p.notes), p.notes
    out = apply_dropblock(model, stages=[-2, -1], input_size=(3, 16, 16))
    assert torch.equal(out(x), ref)
    paths = [r.path for r in p.rows]
    assert "b1.dropblock_proj" in paths and "b2.dropblock_proj" in paths  # both whole, after proj -> bn
    feat = torch.randn(2, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval: DropBlock is the identity, nothing is lost, no warning
        bare = out.b2(feat)  # not the planned call, another path: the original forward, exactly
    assert all(torch.equal(a, b) for a, b in zip(bare, _ListBlock.forward(out.b2, feat)))
    trained = copy.deepcopy(out).train()  # a train step moves BN statistics: on a copy
    with pytest.warns(UserWarning, match=r"1 DropBlock module\(s\) did not run .*b2\.dropblock_proj"):
        trained.b2(feat)
    assert describe(trained).rows[paths.index("b2.dropblock_proj")].skipped_at == ((8, 8),)
    trained(x).sum().backward()
    assert all(p.grad is not None for p in trained.parameters())
    assert torch.equal(remove_dropblock(out).eval()(x), ref)


class _NHWCBlock(nn.Module):
    """MambaOut-style: the block works on channels-last ``N, H, W, C`` tensors."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc(y)


class _NHWCNet(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(_NHWCBlock(c), _NHWCBlock(c))
        self.down = nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x):
        x = self.blocks(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.down(x).mean((2, 3))


@pytest.mark.parametrize("c", [32, 12])  # 12: N, H, W, C = (2, 10, 10, 12) also passes for N, C, H, W
def test_channels_last_blocks_get_permuted_sites(c):
    from dropblock_fx import apply_dropblock, plan

    torch.manual_seed(0)
    model = _NHWCNet(c).eval()
    x = torch.randn(2, 3, 20, 20)
    ref = model(x)
    kw = dict(stages=[0], sites=["shortcut", "conv_last"], block_size=3, drop_prob=0.3, input_size=(3, 20, 20))
    p = plan(model, **kw)
    rows = {r.path: r for r in p.rows}
    assert set(rows) == {f"blocks.{i}.dropblock_{k}" for i in (0, 1) for k in ("shortcut", "conv_last")}
    assert all(r.resolution == (10, 10) and "[channels-last]" in r.anchor for r in rows.values())
    assert [(s.index, s.resolution) for s in p.stages] == [(0, (10, 10)), (1, (5, 5))]  # from conv outputs
    out = apply_dropblock(model, **kw)
    assert torch.equal(out(x), ref)  # eval: identity
    seen = []
    block = out.blocks[0]
    block.dropblock_shortcut.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out.train()
    h = torch.randn(2, 10, 10, c)
    torch.manual_seed(1)
    got = block(h)
    # the DropBlocks see N, C, H, W views (C channels, not W = 10 columns)
    assert seen[0].shape == (2, c, 10, 10) and seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    short = block.dropblock_shortcut(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = block.conv(block.norm(h).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    branch = block.dropblock_conv_last(block.fc(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(got, short + branch)
    dropped = (short == 0).permute(0, 3, 1, 2)  # zeros come in whole 3x3 blocks of one channel's H x W map
    assert dropped.any() and not dropped.all()
    # a dropped element's channel row is not zeroed across channels (per-channel masks over H, W)
    assert not dropped.all(dim=1)[dropped.any(dim=1)].all()


def _meta_cases():
    F = torch.nn.functional
    x = torch.empty(2, 8, 6, 5, device="meta")
    xc = x.to(memory_format=torch.channels_last)
    v = torch.empty(2, 4, 3, 6, 5, device="meta").to(memory_format=torch.channels_last_3d)
    w, w3 = torch.empty(8, device="meta"), torch.empty(4, device="meta")
    cw = torch.empty(16, 8, 3, 3, device="meta")
    return {
        "bn train": lambda: F.batch_norm(xc, w.clone(), w.clone(), w, w, True),
        "bn eval": lambda: F.batch_norm(x, w, w, None, None, False),
        "bn3d": lambda: F.batch_norm(v, w3.clone(), w3.clone(), training=True),
        "layer norm": lambda: F.layer_norm(xc, (5,)),
        "group norm": lambda: F.group_norm(xc, 4, w, w),
        "gelu cl": lambda: F.gelu(xc),
        "hardswish bf16": lambda: F.hardswish(x.to(torch.bfloat16)),
        "relu": lambda: F.relu(v),
        "broadcast add": lambda: x + torch.empty(8, 1, 1, device="meta", dtype=torch.float64),
        "conv": lambda: F.conv2d(xc, cw, stride=2, padding=1),
        "max pool with indices": lambda: F.max_pool2d(x, 2, return_indices=True),
        "mean": lambda: x.mean((2, 3), keepdim=True),
    }


def _meta(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [(o.shape, o.stride(), o.dtype, o.device) for o in outs]


def test_memoised_meta_kernels_give_what_the_kernels_give():
    """A meta op answered from the memo (the second call with the same metadata) has the
    shapes, strides and dtypes the meta kernel gives; in-place ops, views, real and fake
    tensors are not memoised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dropblock_fx.graph.meta import _MEMO, memo_meta

    cases = _meta_cases()
    expected = {name: _meta(f()) for name, f in cases.items()}
    with torch.no_grad(), memo_meta():
        for name, f in cases.items():
            first = _meta(f())
            size = len(_MEMO)
            again = f()
            assert _meta(again) == first == expected[name], name
            assert len(_MEMO) == size, f"{name}: the second call was not answered from the memo"
        x = torch.empty(2, 3, 4, 4, device="meta")
        assert torch.relu_(x) is x and x[:, 1:].storage_offset() == 16  # in place, view: as ever
        real = torch.randn(2, 3, 4, 4)
        with memo_meta():  # re-entrant: one mode
            assert torch.equal(torch.nn.functional.gelu(real), torch.nn.functional.gelu(real.clone()))
        with FakeTensorMode():
            fake = torch.nn.functional.batch_norm(torch.empty(2, 8, 6, 5), None, None, training=True)
        assert type(fake).__name__ == "FakeTensor"


class _Scaled(nn.Module):
    """A parameter read in the forward (FX's ``getattr`` hook), ``math.sqrt`` (an autowrapped
    function), a child called twice."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        import math

        return self.conv(self.conv(x)) * self.gain / math.sqrt(x.shape[1])


def _codes(graphs: dict) -> dict:
    return {mode: g.python_code("self").src for mode, g in graphs.items()}


def test_traces_sharing_one_patch_give_fx_own_graphs_and_put_nn_module_back():
    """Inside ``traces_share_one_patch`` every trace gives the code FX's own trace gives (plain,
    with extra leaves, specialised, timm's and torchvision's blocks), the patch on nn.Module
    is the shared one for all of them (FX does not patch the class per trace), and nn.Module's
    own methods are back afterwards, after a failing trace too."""
    import timm
    import torchvision

    from dropblock_fx.graph.specialise import trace_specialised
    from dropblock_fx.graph.tracing import LeafTracer, _module_call, traces_share_one_patch

    call, getattr_ = nn.Module.__dict__["__call__"], nn.Module.__dict__["__getattr__"]
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(nn.Module.__dict__["__call__"])
            return x + 1

    seq = SmallCNN().stages[2]
    units = [
        (SmallCNN().stages[1], ()),
        (seq, tuple(seq)),  # its blocks as extra leaves
        (_Scaled(), ()),
        (timm.create_model("efficientnet_b0").blocks[1][0], ()),  # SE: autowrapped gates
        (torchvision.models.resnet18().layer2[0], ()),
        (Probe(), ()),
    ]
    plain = [_codes(trace_modes(m, leaves)) for m, leaves in units]
    pair = {"x": [torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)]}
    special = trace_specialised(_ListBlock(4), (), pair)[0]
    assert seen and all(s is not _module_call for s in seen)  # FX's own patch, per trace
    seen.clear()
    with traces_share_one_patch():
        shared = [_codes(trace_modes(m, leaves)) for m, leaves in units]
        special_shared = trace_specialised(_ListBlock(4), (), pair)[0]
        with pytest.raises(ZeroDivisionError):
            LeafTracer().trace(nn.Sequential(nn.ReLU(), _Raising()))
        after_failure = _codes(trace_modes(*units[2]))
    assert shared == plain and after_failure == plain[2]
    assert _codes(special_shared) == _codes(special) and "cat" in str(_codes(special))
    assert seen and all(s is _module_call for s in seen)
    assert nn.Module.__dict__["__call__"] is call and nn.Module.__dict__["__getattr__"] is getattr_


class _Raising(nn.Module):
    def forward(self, x):
        return 1 / 0


def test_other_threads_call_modules_plainly_while_a_shared_patch_traces():
    """While this thread traces under the shared patch, a module called by another thread runs
    as usual (FX's own patch would hand that call to this thread's tracer), and a trace started
    by another thread waits for the scope to end and is FX's own."""
    import threading

    from dropblock_fx.graph.tracing import LeafTracer, traces_share_one_patch

    other = nn.Conv2d(3, 3, 1)
    out: dict = {}

    def call_other() -> None:
        with torch.no_grad():
            out["tensor"] = other(torch.ones(1, 3, 2, 2))

    def trace_other() -> None:
        out["graph"] = [n.op for n in LeafTracer().trace(nn.Sequential(nn.ReLU())).nodes]

    class CallsFromAnotherThread(nn.Module):
        def forward(self, x):
            t = threading.Thread(target=call_other)
            t.start()
            t.join()
            out["tracer_thread"] = threading.Thread(target=trace_other)
            out["tracer_thread"].start()
            out["tracer_thread"].join(timeout=0.2)
            out["waited"] = out["tracer_thread"].is_alive()  # blocked on the scope's lock
            return x * 2

    with traces_share_one_patch():
        graph = LeafTracer().trace(CallsFromAnotherThread())
    out["tracer_thread"].join(timeout=30)
    assert type(out["tensor"]) is torch.Tensor and torch.equal(out["tensor"], other(torch.ones(1, 3, 2, 2)))
    assert [n.op for n in graph.nodes] == ["placeholder", "call_function", "output"]
    assert out["waited"] and out["graph"] == ["placeholder", "call_module", "output"]


def test_a_shared_patch_leaves_someone_elses_patch_alone():
    """When nn.Module.__call__ is patched already (an FX trace in progress, say), the scope
    installs nothing: traces inside are FX's own, and the other patch is still there after."""
    from dropblock_fx.graph.tracing import LeafTracer, traces_share_one_patch

    original = nn.Module.__dict__["__call__"]

    def foreign(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    nn.Module.__call__ = foreign
    try:
        with traces_share_one_patch():
            assert nn.Module.__dict__["__call__"] is foreign
            graph = LeafTracer().trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
        assert nn.Module.__dict__["__call__"] is foreign
    finally:
        nn.Module.__call__ = original
    assert [n.op for n in graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_a_specialised_trace_reads_a_parameter_once_and_its_sizes_as_constants():
    """A block traced for its recorded call (it asks ``isinstance`` about its skip) that reads
    its own parameter: one get_attr node for it (reading it through the trace's patched
    ``__getattr__`` used to record a node per level of a recursion, until it overflowed), and
    the parameter's sizes are constants, not ``size`` nodes: only the batch and spatial sizes
    of the inputs are symbolic."""
    from constructs import GainUp

    from dropblock_fx.graph.specialise import trace_specialised

    block = GainUp(16, 8, 8)
    bound = {"x": torch.empty(1, 16, 8, 8, device="meta"), "skip": torch.empty(1, 8, 16, 16, device="meta")}
    graphs, guard = trace_specialised(block, (), bound, symbolic=True)
    graph = graphs["any"]
    gets = [n for n in graph.nodes if n.op == "get_attr"]
    assert [n.target for n in gets] == ["gain"], [n.target for n in gets]
    (reshape,) = [n for n in graph.nodes if n.target == "reshape"]
    assert reshape.args == (gets[0], 1, 8, 1, 1)
    assert not [n for n in graph.nodes if n.target == "size"]
    assert guard == {"x": ("tensor", (16, None, None)), "skip": ("tensor", (8, None, None))}  # spatial sizes open
    block.eval()
    x, skip = torch.randn(2, 16, 6, 5), torch.randn(2, 8, 12, 10)
    assert torch.equal(torch.fx.GraphModule(block, graph)(x, skip), block(x, skip))



class _Augmented(nn.Module):
    """Augmented assignments on tensors, and one on a Python int."""

    def forward(self, x):
        y = x * 3
        y += x
        y -= 1
        y *= x
        y /= 2
        n = 1
        n += 1  # a plain int: stays Python arithmetic
        y **= n
        return y


class _NewTensors(torch.fx.Interpreter):
    """Runs a graph and collects the storages its call_function nodes return. The outputs are
    kept alive, so that the allocator cannot hand a freed storage's address to a later one."""

    def __init__(self, gm):
        super().__init__(gm)
        self.outputs = []

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor):
            self.outputs.append(out)
        return out

    @property
    def storages(self):
        return [t.untyped_storage().data_ptr() for t in self.outputs]


def test_augmented_assignments_stay_in_place_in_the_traced_forward():
    """FX's own proxy traces ``y += x`` as ``y = y + x`` (a new tensor); the library's traces,
    plain and specialised, keep each augmented assignment, so a rewritten forward writes where
    the original wrote, with the same values."""
    from torch import fx

    from dropblock_fx.graph.specialise import trace_specialised

    m = _Augmented()
    x = torch.randn(2, 3)
    plain_fx = fx.symbolic_trace(m)
    run = _NewTensors(plain_fx)
    run.run(x)
    assert len(set(run.storages)) == 6  # FX alone: every operator a new tensor
    special = trace_specialised(m, (), {"x": x})[0]
    for g in (trace_modes(m)["any"], special.get("any") or special["eval"]):
        gm = fx.GraphModule(m, g)
        for op in ("+=", "-=", "*=", "/=", "**="):
            assert op in gm.code, (op, gm.code)
        assert torch.equal(gm(x), m(x))
        run = _NewTensors(gm)
        run.run(x)
        assert len(set(run.storages)) == 1, gm.code  # ``x * 3``, then written into


def test_a_spliced_residual_block_adds_its_shortcut_in_place():
    """``out += shortcut`` stays in place after splicing: with its DropBlocks at rate 0 a
    training forward returns the very tensor its last norm wrote (with ``out + shortcut`` it
    was a new one), and outputs and gradients are those of the original block."""
    torch.manual_seed(0)
    block = Residual(4, 4)
    ref = copy.deepcopy(block)
    g, sites = sites_of(block, (4, 8, 8))
    insert_sites(g, sites)
    for s in sites:
        block.add_module(s.name, DropBlock2d(0.0, 3))
    splice_graph(block, graph_source({"any": g}))
    seen = {}
    block.bn2.register_forward_hook(lambda mod, args, out: seen.__setitem__("bn2", out))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = block.train()(x)
    assert out.untyped_storage().data_ptr() == seen["bn2"].untyped_storage().data_ptr()
    x2 = x.detach().clone().requires_grad_()
    expected = ref.train()(x2)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(block.parameters(), ref.parameters()))


def test_a_forward_with_string_annotations_splices_on_a_torch_that_imports_every_global(monkeypatch):
    """A forward annotated under ``from __future__ import annotations`` (this file's
    ``Residual``) puts strings such as ``"torch.Tensor"`` in the generated code's globals.
    torch 2.11's FX writes an import line for every global and fails on a string; the block
    then kept its forward and got no DropBlock. Here FX is given that older import writer: the
    spliced forward still runs its DropBlocks."""
    import torch.fx.graph_module as gm

    def import_every_global(globals_, importer):  # torch 2.11's _format_import_block
        return "\n".join(sorted({gm._format_import_statement(k, v, importer) for k, v in globals_.items()}))

    monkeypatch.setattr(gm, "_format_import_block", import_every_global)
    torch.manual_seed(0)
    block = Residual(4, 4)
    g, sites = sites_of(block, (4, 8, 8))
    assert "torch.Tensor" in g.python_code(root_module="self").globals.values()
    insert_sites(g, sites)
    ran = []
    for s in sites:
        block.add_module(s.name, DropBlock2d(0.1, 3))
        getattr(block, s.name).register_forward_hook(lambda mod, args, out, name=s.name: ran.append(name))
    splice_graph(block, graph_source({"any": g}))
    block.train()(torch.randn(2, 4, 8, 8))
    assert sorted(ran) == sorted(s.name for s in sites) and len(ran) >= 3
