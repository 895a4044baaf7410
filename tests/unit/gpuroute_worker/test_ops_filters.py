"""Filters against Pillow (ImageFilter, ImageOps, convert('L')) and NumPy.

Bounds and measured values on these crops:
- GaussianBlur: Pillow rounds to 8 bits after each of its six box passes, we keep
  float; measured 49.3 to 58.6 dB, asserted >= 45 dB.
- MedianFilter: exact. FIND_EDGES and EMBOSS: exact, border included (the 1-pixel
  border is copied unchanged, as Pillow does).
- grayscale: measured exact; asserted at most 1 level off (a rounding tie may go
  either way) and >= 60 dB.
- invert: exact. sepia: NumPy float64 reference, max |diff| <= 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageFilter, ImageOps

from gpuroute_worker.ops import filters
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_equal, assert_psnr, photo, pil, psnr, to_tensor, to_uint8

BLUR_BOUND_DB = 45.0


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("radius", [0.5, 2.0, 5.3, 30.0])
def test_gaussian_blur_matches_pillow(name: str, radius: float) -> None:
    # 30 exceeds half the image: the boxes then reach past both edges at once.
    image = photo(name, *IMAGES[name])
    ours = to_uint8(filters.gaussian_blur(to_tensor(image), radius))
    ref = np.asarray(pil(image).filter(ImageFilter.GaussianBlur(radius)))
    assert_psnr(ours, ref, BLUR_BOUND_DB, f"GaussianBlur({radius}) on {name}")


def test_box_radius_matches_pillow_formula() -> None:
    # Gwosdek et al.'s fractional box radius for 3 passes, spot-checked by hand:
    # sigma 2 -> sigma^2/3 = 4/3, L = sqrt(17), l = 1, a = 3 * (2 - 4) / (6 * (4/3 - 4)).
    assert filters.box_blur_radius(2.0) == pytest.approx(1.375, abs=1e-6)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("size", [3, 5, 9])
def test_median_is_exact(name: str, size: int) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(filters.median(to_tensor(image), size))
    ref = np.asarray(pil(image).filter(ImageFilter.MedianFilter(size)))
    assert_equal(ours, ref, f"MedianFilter({size}) on {name}")


def test_median_strips_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    x = to_tensor(photo("chelsea", 41, 37))
    whole = filters.median(x, 5)
    monkeypatch.setattr(filters, "_MEDIAN_STRIP_ELEMENTS", 5000)
    assert torch.equal(filters.median(x, 5), whole)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize(
    ("op", "pillow_filter"), [("find_edges", ImageFilter.FIND_EDGES), ("emboss", ImageFilter.EMBOSS)]
)
def test_3x3_kernels_exact(name: str, op: str, pillow_filter: ImageFilter.Filter) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(getattr(filters, op)(to_tensor(image)))
    ref = np.asarray(pil(image).filter(pillow_filter))
    assert_equal(ours, ref, f"{op} on {name}")


@pytest.mark.parametrize("name", IMAGES)
def test_grayscale_matches_convert_l(name: str) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(filters.grayscale(to_tensor(image)))
    ref = np.asarray(pil(image).convert("L"))
    assert ours.shape[-1] == 1  # one grey channel, as convert("L")
    max_diff = int(np.abs(ours[..., 0].astype(int) - ref.astype(int)).max())
    assert max_diff <= 1, f"grayscale differs from convert('L') by {max_diff} levels"
    assert_psnr(ours[..., 0], ref, 60.0, f"grayscale on {name}")


@pytest.mark.parametrize("name", IMAGES)
def test_invert_is_exact(name: str) -> None:
    image = photo(name, *IMAGES[name])
    assert_equal(to_uint8(filters.invert(to_tensor(image))), np.asarray(ImageOps.invert(pil(image))), "invert")


@pytest.mark.parametrize("amount", [0.0, 0.35, 1.0])
def test_sepia_matches_numpy(amount: float) -> None:
    image = photo("astronaut", *IMAGES["astronaut"])
    x = image.astype(np.float64) / 255.0
    matrix = np.array(filters.SEPIA)
    toned = np.clip(x @ matrix.T, 0.0, 1.0)
    ref = x + amount * (toned - x)
    ours = filters.sepia(to_tensor(image), amount)[0].permute(1, 2, 0).numpy()
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-5, f"sepia({amount}) max |diff| {err:.2e} vs NumPy"
    assert psnr(to_uint8(filters.sepia(to_tensor(image), amount)), np.round(ref * 255).astype(np.uint8)) > 55
