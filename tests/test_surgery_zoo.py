"""The guarantees on real timm and torchvision models (``pretrained=False``) and a user CNN:
eval outputs bit-identical, state_dict identical and loadable strictly both ways, class kept,
train forward/backward, remove_dropblock restores the original tree; deepcopy, torch.save,
create_feature_extractor; a target submodule of a detection model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dropblock_fx import DropBlockNd, apply_dropblock, describe, remove_dropblock
from dropblock_fx.testing import check_surgery

from small_models import SmallCNN

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*no schedule is attached")]

# Planned at 224 and run at 32 (test_guarantees). Families the zoo sample (tests/test_zoo_sample.py)
# already checks at their own size are left to it: timm's EfficientNet, MobileNetV3, ConvNeXt,
# RegNetX, CSPNet, RepVGG and DLA, torchvision's EfficientNet and MobileNetV3; a wide ResNet is
# a ResNet-50.
TV = ["resnet18", "resnet50", "resnext50_32x4d", "regnet_y_400mf", "densenet121", "convnext_tiny", "vgg11_bn"]
TIMM = ["resnet50d"]
MODELS = {f"tv_{n}": (lambda n=n: tv.models.get_model(n, weights=None)) for n in TV}
MODELS.update({f"timm_{n}": (lambda n=n: timm.create_model(n, pretrained=False)) for n in TIMM})
MODELS["small_cnn"] = SmallCNN

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # planning uses 224


def dropblocks(model: nn.Module) -> dict[str, DropBlockNd]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DropBlockNd)}


@pytest.mark.parametrize("name", list(MODELS))
def test_guarantees(name):
    """Planned at 224 (the default), run at 32: every guarantee of check_surgery."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    plan = check_surgery(model, X.repeat(2, 1, 1, 1), input_size=[3, 224, 224])  # the default recipe
    assert len(plan.rows) > 0


@pytest.mark.parametrize("make", [lambda: tv.models.resnet50(), lambda: timm.create_model("efficientnet_b0")],
                         ids=["tv_resnet50", "timm_efficientnet_b0"])
def test_deepcopy_save_load_and_feature_extractor(make):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = make().eval()
    apply_dropblock(model, "paper-resnet50" if hasattr(model, "layer3") else None)
    with torch.no_grad():
        ref = model(X)
    n = len(dropblocks(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert len(dropblocks(clone)) == n and len(describe(clone).rows) == n
        with torch.no_grad():
            assert torch.equal(clone(X), ref)
        remove_dropblock(clone)
        assert not dropblocks(clone)
    last = "layer4" if hasattr(model, "layer4") else "blocks.6"
    fx_model = create_feature_extractor(model, {last: "out"})
    drop_nodes = [nd.target for nd in fx_model.graph.nodes if nd.op == "call_module" and "dropblock" in str(nd.target)]
    assert len(drop_nodes) >= n - 1  # every spliced site is a node of the new trace
    seen = []
    hook = model.get_submodule(last).register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        model(X)
        assert torch.equal(fx_model.eval()(X)["out"], seen[0])
    hook.remove()
    for m in dropblocks(fx_model).values():
        m.drop_prob = 0.5
    fx_model.train()
    a = fx_model(X.repeat(2, 1, 1, 1))["out"]
    assert a.shape[0] == 2  # the trace obeys train(): DropBlock runs


def test_detection_backbone_target():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    # the paper's COCO model: RetinaNet on a ResNet-50 with FrozenBatchNorm2d (as with pretrained weights)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(2048, 256))
    model = tv.models.detection.RetinaNet(backbone, num_classes=91).eval()
    body = model.backbone.body
    with torch.no_grad():
        ref = body(X)
    apply_dropblock(model, "paper-resnet50", target="backbone.body")
    mods = dropblocks(model)
    assert len(mods) == 36 and all(n.startswith("backbone.body.layer") for n in mods)
    assert type(body.layer3[0].bn1).__name__ == "FrozenBatchNorm2d"
    with torch.no_grad():
        out = body(X)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert describe(model).target == "backbone.body"
    remove_dropblock(model)
    assert not dropblocks(model)


def test_fpn_target_whose_input_is_a_dict_of_feature_maps():
    model = tv.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=64,
                                                       max_size=64).eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        ref = model(images)
    apply_dropblock(model, "ppyolo-neck")
    mods = dropblocks(model)
    assert sorted(mods) == sorted(f"backbone.fpn.{k}_blocks.{i}.dropblock_0" for k in ("inner", "layer")
                                  for i in range(3))
    assert {m.block_size for m in mods.values()} == {3}
    p = describe(model)
    assert any("shapes found by running BackboneWithFPN" in n for n in p.notes)
    assert sorted({r.stage for r in p.rows}) == [2, 3, 4]
    with torch.no_grad():
        out = model(images)
    assert all(torch.equal(out[0][k], ref[0][k]) for k in ref[0])
    assert len(model.backbone.fpn.inner_blocks[0]) == 1  # the added child is hidden from the Sequential


def test_torch_load_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = apply_dropblock(SmallCNN().eval(), "paper-resnet50", input_size=[3, 64, 64])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    torch.save({"model": model, "x": x, "ref": ref}, tmp_path / "m.pt")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "m = d['model']\n"
        "with torch.no_grad(): assert torch.equal(m(d['x']), d['ref'])\n"
        f"assert len(m.dropblock_plan.rows) == {len(dropblocks(model))} and type(m.stages[2][0]).__name__ == 'Residual'\n"
        "m.train()(d['x'].repeat(2, 1, 1, 1)).sum().backward()\n"
        "print('ok')\n"
    )
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.strip().endswith("ok"), out.stderr


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_detector_without_target_is_planned_on_its_backbone_whatever_the_weights(name):
    """A detector's forward depends on the data (NMS), so a whole-model pass would depend on
    the random weights; surgery picks the image backbone, as dropblock_fx.torchvision does."""
    import dropblock_fx.torchvision as dbtv

    plans = []
    for seed in range(2):
        torch.manual_seed(seed)
        # small images for the detector's own transform: the whole-model pass that planning
        # tries first runs it (the backbone is planned at the recipe's input_size either way)
        model = tv.models.get_model(name, weights=None, weights_backbone=None, min_size=64, max_size=64)
        plans.append(apply_dropblock(model).dropblock_plan)
        assert plans[-1].target == dbtv.default_target(model, "detection") == "backbone.body"
        assert plans[-1].notes[0].endswith("planned on its image backbone 'backbone.body' "
                                           "(pass target= to choose another)")
    assert len(plans[0].rows) > 0 and plans[0].input_shape == (1, 3, 224, 224)
    assert [r.as_dict() for r in plans[0].rows] == [r.as_dict() for r in plans[1].rows]
