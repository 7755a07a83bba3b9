"""An independent, plain re-implementation of the official TensorFlow DropBlock
(tensorflow/tpu, models/official/resnet/resnet_model.py), written from the published
algorithm (docs/paper.md) and kept deliberately literal: noise of the full tensor shape, a
valid-block-center mask, a min-pool with SAME padding, one scalar normaliser.

Generalised only where the official code cannot go: H != W (each side uses its own
size and clipped block) -- the formulas reduce to the official ones when H == W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tf_drop_block(x: torch.Tensor, keep_prob: float, dropblock_size: int, generator=None) -> torch.Tensor:
    n, c, height, width = x.shape
    bs_h = min(dropblock_size, height)
    bs_w = min(dropblock_size, width)
    seed_drop_rate = (
        (1.0 - keep_prob) * (width * height) / (bs_w * bs_h) / ((width - bs_w + 1) * (height - bs_h + 1))
    )
    h_i = torch.arange(height).view(height, 1).expand(height, width)
    w_i = torch.arange(width).view(1, width).expand(height, width)
    valid_block_center = (
        (w_i >= bs_w // 2) & (w_i < width - (bs_w - 1) // 2) & (h_i >= bs_h // 2) & (h_i < height - (bs_h - 1) // 2)
    ).to(torch.float64)
    randnoise = torch.rand(x.shape, dtype=torch.float64, generator=generator)
    block_pattern = ((1 - valid_block_center) + (1 - seed_drop_rate) + randnoise >= 1).to(torch.float64)
    if bs_h == height and bs_w == width:
        block_pattern = block_pattern.amin(dim=(2, 3), keepdim=True).expand_as(block_pattern)
    else:
        # -max_pool(-pattern, ksize, stride 1, 'SAME'): TF pads (k-1)//2 before, k//2 after;
        # padded cells never win a min, so pad with 1.
        pad = [(bs_w - 1) // 2, bs_w // 2, (bs_h - 1) // 2, bs_h // 2]
        padded = F.pad(block_pattern, pad, value=1.0)
        block_pattern = -F.max_pool2d(-padded, (bs_h, bs_w), stride=1)
    percent_ones = block_pattern.sum() / block_pattern.numel()
    return (x.to(torch.float64) / percent_ones * block_pattern).to(x.dtype)
