"""The stage rule (graph/stages.py) on every family: nominal strides for dilated backbones,
sites of a block in the stage of the block's output, U-Net decoders, heads after a dilated
backbone. Expected stages are measured independently, with forward hooks on real models."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

import dropblock_fx as dbx
from constructs import IsinstanceUNet, cbr
from dropblock_fx.graph.shapes import record_calls
from dropblock_fx.graph.stages import map_stages

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rows(p: dbx.Plan, strip: str = "") -> list[tuple[int, str, str]]:
    return [(r.stage, r.path[len(strip):] if r.path.startswith(strip) else r.path, r.kind) for r in p.rows]


def _stages(p: dbx.Plan) -> list[tuple[int, str, int]]:
    return [(s.index, s.name, s.stride) for s in p.stages]


def _output_strides(model: nn.Module, pattern: str, size: int = 224) -> dict[str, int]:
    """Real output stride of every module whose path matches ``pattern`` (hooks, one forward)."""
    found: dict[str, int] = {}
    hooks = []
    for path, m in model.named_modules():
        if re.fullmatch(pattern, path):
            def hook(mod, args, out, path=path):
                found[path] = size // out.shape[-1]
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return found


def _stage(stride: int) -> int:
    return max(0, int(math.log2(stride)) - 1)


# --- dilated backbones: the plain ResNet's stages and sites ---------------------------------

def _paper_rows(model: nn.Module, **kw) -> dbx.Plan:
    return dbx.plan(model, "paper-resnet50", **kw)


def test_dilated_torchvision_resnets_have_the_plain_stages_and_sites():
    plain = _paper_rows(torchvision.models.resnet50())
    assert len(plain.rows) == 36 and {r.stage for r in plain.rows} == {3, 4}
    for dilate, res, dil in (([False, True, True], (28, 28), [1, 1, 1, 2, 4]),
                             ([False, False, True], (14, 14), [1, 1, 1, 1, 2])):
        p = _paper_rows(torchvision.models.resnet50(replace_stride_with_dilation=dilate))
        assert _rows(p) == _rows(plain)
        assert _stages(p) == _stages(plain)
        assert p.stages[4].resolution == res  # runs at its real size; stride 32 is nominal
        assert [s.dilation for s in p.stages] == dil


@pytest.mark.parametrize("output_stride", [8, 16])
def test_timm_output_stride_resnets_have_the_plain_stages_and_sites(output_stride):
    plain = _paper_rows(timm.create_model("resnet50"))
    p = _paper_rows(timm.create_model("resnet50", output_stride=output_stride))
    assert _rows(p) == _rows(plain)
    assert _stages(p) == _stages(plain)  # names from feature_info too (it reports real strides)
    real = _output_strides(timm.create_model("resnet50", output_stride=output_stride), r"layer4")["layer4"]
    assert real == output_stride and p.stages[-1].dilation == 32 // output_stride


def test_deeplab_backbone_gets_the_36_paper_sites_of_the_plain_resnet():
    plain = _paper_rows(torchvision.models.resnet50())
    model = deeplabv3_resnet50(weights=None, weights_backbone=None)
    p = _paper_rows(model, target="backbone")
    assert _rows(p, "backbone.") == _rows(plain)
    assert [(s.index, s.stride) for s in p.stages] == [(s.index, s.stride) for s in plain.stages]


def test_heads_after_a_dilated_backbone_keep_the_stage_of_what_feeds_them():
    """DeepLab's ASPP head reads layer4 (nominal stride 32) and the aux head layer3 (16): each
    keeps its input's stage, though all run at stride 8; ASPP's rates (12, 24, 36) are no
    replaced stride."""
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True, num_classes=3)
    p = dbx.plan(model, stages=[2, 3, 4])
    by_head = {h: {r.stage for r in p.rows if r.path.startswith(h + ".")} for h in ("classifier", "aux_classifier")}
    assert by_head == {"classifier": {4}, "aux_classifier": {3}}
    assert {r.stage for r in p.rows if r.path.startswith("backbone.layer2.")} == {2}
    assert [s.stride for s in p.stages] == [2, 4, 8, 16, 32]


def test_parallel_dilated_branches_are_not_a_replaced_stride():
    """Selective-kernel blocks use a dilation-2 branch beside a plain one at every stage."""
    model = timm.create_model("skresnet18")
    assert any(isinstance(m, nn.Conv2d) and m.dilation[0] == 2 for m in model.modules())
    p = dbx.plan(model)
    assert [(s.index, s.stride, s.dilation) for s in p.stages] == [(i, 2 ** (i + 1), 1) for i in range(5)]
    assert {r.path.split(".")[0] for r in p.rows if r.stage == 3} == {"layer3"}


# --- a block and every site in it: the stage of the block's output --------------------------

FAMILIES = {
    "tv-resnet50": (lambda: torchvision.models.resnet50(), r"layer\d\.\d+"),
    "timm-efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), r"blocks\.\d\.\d+"),
    "timm-mobilenetv3": (lambda: timm.create_model("mobilenetv3_large_100"), r"blocks\.\d\.\d+"),
    "tv-mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), r"features\.\d+"),
    "tv-regnet": (lambda: torchvision.models.regnet_y_400mf(), r"trunk_output\.block\d\.block\d-\d+"),
    "tv-convnext": (lambda: torchvision.models.convnext_tiny(), r"features\.\d\.\d+"),
    "timm-hrnet": (lambda: timm.create_model("hrnet_w18_small"), r"stage\d\.\d\.branches\.\d\.\d+"),
    "tv-densenet121": (lambda: torchvision.models.densenet121(), r"features\.denseblock\d"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_site_of_a_block_is_in_the_stage_of_the_block_output(family):
    build, pattern = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    strides = _output_strides(build(), pattern)
    p = dbx.plan(model, stages=[2, 3, 4])
    checked = 0
    for r in p.rows:
        # a site put in an enclosing module's graph is named after its path there:
        # HRNet's stage2.0.dropblock_branches_1_0_conv_last is in block stage2.0.branches.1.0
        path = re.sub(r"dropblock_(branches)_(\d+)_(\d+)_", r"\1.\2.\3.", r.path)
        owner = max((b for b in strides if path.startswith(b + ".")), key=len, default=None)
        if owner is None:
            continue
        assert r.stage == _stage(strides[owner]), (r.path, owner, strides[owner])
        checked += 1
    assert checked >= 10


def test_a_strided_inverted_residual_is_one_stage():
    """EfficientNet's first block of the stride-16 group: its expand conv runs at 28x28 and
    still is stage 3 (as ResNet's layer3.0.conv1); the first block of the stride-32 group is
    all stage 4."""
    p = dbx.plan(timm.create_model("efficientnet_b0"), stages=[3, 4])
    rows = {r.path: r for r in p.rows}
    assert rows["blocks.3.0.dropblock_conv_pw"].stage == 3 and rows["blocks.3.0.dropblock_conv_pw"].resolution == (28, 28)
    assert {rows[k].stage for k in rows if k.startswith("blocks.5.0.")} == {4}
    assert {st for st in (s.index for s in p.stages)} == {0, 1, 2, 3, 4}
    assert p.stages[3].span == "blocks.3..blocks.4" and p.stages[4].span == "blocks.5..bn2"


class PaddedInvertedResidual(nn.Module):
    """efficientnet_pytorch's block with an image size: a ``ZeroPad2d`` module (TF "same"
    padding) before the strided depthwise conv, so a padded map (larger than its input)
    runs inside the block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cin * 4
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.pad = nn.ZeroPad2d(2)  # 8x8 -> 12x12: by its size alone, a map of stride 10.7
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 5, stride, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.project(self.dw(self.pad(self.expand(x))))


def test_a_padding_module_inside_a_block_keeps_the_stage_of_its_input():
    """A padded map is its input's map, made larger: it is no shallower stage. So the strided
    block stays one block in the stage of its output, its expand conv (at the previous
    resolution) included, and the padding layer is named in no other stage."""
    layers = [nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()]
    c = 8
    for _ in range(4):
        layers += [PaddedInvertedResidual(c, c * 2, 2), PaddedInvertedResidual(c * 2, c * 2, 1)]
        c *= 2
    net = nn.Sequential(*layers)
    p = dbx.plan(net, input_size=(3, 128, 128), stages=[3, 4])
    rows = {r.path: r for r in p.rows}
    first4 = "9"  # the strided block of the stride-32 group
    assert rows[f"{first4}.expand.dropblock_0"].stage == 4, rows.keys()
    assert rows[f"{first4}.expand.dropblock_0"].resolution == (8, 8)
    assert not any("pad" in s.name for s in p.stages), [s.name for s in p.stages]
    assert [s.resolution for s in p.stages] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]


def test_densenet_transition_belongs_to_the_stage_it_opens():
    p = dbx.plan(torchvision.models.densenet121(), stages=[3])
    assert p.stages[3].span == "features.transition2..features.denseblock3"


# --- U-Net decoders that go back up ---------------------------------------------------------

class ConvThenUp(nn.Module):
    """A decoder block that convolves at the deep resolution, then upsamples."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = cbr(cin, cout)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2.0)


class ConvFirstUNet(nn.Module):
    """IsinstanceUNet's encoder with ConvThenUp decoder blocks (skips concatenated after them)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([cbr(3, 8, 2), cbr(8, 16, 2), cbr(16, 32, 2), cbr(32, 64, 2)])
        self.dec = nn.ModuleList([ConvThenUp(64, 32), ConvThenUp(32 + 32, 16), ConvThenUp(16 + 16, 8)])
        self.head = nn.Conv2d(8 + 8, 2, 1)

    def forward(self, x):
        feats = []
        for e in self.enc:
            x = e(x)
            feats.append(x)
        for d, skip in zip(self.dec, reversed(feats[:-1])):
            x = torch.cat([d(x), skip], 1)
        return self.head(x)


def test_unet_decoder_blocks_take_the_stage_of_their_output():
    """IsinstanceUNet's decoder blocks upsample, concatenate the skip, then convolve (smp's)."""
    p = dbx.plan(IsinstanceUNet(), stages=[0, 1, 2, 3], input_size=(3, 64, 64))
    dec = {r.path.split(".")[1]: r.stage for r in p.rows if r.path.startswith("dec.")}
    assert dec == {"0": 2, "1": 1, "2": 0}  # strides 8, 4, 2
    enc = {r.path: r.stage for r in p.rows if r.path.startswith("enc.")}
    assert enc["enc.3.dropblock_0"] == 3
    assert " + " in p.stages[2].span  # encoder and decoder at stride 8, apart in call order


def test_a_decoder_block_that_convolves_before_upsampling_keeps_its_convs_stage():
    p = dbx.plan(ConvFirstUNet(), stages=[0, 1, 2, 3], input_size=(3, 64, 64))
    dec = {r.path: r.stage for r in p.rows if r.path.startswith("dec.")}
    assert dec and all(dec[k] == {"0": 3, "1": 2, "2": 1}[k.split(".")[1]] for k in dec), dec


def test_stage_modules_are_true():
    """Every module a stage lists has all its feature maps in that stage."""
    model = timm.create_model("efficientnet_b0")
    record = record_calls(model, (3, 224, 224))
    sm = map_stages(model, record)
    position = {id(c): i for i, c in enumerate(record.calls)}
    for s in sm.stages:
        for path in (m for m in s.modules if not m.startswith("|")):
            calls = record.by_module[id(model.get_submodule(path))]
            inner = {sm.by_call[j] for c in calls for j in range(position[id(c)], len(record.calls))
                     if j in sm.by_call and record.calls[j].start < c.end}
            assert inner == {s.index}, (path, inner)


def test_dilated_plan_applies_and_keeps_eval_outputs():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dbx.apply_dropblock(model, "paper-resnet50", input_size=(3, 96, 96))
    assert len(dbx.describe(model).rows) == 36
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# --- models that cannot be planned whole ----------------------------------------------------

class TwoInputs(nn.Module):
    """A forward that needs more than the image: the shape pass cannot run it."""

    def __init__(self):
        super().__init__()
        self.encoder = torchvision.models.resnet18()
        self.head = nn.Linear(1000, 2)

    def forward(self, x, y):
        return self.head(self.encoder(x)) + y


def test_a_model_that_cannot_run_on_an_image_is_refused_in_one_line_naming_the_target():
    model = TwoInputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dbx.SurgeryError) as err:
        dbx.apply_dropblock(model)
    text = str(err.value)
    assert "\n" not in text and len(text) < 400
    assert "target='encoder'" in text and "missing 1 required positional argument" in text
    assert "example_inputs=" in text
    assert text.count("missing 1 required") == 1  # the three passes' one error, said once
    assert not hasattr(model, "dropblock_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dbx.apply_dropblock(model, target="encoder")  # the named fix works
    assert len(dbx.describe(model).rows) > 0


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_efficientnet_has_the_plain_stages_and_sites(output_stride):
    plain = dbx.plan(timm.create_model("efficientnet_b0"))
    p = dbx.plan(timm.create_model("efficientnet_b0", output_stride=output_stride))
    assert _rows(p) == _rows(plain)
    assert [(s.index, s.stride, s.span) for s in p.stages] == [(s.index, s.stride, s.span) for s in plain.stages]
    assert p.stages[-1].dilation == 32 // output_stride


def test_a_map_collapsed_to_1x1_is_still_its_stage_and_se_vectors_are_not_maps():
    """At a 32 px input ResNet's layer4 runs at 1x1: it is stage 4 (stride 32), not a missing
    stage; squeeze-excitation vectors (1x1 too) never make a stage, at any input size."""
    for build in (torchvision.models.resnet18, lambda: timm.create_model("seresnet18")):
        p = dbx.plan(build(), input_size=(3, 32, 32))
        assert [(s.index, s.resolution) for s in p.stages] == [(0, (16, 16)), (1, (8, 8)), (2, (4, 4)),
                                                                (3, (2, 2)), (4, (1, 1))]
        assert p.stages[4].span.startswith("layer4") and "pool" not in p.stages[4].span
        assert {r.stage for r in p.rows} == {3}  # the default stages, 3 and 4; no site on 1x1 maps
    p = dbx.plan(timm.create_model("seresnet18"))
    assert [s.index for s in p.stages] == [0, 1, 2, 3, 4]


def test_a_head_conv_whose_kernel_covers_the_map_makes_no_stage():
    """timm's VGG ends in a 7x7 ConvMlp that maps a 7x7 map to 1x1 with stride 1: a head,
    not a stride, so VGG keeps its four conv stages at any input size."""
    for size in (64, 224):
        p = dbx.plan(timm.create_model("vgg11"), input_size=(3, size, size))
        assert [s.index for s in p.stages] == [0, 1, 2, 3]
        assert {r.stage for r in p.rows} == {2, 3}


def test_ssd_is_planned_on_its_base_network_not_its_extra_layers():
    """SSD's extra layers shrink the map to 1x1; the paper's groups are the base network's.
    The plan does not depend on the input size or the weights."""
    plans = []
    for seed, size in ((0, 64), (1, 320)):
        torch.manual_seed(seed)
        model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        plans.append(dbx.plan(model, input_size=(3, size, size)))
    assert all(p.target == "backbone.features" for p in plans)
    assert _rows(plans[0]) == _rows(plans[1]) and {r.stage for r in plans[0].rows} == {3, 4}
    assert "backbone.features" in plans[0].notes[0]


def test_a_bare_sequential_target_is_rewritten_like_the_same_layers_in_a_model():
    """``target="features"`` (VGG's layers in one nn.Sequential) gets the sites the whole model
    gives them; an SSD300 is planned on its VGG base network and gets sites there too."""
    vgg = torchvision.models.vgg16()  # planning leaves the model as it was: one build serves both
    whole = dbx.plan(vgg)
    part = dbx.plan(vgg, target="features")
    assert _rows(part) == _rows(whole) and len(part.rows) > 0
    ssd = dbx.plan(torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None),
                   input_size=(3, 300, 300))
    assert ssd.target == "backbone.features" and {r.stage for r in ssd.rows} == {1, 2}
