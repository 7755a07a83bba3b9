"""A fixed sample of the zoo coverage run as a CI test: the same check
(``dropblock_fx.testing.check_surgery``) and the same builder, in process, on small models
from every major timm family and every torchvision kind (classification, segmentation, video
with DropBlock3d, detection backbones).

Each model: default recipe at the model's small input size (64x64 mostly, batch 2), every
guarantee of ``check_surgery``. The full run and its results: ``docs/coverage.md``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from dropblock_fx.testing import check_surgery, zoo_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (timm family and what the model adds in comments); one small member per construct, so the
# sample runs in ~1-2 min on 2 cores. Left out as covered by the others: the EfficientNet
# builder's plain variants (tinynet, fbnet, mnasnet: efficientnet_b0's blocks), RegNetX
# (regnety_002 without SE; torchvision's regnet_x_400mf), MobileOne (repvgg_a0's re-param blocks).
TIMM = [
    "resnet10t", "resnet18d", "seresnext26t_32x4d",           # resnet: basic, avg-down, SE bottleneck
    "resnetv2_18",                                            # resnetv2 (pre-activation)
    "efficientnet_b0", "tf_efficientnet_lite0", "mixnet_s",   # efficientnet; TF "same" padding; mixed conv
    "lcnet_050",                                              # efficientnet builder without residuals
    "mobilenetv3_small_050",                                  # mobilenetv3
    "mobilenetv4_conv_small",                                 # mobilenetv3 (MobileNetV4)
    "mambaout_femto",                                         # mambaout (channels-last blocks)
    "convnext_atto", "convnextv2_atto",                       # convnext, convnext v2 (GRN)
    "regnety_002",                                            # regnet
    "cs3darknet_s", "cspresnet50",                            # cspnet
    "dla46_c",                                                # dla
    "densenet121",                                            # densenet
    "dpn48b",                                                 # dpn
    "hrnet_w18_small",                                        # hrnet
    "repvgg_a0", "gernet_s",                                  # byobnet: re-param blocks; mixed block types
    "res2net50_14w_8s",                                       # res2net
    "resnest14d",                                             # resnest
    "selecsls42b",                                            # selecsls (blocks take [x, skip])
    "skresnet18",                                             # sknet
    "ghostnet_050",                                           # ghostnet
    "rexnet_100",                                             # rexnet
    "hardcorenas_a",                                          # hardcorenas
    "nf_regnet_b0",                                           # nfnet (norm-free)
    "ese_vovnet19b_slim_dw",                                  # vovnet
    "hgnetv2_b0",                                             # hgnet
    "repghostnet_050",                                        # repghost
    "inception_next_atto",                                    # inception_next
    "fastvit_t8",                                             # fastvit
    "starnet_s1",                                             # starnet
    "xception41",                                             # xception_aligned
]
# torchvision's ResNet and RegNet are checked in tests/test_surgery_zoo.py (planned at 224, run at 32).
TV = [
    ("tv-classification", "mobilenet_v3_small"),
    ("tv-classification", "squeezenet1_1"), ("tv-classification", "shufflenet_v2_x0_5"),
    ("tv-classification", "mnasnet0_5"), ("tv-classification", "googlenet"),
    ("tv-classification", "efficientnet_b0"),
    ("tv-segmentation", "lraspp_mobilenet_v3_large"),
    ("tv-video", "r3d_18"),
    ("tv-detection", "fasterrcnn_mobilenet_v3_large_320_fpn"),
    ("tv-detection", "ssdlite320_mobilenet_v3_large"),
]
SPECS = [("timm", n) for n in TIMM] + TV


@pytest.mark.parametrize("spec", SPECS, ids=[f"{'timm' if s == 'timm' else 'tv'}:{n}" for s, n in SPECS])
def test_zoo_model(spec):
    torch.manual_seed(0)
    model, target, runner, sizes = zoo_model(*spec)
    model.eval()
    g = torch.Generator().manual_seed(0)
    for size in sizes:  # the smallest input the model runs on
        x = torch.randn(2, *size, generator=g)
        try:
            with torch.no_grad():
                runner(x)
            break
        except Exception:  # noqa: BLE001 - too small for this model: the next size
            continue
    plan = check_surgery(model, x, runner=runner, **({"target": target} if target else {}))
    assert len(plan.rows) > 0
    if spec[0] == "tv-video":
        assert all(len(r.resolution) == 3 for r in plan.rows)
