"""Decoding limits and encoding round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from gpuroute_worker.codec import DecodeError, decode_image, encode_image


def _png(w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_limits_are_enforced_before_decoding() -> None:
    with pytest.raises(DecodeError, match="pixels, limit is 9999"):
        decode_image(_png(100, 100), max_bytes=1 << 20, max_pixels=9999)
    with pytest.raises(DecodeError, match="bytes, limit is 10"):
        decode_image(_png(10, 10), max_bytes=10, max_pixels=1 << 20)
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", max_bytes=10, max_pixels=10)
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"junk" * 50, max_bytes=1 << 20, max_pixels=1 << 20)


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert tuple(decode_image(buffer.getvalue(), max_bytes=1 << 20, max_pixels=1 << 20).shape) == (3, 30, 10)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trip(fmt: str) -> None:
    pixels = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    encoded = encode_image(pixels, fmt=fmt, quality=95)
    assert (encoded.width, encoded.height, encoded.format) == (20, 12, fmt)
    decoded = decode_image(encoded.data, max_bytes=1 << 20, max_pixels=1 << 20)
    if fmt == "png":
        assert torch.equal(decoded, pixels)
    assert len(encoded.sha256) == 64
