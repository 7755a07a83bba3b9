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


class GainUp(IsinstanceUp):
    """`IsinstanceUp` whose output is scaled by a learned per-channel gain (LayerScale), read
    from its own parameter in the forward, with its size taken from the parameter."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__(cin, cskip, cout)
        self.gain = nn.Parameter(torch.full((cout,), 0.5))

    def forward(self, x, skip=None):
        return super().forward(x, skip) * self.gain.reshape(1, self.gain.shape[0], 1, 1)


class GainUNet(IsinstanceUNet):
    """IsinstanceUNet with `GainUp` decoder blocks."""

    def __init__(self):
        super().__init__()
        self.dec = nn.ModuleList([GainUp(64, 32, 32), GainUp(32, 16, 16), GainUp(16, 8, 8)])


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


# ---------------------------------------------------------------------------------------------
# The plan is what runs: constructs whose tensors are not feature maps, side branches, parents
# that inline their children, calls the planned trace does not cover. Each backbone is a plain
# ResNet-like net (stem at stride 2, then stages at strides 4..32) with the construct in the
# last two stages, so the default recipe (the last two stages) looks at it.


class Bottleneck(nn.Module):
    """A residual block: three conv -> BN (-> ReLU) chains, an identity shortcut."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class Backbone(nn.Module):
    """stem (stride 2), down + block per stage (strides 4, 8, 16, 32); ``deep(c)`` builds the
    blocks of the last two stages."""

    def __init__(self, deep, c: int = 16):
        super().__init__()
        self.stem = cbr(3, c, 2)
        self.downs = nn.ModuleList([cbr(c, c, 2) for _ in range(4)])
        self.blocks = nn.ModuleList([Bottleneck(c), Bottleneck(c), deep(c), deep(c)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for down, block in zip(self.downs, self.blocks):
            x = block(down(x))
        return self.head(x.mean((2, 3)))


class PatchUnfoldBlock(nn.Module):
    """MobileViT-style: the map is unfolded into ``(B, C, patch_area, n_patches)`` and 1x1 conv
    -> BN layers with residual adds run on that (a conv output at a size that is no map)."""

    def __init__(self, c: int, p: int = 2):
        super().__init__()
        self.p = p
        self.local = cbr(c, c)
        self.mix1, self.nrm1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.mix2, self.nrm2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.local(x)
        b, c, h, w = x.shape
        p = self.p
        u = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c, p * p, -1)
        u = u + self.nrm1(self.mix1(u))
        u = u + self.nrm2(self.mix2(u))
        u = u.reshape(b, c, p, p, h // p, w // p).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
        return x + u


class RelPosAttention(nn.Module):
    """HaloNet-style attention on the map: the logits get a conv-free relative-position term
    (``logits + pos(q)``, two same-shape tensors), then a softmax."""

    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.rel = nn.Parameter(torch.zeros(c // heads, 1))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        logits = q.transpose(1, 2) @ k  # (B * heads, HW, HW)
        logits = logits.reshape(b * self.heads, h * w, h, w)
        pos = (q.transpose(1, 2) @ self.rel.expand(-1, h * w)).reshape(b * self.heads, h * w, h, w)
        attn = (logits + pos).flatten(2).softmax(-1)
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.bn(out)


class WindowBlock(nn.Module):
    """EfficientViT-style: the map is split into windows ``(B * windows, C, w, w)`` and a
    residual conv -> BN runs on each window."""

    def __init__(self, c: int, win: int = 2):
        super().__init__()
        self.win = win
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.win
        y = x.reshape(b, c, s, h // s, s, w // s).permute(0, 2, 4, 1, 3, 5).reshape(b * s * s, c, h // s, w // s)
        y = y + self.bn(self.conv(y))
        y = y.reshape(b, s, s, c, h // s, w // s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return x + y


class PooledGateBlock(nn.Module):
    """GhostNetV2's DFC attention: a gate computed at half the resolution (avg-pool, conv ->
    BN chains), through a sigmoid, upsampled and multiplied in."""

    def __init__(self, c: int):
        super().__init__()
        self.main = cbr(c, c)
        self.gate = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        g = self.gate(F.avg_pool2d(x, 2, 2))
        return x + self.main(x) * F.interpolate(torch.sigmoid(g), size=x.shape[-2:], mode="nearest")


class SharedPosEnc(nn.Module):
    """CoaT's ``ConvPosEnc``: a residual depthwise conv, one instance shared by several blocks."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        return x + self.proj(x)


class SerialBlock(nn.Module):
    """Calls the shared position encoding, then its own residual branch; traced whole, so its
    graph inlines the shared module's code."""

    def __init__(self, c: int, shared: nn.Module):
        super().__init__()
        self.cpe = shared
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.cpe(x)
        return x + self.bn(self.conv(x))


class SharedModuleNet(nn.Module):
    """The shared module is registered on the model (``cpe3``, ``cpe4``, as in CoaT) and
    called only by the blocks that hold it."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = cbr(3, c, 2)
        self.downs = nn.ModuleList([cbr(c, c, 2) for _ in range(4)])
        self.early = nn.ModuleList([Bottleneck(c), Bottleneck(c)])
        self.cpe3, self.cpe4 = SharedPosEnc(c), SharedPosEnc(c)
        self.serial3 = nn.ModuleList([SerialBlock(c, self.cpe3) for _ in range(2)])
        self.serial4 = nn.ModuleList([SerialBlock(c, self.cpe4) for _ in range(2)])

    def forward(self, x):
        x = self.stem(x)
        x = self.early[0](self.downs[0](x))
        x = self.early[1](self.downs[1](x))
        x = self.downs[2](x)
        for blk in self.serial3:
            x = blk(x)
        x = self.downs[3](x)
        for blk in self.serial4:
            x = blk(x)
        return x.mean((2, 3))


class UpBlock(nn.Module):
    """smp's ``UnetDecoderBlock``: called with the target size as extra arguments."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = cbr(cin + cskip, cout), cbr(cout, cout)

    def forward(self, x, height: int, width: int, skip=None):
        x = F.interpolate(x, size=(height, width), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class IteratingDecoder(nn.Module):
    """smp's ``UnetDecoder``: iterates a ``ModuleList`` of blocks, reading the sizes from the
    features it gets (a list)."""

    def __init__(self, chs: tuple[int, ...] = (64, 32, 16, 8)):
        super().__init__()
        self.blocks = nn.ModuleList([UpBlock(chs[i], chs[i + 1], chs[i + 1]) for i in range(len(chs) - 1)])

    def forward(self, features):
        shapes = [f.shape[2:] for f in features][::-1]
        feats = features[::-1]
        x = feats[0]
        for i, block in enumerate(self.blocks):
            h, w = shapes[i + 1]
            x = block(x, h, w, skip=feats[i + 1])
        return x


class IteratingUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([cbr(3, 8, 2), cbr(8, 16, 2), cbr(16, 32, 2), cbr(32, 64, 2)])
        self.decoder = IteratingDecoder()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        feats = []
        for e in self.enc:
            x = e(x)
            feats.append(x)
        return self.head(self.decoder(feats))


def tf_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding, computed in Python from the input's size (as Hugging Face's
    MobileNet ports do)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph = max(k - s, 0) if h % s == 0 else max(k - h % s, 0)
    pw = max(k - s, 0) if w % s == 0 else max(k - w % s, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class TFPadBlock(nn.Module):
    """A residual block whose own code reads its input's size (``int(x.shape[-1])``)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, 2 * c, 3, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c)
        self.conv3, self.bn3 = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv1(x)))
        y = F.relu6(self.bn2(self.conv2(tf_pad(y, 3, 1))))
        return x + self.bn3(self.conv3(y))


class SizeBranchBlock(nn.Module):
    """A block whose path depends on its input's size: a call at another size cannot reuse
    the planned trace, and runs its original forward."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if int(x.shape[-1]) >= 4:  # a different path on small maps
            y = F.relu(y)
        return x + y


class CheckpointStage(nn.Module):
    """timm's ``MetaFormerStage``: a downsample, then its blocks, checkpointed when its
    ``grad_checkpointing`` switch is on, with reshapes around them (not a plain chain)."""

    def __init__(self, c: int):
        super().__init__()
        self.grad_checkpointing = False
        self.down = cbr(c, c, 2)
        self.blocks = nn.Sequential(Bottleneck(c), Bottleneck(c))

    def forward(self, x):
        x = self.down(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).reshape(b, c, h, w)
        if self.grad_checkpointing:
            import torch.utils.checkpoint as cp

            x = cp.checkpoint(self.blocks, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x


class CheckpointNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, c, 2), cbr(c, c, 2), cbr(c, c, 2))
        self.stages = nn.ModuleList([CheckpointStage(c), CheckpointStage(c)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x.mean((2, 3))


# ---------------------------------------------------------------------------------------------
# Any real CNN: a module under two names, code that cannot be regenerated, several inputs,
# valid padding, rectangular pooling, a flat model, a norm nobody registered.


class EncoderKeepingDecoder(nn.Module):
    """nnU-Net's decoder keeps ``self.encoder``: every encoder module has a second name."""

    def __init__(self, encoder: nn.Module, c: int = 16):
        super().__init__()
        self.encoder = encoder
        self.up = nn.ConvTranspose2d(c, c, 2, 2)
        self.conv = cbr(2 * c, c)

    def forward(self, skips):
        return self.conv(torch.cat([self.up(skips[-1]), skips[-2]], 1))


class TwoNamesUNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.encoder = nn.ModuleList([cbr(3, c, 2)] + [nn.Sequential(cbr(c, c, 2), Bottleneck(c)) for _ in range(4)])
        self.decoder = EncoderKeepingDecoder(self.encoder, c)

    def forward(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips)


class NamedTupleBlock(nn.Module):
    """easyocr's CRAFT: a class made inside ``forward`` (its generated code could not import it)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = Bottleneck(c)

    def forward(self, x):
        import collections

        Out = collections.namedtuple("Out", ["features", "skip"])
        return Out(self.body(x), x)


class NamedTupleNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.net = Backbone(lambda c: Bottleneck(c), c)
        self.extra = NamedTupleBlock(c)

    def forward(self, x):
        x = self.net.stem(x)
        for down, block in zip(self.net.downs, self.net.blocks):
            x = block(down(x))
        return self.extra(x).features.mean((2, 3))


class TwoPathway(nn.Module):
    """SlowFast: a list of two clips (slow: few frames; fast: many frames, few channels), two
    pathways of 3-D residual stages, the fast one fused into the slow one at each stage."""

    def __init__(self, c: int = 16, cf: int = 4):
        super().__init__()

        def stage(cin, cout, stride):
            return nn.Sequential(nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
                                 nn.BatchNorm3d(cout), nn.ReLU())

        self.slow = nn.ModuleList([stage(3, c, 2)] + [stage(c + cf, c, 2) for _ in range(4)])
        self.fast = nn.ModuleList([stage(3, cf, 2)] + [stage(cf, cf, 2) for _ in range(4)])
        self.fuse = nn.ModuleList([nn.Conv3d(cf, cf, (4, 1, 1), (4, 1, 1)) for _ in range(5)])
        self.head = nn.Linear(c + cf, 10)

    def forward(self, clips):
        slow, fast = clips
        for s, f, fuse in zip(self.slow, self.fast, self.fuse):
            slow, fast = s(slow), f(fast)
            slow = torch.cat([slow, fuse(fast)], 1)
        return self.head(slow.mean((2, 3, 4)))


class ValidPaddingNet(nn.Module):
    """facenet-pytorch's InceptionResnetV1: unpadded convs and pools, so a 160 px input runs at
    79, 38, 17, 8 and 3 px (real strides 2.0, 4.2, 9.4, 20 and 53), with residual blocks."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2), nn.BatchNorm2d(c), nn.ReLU())  # 79
        self.downs = nn.ModuleList([nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(c, c, 1))] +  # 39
                                   [nn.Sequential(nn.Conv2d(c, c, 3, 2), nn.BatchNorm2d(c), nn.ReLU())  # 19, 9, 4
                                    for _ in range(3)])
        self.blocks = nn.ModuleList([Bottleneck(c) for _ in range(4)])

    def forward(self, x):
        x = self.stem(x)
        for down, block in zip(self.downs, self.blocks):
            x = block(down(x))
        return x.mean((2, 3))


class RectPoolNet(nn.Module):
    """python-doctr's ResNet31: text lines are wide, so the later pools halve the height only."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = cbr(3, c)
        self.pools = nn.ModuleList([nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d((2, 1)), nn.MaxPool2d((2, 1))])
        self.blocks = nn.ModuleList([Bottleneck(c) for _ in range(4)])

    def forward(self, x):
        x = self.stem(x)
        for pool, block in zip(self.pools, self.blocks):
            x = block(pool(x))
        return x.mean((2, 3))


class FlatNet(nn.Module):
    """facenet-pytorch's ONet: the model's own forward calls its convs and activations; no norm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 16, 3, 2, 1), nn.PReLU(16)
        self.conv2, self.act2 = nn.Conv2d(16, 16, 3, 2, 1), nn.PReLU(16)
        self.conv3, self.act3 = nn.Conv2d(16, 32, 3, 2, 1), nn.PReLU(32)
        self.conv4, self.act4 = nn.Conv2d(32, 32, 3, 2, 1), nn.PReLU(32)
        self.conv5, self.act5 = nn.Conv2d(32, 32, 3, 2, 1), nn.PReLU(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        x = self.act4(self.conv4(x))
        x = self.act5(self.conv5(x))
        return self.fc(x.mean((2, 3)))


class FilterResponseNorm(nn.Module):
    """kornia's ``FilterResponseNorm2d``: a per-channel norm of no known class."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("eps", torch.tensor([eps]))

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        return self.weight * x * torch.rsqrt(nu2 + self.eps.abs()) + self.bias


class ChannelScale(nn.Module):
    """A per-channel layer after each conv that is no norm by name (a suspect, not a norm)."""

    def __init__(self, c: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.gain


def chain_net(layer) -> nn.Sequential:
    """conv -> ``layer`` -> act, five times at strides 2..32."""
    mods: list[nn.Module] = []
    cin = 3
    for _ in range(5):
        mods += [nn.Conv2d(cin, 16, 3, 2, 1), layer(16), nn.ReLU()]
        cin = 16
    return nn.Sequential(*mods)


class PyramidPool(nn.Module):
    """segmentation-models-pytorch's PSP module (PSPNet, UPerNet): the map pooled to 1, 2, 3
    and 6 bins, each through a 1x1 conv + BN + ReLU and upsampled back, then concatenated.
    ``adaptive=False``: MONAI's AHNet, strided max pools of 8 and 16 and a 1x1 projection."""

    def __init__(self, c: int, adaptive: bool = True):
        super().__init__()
        if adaptive:
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(c, c // 4, 1, bias=False), nn.BatchNorm2d(c // 4),
                              nn.ReLU()) for b in (1, 2, 3, 6))
        else:
            self.blocks = nn.ModuleList(nn.Sequential(nn.MaxPool2d(k, k), nn.Conv2d(c, c // 4, 1)) for k in (8, 16))
        self.out = cbr(c + len(self.blocks) * (c // 4), c)

    def forward(self, x):
        size = x.shape[2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.blocks]
        return self.out(torch.cat([x, *pooled], dim=1))


class PSPNet(nn.Module):
    """An encoder of conv + BN + ReLU stages at strides 2..8 (or 2..32 with ``depth=5``), then a
    `PyramidPool` at the encoder's output stride and a 1x1 head."""

    def __init__(self, depth: int = 3, adaptive: bool = True):
        super().__init__()
        layers, cin = [], 3
        for i in range(depth):
            layers.append(nn.Sequential(cbr(cin, 16 * 2 ** i, 2), cbr(16 * 2 ** i, 16 * 2 ** i)))
            cin = 16 * 2 ** i
        self.encoder = nn.Sequential(*layers)
        self.psp = PyramidPool(cin, adaptive)
        self.head = nn.Conv2d(cin, 2, 1)

    def forward(self, x):
        return self.head(self.psp(self.encoder(x)))
