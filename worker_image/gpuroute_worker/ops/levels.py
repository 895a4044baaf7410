"""8-bit level helpers for the ops Pillow defines on integer levels.

Images travel as float tensors in [0, 1]; histogram ops (autocontrast, equalize) and
the mean grey of Contrast are defined by Pillow on 0..255 integers, so they quantize
first with the same rounding the worker uses when it encodes the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ITU-R 601-2 luma in Pillow's 16-bit fixed point (convert("L")): the float weights are
# the same fractions, so float luma differs from Pillow's only by its final rounding.
LUMA_R, LUMA_G, LUMA_B = 19595, 38470, 7471


def to_levels(x: Tensor) -> Tensor:
    """(…) float in [0, 1] -> int64 levels 0..255, rounded to nearest."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.int64)


def from_levels(levels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer levels -> float in [0, 1]."""
    return levels.to(dtype) / 255.0


def luma(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) float luma with Pillow's convert('L') weights; grey is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * LUMA_R + g * LUMA_G + b * LUMA_B) / 65536.0


def luma_levels(levels: Tensor) -> Tensor:
    """(N, 3, H, W) int64 levels -> (N, 1, H, W) int64 luma exactly as Pillow rounds it; grey as is."""
    if levels.shape[1] == 1:
        return levels
    r, g, b = levels[:, 0:1], levels[:, 1:2], levels[:, 2:3]
    return (r * LUMA_R + g * LUMA_G + b * LUMA_B + 0x8000) >> 16


def histograms(levels: Tensor) -> Tensor:
    """(N, C, H, W) int64 levels -> (N, C, 256) int64 counts, one histogram per image and channel."""
    n, c = levels.shape[:2]
    # One bincount over offset levels keeps it a single kernel on any device.
    offsets = torch.arange(n * c, device=levels.device).view(n, c, 1, 1) * 256
    counts = torch.bincount((levels + offsets).reshape(-1), minlength=n * c * 256)
    return counts.view(n, c, 256)


def apply_lut(levels: Tensor, lut: Tensor) -> Tensor:
    """Map (N, C, H, W) levels through per-image, per-channel (N, C, 256) tables."""
    n, c, h, w = levels.shape
    return torch.gather(lut, 2, levels.reshape(n, c, h * w)).view(n, c, h, w)
