"""Per-sample random augmentation, done on the training device in a few batched calls: an affine
move (rotation, zoom, shift) and, optionally, an elastic distortion (Simard et al., 2003: a random
displacement field smoothed by a Gaussian), both applied by one bilinear resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config import Settings


def blur_matrix(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """M with M @ v the Gaussian blur (3 sigma each side, zeros beyond) of v: an image X blurs as
    M @ X @ M.T, two small matrix products, far cheaper on a CPU than a wide convolution."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    offset = torch.arange(size, device=device)[None, :] - torch.arange(size, device=device)[:, None]
    inside = offset.abs() <= radius
    return torch.where(inside, kernel[(offset + radius).clamp(0, 2 * radius)], torch.zeros(()))


def elastic_field(batch: int, height: int, width: int, alpha: float, sigma: float,
                  generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, H, W, 2) displacements in pixels: uniform noise in [-1, 1] per pixel and axis, smoothed
    by a Gaussian of std sigma, times alpha (Simard's alpha=34, sigma=4 is a strong setting)."""
    noise = torch.rand(batch * 2, height, width, generator=generator, device=device) * 2 - 1
    # Blur along the rows, then along the columns, each as one large matrix product.
    along_w = (noise.reshape(-1, width) @ blur_matrix(width, sigma, device).T).view_as(noise)
    along_h = along_w.transpose(1, 2).reshape(-1, height) @ blur_matrix(height, sigma, device).T
    smooth = along_h.view(batch, 2, width, height).transpose(2, 3)
    return (smooth * alpha).permute(0, 2, 3, 1)


def random_affine(images: torch.Tensor, generator: torch.Generator, rotate: float, scale: float,
                  shift: float, elastic: float = 0.0, elastic_sigma: float = 4.0) -> torch.Tensor:
    """Rotate (degrees), zoom (relative), shift (pixels) and, with elastic > 0, distort each image of
    (B, 28, 28) at random. Bilinear, zeros outside: range, shape and dtype are kept."""
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
    if elastic > 0:
        field = elastic_field(batch, height, width, elastic, elastic_sigma, generator, images.device)
        grid = grid + field * torch.tensor([2 / width, 2 / height], device=images.device)
    out = F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.squeeze(1).to(images.dtype)


def augment(images: torch.Tensor, generator: torch.Generator, cfg: Settings) -> torch.Tensor:
    return random_affine(images, generator, cfg.rotate, cfg.scale, cfg.shift, cfg.elastic,
                         cfg.elastic_sigma)
