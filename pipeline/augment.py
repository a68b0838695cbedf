"""Per-sample random affine augmentation, done on the training device in one batched call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(images: torch.Tensor, generator: torch.Generator, rotate: float, scale: float,
                  shift: float) -> torch.Tensor:
    """Rotate (degrees), zoom (relative) and shift (pixels) each image of (B, 28, 28) at random.

    Values keep their range (bilinear interpolation, zeros outside); shape and dtype are kept.
    """
    batch, height, width = images.shape
    u = torch.rand(batch, 4, generator=generator, device=images.device) * 2 - 1
    angle = u[:, 0] * math.radians(rotate)
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # Sampling coordinates run over [-1, 1]: one pixel is 2 / width of them.
    tx, ty = u[:, 2] * shift * 2 / width, u[:, 3] * shift * 2 / height
    # The sampling grid as one matrix product: each output pixel's (x, y, 1) times each image's
    # 2x3 affine matrix. F.affine_grid does the same with a batched matmul several times slower.
    xs = (torch.arange(width, device=images.device) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=images.device) * 2 + 1) / height - 1
    base = torch.stack([xs.repeat(height), ys.repeat_interleave(width), torch.ones_like(xs).repeat(height)])
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = (theta.reshape(-1, 3) @ base).view(batch, 2, height, width).permute(0, 2, 3, 1)
    out = F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.squeeze(1).to(images.dtype)
