"""The demo's data: scikit-learn's handwritten digits (shipped inside scikit-learn, nothing is
downloaded) or an ImageFolder, as in-memory tensors, split and normalised."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DemoData", "load_digits", "load_image_folder", "split", "subset_per_class"]


@dataclass
class DemoData:
    """Training and validation images (``N, C, H, W``, normalised) with their labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    name: str

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Stratified split: ``val_fraction`` of every class held out, chosen by ``seed``.

    Examples:
        >>> x, y = torch.arange(10.0), torch.tensor([0] * 5 + [1] * 5)
        >>> tx, ty, vx, vy = split(x, y, 0.2, seed=0)
        >>> len(tx), len(vx), sorted(vy.tolist())
        (8, 2, [0, 1])
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return x[tr], y[tr], x[va], y[va]


def subset_per_class(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, ...]:
    """At most ``per_class`` images of every class, chosen by ``seed`` (0: all of them)."""
    if per_class <= 0:
        return x, y
    g = torch.Generator().manual_seed(seed + 12345)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(keep).sort().values
    return x[idx], y[idx]


def _normalise(d: DemoData) -> DemoData:
    dims = (0, 2, 3)
    mean = d.train_x.mean(dim=dims, keepdim=True)
    std = d.train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    d.train_x = (d.train_x - mean) / std
    d.val_x = (d.val_x - mean) / std
    return d


def load_digits(image_size: int, val_fraction: float, seed: int) -> DemoData:
    """scikit-learn's digits (1797 scans of 8x8), upscaled (bilinear) to ``image_size``."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the demo's data set is scikit-learn's digits: install the demo extra (in a clone of "
            'dropblock-fx: pip install -e ".[demo]"), or pass --data DIR (an ImageFolder)', name=e.name) from None
    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    tx, ty, vx, vy = split(x, y, val_fraction, seed)
    return _normalise(DemoData(tx, ty, vx, vy, [str(i) for i in range(10)], "scikit-learn digits"))


def load_image_folder(root: str, image_size: int, val_fraction: float, seed: int) -> DemoData:
    """An ImageFolder (``root/CLASS/*.jpg``), resized to ``image_size`` squares, RGB, in memory."""
    from torchvision import datasets, transforms

    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(2, "no such directory", root)
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    ds = datasets.ImageFolder(root, transform=tf)
    if len(ds.classes) < 2:
        raise ValueError(f"{root}: an ImageFolder needs at least 2 class folders, found {len(ds.classes)}")
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    tx, ty, vx, vy = split(x, y, val_fraction, seed)
    return _normalise(DemoData(tx, ty, vx, vy, list(ds.classes), os.path.basename(root.rstrip("/")) or root))
