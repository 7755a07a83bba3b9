"""torchvision integration: get_model with a recipe, local weights, detection / segmentation backbones."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dropblock_fx.torchvision as dbtv
from dropblock_fx import DropBlockNd, RecipeError
from dropblock_fx.surgery import SurgeryError, describe

SMALL = {"input_size": [3, 128, 128]}


def _ours(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DropBlockNd)]


@pytest.mark.filterwarnings("ignore:dropblock_fx. this model's recipe has a schedule")
def test_get_model_classification_paper_placement_and_local_weights(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    m = dbtv.get_model("resnet18", "paper-resnet50", num_classes=10, checkpoint_path=path, recipe_overrides=SMALL)
    assert type(m) is torchvision.models.ResNet
    plan = describe(m)
    assert plan.recipe.name == "paper-resnet50" and plan.target == ""
    assert {r.stage for r in plan.rows} == {3, 4} and len(plan.rows) == len(_ours(m))
    sd, sr = m.state_dict(), ref.state_dict()
    assert list(sd) == list(sr) and all(torch.equal(sd[k], sr[k]) for k in sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), ref.eval()(x))
    m.train()(x).sum().backward()


def test_get_model_rejects_a_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(RuntimeError, match="state_dict"):
        dbtv.get_model("resnet34", checkpoint_path=path, recipe_overrides=SMALL)


def test_detection_applies_to_the_backbone_body():
    m = dbtv.get_model("retinanet_resnet50_fpn", "retinanet-coco", weights_backbone=None, min_size=96, max_size=96,
                       recipe_overrides=SMALL)
    plan = describe(m)
    assert plan.target == "backbone.body"
    assert {r.stage for r in plan.rows} == {1, 2, 3, 4}
    assert all(p.startswith("backbone.body.") for p in _ours(m))
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 96, 96)])  # min_size / max_size: no resize to 800 px
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_detection_default_target_without_body_and_explicit_target():
    assert dbtv.default_target(torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights_backbone=None),
                               "detection") == "backbone.features"
    m = dbtv.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=None, recipe_overrides=SMALL)
    assert describe(m).target == "backbone.body"
    m = dbtv.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=None, target="backbone.body",
                       recipe_overrides={"input_size": [3, 96, 96], "stages": [-1]})
    assert {r.stage for r in describe(m).rows} == {max(s.index for s in describe(m).stages)}
    with pytest.raises(SurgeryError, match="no such submodule"):
        dbtv.get_model("resnet18", target="backbone", recipe_overrides=SMALL)


def test_segmentation_applies_to_the_backbone():
    m = dbtv.get_model("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=3, recipe_overrides=SMALL)
    assert describe(m).target == "backbone" and _ours(m)
    assert all(p.startswith("backbone.") for p in _ours(m))
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)


def test_task_and_errors():
    assert dbtv.model_task("resnet50") == "classification"
    assert dbtv.model_task("retinanet_resnet50_fpn") == "detection"
    assert dbtv.model_task("fcn_resnet50") == "segmentation"
    assert dbtv.model_task("r3d_18") == "video"
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        dbtv.get_model("resnet5O")
    with pytest.raises(RecipeError):
        dbtv.get_model("resnet18", "no-such-recipe")
