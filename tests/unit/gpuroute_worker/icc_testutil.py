"""ICC profiles built by the tests themselves: a Display P3 matrix/TRC profile in the
ICC v2 layout (the published P3 colorants, adapted to D50, and the sRGB tone curve).

Not a test module (no test_ prefix).
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
DISPLAY_P3 = {
    "rXYZ": (0.515102, 0.241182, -0.001050),
    "gXYZ": (0.291965, 0.692236, 0.041885),
    "bXYZ": (0.157153, 0.066574, 0.784378),
}
"""Display P3 primaries as D50-adapted XYZ colorants (Apple's Display P3 profile)."""
_SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
"""parametricCurveType 3 parameters of the sRGB transfer function: g, a, b, c, d."""


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in values)


def _para() -> bytes:
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in _SRGB_CURVE)


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    body = b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text
    return body + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67


def _text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def matrix_profile(name: str, colorants: dict[str, tuple[float, float, float]]) -> bytes:
    """An RGB display profile (v2.1) from D50 colorants and the sRGB tone curve."""
    return _profile(b"RGB ", [
        (b"desc", _desc(name)),
        (b"cprt", _text("No copyright, test profile")),
        (b"wtpt", _xyz(D50)),
        (b"rXYZ", _xyz(colorants["rXYZ"])),
        (b"gXYZ", _xyz(colorants["gXYZ"])),
        (b"bXYZ", _xyz(colorants["bXYZ"])),
        (b"rTRC", _para()),
        (b"gTRC", _para()),
        (b"bTRC", _para()),
    ])


def grey_profile() -> bytes:
    """A grey display profile (v2.1): the sRGB tone curve on one channel."""
    return _profile(b"GRAY", [(b"desc", _desc("Grey sRGB curve (gpuroute test)")),
                              (b"cprt", _text("No copyright, test profile")),
                              (b"wtpt", _xyz(D50)), (b"kTRC", _para())])


def _profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + space + b"XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"APPL" + b"\0" * 4 + b"\0" * 4 + b"\0" * 4
              + b"\0" * 8 + struct.pack(">I", 0) + b"".join(_s15(v) for v in D50) + b"lcms" + b"\0" * 16
              + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def display_p3() -> bytes:
    return matrix_profile("Display P3 (gpuroute test)", DISPLAY_P3)
