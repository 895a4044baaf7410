"""The Pillow reference checks again, on CUDA (skipped without a GPU).

Same bounds as the CPU tests: exact where the CPU result is exact, the same PSNR bound
otherwise; and the CUDA result must agree with the CPU one to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import enhance, filters, resample, run_pipeline, transforms
from tests.unit.gpuroute_worker.ops_testutil import IMAGES, assert_equal, assert_psnr, photo, pil, to_tensor, to_uint8

pytestmark = pytest.mark.gpu

Ours = Callable[[torch.Tensor], torch.Tensor]
Ref = Callable[[Image.Image], Image.Image]
H, W = IMAGES["chelsea"]
CASES: dict[str, tuple[Ours, Ref, float]] = {
    "resize nearest": (lambda x: resample.resize(x, 2 * H + 1, W // 2, "nearest"),
                       lambda p: p.resize((W // 2, 2 * H + 1), Image.Resampling.NEAREST), math.inf),
    "resize bicubic": (lambda x: resample.resize(x, 3 * H, 3 * W, "bicubic"),
                       lambda p: p.resize((3 * W, 3 * H), Image.Resampling.BICUBIC), 50.0),
    "resize lanczos": (lambda x: resample.resize(x, 37, 53, "lanczos"),
                       lambda p: p.resize((53, 37), Image.Resampling.LANCZOS), 50.0),
    "resize bilinear": (lambda x: resample.resize(x, 37, 3 * W, "bilinear"),
                        lambda p: p.resize((3 * W, 37), Image.Resampling.BILINEAR), 50.0),
    "blur": (lambda x: filters.gaussian_blur(x, 2.0), lambda p: p.filter(ImageFilter.GaussianBlur(2.0)), 45.0),
    "median": (lambda x: filters.median(x, 5), lambda p: p.filter(ImageFilter.MedianFilter(5)), math.inf),
    "invert": (filters.invert, ImageOps.invert, math.inf),
    "autocontrast": (lambda x: enhance.autocontrast(x, 2.0), lambda p: ImageOps.autocontrast(p, cutoff=2.0), math.inf),
    "equalize": (enhance.equalize, ImageOps.equalize, math.inf),
    "contrast": (lambda x: enhance.contrast(x, 1.7), lambda p: ImageEnhance.Contrast(p).enhance(1.7), 48.0),
    "saturation": (lambda x: enhance.saturation(x, 0.5), lambda p: ImageEnhance.Color(p).enhance(0.5), 48.0),
    "sharpen": (lambda x: enhance.sharpen(x, 2.0, 150, 3), lambda p: p.filter(ImageFilter.UnsharpMask(2.0, 150, 3)), 45.0),
    "rotate nearest": (lambda x: transforms.rotate(x, 30.0, True, "nearest", "#102030"),
                       lambda p: p.rotate(30.0, Image.Resampling.NEAREST, expand=True, fillcolor=(16, 32, 48)), math.inf),
    "rotate bilinear": (lambda x: transforms.rotate(x, -45.5, False, "bilinear", "#102030"),
                        lambda p: p.rotate(-45.5, Image.Resampling.BILINEAR, fillcolor=(16, 32, 48)), 48.0),
    "rotate 90": (lambda x: transforms.rotate(x, 90, True, "bilinear", "#000000"),
                  lambda p: p.rotate(90, Image.Resampling.BILINEAR, expand=True), math.inf),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_on_cuda(case: str) -> None:
    ours_fn, ref_fn, bound = CASES[case]
    image = photo("chelsea", H, W)
    on_gpu = ours_fn(to_tensor(image, "cuda"))
    assert on_gpu.is_cuda
    ours = to_uint8(on_gpu)
    ref = np.asarray(ref_fn(pil(image)))
    if math.isinf(bound):
        assert_equal(ours, ref, f"{case} on CUDA")
    else:
        assert_psnr(ours, ref, bound, f"{case} on CUDA")
    on_cpu = ours_fn(to_tensor(image))
    err = float((on_gpu.cpu() - on_cpu).abs().max())
    assert err <= 2e-5, f"{case}: CUDA and CPU differ by {err:.2e}"


@pytest.mark.parametrize("name", ["find_edges", "emboss"])
def test_kernels_exact_on_cuda(name: str) -> None:
    image = photo("astronaut", *IMAGES["astronaut"])
    ours = to_uint8(getattr(filters, name)(to_tensor(image, "cuda")))
    ref = np.asarray(pil(image).filter(ImageFilter.FIND_EDGES if name == "find_edges" else ImageFilter.EMBOSS))
    assert_equal(ours[1:-1, 1:-1], ref[1:-1, 1:-1], f"{name} interior on CUDA")


def test_pipeline_on_cuda_matches_cpu() -> None:
    steps = normalize_steps([
        {"op": "autocontrast", "cutoff": 1}, {"op": "resize", "width": 90, "method": "lanczos"},
        {"op": "sharpen"}, {"op": "rotate", "angle": 12, "expand": True}, {"op": "equalize"},
    ])
    batch = torch.cat([to_tensor(photo(n, H, W)) for n in ("chelsea", "astronaut", "coffee")])
    on_gpu = run_pipeline(batch.cuda(), steps)
    on_cpu = run_pipeline(batch, steps)
    assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape
    # Equalize maps whole levels, so a float difference at a rounding edge moves a pixel
    # by a level or more: compare the fraction of pixels that differ.
    differ = (to_uint8(on_gpu.cpu(), 0) != to_uint8(on_cpu, 0)).mean()
    assert differ < 0.01, f"{differ:.2%} of values differ between CUDA and CPU"
