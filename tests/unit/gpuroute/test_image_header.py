"""image_size against what Pillow itself writes and reads."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from gpuroute.image_header import image_size


def _encode(fmt: str, size: tuple[int, int], **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 1), (640, 480), (333, 1017), (4000, 3)])
@pytest.mark.parametrize(("fmt", "options"), [
    ("PNG", {}),
    ("JPEG", {}),
    ("JPEG", {"progressive": True}),
    ("JPEG", {"exif": Image.Exif().tobytes() + b"\0" * 64}),
    ("WEBP", {"lossless": True}),
    ("WEBP", {"quality": 80}),
    ("GIF", {}),
    ("BMP", {}),
])
def test_matches_pillow(fmt: str, options: dict[str, object], size: tuple[int, int]) -> None:
    data = _encode(fmt, size, **options)
    assert Image.open(io.BytesIO(data)).size == size
    assert image_size(data) == size


def test_webp_extended_header() -> None:
    # Pillow writes VP8X when the image carries metadata such as EXIF.
    data = _encode("WEBP", (300, 200), exif=Image.Exif().tobytes())
    assert data[12:16] == b"VP8X"
    assert image_size(data) == (300, 200)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP",
                                  b"GIF89a\0", b"BM" + b"\0" * 30])
def test_unknown_or_truncated_is_none(data: bytes) -> None:
    assert image_size(data) is None


def test_truncated_real_headers_never_raise() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        data = _encode(fmt, (64, 48))
        for cut in range(0, 64):
            result = image_size(data[:cut])
            assert result is None or result == (64, 48)


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    prefixes = [b"\xff\xd8", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"RIFF\0\0\0\0WEBPVP8 ", b"GIF89a", b"BM"]
    for _ in range(2000):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 64))
        result = image_size(data)
        assert result is None or (result[0] > 0 and result[1] > 0)
