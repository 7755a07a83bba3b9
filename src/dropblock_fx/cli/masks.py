"""``dropblock-fx masks``: what dropout, SpatialDropout and DropBlock drop from a feature map."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..op import drop_block, expected_drop_rate, paper_gamma
from .plotting import pyplot

__all__ = ["sample_image_path", "load_image", "method_masks", "write_masks"]


def sample_image_path() -> str:
    """A photo that ships with matplotlib (Grace Hopper), used when no image is given."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_image(path: Optional[str]) -> tuple[np.ndarray, str]:
    """RGB float image in ``[0, 1]`` (H, W, 3) and its name."""
    from PIL import Image

    path = path or sample_image_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such image", path)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as e:
        raise ValueError(f"{path}: not an image PIL can read ({e})") from None
    return rgb, os.path.basename(path)


def method_masks(
    size: int, channels: int, drop_prob: float, block_sizes: Sequence[int], seed: int = 0
) -> list[tuple[str, np.ndarray, float]]:
    """``[(title, keep mask (channels, size, size) of 0/1, expected drop rate), ...]`` for
    dropout, SpatialDropout and DropBlock at each block size, all at ``drop_prob``.

    Dropout is DropBlock with block 1 and SpatialDropout with block = the map (one valid seed
    per channel), so all three come from the same op with the paper's gamma.

    Examples:
        >>> masks = method_masks(size=14, channels=2, drop_prob=0.1, block_sizes=[7])
        >>> [(title, keep.shape, round(expected, 4)) for title, keep, expected in masks]
        [('dropout', (2, 14, 14), 0.1), ('SpatialDropout', (2, 14, 14), 0.1), ('DropBlock 7x7', (2, 14, 14), 0.0929)]
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"--drop-prob must be in [0, 1], got {drop_prob}")
    if size < 2:
        raise ValueError(f"--size must be >= 2, got {size}")
    if channels < 1:
        raise ValueError(f"--channels must be >= 1, got {channels}")
    bad = [k for k in block_sizes if k < 1 or k > size]
    if bad:
        raise ValueError(f"--block-sizes must be in [1, {size}] (the map size), got {bad}")
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(1, channels, size, size)
    out = []
    spec = [("dropout", 1), ("SpatialDropout", size)] + [(f"DropBlock {k}x{k}", k) for k in block_sizes]
    for title, k in spec:
        y = drop_block(ones, drop_prob, k, mask="channel", seed_region="valid", scale="none", generator=gen)
        keep = (y[0] != 0).numpy().astype(np.float32)
        exp = expected_drop_rate(paper_gamma(drop_prob, (size, size), (k, k)), (size, size), (k, k), "valid")
        out.append((title, keep, exp))
    return out


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    h, w = t.shape[-2:]
    s = min(h, w)  # centre square crop, as the usual 224 x 224 input
    t = t[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    t = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def write_masks(
    out: str,
    image: Optional[str] = None,
    drop_prob: float = 0.15,
    block_sizes: Sequence[int] = (3, 5, 7),
    size: int = 28,
    channels: int = 3,
    seed: int = 0,
) -> str:
    """Write the figure to ``out`` (PNG); returns a one-line summary of the dropped fractions."""
    rgb, name = load_image(image)
    masks = method_masks(size, channels, drop_prob, block_sizes, seed)
    side = size * max(1, round(224 / size))
    img = _resize(rgb, side)
    plt = pyplot()
    cols = 1 + len(masks)
    fig, axes = plt.subplots(channels, cols, figsize=(1.9 * cols, 2.0 * channels + 0.5), squeeze=False)
    rep = side // size
    summary = []
    for j, (title, keep, exp) in enumerate(masks):
        dropped = 1.0 - float(keep.mean())
        summary.append(f"{title} {100 * dropped:.1f}%")
        for c in range(channels):
            ax = axes[c][j + 1]
            up = np.kron(keep[c], np.ones((rep, rep), dtype=np.float32))[..., None]
            shown = img * up + (1 - up) * np.array([0.05, 0.05, 0.05], dtype=np.float32)
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"{title}\nexpected {100 * exp:.1f}%", fontsize=9)
            # the share of this panel's channel that is dropped (the title's "expected" is the mean)
            ax.set_xlabel(f"{100 * (1 - float(keep[c].mean())):.0f}% of channel {c + 1} dropped", fontsize=8)
    for c in range(channels):
        ax = axes[c][0]
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
            ax.imshow(img)
            ax.set_title(f"input image\n({name})", fontsize=9)
            ax.set_xlabel(f"seen as a {size}x{size} feature map", fontsize=8)
        else:
            ax.axis("off")
    for c in range(channels):
        axes[c][1].set_ylabel(f"mask of channel {c + 1}", fontsize=8)
    fig.suptitle(f"What each method drops from a {size}x{size} feature map at drop rate {drop_prob:g}: "
                 f"one row per channel, each with its own mask (dark = dropped; seed {seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"input {name}, {size}x{size} map, drop_prob {drop_prob:g}; dropped: " + ", ".join(summary)
