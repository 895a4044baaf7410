"""Pillow-compatible resizing as one matrix product per axis.

Pillow's Image.resize is separable: for each output pixel it precomputes normalized
filter weights over a window of input pixels (pixel centres at +0.5, the support
widened by the shrink factor so downscaling is antialiased), runs the horizontal pass,
then the vertical one. The same weights here form an (out, in) matrix per axis, so the
whole resize is two matmuls and runs unchanged on CPU and GPU. NEAREST is Pillow's
affine nearest-neighbour path, reproduced index for index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gpuroute.ops_catalog import RESAMPLE_DENSE_LIMIT
from gpuroute_worker.ops.channels import has_alpha, premultiply, unpremultiply

FilterFn = Callable[[np.ndarray], np.ndarray]

# Above this many matrix entries (16 MiB of float32) an axis is split into bands of
# output pixels, each dense only over the input span it reads, so a 16k x 16k resize
# never materializes a 1 GiB weight matrix and cached plans stay small.
_DENSE_LIMIT = RESAMPLE_DENSE_LIMIT


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys cubic convolution with a = -0.5, as Pillow's bicubic_filter.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    # Pillow's window is half-open, [-3, 3).
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


FILTERS: dict[str, tuple[FilterFn, float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}
"""Filter function and support radius (in output-scaled input pixels) per method."""


def target_size(
    height: int, width: int, *, scale: float | None, out_width: int | None, out_height: int | None
) -> tuple[int, int]:
    """(h, w) a resize step asks for: `scale`, or width/height with the aspect kept for a missing side."""
    if scale is not None:
        return max(1, round(height * scale)), max(1, round(width * scale))
    if out_width is not None and out_height is not None:
        return out_height, out_width
    if out_width is not None:
        return max(1, round(height * out_width / width)), out_width
    if out_height is not None:
        return out_height, max(1, round(width * out_height / height))
    return height, width


@dataclass(frozen=True)
class _Band:
    """Weights of output pixels [out0, out1) over input pixels [in0, in1)."""

    out0: int
    out1: int
    in0: int
    in1: int
    weights: np.ndarray
    """(out1 - out0, in1 - in0) float32."""


@functools.lru_cache(maxsize=32)
def _plan(in_size: int, out_size: int, method: str) -> tuple[_Band, ...]:
    """Pillow's precompute_coeffs for one axis, cut into dense bands."""
    fn, base_support = FILTERS[method]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = math.ceil(support) * 2 + 1

    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # Pillow rounds with a C (int) cast, i.e. truncation toward zero, then clamps.
    xmin = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64)
    taps = xmin[:, None] + np.arange(ksize)[None, :]
    valid = taps < xmax[:, None]
    w = fn((taps - centers[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(valid, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w.copy(), where=total != 0.0)

    rows = out_size if out_size * in_size <= _DENSE_LIMIT else max(1, _DENSE_LIMIT // in_size)
    bands = []
    for out0 in range(0, out_size, rows):
        out1 = min(out0 + rows, out_size)
        in0 = int(xmin[out0:out1].min())
        in1 = int(xmax[out0:out1].max())
        dense = np.zeros((out1 - out0, in1 - in0), dtype=np.float32)
        keep = valid[out0:out1]
        # Taps of one output pixel are distinct input pixels, so plain assignment suffices.
        rows_of = np.broadcast_to(np.arange(out1 - out0)[:, None], keep.shape)
        dense[rows_of[keep], (taps[out0:out1] - in0)[keep]] = w[out0:out1][keep]
        bands.append(_Band(out0, out1, in0, in1, dense))
    return tuple(bands)


@functools.lru_cache(maxsize=64)
def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index per output pixel exactly as Pillow's ImagingScaleAffine computes it."""
    step = in_size / out_size
    # Pillow accumulates `xo += a[0]` in double; cumsum adds in the same order.
    coords = np.cumsum(np.concatenate(([step * 0.5], np.full(out_size - 1, step))))
    index = np.where(coords < 0.0, -1, coords.astype(np.int64))
    return np.clip(index, 0, in_size - 1)


def _weights(band: _Band, like: Tensor) -> Tensor:
    return torch.from_numpy(band.weights).to(device=like.device, dtype=like.dtype)


def _resample_width(x: Tensor, out_w: int, method: str) -> Tensor:
    bands = _plan(x.shape[-1], out_w, method)
    parts = [x[..., b.in0 : b.in1] @ _weights(b, x).T for b in bands]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _resample_height(x: Tensor, out_h: int, method: str) -> Tensor:
    bands = _plan(x.shape[-2], out_h, method)
    parts = [_weights(b, x) @ x[..., b.in0 : b.in1, :] for b in bands]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def resize(x: Tensor, out_h: int, out_w: int, method: str) -> Tensor:
    """Resize (N, C, H, W) to (N, C, out_h, out_w) like Pillow's Image.resize.

    With alpha, filters other than nearest work on premultiplied colour, as Pillow's do.
    """
    h, w = x.shape[-2:]
    if (h, w) == (out_h, out_w):
        return x
    if method != "nearest" and has_alpha(x):
        return unpremultiply(_resize(premultiply(x), out_h, out_w, method))
    return _resize(x, out_h, out_w, method)


def _resize(x: Tensor, out_h: int, out_w: int, method: str) -> Tensor:
    h, w = x.shape[-2:]
    if method == "nearest":
        if w != out_w:
            x = x.index_select(-1, torch.from_numpy(_nearest_index(w, out_w)).to(x.device))
        if h != out_h:
            x = x.index_select(-2, torch.from_numpy(_nearest_index(h, out_h)).to(x.device))
        return x
    if method not in FILTERS:
        raise ValueError(f"unknown resampling method {method!r}")
    if w != out_w:
        # Pillow stores the horizontal pass as 8-bit, which clips overshoot before the
        # vertical pass; clamping here keeps bicubic and lanczos ringing the same.
        x = _resample_width(x, out_w, method).clamp_(0.0, 1.0)
    if h != out_h:
        x = _resample_height(x, out_h, method).clamp_(0.0, 1.0)
    return x
