"""Coverage beyond timm and torchvision: CNNs from segmentation, medical-imaging, model-hub and
TF-port libraries, random init, CPU, offline, through the same check as the zoo run
(``dropblock_fx.testing.check_surgery``, default recipe, planned at the test input size).

Needs the ``thirdparty`` extra (``pip install -e ".[thirdparty]"``): segmentation-models-pytorch,
MONAI, efficientnet_pytorch, transformers, kornia; and, without their dependency pins, which
ask for other torch versions, an older timm (dynamic-network-architectures, nnU-Net's
networks) or video and OCR stacks the check does not use::

    pip install --no-deps facenet-pytorch pytorchvideo python-doctr dynamic-network-architectures
    pip install fvcore iopath anyascii shapely pypdfium2 h5py validators pyclipper rapidfuzz langdetect opencv-python-headless

A library that is not installed is reported as skipped. Writes its table into ``docs/coverage.md`` between its marker lines (``--out``) and
prints ``N passed, M failed``::

    python benchmarks/thirdparty.py            # ~3 min on 2 cores
    python benchmarks/thirdparty.py --models smp:Unet-resnet34 monai:UNet
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- third-party table: generated below this line by benchmarks/thirdparty.py -->"
END = "<!-- third-party table: end -->"


def _smp(arch: str, encoder: str) -> Callable[[], Any]:
    def make():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder, encoder_weights=None, classes=2)
    return make


def _monai(name: str, **kw: Any) -> Callable[[], Any]:
    def make():
        import monai.networks.nets as nets

        return getattr(nets, name)(**kw)
    return make


def _effnet(name: str) -> Callable[[], Any]:
    def make():
        from efficientnet_pytorch import EfficientNet

        return EfficientNet.from_name(name)
    return make


def _hf(config: str, model: str, **kw: Any) -> Callable[[], Any]:
    def make():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kw))
    return make


def _call(module: str, attr: str, *args: Any, **kw: Any) -> Callable[[], Any]:
    def make():
        return getattr(importlib.import_module(module), attr)(*args, **kw)
    return make


def _clips(slow: tuple[int, ...], fast: tuple[int, ...]) -> Callable[[], Any]:
    """SlowFast's input: one positional argument, a list of two clips."""
    def make():
        g = torch.Generator().manual_seed(0)
        return ([torch.randn(2, *slow, generator=g), torch.randn(2, *fast, generator=g)],)
    return make


class _Logits(torch.nn.Module):
    """transformers models take ``pixel_values`` and return a ModelOutput: the check runs this."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


# name -> (library, builder, input size (C, H, W) or a builder of the example inputs, what it reproduces)
MODELS: dict[str, tuple[str, Callable[[], Any], Any, str]] = {
    "smp:Unet-resnet34": ("segmentation-models-pytorch", _smp("Unet", "resnet34"), (3, 128, 128),
                          "U-Net decoder blocks take a list of skips"),
    "smp:UnetPlusPlus-resnet18": ("segmentation-models-pytorch", _smp("UnetPlusPlus", "resnet18"), (3, 128, 128),
                                  "nested dense skip paths"),
    "smp:DeepLabV3Plus-resnet50": ("segmentation-models-pytorch", _smp("DeepLabV3Plus", "resnet50"),
                                   (3, 128, 128), "dilated encoder, ASPP"),
    "smp:PSPNet-resnet34": ("segmentation-models-pytorch", _smp("PSPNet", "resnet34"), (3, 128, 128),
                            "pyramid pooling (1, 2, 3, 6 bins) after a stride-8 encoder"),
    "smp:UPerNet-resnet34": ("segmentation-models-pytorch", _smp("UPerNet", "resnet34"), (3, 128, 128),
                             "pyramid pooling on the deepest map, an FPN"),
    "smp:FPN-efficientnet-b0": ("segmentation-models-pytorch", _smp("FPN", "efficientnet-b0"), (3, 128, 128),
                                "an EfficientNet encoder from another implementation"),
    "smp:Linknet-resnet18": ("segmentation-models-pytorch", _smp("Linknet", "resnet18"), (3, 128, 128),
                             "decoder adds skips"),
    "monai:UNet": ("monai", _monai("UNet", spatial_dims=2, in_channels=1, out_channels=2,
                                   channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
                   (1, 128, 128), "recursive skip blocks, Convolution/ADN containers"),
    "monai:UNet-3d": ("monai", _monai("UNet", spatial_dims=3, in_channels=1, out_channels=2,
                                      channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1),
                      (1, 32, 32, 32), "the same in 3-D (DropBlock3d)"),
    "monai:BasicUNet": ("monai", _monai("BasicUNet", spatial_dims=2, in_channels=1, out_channels=2),
                        (1, 128, 128), "decoder blocks take the skip as an argument"),
    "monai:SegResNet": ("monai", _monai("SegResNet", spatial_dims=2, init_filters=8, in_channels=1,
                                        out_channels=2), (1, 128, 128), "pre-activation residual blocks"),
    "monai:AHNet": ("monai", _monai("AHNet", spatial_dims=2, in_channels=1, out_channels=2), (1, 128, 128),
                    "max pools of 8 to 64 and 1x1 projections (pyramid pooling), anisotropic pools"),
    "monai:DenseNet121": ("monai", _monai("DenseNet121", spatial_dims=2, in_channels=3, out_channels=2),
                          (3, 128, 128), "dense layers, transitions"),
    "monai:SEResNet50": ("monai", _monai("SEResNet50", spatial_dims=2, in_channels=3, num_classes=2),
                         (3, 128, 128), "squeeze-excitation bottlenecks"),
    "efficientnet_pytorch:b0": ("efficientnet_pytorch", _effnet("efficientnet-b0"), (3, 128, 128),
                                "drop_connect_rate passed at call time, TF-same padding"),
    "efficientnet_pytorch:b3": ("efficientnet_pytorch", _effnet("efficientnet-b3"), (3, 128, 128),
                                "the same, deeper"),
    "transformers:ResNet": ("transformers", _hf("ResNetConfig", "ResNetForImageClassification",
                                                depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256],
                                                embedding_size=16), (3, 128, 128),
                            "a model hub's ResNet: ModelOutput returns, keyword arguments"),
    "transformers:ConvNext": ("transformers", _hf("ConvNextConfig", "ConvNextForImageClassification",
                                                  depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128]),
                              (3, 128, 128), "channels-last blocks"),
    "transformers:RegNet": ("transformers", _hf("RegNetConfig", "RegNetForImageClassification",
                                                depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256],
                                                embedding_size=16, groups_width=16), (3, 128, 128), "group convs"),
    "transformers:MobileNetV2": ("transformers", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification",
                                                     depth_multiplier=0.35), (3, 128, 128),
                                 "TF padding computed from the input size"),
    "transformers:EfficientNet": ("transformers", _hf("EfficientNetConfig", "EfficientNetForImageClassification",
                                                      width_coefficient=1.0, depth_coefficient=1.0, image_size=128,
                                                      hidden_dim=1280),
                                  (3, 128, 128), "another EfficientNet port"),
    "pytorchvideo:slowfast_r50": ("pytorchvideo", _call("pytorchvideo.models.slowfast", "create_slowfast",
                                                        model_num_class=10,
                                                        head_pool_kernel_sizes=((8, 3, 3), (32, 3, 3))),
                                  _clips((3, 8, 96, 96), (3, 32, 96, 96)),
                                  "a list of two clips (example_inputs), two 3-D pathways fused"),
    "pytorchvideo:x3d_xs": ("pytorchvideo", _call("pytorchvideo.models.x3d", "create_x3d", model_num_class=10,
                                                  input_clip_length=4, input_crop_size=96, depth_factor=1.0),
                            (3, 4, 96, 96), "3-D inverted residuals with SE and swish"),
    "facenet-pytorch:InceptionResnetV1": ("facenet-pytorch", _call("facenet_pytorch", "InceptionResnetV1"),
                                          (3, 160, 160), "valid padding: maps of 79, 38, 17, 8, 3 px"),
    "facenet-pytorch:ONet": ("facenet-pytorch", _call("facenet_pytorch", "ONet", pretrained=False), (3, 48, 48),
                             "a flat model: its own forward calls its convs; no norm"),
    "python-doctr:resnet31": ("python-doctr", _call("doctr.models", "resnet31", pretrained=False), (3, 32, 128),
                              "later pools halve the height only"),
    "python-doctr:magc_resnet31": ("python-doctr", _call("doctr.models", "magc_resnet31", pretrained=False),
                                   (3, 32, 128), "the same with global-context attention"),
    "kornia:HyNet": ("kornia", _call("kornia.feature", "HyNet", pretrained=False), (1, 32, 32),
                     "FilterResponseNorm, an unregistered norm; a dtype test in forward"),
    "kornia:SOSNet": ("kornia", _call("kornia.feature", "SOSNet", pretrained=False), (1, 32, 32),
                      "a plain patch descriptor CNN"),
    "dynamic-network-architectures:PlainConvUNet": (
        "dynamic-network-architectures",
        _call("dynamic_network_architectures.architectures.unet", "PlainConvUNet", 1, 5, (16, 32, 64, 128, 128),
              torch.nn.Conv2d, 3, (1, 2, 2, 2, 2), (2, 2, 2, 2, 2), 2, (2, 2, 2, 2), False, torch.nn.BatchNorm2d,
              None, None, None, torch.nn.LeakyReLU),
        (1, 64, 64), "nnU-Net: the decoder keeps the encoder (modules under two names)"),
    "dynamic-network-architectures:ResidualEncoderUNet": (
        "dynamic-network-architectures",
        _call("dynamic_network_architectures.architectures.unet", "ResidualEncoderUNet", 1, 5,
              (16, 32, 64, 128, 128), torch.nn.Conv2d, 3, (1, 2, 2, 2, 2), (1, 1, 2, 2, 2), 2, (1, 1, 1, 1),
              False, torch.nn.BatchNorm2d, None, None, None, torch.nn.LeakyReLU),
        (1, 64, 64), "nnU-Net's residual encoder"),
}

_MODULES = {"segmentation-models-pytorch": "segmentation_models_pytorch", "facenet-pytorch": "facenet_pytorch",
            "python-doctr": "doctr", "dynamic-network-architectures": "dynamic_network_architectures"}


def check(name: str) -> dict[str, Any]:
    """One model's row: status, sites by kind, stages, fallbacks, notes; never raises."""
    from dropblock_fx.testing import check_surgery

    lib, make, size, what = MODELS[name]
    row: dict[str, Any] = {"model": name, "library": lib, "construct": what, "status": "failed", "reason": ""}
    module = _MODULES.get(lib, lib)
    try:
        importlib.import_module(module)
    except ImportError:
        row.update(status="skipped", reason=f"{lib} is not installed")
        return row
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = make().eval()
        runner = _Logits(model) if lib == "transformers" else model
        x = size() if callable(size) else torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        plan = check_surgery(runner, x)
        row.update(status="passed", sites=len(plan.rows), stages=sorted({r.stage for r in plan.rows}),
                   kinds=dict(sorted(Counter(r.kind for r in plan.rows).items())),
                   fallback=sum(r.mechanism != "graph" for r in plan.rows),
                   specialised=sum("traced for calls like the planned one" in n for n in plan.notes))
    except Exception as e:  # noqa: BLE001
        row["reason"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    import torch as _torch

    versions = []
    for lib in dict.fromkeys(r["library"] for r in rows):
        module = _MODULES.get(lib, lib)
        try:
            mod = importlib.import_module(module)
            version = getattr(mod, "__version__", None)
            if version is None:
                from importlib.metadata import version as dist_version

                version = dist_version(lib)
            versions.append(f"{lib} {version}")
        except Exception:  # noqa: BLE001
            versions.append(f"{lib} (not installed)")
    head = (f"<!-- generated by `python benchmarks/thirdparty.py` on {time.strftime('%Y-%m-%d')}; "
            f"torch {_torch.__version__}, {', '.join(versions)} -->\n\n")
    lines = ["| model | what it reproduces | result | sites (by kind) | stages | without a graph | specialised units |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "passed":
            kinds = ", ".join(f"{k} {n}" for k, n in r["kinds"].items())
            lines.append(f"| {r['model']} | {r['construct']} | passed | {r['sites']} ({kinds}) | "
                         f"{', '.join(map(str, r['stages']))} | {r['fallback']} | {r['specialised']} |")
        else:
            lines.append(f"| {r['model']} | {r['construct']} | {r['status']}: {r['reason']} | | | | |")
    return head + "\n".join(lines) + "\n"


def write(text: str, out: Path) -> None:
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old.split(BEGIN)[0] + BEGIN + "\n" + text + END + old.split(END, 1)[1]
    else:
        new = old + f"\n{BEGIN}\n{text}{END}\n"
    out.write_text(new)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="names or patterns (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md", help="markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    names = [n for n in MODELS if not args.models or any(fnmatch.fnmatch(n, p) for p in args.models)]
    rows = []
    for n in names:
        r = check(n)
        rows.append(r)
        print(f"{n:32s} {r['status']:8s} {r.get('sites', '')!s:>4} {r['reason'][:100]}", flush=True)
    text = table(rows)
    if not args.no_write:
        write(text, args.out)
    passed = sum(r["status"] == "passed" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"{passed} passed, {failed} failed" + (f", {len(rows) - passed - failed} skipped"
                                                  if len(rows) > passed + failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
