"""Tiled inference for super-resolution models, as Real-ESRGAN's tile_process.

The input is cut into tile x tile squares; each is run with `pad` extra input pixels
on every side that has a neighbour, and only the tile's own region of the output is
kept. Convolutions near a tile's edge then see real neighbouring pixels, so with a pad
at least as wide as the model's receptive field the result equals an untiled run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tiled_forward(
    model: nn.Module | Callable[[Tensor], Tensor],
    batch: Tensor,
    scale: int,
    tile: int = 512,
    pad: int = 16,
    check_deadline: Callable[[], None] | None = None,
    *,
    multiple: int = 1,
) -> Tensor:
    """Run `model` (x`scale`) over (N, C, H, W) `batch` in tiles; one call when it fits in a tile.

    `multiple` is the model's input granularity (pixel-unshuffle factor): tile and pad are
    rounded to it so every tile starts on the same sub-pixel phase as the whole image;
    H and W must already be multiples of it.
    """
    n, _, height, width = batch.shape
    if height % multiple or width % multiple:
        raise ValueError(f"input {width}x{height} is not a multiple of {multiple}")
    if height <= tile and width <= tile:
        return model(batch)
    tile = max(multiple, tile // multiple * multiple)
    pad = _round_up(pad, multiple)

    out: Tensor | None = None
    for ty in range(math.ceil(height / tile)):
        for tx in range(math.ceil(width / tile)):
            if check_deadline is not None:
                check_deadline()
            x0, y0 = tx * tile, ty * tile
            x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
            px0, py0 = max(x0 - pad, 0), max(y0 - pad, 0)
            px1, py1 = min(x1 + pad, width), min(y1 + pad, height)
            result = model(batch[:, :, py0:py1, px0:px1])
            if out is None:
                # Channels and dtype come from the model, which may differ from the input.
                out = result.new_empty(n, result.shape[1], height * scale, width * scale)
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, :, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = result[
                :, :, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
            ]
            del result
    if out is None:
        raise ValueError(f"cannot tile an empty {width}x{height} input")
    return out
