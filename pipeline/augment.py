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
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / width of them.
    tx, ty = u[:, 2] * shift * 2 / width, u[:, 3] * shift * 2 / height
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    out = F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.squeeze(1).to(images.dtype)
