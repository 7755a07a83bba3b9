"""Plan any real CNN: a module under two names, code that cannot be regenerated, several
inputs, valid padding, rectangular maps, flat models, norms nobody registered; the self-check
on a model in train mode; warnings and errors that name the real problem.

One small model per construct (tests/constructs.py says which library each reproduces),
then the real libraries where they are installed (they are not test dependencies)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dropblock_fx as dbx
from constructs import (Bottleneck, ChannelScale, FilterResponseNorm, FlatNet, NamedTupleNet, PSPNet, RectPoolNet,
                        TwoNamesUNet, TwoPathway, ValidPaddingNet, chain_net)
from dropblock_fx import SurgeryError
from dropblock_fx.graph.splice import original_class
from dropblock_fx.testing import CheckFailed, check_surgery

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:dropblock_fx. this model's recipe has a schedule"),
              pytest.mark.filterwarnings("ignore:dropblock_fx. input_size=.* is too small")]


def _x(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- one module, two names


def test_a_module_reachable_under_two_names_is_planned_once_under_its_first():
    """nnU-Net's decoder keeps the encoder: ``encoder.3`` is also ``decoder.encoder.3``; the
    two actions on it collided (``it already has an attribute 'dropblock_0'``)."""
    model = TwoNamesUNet().eval()
    p = check_surgery(model, _x(3, 128, 128))
    paths = [r.path for r in p.rows]
    assert paths and not [q for q in paths if q.startswith("decoder.encoder.")]
    assert any(q.startswith("encoder.3.") for q in paths) and len(set(paths)) == len(paths)
    dbx.apply_dropblock(model, input_size=(3, 128, 128))
    assert sorted(r.path for r in dbx.describe(model).rows) == sorted(paths)
    assert model.decoder.encoder[3][1].dropblock_conv1 is model.encoder[3][1].dropblock_conv1  # one module
    dbx.remove_dropblock(model)
    assert not [m for m in model.modules() if isinstance(m, dbx.DropBlockNd)]


# ---------------------------------------------------------------- code generation fails for one unit


def test_a_block_whose_code_cannot_be_regenerated_keeps_its_forward_and_the_rest_is_planned():
    """easyocr's CRAFT builds a namedtuple class inside forward: the generated code cannot
    import it. That block keeps its forward, with a note; the others are planned."""
    model = NamedTupleNet().eval()
    p = check_surgery(model, _x(3, 128, 128))
    assert p.rows and not [r.path for r in p.rows if r.path.startswith("extra.")]
    assert any(n.startswith("extra: not rewritten, it keeps its forward (its new forward could not be generated")
               for n in p.notes), p.notes


# ---------------------------------------------------------------- several inputs


def _clips(batch: int = 2) -> list[torch.Tensor]:
    return [_x(3, 4, 64, 64, batch=batch), _x(3, 16, 64, 64, batch=batch)]


def test_a_model_that_takes_a_list_of_clips_is_planned_on_both_pathways():
    model = TwoPathway().eval()
    with pytest.raises(SurgeryError, match="pass example_inputs="):
        dbx.plan(model, input_size=(3, 4, 64, 64))
    p = dbx.plan(model, example_inputs=(_clips(),))
    assert {r.path.split(".")[0] for r in p.rows} == {"slow", "fast"}
    assert p.recipe.input_size == [3, 4, 64, 64] and tuple(p.input_shape) == (1, 3, 4, 64, 64)
    assert all(len(r.resolution) == 3 for r in p.rows)  # DropBlock3d on the clips
    check_surgery(model, (_clips(),))  # the self-check takes the same forms
    dbx.apply_dropblock(model, example_inputs=(_clips(4),), verify="exact")  # any batch; exact runs them
    assert len(dbx.describe(model).rows) == len(p.rows)


def test_example_inputs_take_args_and_kwargs_and_must_hold_an_image():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = chain_net(nn.BatchNorm2d)

        def forward(self, x, *, scale: float):
            return self.net(x) * scale

    p = dbx.plan(Masked(), example_inputs=((_x(3, 64, 64),), {"scale": 2.0}))
    assert p.rows and p.recipe.input_size == [3, 64, 64]
    with pytest.raises(SurgeryError, match="no 4-D or 5-D tensor"):
        dbx.plan(Masked(), example_inputs=(torch.zeros(2, 10),))
    with pytest.raises(SurgeryError, match="input_size=.* and example_inputs .* disagree"):
        dbx.plan(Masked(), example_inputs=((_x(3, 64, 64),), {"scale": 2.0}), input_size=(3, 32, 32))


def test_cli_plan_takes_example_inputs(capsys):
    from dropblock_fx.cli import main

    assert main(["plan", "constructs:TwoPathway", "--example-inputs", "[(3, 4, 64, 64), (3, 16, 64, 64)]",
                 "--modules"]) == 0
    out = capsys.readouterr().out
    assert "slow." in out and "fast." in out


# ---------------------------------------------------------------- stages as downsampling steps


def test_valid_padding_keeps_the_stage_numbers_and_reports_the_real_stride():
    """facenet-pytorch's InceptionResnetV1 at 160 px: maps of 79, 39, 19, 9 and 4 px. By
    round(log2(160 / map)) they were stages 0, 1, 2, 3, 5, and `paper-resnet50` (stages 3, 4)
    was refused; each strided layer is one step, whatever its padding."""
    model = ValidPaddingNet().eval()
    p = dbx.plan(model, "paper-resnet50", input_size=(3, 160, 160))
    assert [(s.index, s.resolution) for s in p.stages] == [(0, (79, 79)), (1, (39, 39)), (2, (19, 19)),
                                                            (3, (9, 9)), (4, (4, 4))]
    assert [s.rule for s in p.stages[2:]] == ["stride 8 (real 8.4)", "stride 16 (real 17.8)", "stride 32 (real 40)"]
    assert {r.stage for r in p.rows} == {3, 4}
    check_surgery(model, _x(3, 160, 160), "paper-resnet50")


def test_pooling_one_axis_is_a_step_and_the_real_stride_per_axis_is_reported():
    """python-doctr's ResNet31 halves only the height in its later pools: each is a step."""
    model = RectPoolNet().eval()
    p = dbx.plan(model, input_size=(3, 32, 256))
    assert [(s.index, s.resolution, s.real_stride) for s in p.stages] == [
        (0, (16, 128), (2.0, 2.0)), (1, (8, 64), (4.0, 4.0)), (2, (4, 64), (8.0, 4.0)), (3, (2, 64), (16.0, 4.0))]
    assert p.stages[-1].rule == "stride 16 (real 16x4)"
    assert {r.stage for r in p.rows} == {2, 3}  # the last pools' blocks, not the early layers
    check_surgery(model, _x(3, 32, 256))


# ---------------------------------------------------------------- the root is a unit


def test_a_flat_model_gets_sites_in_its_own_forward_and_keeps_its_class():
    """facenet-pytorch's ONet calls its convs in its own forward and has no norm: 0 sites."""
    model = FlatNet().eval()
    p = check_surgery(model, _x(3, 128, 128))
    assert [r.path for r in p.rows] == ["dropblock_conv4", "dropblock_conv5"]
    assert all(r.anchor.startswith("after conv") and "> act" in r.anchor for r in p.rows)
    dbx.apply_dropblock(model, input_size=(3, 128, 128))
    assert isinstance(model, FlatNet) and type(model).__name__ == "FlatNet" and original_class(model) is FlatNet
    traced = torch.fx.symbolic_trace(model)  # the rewritten forward traces again, DropBlock included
    assert sum(n.op == "call_module" and "dropblock" in str(n.target) for n in traced.graph.nodes) == 2
    dbx.remove_dropblock(model)
    assert type(model) is FlatNet



# ---------------------------------------------------------------- pyramid pooling


@pytest.mark.parametrize("depth, adaptive", [(3, True), (5, True), (3, False)])
def test_a_pyramid_pooling_branch_is_no_stage_and_holds_no_site(depth, adaptive):
    """PSPNet's and UPerNet's pooled bins (adaptive pools to 1, 2, 3, 6) and AHNet's strided
    max pools of 8 and 16, each followed by 1x1 convs and upsampled back: their maps are not
    deeper stages (the last two stages stay the encoder's) and hold no DropBlock."""
    model = PSPNet(depth, adaptive).eval()
    p = check_surgery(model, _x(3, 128, 128))
    assert [s.index for s in p.stages] == list(range(depth))
    assert sorted({r.stage for r in p.rows}) == [depth - 2, depth - 1]
    assert not [r.path for r in p.rows if r.path.startswith("psp.blocks")]
    assert all(r.resolution == p.stages[r.stage].resolution for r in p.rows if r.path.startswith("psp"))


# ---------------------------------------------------------------- unknown norms


def test_a_norm_nobody_registered_is_recognised_by_what_it_does():
    """kornia's FilterResponseNorm2d: 0 sites, silently."""
    model = chain_net(FilterResponseNorm).eval()
    p = check_surgery(model, _x(3, 128, 128))
    assert p.rows and all(r.anchor.startswith("after ") and "> " in r.anchor for r in p.rows)
    assert any("FilterResponseNorm is taken for a norm" in n for n in p.notes), p.notes


def test_nothing_inserted_names_the_layer_to_register():
    model = nn.Sequential(nn.BatchNorm2d(3), *chain_net(ChannelScale)).eval()  # a norm: not a norm-free net
    with pytest.warns(UserWarning, match=r"nothing inserted .*ChannelScale.*register_norm\(ChannelScale\)"):
        dbx.apply_dropblock(model, input_size=(3, 128, 128), sites=["conv"])
    dbx.register_norm(ChannelScale)
    try:
        assert dbx.plan(model, input_size=(3, 128, 128), sites=["conv"]).rows
    finally:
        from dropblock_fx.graph.leaves import _NORMS

        _NORMS.pop(ChannelScale)


def test_specialised_traces_answer_dtype_and_device():
    """kornia's HyNet asks ``x.dtype in (torch.float16, torch.bfloat16)``: answered, and the
    guard keys on it (a bfloat16 call is traced again for itself)."""

    class DtypeBlock(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.body = Bottleneck(c)

        def forward(self, x):
            y = self.body(x)
            if x.dtype in (torch.float16, torch.bfloat16) or x.device.type == "cuda":
                y = y.float()
            return y

    model = nn.Sequential(chain_net(nn.BatchNorm2d), DtypeBlock(16)).eval()
    p = dbx.plan(model, input_size=(3, 128, 128), stages=[4])
    assert any("(x=Nx16x*x* float32 cpu tensor)" in n for n in p.notes), p.notes
    assert any(r.path.startswith("1.") for r in p.rows)
    check_surgery(model, _x(3, 128, 128), stages=[4])


# ---------------------------------------------------------------- the self-check


def test_check_surgery_on_a_model_in_train_mode_checks_eval_in_eval_and_restores_the_mode():
    """timm and torchvision factories return models in train mode: 'eval outputs differ'."""
    from small_models import SmallCNN

    model = SmallCNN().train()
    modes = [m.training for m in model.modules()]
    check_surgery(model, _x(3, 64, 64), input_size=(3, 64, 64))
    assert [m.training for m in model.modules()] == modes


def test_a_failed_check_leaves_the_model_as_it_came(monkeypatch):
    import dropblock_fx.testing as testing
    from small_models import SmallCNN

    model = SmallCNN().train()
    before = copy.deepcopy(model.state_dict())
    tree = repr(model)

    def broken(*args, **kwargs):
        raise AssertionError("injected")

    monkeypatch.setattr(testing, "_check_rows_ran", broken)
    with pytest.raises(CheckFailed, match=r"\[rows run\] AssertionError: injected"):
        check_surgery(model, _x(3, 64, 64))
    assert repr(model) == tree and not hasattr(model, "dropblock_plan") and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



def test_check_surgery_fails_a_rewrite_that_asks_for_more_memory(monkeypatch):
    """With FX's own proxy (``x += shortcut`` traced as ``x + shortcut``) every rewritten
    residual block allocates one feature map more per training step: the check fails at
    "memory", naming the excess, and leaves the model as it came; with the library's tracer
    the same model passes."""
    from torch import fx

    from dropblock_fx.graph.tracing import LeafTracer
    from small_models import SmallCNN

    model = SmallCNN().train()
    before, tree = copy.deepcopy(model.state_dict()), repr(model)
    check_surgery(model, _x(3, 64, 64))
    monkeypatch.setattr(LeafTracer, "proxy", fx.Tracer.proxy)
    with pytest.raises(CheckFailed, match=r"^\[memory\] AssertionError: a training step at rate 0 asks for \d+ bytes more"):
        check_surgery(model, _x(3, 64, 64))
    assert repr(model) == tree and not hasattr(model, "dropblock_plan") and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_check_surgery_on_a_model_with_no_site():
    """kornia's TFeat: an input norm, then convs with no norm after them, so no conv site:
    apply_dropblock inserts nothing and keeps no plan. The check fails at "sites" with the
    plan's notes, or, with require_sites=False, passes and returns the empty plan, the model
    left as it came."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.InstanceNorm2d(1), nn.Conv2d(1, 8, 7), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 6),
                          nn.Tanh()).eval()
    before, tree = copy.deepcopy(model.state_dict()), repr(model)
    with pytest.warns(UserWarning, match="nothing inserted"):
        with pytest.raises(CheckFailed, match=r"^\[sites\] AssertionError: no DropBlock site .*no sites of kinds"):
            check_surgery(model, _x(1, 32, 32))
    with pytest.warns(UserWarning, match="nothing inserted"):
        p = check_surgery(model, _x(1, 32, 32), require_sites=False)
    assert not p.rows and any("no sites of kinds" in n for n in p.notes), p.notes
    assert repr(model) == tree and not hasattr(model, "dropblock_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- warnings and errors


def test_a_plan_too_small_for_its_stages_warns_in_one_line_naming_input_size():
    import torchvision

    model = torchvision.models.resnet18()
    with pytest.warns(UserWarning) as record:
        dbx.apply_dropblock(model, input_size=(3, 16, 16))
    texts = [str(w.message) for w in record if "too small" in str(w.message)]
    assert len(texts) == 1 and "\n" not in texts[0] and "input_size=(3, 16, 16)" in texts[0]
    assert "deepest stages merged" in texts[0] and "smaller than their blocks" in texts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the size the recipe is for: nothing to say
        dbx.apply_dropblock(torchvision.models.resnet18(), schedule=None)


def test_errors_name_the_real_problem():
    import torchvision

    with pytest.raises(SurgeryError, match="TorchScript module .* apply DropBlock to the Python model before"):
        dbx.plan(torch.jit.script(torchvision.models.resnet18().eval()))
    with pytest.raises(SurgeryError, match=r"has no Conv2d or Conv3d layer"):
        dbx.plan(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2)))
    with pytest.raises(SurgeryError, match=r"^ResNet: input_size \(1, 224, 224\) has 1 channel\(s\), but the first "
                                           r"conv \(conv1\) takes 3: pass input_size=\(3, 224, 224\)$"):
        dbx.plan(torchvision.models.resnet18(), input_size=(1, 224, 224))


# ---------------------------------------------------------------- the real libraries (not test dependencies)


def test_facenet_inception_resnet_v1_gets_the_paper_groups():
    facenet = pytest.importorskip("facenet_pytorch")
    model = facenet.InceptionResnetV1(pretrained=None).eval()
    p = dbx.plan(model, "paper-resnet50", input_size=(3, 160, 160))
    assert [s.index for s in p.stages] == [0, 1, 2, 3, 4] and {r.stage for r in p.rows} == {3, 4}


def test_facenet_onet_a_flat_model_gets_sites():
    facenet = pytest.importorskip("facenet_pytorch")
    check_surgery(facenet.ONet(pretrained=False).eval(), _x(3, 48, 48))


def test_doctr_resnet31_counts_its_height_only_pools():
    doctr = pytest.importorskip("doctr.models")
    p = dbx.plan(doctr.resnet31(pretrained=False).eval(), input_size=(3, 32, 128))
    assert p.stages[-1].real_stride[0] > p.stages[-1].real_stride[1]
    assert {r.stage for r in p.rows} == {s.index for s in p.stages[-2:]}


def test_kornia_hynet_filter_response_norm():
    kornia = pytest.importorskip("kornia.feature")
    check_surgery(kornia.HyNet(pretrained=False).eval(), _x(1, 32, 32))


def test_nnunet_plain_conv_unet_encoder_under_two_names():
    arch = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    model = arch.PlainConvUNet(1, 5, (16, 32, 64, 128, 128), nn.Conv2d, 3, (1, 2, 2, 2, 2), (2, 2, 2, 2, 2), 2,
                               (2, 2, 2, 2), False, nn.BatchNorm2d, None, None, None, nn.LeakyReLU).eval()
    p = check_surgery(model, _x(1, 64, 64))
    assert p.rows and not [r.path for r in p.rows if r.path.startswith("decoder.encoder.")]
