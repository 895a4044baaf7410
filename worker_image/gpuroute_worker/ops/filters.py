"""Neighbourhood and colour filters: Gaussian blur, median, 3x3 kernels, grey, sepia, invert.

The blur follows Pillow's algorithm rather than a sampled Gaussian: three passes of a
box blur whose radius has a fractional part (Gwosdek et al., as in BoxBlur.c), each
pass extending the edge pixel outward. Pillow rounds to 8 bits after every pass; here
values stay in float, so results differ from Pillow's by that rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gpuroute.ops_catalog import MEDIAN_STRIP_ELEMENTS
from gpuroute_worker.ops.channels import to_rgb
from gpuroute_worker.ops.levels import luma

BLUR_PASSES = 3
"""Box passes per axis; Pillow's GaussianBlur and UnsharpMask use 3."""

FIND_EDGES = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
EMBOSS = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
EMBOSS_OFFSET = 128.0 / 255.0

SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))
"""Classic sepia matrix: output channel rows, input channel columns."""

# Median windows are gathered strip by strip so the size*size copies of a large image
# never exist at once; the catalogue's memory estimate counts one strip.
_MEDIAN_STRIP_ELEMENTS = MEDIAN_STRIP_ELEMENTS


def box_blur_radius(sigma: float, passes: int = BLUR_PASSES) -> float:
    """Fractional box radius whose `passes`-fold repetition has standard deviation `sigma`.

    Computed in float32 like Pillow's _gaussian_blur_radius, so the boxes are the same.
    """
    f = np.float32
    sigma2 = f(sigma) * f(sigma) / f(passes)
    big_l = f(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = f(math.floor((float(big_l) - 1.0) / 2.0))
    a = (f(2) * small_l + f(1)) * (small_l * (small_l + f(1)) - f(3) * sigma2)
    a = a / (f(6) * (sigma2 - (small_l + f(1)) * (small_l + f(1))))
    return float(small_l + a)


def _box_weights(radius: float) -> tuple[int, float, float]:
    """Integer radius, inner and outer tap weights exactly as Pillow's 24-bit fixed point."""
    r = int(radius)
    ww = int(np.float32(1 << 24) / (np.float32(radius) * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    return r, ww / float(1 << 24), fw / float(1 << 24)


def _edge_index(size: int, before: int, after: int, device: torch.device) -> Tensor:
    return torch.arange(-before, size + after, device=device).clamp_(0, size - 1)


def _box_pass_last_dim(x: Tensor, r: int, inner: float, outer: float) -> Tensor:
    """One fractional box pass along the last dim, edge pixels repeated outward.

    Running sums make the cost independent of the radius; they are kept in float64
    because a float32 prefix sum over a 16k-pixel row would lose the low bits.
    """
    n = x.shape[-1]
    p = x.index_select(-1, _edge_index(n, r + 1, r + 1, x.device))
    c = F.pad(torch.cumsum(p, dim=-1), (1, 0))
    window = c[..., 2 * r + 2 : 2 * r + 2 + n] - c[..., 1 : 1 + n]
    return window * inner + (p[..., :n] + p[..., 2 * r + 2 : 2 * r + 2 + n]) * outer


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Pillow's GaussianBlur(sigma): three fractional box passes per axis."""
    radius = box_blur_radius(sigma)
    if radius == 0.0:
        return x
    r, inner, outer = _box_weights(radius)
    y = x.to(torch.float64)
    for _ in range(BLUR_PASSES):
        y = _box_pass_last_dim(y, r, inner, outer)
    y = y.transpose(-1, -2)
    for _ in range(BLUR_PASSES):
        y = _box_pass_last_dim(y, r, inner, outer)
    return y.transpose(-1, -2).to(x.dtype).clamp_(0.0, 1.0)


def median(x: Tensor, size: int, check_deadline: Callable[[], None] | None = None) -> Tensor:
    """Pillow's MedianFilter(size): edges repeated outward, middle of size*size values.
    `check_deadline` runs before every strip, so a long filter stops at the deadline."""
    n, c, h, w = x.shape
    half = size // 2
    rows = _edge_index(h, half, half, x.device)
    cols = _edge_index(w, half, half, x.device)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    strip = max(1, _MEDIAN_STRIP_ELEMENTS // max(1, n * c * w * size * size))
    out = []
    for y0 in range(0, h, strip):
        if check_deadline is not None:
            check_deadline()
        y1 = min(y0 + strip, h)
        windows = padded[:, :, y0 : y1 + 2 * half, :].unfold(2, size, 1).unfold(3, size, 1)
        # An odd count has a single middle element, so the lower median is Pillow's rank.
        out.append(windows.reshape(n, c, y1 - y0, w, size * size).median(dim=-1).values)
    return torch.cat(out, dim=2)


def kernel3x3(x: Tensor, kernel: tuple[tuple[float, ...], ...], offset: float = 0.0) -> Tensor:
    """A 3x3 kernel applied like Pillow's ImageFilter.Kernel, edges repeated outward.

    Pillow multiplies the kernel's first row with the row *below* the pixel (its loop
    reads image[y + 1] with kernel[0..2]), so rows are taken bottom-up here. Nine
    shifted multiply-adds instead of a convolution: cuDNN may run float32 convolutions
    in TF32, which would lose the exact 8-bit results. Pillow copies the outermost
    pixels unchanged, and so does this.
    """
    h, w = x.shape[-2:]
    padded = x.index_select(-2, _edge_index(h, 1, 1, x.device)).index_select(-1, _edge_index(w, 1, 1, x.device))
    out = torch.full_like(x, offset)
    for row, weights in enumerate(kernel):
        dy = 2 - row
        for dx, weight in enumerate(weights):
            if weight:
                out += weight * padded[..., dy : dy + h, dx : dx + w]
    out.clamp_(0.0, 1.0)
    out[..., 0, :] = x[..., 0, :]
    out[..., h - 1, :] = x[..., h - 1, :]
    out[..., :, 0] = x[..., :, 0]
    out[..., :, w - 1] = x[..., :, w - 1]
    return out


def find_edges(x: Tensor) -> Tensor:
    return kernel3x3(x, FIND_EDGES)


def emboss(x: Tensor) -> Tensor:
    return kernel3x3(x, EMBOSS, EMBOSS_OFFSET)


def grayscale(x: Tensor) -> Tensor:
    """Colour channels -> one luma channel (Pillow's convert('L')); grey stays as it is."""
    return luma(x).clamp(0.0, 1.0)


def sepia(x: Tensor, amount: float) -> Tensor:
    """Colour (grey is expanded to RGB first, as Pillow converts it) -> sepia-toned RGB."""
    x = to_rgb(x)
    matrix = torch.tensor(SEPIA, dtype=x.dtype, device=x.device)
    toned = torch.einsum("oc,nchw->nohw", matrix, x).clamp_(0.0, 1.0)
    return torch.lerp(x, toned, amount)


def invert(x: Tensor) -> Tensor:
    return 1.0 - x
