"""Resizing against Pillow's Image.resize.

Bounds: NEAREST is index-for-index Pillow's (exact). Bilinear, bicubic and lanczos keep
float precision where Pillow rounds to 8 bits between its two passes and uses 22-bit
fixed-point weights: measured 54.8 to 60.2 dB on these crops; asserted >= 50 dB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gpuroute_worker.ops import resample
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_equal, assert_psnr, photo, pil, to_tensor, to_uint8

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
FILTERED_BOUND_DB = 50.0


def _sizes(h: int, w: int) -> list[tuple[int, int]]:
    # Enlarge x3, shrink both sides (antialiased), and enlarge one side while shrinking the other.
    return [(h * 3, w * 3), (37, 53), (h * 2 + 1, w // 2)]


@pytest.mark.parametrize("name", IMAGES)
def test_nearest_is_exact(name: str) -> None:
    h, w = IMAGES[name]
    image = photo(name, h, w)
    for out_h, out_w in [*_sizes(h, w), (h * 7 // 3, w * 5 // 3), (h - 1, w + 1)]:
        ours = to_uint8(resample.resize(to_tensor(image), out_h, out_w, "nearest"))
        ref = np.asarray(pil(image).resize((out_w, out_h), Image.Resampling.NEAREST))
        assert_equal(ours, ref, f"nearest {w}x{h} -> {out_w}x{out_h}")


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("name", IMAGES)
def test_filtered_resize_matches_pillow(name: str, method: str) -> None:
    h, w = IMAGES[name]
    image = photo(name, h, w)
    for out_h, out_w in _sizes(h, w):
        ours = to_uint8(resample.resize(to_tensor(image), out_h, out_w, method))
        ref = np.asarray(pil(image).resize((out_w, out_h), PIL_FILTERS[method]))
        assert_psnr(ours, ref, FILTERED_BOUND_DB, f"{method} {w}x{h} -> {out_w}x{out_h}")


def test_same_size_is_identity() -> None:
    x = to_tensor(photo("astronaut", 20, 30))
    for method in PIL_FILTERS:
        assert torch.equal(resample.resize(x, 20, 30, method), x)


def test_banded_weights_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large axes are split into bands of output pixels; force that on a small image.
    x = to_tensor(photo("chelsea", 97, 131))
    dense = resample.resize(x, 61, 250, "lanczos")
    resample._plan.cache_clear()
    monkeypatch.setattr(resample, "_DENSE_LIMIT", 2000)
    try:
        assert len(resample._plan(131, 250, "lanczos")) > 1
        banded = resample.resize(x, 61, 250, "lanczos")
    finally:
        resample._plan.cache_clear()
    torch.testing.assert_close(banded, dense, rtol=0, atol=1e-6)


def test_target_size() -> None:
    size = resample.target_size
    assert size(100, 200, scale=1.5, out_width=None, out_height=None) == (150, 300)
    assert size(100, 200, scale=0.001, out_width=None, out_height=None) == (1, 1)
    # One side given: the other keeps the aspect ratio, rounded.
    assert size(100, 200, scale=None, out_width=301, out_height=None) == (150, 301)
    assert size(100, 200, scale=None, out_width=None, out_height=33) == (33, 66)
    assert size(100, 200, scale=None, out_width=50, out_height=70) == (70, 50)
