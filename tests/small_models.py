"""Small user-defined CNNs shared by the surgery and graph tests (no tests here; no timm / torchvision)."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn


class Residual(nn.Module):
    """BasicBlock-like: conv-bn-relu, conv-bn, + shortcut (identity or projection), relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)

    def extra_method(self) -> str:
        return "still here"


class SmallCNN(nn.Module):
    """Stem at stride 2, then stages at strides 4, 8, 16, 32 (stages 1-4), two blocks each."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width, width * 2, width * 4, width * 8]
        layers = []
        cin = width
        for i, c in enumerate(chans):
            layers.append(nn.Sequential(Residual(cin, c, 2), Residual(c, c)))
            cin = c
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class Untraceable(nn.Module):
    """A block with data-dependent control flow: FX cannot trace it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.detach().abs().sum()) >= 0:  # data-dependent: FX cannot trace this
            y = y + x
        return y


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.odd = Untraceable(16)
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.last = Residual(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.down(self.odd(self.mid(self.stem(x)))))


class TrainBranch(nn.Module):
    """Behaves differently in train mode (FX specialises self.training at trace time)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        if self.training:
            y = y * 2.0
        return y + x


class TrainBranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 16, 1)
        self.block = TrainBranch(8)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)
        self.block2 = TrainBranch(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.down(self.block(self.stem(x))))


class NormFree(nn.Module):
    """VGG-like without norms: conv -> relu chains in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in (8, 16, 16, 32, 32):
            layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@functools.lru_cache(maxsize=None)
def lightning_net_class() -> type:
    """``LightningNet(samples, target_drop_prob=None)``: a LightningModule (Lightning is imported
    here, on first use: it takes seconds) of a conv, ``DropBlock2d(0.2, 3)`` and a linear head,
    trained with SGD on ``samples`` random 8x8 images in batches of 2; ``seen`` records the
    DropBlock module's rate at each training step."""
    import lightning.pytorch as L

    from dropblock_fx import DropBlock2d

    class LightningNet(L.LightningModule):
        def __init__(self, samples: int, target_drop_prob: Optional[float] = None):
            super().__init__()
            torch.manual_seed(0)
            self.samples = samples
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DropBlock2d(0.2, 3), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(4, 1))
            if target_drop_prob is not None:
                self.body[1].target_drop_prob = target_drop_prob
            self.seen: list[float] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(self.body[1].drop_prob)
            return self.body(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(self.samples, 3, 8, 8), batch_size=2)

    return LightningNet
