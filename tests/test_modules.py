"""DropBlock2d / DropBlock3d: attributes, state, FX tracing, torch.compile."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.fx
from torch import nn

import dropblock_fx as dbx


class Net(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = dbx.DropBlock2d(**({"drop_prob": 0.3, "block_size": 3} | kw))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def test_options_are_attributes_and_repr_shows_them():
    m = dbx.DropBlock2d(0.2, 5, mask="shared", seed_region="full", gamma_scale=0.25, scale="none",
                        noise=True, calibrate=True, inplace=False)
    for name, value in dict(drop_prob=0.2, block_size=5, mask="shared", seed_region="full", gamma_scale=0.25,
                            scale="none", noise=True, calibrate=True, inplace=False).items():
        assert getattr(m, name) == value
    r = repr(m)
    for s in ("drop_prob=0.2", "block_size=5", "mask='shared'", "seed_region='full'", "gamma_scale=0.25",
              "scale='none'", "noise=True", "calibrate=True"):
        assert s in r
    assert repr(dbx.DropBlock3d()) == "DropBlock3d(drop_prob=0.1, block_size=7)"


def test_state_dict_is_empty_and_rate_survives_dtype_casts():
    m = dbx.DropBlock2d(0.1, 7)
    assert m.state_dict() == {}
    net = Net()
    keys = set(net.state_dict())
    assert not any("drop" in k for k in keys)
    m.to(torch.bfloat16)
    assert m.drop_prob_tensor.dtype == torch.float32 and m.drop_prob_tensor.item() == pytest.approx(0.1, abs=1e-8)
    m.half()
    m.drop_prob = 0.3
    assert m.drop_prob_tensor.item() == pytest.approx(0.3, abs=1e-7)
    with pytest.raises(ValueError, match="drop_prob"):
        m.drop_prob = 2.0


def test_training_flag_controls_dropping():
    m = dbx.DropBlock2d(0.5, 3)
    x = torch.ones(2, 4, 10, 10)
    assert (m(x) == 0).any()
    assert m.eval()(x) is x


def test_deepcopy_and_pickle():
    net = Net()
    net2 = copy.deepcopy(net)
    assert net2.drop.drop_prob == 0.3
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    net3 = torch.load(buf, weights_only=False)
    net3.drop.drop_prob = 0.4
    assert net3.drop.drop_prob_tensor.item() == pytest.approx(0.4)
    assert net.drop.drop_prob == 0.3


def test_3d_module_drops_cuboids():
    torch.manual_seed(0)
    y = dbx.DropBlock3d(0.3, 3)(torch.ones(2, 4, 6, 8, 8))
    assert (y == 0).any() and y.shape == (2, 4, 6, 8, 8)


def test_unscheduled_warning_once():
    from dropblock_fx.modules import Placement
    from dropblock_fx.surgery.watch import ModelWatch

    m = dbx.DropBlock2d(0.1, 3)
    m.placement = Placement(4, "conv", 0.1, recipe_schedule=dbx.ScheduleSpec(), watch=ModelWatch((3, 8, 8)))
    assert m.schedule_pending
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m(torch.ones(1, 2, 8, 8))
        m(torch.ones(1, 2, 8, 8))
    msgs = [str(x.message) for x in w if "attach_schedule" in str(x.message)]
    assert len(msgs) == 1


# ----------------------------------------------------------------- FX


def _assert_trace_obeys_mode(gm: nn.Module, out_key=None) -> None:
    x = torch.ones(4, 3, 16, 16)

    def run():
        out = gm(x)
        return out if out_key is None else out[out_key]

    gm.eval()
    a, b = run(), run()
    assert torch.equal(a, b)
    gm.train()
    torch.manual_seed(0)
    c = run()
    torch.manual_seed(1)
    d = run()
    assert not torch.equal(c, d)


def test_symbolic_trace_keeps_a_leaf_that_obeys_train_and_eval():
    net = Net()
    gm = torch.fx.symbolic_trace(net)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "drop" in targets
    _assert_trace_obeys_mode(gm)
    # The traced graph computes exactly what the module does.
    net.eval()
    gm.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(net(x), gm(x))


def test_symbolic_trace_in_train_mode_works():
    net = Net().train()
    gm = torch.fx.symbolic_trace(net)
    _assert_trace_obeys_mode(gm)


def test_torchvision_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    net = Net()
    train_nodes, eval_nodes = get_graph_node_names(net)
    assert "drop" in train_nodes and "drop" in eval_nodes
    fe = create_feature_extractor(net, return_nodes={"drop": "feat"})
    _assert_trace_obeys_mode(fe, "feat")


def test_timm_feature_extractor_and_leaf_registration():
    from timm.layers import get_notrace_modules
    from timm.models._features_fx import create_feature_extractor

    net = Net()  # building a module registers the classes once timm is loaded
    assert dbx.DropBlock2d in get_notrace_modules() and dbx.DropBlock3d in get_notrace_modules()
    fe = create_feature_extractor(net, return_nodes={"drop": "feat"})
    _assert_trace_obeys_mode(fe, "feat")


# ----------------------------------------------------------------- torch.compile


def test_compile_fullgraph_ten_rates_one_graph():
    """The real inductor test: ten rates on one compiled graph (forward and backward), the rate
    read at run time by the generated code."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), dbx.DropBlock2d(0.0, 3))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    x = torch.ones(8, 3, 16, 16)
    dropped = []
    for p in [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]:
        net[1].drop_prob = p
        out = compiled(x)
        out.sum().backward()
        assert torch.isfinite(out).all()
        dropped.append((out == 0).float().mean().item())
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert dropped[0] == 0.0 and 0.05 < dropped[3] < dropped[-1] and dropped[-1] > 0.4, dropped


def test_compiled_noise_fills_the_dropped_units_only():
    """Under inductor on the CPU the mask op returns a uint8 mask, which the noise fill turns
    back into a bool one: kept units are the input (``scale="none"``), and the dropped ones, about
    the drawn fraction of them, hold N(0, 1) samples (mean within 5 standard errors of 0, variance
    within 5 of 1: the sample variance of n normals has standard error sqrt(2 / n))."""
    torch._dynamo.reset()
    m = dbx.DropBlock2d(0.2, 3, noise=True, scale="none").train()
    cm = torch.compile(m, fullgraph=True)
    torch.manual_seed(0)
    out = cm(torch.ones(8, 16, 12, 12))
    noise = out[out != 1]
    n = noise.numel()
    assert 0.1 < n / out.numel() < 0.3, n / out.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.var().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("opts", [dict(calibrate=True, scale="expected"), dict(mask="shared", seed_region="full"),
                                  dict(noise=True, scale="none")])
def test_compile_fullgraph_options(opts):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = dbx.DropBlock2d(0.1, 5, **opts)
    counter = CompileCounter()  # counts graphs; inductor itself: test_compile_fullgraph_ten_rates_one_graph
    cm = torch.compile(m, backend=counter, fullgraph=True)
    x = torch.ones(32, 8, 14, 14, requires_grad=True)
    for p in (0.1, 0.2, 0.3):
        m.drop_prob = p
        y = cm(x)
        y.sum().backward()
    assert counter.frame_count == 1
    if opts.get("calibrate"):
        m.drop_prob = 0.3
        frac = (cm(torch.ones(256, 16, 14, 14)) == 0).float().mean().item()
        assert abs(frac - 0.3) < 0.03  # calibrated: the real rate is the requested one


def test_compiled_cpu_sites_are_one_opaque_op_each_and_a_dynamic_batch_is_one_graph():
    """On the CPU each site traces to one ``dropblock_fx.sampled_keep_mask_v3`` call (no random
    or sliding-max ops for the compiler to generate), whatever the batch size."""
    from torch._dynamo.utils import counters

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 1), dbx.DropBlock2d(0.2, 3), nn.ReLU(), dbx.DropBlock2d(0.1, 5, mask="shared"))
    compiled = torch.compile(net, backend=capture, fullgraph=True, dynamic=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 3, 12, 12, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        assert y.shape == (n, 8, 12, 12) and (y == 0).any()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 batch sizes"
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("sampled_keep_mask_v3" in t for t in targets) == 2, targets
    assert not any(name in t for t in targets for name in ("rand", "uniform", "unfold", "max_pool")), targets
    # AOT autograd traces the op's fake with a symbolic batch: still one graph (with
    # dynamic=True the float option is specialised there: a restart, not a second graph)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (2, 3, 5):
        compiled(torch.randn(n, 3, 12, 12, requires_grad=True)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_cpu_masks_follow_the_paper():
    """Under inductor: two sites of one shape draw different masks (the op is seeded random:
    never merged, never recomputed in backward), the dropped fraction is the exact expected
    one (a z-test over the maps), the count normaliser is exact and the gradient uses the
    forward's mask."""
    import math

    from dropblock_fx.op.gamma import expected_drop_rate, paper_gamma

    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = dbx.DropBlock2d(0.2, 3), dbx.DropBlock2d(0.2, 3)
    compiled = torch.compile(lambda t: (a(t), b(t)), fullgraph=True)
    x = (torch.rand(64, 16, 11, 11) + 0.5).requires_grad_(True)
    ya, yb = compiled(x)
    (ya.sum() + 2 * yb.sum()).backward()
    keep_a, keep_b = ya != 0, yb != 0
    assert not torch.equal(keep_a, keep_b)
    for y, keep in ((ya, keep_a), (yb, keep_b)):
        scale = torch.tensor(float(keep.numel()), dtype=torch.float32) / keep.sum().float()
        assert torch.equal(y, x.detach() * keep * scale)
    scale_a = keep_a.numel() / keep_a.sum().item()
    scale_b = keep_b.numel() / keep_b.sum().item()
    torch.testing.assert_close(x.grad, keep_a * scale_a + 2 * keep_b * scale_b)
    dropped = (~keep_a).flatten(2).float().mean(-1).flatten()  # per map, iid across the 1024 maps
    expected = expected_drop_rate(paper_gamma(0.2, (11, 11), (3, 3)), (11, 11), (3, 3))
    se = math.sqrt(dropped.var().item() / dropped.numel())
    assert abs(dropped.mean().item() - expected) <= 5 * se
