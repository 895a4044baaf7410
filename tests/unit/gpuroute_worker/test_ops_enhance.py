"""Enhancement ops against Pillow's ImageOps / ImageEnhance / UnsharpMask and NumPy.

Bounds and measured values on these crops:
- autocontrast, equalize: exact (they work on 8-bit levels like Pillow), also on
  random small images with few levels.
- Brightness / Contrast / Color: Pillow truncates its blend to 8 bits, we keep float:
  factor 0 exact; otherwise measured 51.9 to 55.1 dB and at most 1 level off;
  asserted >= 48 dB and <= 1 level.
- UnsharpMask: float blur vs Pillow's 8-bit one, amplified by `percent`: measured
  48.9 to 53.5 dB for percent <= 150, 42.1 dB for percent 300 with threshold 0;
  asserted >= 45 dB and >= 40 dB respectively.
- gamma: NumPy float64 reference, max |diff| <= 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageEnhance, ImageFilter, ImageOps

from gpuroute_worker.ops import enhance, filters
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_equal, assert_psnr, photo, pil, to_tensor, to_uint8


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("cutoff", [0.0, 2.0, 10.5, 49.0])
def test_autocontrast_is_exact(name: str, cutoff: float) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(enhance.autocontrast(to_tensor(image), cutoff))
    ref = np.asarray(ImageOps.autocontrast(pil(image), cutoff=cutoff))
    assert_equal(ours, ref, f"autocontrast(cutoff={cutoff}) on {name}")


@pytest.mark.parametrize("name", IMAGES)
def test_equalize_is_exact(name: str) -> None:
    image = photo(name, *IMAGES[name])
    assert_equal(to_uint8(enhance.equalize(to_tensor(image))), np.asarray(ImageOps.equalize(pil(image))), "equalize")


def test_histogram_ops_exact_on_sparse_histograms() -> None:
    # Few distinct levels exercise the corner cases: one level, tiny steps, cut-offs
    # that swallow whole bins, LUT values that would pass 255.
    rng = np.random.default_rng(7)
    for trial in range(40):
        levels = rng.choice(256, size=int(rng.integers(1, 6)), replace=False)
        image = rng.choice(levels, size=(int(rng.integers(1, 20)), int(rng.integers(1, 20)), 3)).astype(np.uint8)
        cutoff = float(rng.choice([0.0, 1.0, 20.0, 33.3, 49.0]))
        x = to_tensor(image)
        assert_equal(to_uint8(enhance.equalize(x)), np.asarray(ImageOps.equalize(pil(image))), f"equalize #{trial}")
        assert_equal(
            to_uint8(enhance.autocontrast(x, cutoff)),
            np.asarray(ImageOps.autocontrast(pil(image), cutoff=cutoff)),
            f"autocontrast({cutoff}) #{trial}",
        )


ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("op", ENHANCERS)
@pytest.mark.parametrize("factor", [0.0, 0.5, 1.7])
def test_image_enhance_matches_pillow(name: str, op: str, factor: float) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(getattr(enhance, op)(to_tensor(image), factor))
    ref = np.asarray(ENHANCERS[op](pil(image)).enhance(factor))
    if factor == 0.0:
        assert_equal(ours, ref, f"{op}(0) on {name}")
        return
    max_diff = int(np.abs(ours.astype(int) - ref.astype(int)).max())
    assert max_diff <= 1, f"{op}({factor}) on {name}: {max_diff} levels off"
    assert_psnr(ours, ref, 48.0, f"{op}({factor}) on {name}")


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize(
    ("radius", "percent", "threshold", "bound"), [(2.0, 150, 3, 45.0), (5.0, 80, 10, 45.0), (1.0, 300, 0, 40.0)]
)
def test_sharpen_matches_unsharp_mask(name: str, radius: float, percent: int, threshold: int, bound: float) -> None:
    image = photo(name, *IMAGES[name])
    ours = to_uint8(enhance.sharpen(to_tensor(image), radius, percent, threshold))
    ref = np.asarray(pil(image).filter(ImageFilter.UnsharpMask(radius, percent, threshold)))
    assert_psnr(ours, ref, bound, f"UnsharpMask({radius}, {percent}, {threshold}) on {name}")


@pytest.mark.parametrize("value", [0.4, 1.0, 2.2])
def test_gamma_matches_numpy(value: float) -> None:
    image = photo("chelsea", *IMAGES["chelsea"])
    ref = (image.astype(np.float64) / 255.0) ** (1.0 / value)
    ours = enhance.gamma(to_tensor(image), value)[0].permute(1, 2, 0).numpy()
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-5, f"gamma({value}) max |diff| {err:.2e} vs NumPy"


def test_denoise_dispatches_to_median_and_gaussian() -> None:
    x = to_tensor(photo("astronaut", 40, 50))
    assert torch.equal(enhance.denoise(x, "median", 5, 1.0), filters.median(x, 5))
    assert torch.equal(enhance.denoise(x, "gaussian", 3, 1.5), filters.gaussian_blur(x, 1.5))
