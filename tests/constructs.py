"""Small models reproducing constructs of third-party CNN libraries that FX-based surgery gets
wrong when it trusts a plain trace (segmentation decoders, detection heads, medical U-Nets,
TF ports). Each class is one construct; used by test_surgery_constructs.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# 1. A decoder block that asks isinstance() about its skip input (a Proxy is no Tensor) ----------

class IsinstanceUp(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, jit: bool = False):
        super().__init__()
        self.jit = jit
        self.conv1 = nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        has_skip = torch.jit.isinstance(skip, torch.Tensor) if self.jit else isinstance(skip, torch.Tensor)
        if has_skip:
            x = torch.cat([x, skip], dim=1)
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class IsinstanceUNet(nn.Module):
    """Encoder at strides 2..16, a decoder of IsinstanceUp blocks back to stride 2."""

    def __init__(self, jit: bool = False):
        super().__init__()
        self.enc = nn.ModuleList([cbr(3, 8, 2), cbr(8, 16, 2), cbr(16, 32, 2), cbr(32, 64, 2)])
        self.dec = nn.ModuleList([IsinstanceUp(64, 32, 32, jit), IsinstanceUp(32, 16, 16, jit),
                                  IsinstanceUp(16, 8, 8, jit)])
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        feats = []
        for e in self.enc:
            x = e(x)
            feats.append(x)
        for d, skip in zip(self.dec, reversed(feats[:-1])):
            x = d(x, skip)
        return self.head(x)


# 2. A detection head that caches what it derives from the input on itself --------------------

class CachingHead(nn.Module):
    """Like a YOLO Detect: a grid per level, rebuilt when the input shape changes and kept in
    a list attribute; a dict of strides; the last shape seen."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.grid = [torch.empty(0)]
        self.strides: dict = {}
        self.shape = None

    def forward(self, x):
        y = self.conv(x)
        if self.shape != x.shape:
            h, w = x.shape[-2:]
            yy, xx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            self.grid[0] = torch.stack((xx, yy), 0).to(x.dtype)
            self.strides[h] = 1.0
            self.shape = x.shape
        return y[:, :2] + self.grid[0]


class CachingDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 32, 2), cbr(32, 64, 2), cbr(64, 64))
        self.head = CachingHead(64)
        self._last_input = None

    def forward(self, x):
        self._last_input = x.shape  # a plain attribute set by every forward
        return self.head(self.body(x))


# 3. A recursively built encoder-decoder (MONAI's UNet: each skip block wraps the deeper net) --

class SkipConnection(nn.Module):
    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x):
        return torch.cat([x, self.submodule(x)], dim=1)


def unet_level(cin: int, cout: int, channels: tuple[int, ...]) -> nn.Sequential:
    """MONAI's recursion: down (stride 2), a skip connection around everything deeper, up."""
    c = channels[0]
    if len(channels) > 2:
        sub, upc = unet_level(c, c, channels[1:]), 2 * c
    else:
        sub, upc = cbr(c, channels[1]), c + channels[1]
    up = nn.Sequential(nn.ConvTranspose2d(upc, cout, 2, 2), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(cbr(cin, c, 2), SkipConnection(sub), up)


class NestedUNet(nn.Module):
    """Five levels: the bottom runs at stride 32; the outermost skip block outputs at stride 2."""

    def __init__(self):
        super().__init__()
        self.model = unet_level(3, 8, (8, 16, 32, 64, 128, 128))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.model(x))


# 4. Blocks that trace only with their recorded values ----------------------------------------

class SamePadConv(nn.Conv2d):
    """TF "same" padding computed from the input's size (efficientnet_pytorch's dynamic padding)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DropConnectBlock(nn.Module):
    """An MBConv-like residual block whose forward takes ``drop_connect_rate`` (a float) at call
    time and branches on it, with TF-same convs (a module that is not a torch leaf)."""

    def __init__(self, c: int):
        super().__init__()
        self.expand = SamePadConv(c, 2 * c, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * c)
        self.dw = SamePadConv(2 * c, 2 * c, 3, groups=2 * c, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.project = SamePadConv(2 * c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x, drop_connect_rate=None):
        y = F.silu(self.bn0(self.expand(x)))
        y = F.silu(self.bn1(self.dw(y)))
        y = self.bn2(self.project(y))
        if drop_connect_rate:
            if self.training:
                keep = 1 - drop_connect_rate
                y = y * torch.floor(keep + torch.rand(y.shape[0], 1, 1, 1, device=y.device)) / keep
        return y + x


class DropConnectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 2)
        self.downs = nn.ModuleList([cbr(16, 16, 2), cbr(16, 32, 2), cbr(32, 32, 2), cbr(32, 32, 2)])
        self.blocks = nn.ModuleList([DropConnectBlock(c) for c in (16, 16, 32, 32, 32, 32, 32, 32)])

    def forward(self, x):
        x = self.stem(x)
        for i, down in enumerate(self.downs):
            x = down(x)
            for j in (2 * i, 2 * i + 1):
                x = self.blocks[j](x, drop_connect_rate=0.1 * j / len(self.blocks))
        return x.mean((2, 3))


class ADN(nn.Sequential):
    """MONAI-style norm -> dropout -> activation container (no conv)."""

    def __init__(self, c: int):
        super().__init__()
        self.add_module("N", nn.BatchNorm2d(c))
        self.add_module("A", nn.PReLU())


class Convolution(nn.Sequential):
    """MONAI-style conv wrapper: the conv, then its ADN in a sibling container."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, 3, stride, 1))
        self.add_module("adn", ADN(cout))


class SiblingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(Convolution(3, 8, 2), Convolution(8, 16, 2), Convolution(16, 32, 2),
                                    Convolution(32, 32, 2), Convolution(32, 64, 2), Convolution(64, 64))

    def forward(self, x):
        return self.layers(x).mean((2, 3))


# 5. An optional argument passed as None, by keyword ------------------------------------------

class MaskedBlock(nn.Module):
    """A residual block with an optional ``mask`` its parent passes as ``mask=None``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x, mask=None):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if mask is not None:
            y = y * mask
        return F.relu(x + y)


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 2), cbr(16, 16, 2), cbr(16, 16, 2), cbr(16, 16, 2))
        self.blocks = nn.ModuleList([MaskedBlock(16) for _ in range(2)])

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x, mask=None)
        return x


# 6. A residual block whose branch goes down and back up (EfficientFormerV2's attention) -------

class DownUpMixer(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        self.up = nn.Upsample(scale_factor=2.0)

    def forward(self, x):
        return self.up(self.down(x))


class DownUpBlock(nn.Module):
    """``x + mixer(x)`` where the mixer runs at half the resolution: the block is descended
    (its inside is deeper than its output), and its residual add still gets its sites."""

    def __init__(self, c: int):
        super().__init__()
        self.mixer = DownUpMixer(c)

    def forward(self, x):
        return x + self.mixer(x)


class DownUpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 2), cbr(16, 16, 2), cbr(16, 32, 2), cbr(32, 32, 2))
        self.blocks = nn.Sequential(DownUpBlock(32), DownUpBlock(32))

    def forward(self, x):
        return self.blocks(self.stem(x))
