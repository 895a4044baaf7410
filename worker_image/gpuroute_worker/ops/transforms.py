"""Geometric transforms: crop, flip, pad and rotation by any angle.

Rotation reproduces Pillow's Image.rotate: the same shortcuts for multiples of 90
degrees, the same inverse affine matrix (rounded to 15 decimals), the same expanded
canvas size, nearest sampling in its 16.16 fixed point, and bilinear sampling that
leaves every output pixel whose source point falls outside the image at the fill colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gpuroute.ops_catalog import parse_rgba
from gpuroute_worker.ops.channels import has_alpha, premultiply, unpremultiply
from gpuroute_worker.ops.levels import LUMA_B, LUMA_G, LUMA_R

# Pillow's nearest path uses 16.16 fixed point while every source coordinate fits in it.
_FIXED_LIMIT = 32768.0


def fill_levels(fill: str, channels: int) -> tuple[int, ...]:
    """#rrggbb[aa] -> one 8-bit level per channel of an image with `channels` channels.

    Grey images get the colour's luma (Pillow's convert('L') rounding); images without
    alpha ignore the fill's alpha, images with alpha get it (255 for #rrggbb).
    """
    r, g, b, a = parse_rgba(fill)
    if channels in (1, 2):
        grey = (r * LUMA_R + g * LUMA_G + b * LUMA_B + 0x8000) >> 16
        return (grey,) if channels == 1 else (grey, a)
    return (r, g, b) if channels == 3 else (r, g, b, a)


def fill_tensor(fill: str, like: Tensor, *, premultiplied: bool = False) -> Tensor:
    """#rrggbb[aa] -> (1, C, 1, 1) float colour matching `like`'s channels and device."""
    values = torch.tensor(fill_levels(fill, like.shape[1]), dtype=like.dtype, device=like.device) / 255.0
    values = values.view(1, -1, 1, 1)
    return premultiply(values) if premultiplied else values


def crop(x: Tensor, left: int, top: int, width: int, height: int) -> Tensor:
    return x[..., top : top + height, left : left + width]


def flip(x: Tensor, direction: str) -> Tensor:
    return x.flip(-1 if direction == "horizontal" else -2)


def _pad_index(size: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    i = torch.arange(-before, size + after, device=device)
    if mode == "edge" or size == 1:
        return i.clamp_(0, size - 1)
    # numpy.pad "reflect": mirror about the edge pixel without repeating it, and keep
    # mirroring when the border is wider than the image (period 2 * (size - 1)).
    period = 2 * (size - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= size, period - i, i)


def pad(x: Tensor, left: int, top: int, right: int, bottom: int, mode: str, fill: str) -> Tensor:
    """Add a border like numpy.pad with mode constant (fill colour), edge or reflect."""
    n, c, h, w = x.shape
    if mode == "constant":
        out = fill_tensor(fill, x).expand(n, c, h + top + bottom, w + left + right).clone()
        out[..., top : top + h, left : left + w] = x
        return out
    rows = _pad_index(h, top, bottom, mode, x.device)
    cols = _pad_index(w, left, right, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


@dataclass(frozen=True)
class RotatePlan:
    """How Pillow would rotate an image of a given size."""

    kind: str
    """copy, rot90, rot180, rot270 (exact transposes) or affine."""
    height: int
    width: int
    matrix: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    """Output pixel centre -> source point, Pillow's (a, b, c, d, e, f)."""


def rotate_plan(height: int, width: int, angle: float, expand: bool) -> RotatePlan:
    """Image.rotate's geometry, in the same float operations so sizes match exactly."""
    angle = angle % 360.0
    if angle == 0:
        return RotatePlan("copy", height, width)
    if angle == 180:
        return RotatePlan("rot180", height, width)
    if angle in (90, 270) and (expand or width == height):
        return RotatePlan("rot90" if angle == 90 else "rot270", width, height)

    w, h = width, height
    cx, cy = w / 2, h / 2
    rad = -math.radians(angle)
    m = [
        round(math.cos(rad), 15), round(math.sin(rad), 15), 0.0,
        round(-math.sin(rad), 15), round(math.cos(rad), 15), 0.0,
    ]

    def apply(px: float, py: float) -> tuple[float, float]:
        return m[0] * px + m[1] * py + m[2], m[3] * px + m[4] * py + m[5]

    m[2], m[5] = apply(-cx, -cy)
    m[2] += cx
    m[5] += cy
    if expand:
        corners = [apply(px, py) for px, py in ((0, 0), (w, 0), (w, h), (0, h))]
        xs = [p[0] for p in corners]
        ys = [p[1] for p in corners]
        nw = math.ceil(max(xs)) - math.floor(min(xs))
        nh = math.ceil(max(ys)) - math.floor(min(ys))
        m[2], m[5] = apply(-(nw - w) / 2.0, -(nh - h) / 2.0)
        w, h = nw, nh
    return RotatePlan("affine", h, w, (m[0], m[1], m[2], m[3], m[4], m[5]))


def _fixed(v: float) -> int:
    return math.floor(v * 65536.0 + 0.5)


def _nearest_source(plan: RotatePlan, in_h: int, in_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Integer source pixel per output pixel, as Pillow's affine_fixed (or its float fallback)."""
    a0, a1, a2, a3, a4, a5 = plan.matrix
    ys = torch.arange(plan.height, device=device, dtype=torch.int64).view(-1, 1)
    xs = torch.arange(plan.width, device=device, dtype=torch.int64).view(1, -1)
    corners = ((0, 0), (plan.width, plan.height), (0, plan.height), (plan.width, 0))
    if all(abs(x * a0 + y * a1 + a2) < _FIXED_LIMIT and abs(x * a3 + y * a4 + a5) < _FIXED_LIMIT for x, y in corners):
        # The row start and per-pixel step are rounded to 16.16 once and then added up,
        # which integer arithmetic reproduces bit for bit.
        xx = _fixed(a2 + a0 * 0.5 + a1 * 0.5) + ys * _fixed(a1) + xs * _fixed(a0)
        yy = _fixed(a5 + a3 * 0.5 + a4 * 0.5) + ys * _fixed(a4) + xs * _fixed(a3)
        return xx >> 16, yy >> 16
    fx = (a2 + a1 * 0.5 + a0 * 0.5) + ys.double() * a1 + xs.double() * a0
    fy = (a5 + a4 * 0.5 + a3 * 0.5) + ys.double() * a4 + xs.double() * a3
    # Pillow's COORD(): any negative coordinate is outside (-1), else truncation.
    return torch.where(fx < 0, -1, fx.long()), torch.where(fy < 0, -1, fy.long())


def _gather(x: Tensor, yi: Tensor, xi: Tensor) -> Tensor:
    """x[n, c, yi, xi] for (H', W') index maps shared by the whole batch."""
    n, c, h, w = x.shape
    flat = (yi * w + xi).reshape(1, -1).expand(n * c, -1)
    # gather on a flat view: several times faster on CPU than index_select on the last dim.
    return torch.gather(x.reshape(n * c, h * w), 1, flat).view(n, c, *yi.shape)


def rotate(x: Tensor, angle: float, expand: bool, method: str, fill: str) -> Tensor:
    """Rotate counter-clockwise by `angle` degrees about the centre, like Image.rotate.

    With alpha and bilinear sampling the colour is premultiplied first, as Pillow does,
    so transparent pixels' hidden colour does not bleed into the edges.
    """
    if method != "nearest" and has_alpha(x):
        plan = rotate_plan(x.shape[-2], x.shape[-1], angle, expand)
        if plan.kind == "affine":
            return unpremultiply(_rotate(premultiply(x), angle, expand, method, fill, premultiplied=True))
    return _rotate(x, angle, expand, method, fill)


def _rotate(x: Tensor, angle: float, expand: bool, method: str, fill: str, *, premultiplied: bool = False) -> Tensor:
    h, w = x.shape[-2:]
    plan = rotate_plan(h, w, angle, expand)
    if plan.kind == "copy":
        return x
    if plan.kind == "rot180":
        return x.flip(-1, -2)
    if plan.kind in ("rot90", "rot270"):
        return torch.rot90(x, 1 if plan.kind == "rot90" else -1, dims=(-2, -1))

    if method == "nearest":
        xi, yi = _nearest_source(plan, h, w, x.device)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        values = _gather(x, yi.clamp(0, h - 1), xi.clamp(0, w - 1))
    else:
        a0, a1, a2, a3, a4, a5 = plan.matrix
        # Source points in float64, as Pillow's generic transform computes them.
        ys = torch.arange(plan.height, device=x.device, dtype=torch.float64).view(-1, 1) + 0.5
        xs = torch.arange(plan.width, device=x.device, dtype=torch.float64).view(1, -1) + 0.5
        sx = a0 * xs + a1 * ys + a2
        sy = a3 * xs + a4 * ys + a5
        inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        sx = sx - 0.5
        sy = sy - 0.5
        x0 = torch.floor(sx)
        y0 = torch.floor(sy)
        dx = (sx - x0).to(x.dtype)
        dy = (sy - y0).to(x.dtype)
        x0 = x0.long()
        y0 = y0.long()
        # Neighbours outside the image repeat the edge pixel (Pillow's XCLIP/YCLIP).
        xa, xb = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
        ya, yb = y0.clamp(0, h - 1), (y0 + 1).clamp(0, h - 1)
        top = torch.lerp(_gather(x, ya, xa), _gather(x, ya, xb), dx)
        bottom = torch.lerp(_gather(x, yb, xa), _gather(x, yb, xb), dx)
        values = torch.lerp(top, bottom, dy)
    return torch.where(inside, values, fill_tensor(fill, x, premultiplied=premultiplied))
