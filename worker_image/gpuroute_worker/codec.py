"""Decode inputs to uint8 tensors and encode outputs, with size limits.

Runs on worker threads, never on the GPU executor's thread.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DECODABLE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"})
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class DecodeError(ValueError):
    """The input is not an image this worker accepts; the job's fault, never retried."""


@dataclass(frozen=True)
class Encoded:
    """An encoded output image."""

    data: bytes
    """The file's bytes."""
    width: int
    """Width in pixels."""
    height: int
    """Height in pixels."""
    sha256: str
    """Hex digest of `data`."""
    format: str
    """png, jpeg or webp."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Encoded bytes to a (3, H, W) uint8 RGB tensor, EXIF orientation applied."""
    if len(data) > max_bytes:
        raise DecodeError(f"input is {len(data)} bytes, limit is {max_bytes}")
    if not data:
        raise DecodeError("input is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and errors above 2x) on huge images; our own limit applies first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in DECODABLE_FORMATS:
                raise DecodeError(f"input format {image.format} is not supported")
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(f"input is {width}x{height} = {width * height} pixels, limit is {max_pixels}")
            image = ImageOps.exif_transpose(image).convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"input is not a readable image: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def encode_image(pixels: torch.Tensor, *, fmt: str, quality: int) -> Encoded:
    """A (3, H, W) uint8 tensor to PNG, JPEG or WebP bytes."""
    array = pixels.permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(array, mode="RGB")
    buffer = io.BytesIO()
    options: dict[str, object] = {}
    if fmt in ("jpeg", "webp"):
        options["quality"] = quality
    else:
        # Level 1 is ~3x faster than Pillow's default 6 for a few percent more bytes.
        options["compress_level"] = 1
    image.save(buffer, format=_PIL_FORMAT[fmt], **options)
    data = buffer.getvalue()
    return Encoded(data, image.width, image.height, hashlib.sha256(data).hexdigest(), fmt)
