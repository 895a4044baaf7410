"""Image dimensions from the first bytes of a file, without decoding it (pure, no Pillow).

The operator has no image library and must not decode user input; it only wants to know
how many pixels an inline input holds so the router can compare pools on that job's size.
An unknown or truncated header gives None (the router then uses the typical size).
"""

from __future__ import annotations

import struct

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""Start-of-frame markers (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames)."""
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
"""Markers without a length field (TEM, RST0-7)."""


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, WebP, GIF or BMP, or None if the header is not one of those."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
        elif data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp_size(data)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
        elif data.startswith(b"BM"):
            width, height = struct.unpack("<ii", data[18:26])
            height = abs(height)  # negative height: rows stored top-down
        else:
            return None
    except struct.error:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return (width, height) if width and height else None
        if marker == 0xDA or length < 2:  # scan data follows; no frame header before it
            return None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None
