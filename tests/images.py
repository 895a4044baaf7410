"""Images the tests make themselves (nothing is downloaded)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of seeded uniform noise: incompressible, so sizes and timings are realistic."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
