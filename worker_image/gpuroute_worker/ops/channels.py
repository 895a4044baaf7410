"""Channel layouts of the tensors ops work on, and Pillow's rules for alpha.

A batch is (N, C, H, W) float in [0, 1] with C = 1 (grey), 2 (grey + alpha), 3 (RGB)
or 4 (RGBA); alpha, when present, is the last channel and straight (not premultiplied).

Pillow's rules, which the ops follow:
- resampling (resize, rotate with a filter other than nearest) works on premultiplied
  colour, so transparent pixels do not bleed their hidden colour into visible ones;
- neighbourhood filters (blur, unsharp mask, median, 3x3 kernels), crop, flip and pad
  treat alpha as one more band;
- tone and colour ops (ImageOps, ImageEnhance, invert, gamma, grey, sepia) change the
  colour and leave alpha as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def has_alpha(x: Tensor) -> bool:
    return x.shape[1] in (2, 4)


def colour_channels(x: Tensor) -> int:
    return x.shape[1] - 1 if has_alpha(x) else x.shape[1]


def split_alpha(x: Tensor) -> tuple[Tensor, Tensor | None]:
    if has_alpha(x):
        return x[:, :-1], x[:, -1:]
    return x, None


def join_alpha(colour: Tensor, alpha: Tensor | None) -> Tensor:
    return colour if alpha is None else torch.cat((colour, alpha.to(colour.dtype)), dim=1)


def premultiply(x: Tensor) -> Tensor:
    colour, alpha = split_alpha(x)
    return x if alpha is None else torch.cat((colour * alpha, alpha), dim=1)


def unpremultiply(x: Tensor) -> Tensor:
    colour, alpha = split_alpha(x)
    if alpha is None:
        return x
    alpha = alpha.clamp(0.0, 1.0)
    # Fully transparent pixels have no colour left to recover; Pillow gives them 0.
    straight = torch.where(alpha > 0, colour / alpha.clamp(min=1e-12), torch.zeros_like(colour))
    return torch.cat((straight.clamp_(0.0, 1.0), alpha), dim=1)


def to_rgb(colour: Tensor) -> Tensor:
    """Grey colour channels -> three equal ones (Pillow's convert('RGB') of L)."""
    return colour.expand(-1, 3, -1, -1) if colour.shape[1] == 1 else colour
