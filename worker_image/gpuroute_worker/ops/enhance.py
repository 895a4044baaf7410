"""Tone and colour enhancement with Pillow's ImageOps and ImageEnhance semantics.

Every statistic (histogram, mean grey) is taken per image, never over the batch, so an
image's result does not depend on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gpuroute_worker.ops.filters import gaussian_blur, median
from gpuroute_worker.ops.levels import (
    apply_lut,
    from_levels,
    histograms,
    luma,
    luma_levels,
    to_levels,
)


def _identity_lut(like: Tensor) -> Tensor:
    return torch.arange(256, device=like.device, dtype=torch.int64).expand_as(like)


def autocontrast(x: Tensor, cutoff: float) -> Tensor:
    """ImageOps.autocontrast(image, cutoff) per channel, on 8-bit levels."""
    levels = to_levels(x)
    hist = histograms(levels)
    # Every image in a batch has the same pixel count, so Pillow's Python expression
    # gives one cut for all, computed here with the same float floor division.
    pixels = levels.shape[-1] * levels.shape[-2]
    cut = int(pixels * cutoff // 100)
    # Removing `cut` pixels from the dark end leaves the first bin whose running count
    # exceeds it as the lowest level; the same from the bright end for the highest.
    lo = (hist.cumsum(-1) > cut).to(torch.int64).argmax(dim=-1, keepdim=True)
    from_top = hist.flip(-1).cumsum(-1) > cut
    hi = 255 - from_top.to(torch.int64).argmax(dim=-1, keepdim=True)

    ix = torch.arange(256, device=x.device, dtype=torch.float64)
    span = (hi - lo).clamp(min=1).to(torch.float64)
    # Tensor by tensor: torch turns `scalar / tensor` (and, on CUDA, `tensor / scalar`)
    # into a multiplication by a reciprocal, which is an ulp away from Python's division
    # and flips int() on exact levels such as 94 * 255 / 235 = 102.
    scale = torch.full_like(span, 255.0) / span
    offset = -lo.to(torch.float64) * scale
    # Two separate roundings (multiply, then add) as in Pillow's Python loop; int()
    # truncates toward zero, and negatives clamp to 0 either way.
    stretched = torch.trunc(ix * scale + offset).clamp(0.0, 255.0).to(torch.int64)
    lut = torch.where(hi > lo, stretched, _identity_lut(stretched))
    return from_levels(apply_lut(levels, lut), x.dtype)


def equalize(x: Tensor) -> Tensor:
    """ImageOps.equalize per channel, on 8-bit levels (recent Pillow divides the step by 255; older releases used 256)."""
    levels = to_levels(x)
    hist = histograms(levels)
    nonzero = hist > 0
    used = nonzero.sum(dim=-1, keepdim=True)
    last_used = 255 - nonzero.flip(-1).to(torch.int64).argmax(dim=-1, keepdim=True)
    total = hist.sum(dim=-1, keepdim=True)
    step = (total - hist.gather(-1, last_used)) // 255
    safe_step = step.clamp(min=1)
    before = hist.cumsum(-1) - hist  # pixels strictly below each level
    mapped = ((safe_step // 2 + before) // safe_step).clamp(max=255)
    lut = torch.where((used > 1) & (step > 0), mapped, _identity_lut(mapped))
    return from_levels(apply_lut(levels, lut), x.dtype)


def _blend(degenerate: Tensor, image: Tensor, factor: float) -> Tensor:
    # Image.blend(degenerate, image, factor): factor above 1 extrapolates, then clips.
    return (degenerate + factor * (image - degenerate)).clamp_(0.0, 1.0)


def brightness(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return (x * factor).clamp_(0.0, 1.0)


def contrast(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Contrast: blend with the image's mean grey, int(mean + 0.5) of its 8-bit luma."""
    grey = luma_levels(to_levels(x)).to(torch.float64)
    # Sum, then one true division, as ImageStat does (the sum of levels is exact in
    # float64); a tensor divisor keeps CUDA from multiplying by a rounded reciprocal.
    total = grey.sum(dim=(1, 2, 3), keepdim=True)
    mean = torch.floor(total / torch.full_like(total, grey[0].numel()) + 0.5)
    degenerate = (mean / 255.0).to(x.dtype)
    return _blend(degenerate, x, factor)


def saturation(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Color: blend with the luma image (grey is its own luma: unchanged)."""
    if x.shape[1] == 1:
        return x
    return _blend(luma(x), x, factor)


def gamma(x: Tensor, value: float) -> Tensor:
    """out = in ** (1 / gamma)."""
    return x.clamp(0.0, 1.0).pow(1.0 / value)


def sharpen(x: Tensor, radius: float, percent: int, threshold: int) -> Tensor:
    """ImageFilter.UnsharpMask(radius, percent, threshold).

    The threshold compares the difference in whole 8-bit levels, as Pillow does, so a
    change of exactly `threshold` levels is left alone.
    """
    blurred = gaussian_blur(x, radius)
    diff = x - blurred
    apply = torch.round(diff.abs() * 255.0) > threshold
    return torch.where(apply, x + diff * (percent / 100.0), x).clamp_(0.0, 1.0)


def denoise(x: Tensor, method: str, size: int, radius: float,
            check_deadline: Callable[[], None] | None = None) -> Tensor:
    """Median filter (keeps edges; checks `check_deadline` between strips) or Gaussian blur."""
    if method == "median":
        return median(x, size, check_deadline)
    return gaussian_blur(x, radius)
