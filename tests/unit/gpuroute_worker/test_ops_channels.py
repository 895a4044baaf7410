"""Every op on grey, grey + alpha, RGB and RGBA images, against Pillow.

Two implementations are checked against the same Pillow reference:
- the CPU path (ops.cpu.run_cpu): Pillow itself or torch's uint8 resize, so exact, or
  within one level (antialiased bilinear/bicubic on RGB);
- the torch float code the GPU runs (ops.run_pipeline), within PSNR bounds. With alpha
  the comparison is on premultiplied colour (what is visible) plus the alpha channel:
  Pillow premultiplies in 8 bits, so a nearly transparent pixel's straight colour is
  only known to within 255 / alpha levels and differs legitimately.

Alpha rules (Pillow's): resampling premultiplies; filters, crop, flip and pad treat
alpha as a band; tone and colour ops keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.codec import to_tensor
from gpuroute_worker.ops import run_pipeline
from gpuroute_worker.ops.cpu import run_cpu
from gpuroute_worker.ops.filters import SEPIA
from tests.unit.gpuroute_worker.ops_testutil import photo

MODES = ("L", "LA", "RGB", "RGBA")
H, W = 48, 64


def _image(mode: str) -> Image.Image:
    rgb = photo("astronaut", H, W)
    yy, xx = np.mgrid[0:H, 0:W]
    alpha = np.clip(xx * 255 // (W - 1), 0, 255).astype(np.uint8)
    alpha[:, : W // 6] = 0  # a fully transparent band
    alpha[: H // 4] = 255   # and an opaque one
    base = Image.fromarray(rgb)
    if mode == "L":
        return base.convert("L")
    if mode == "RGB":
        return base
    colour = base.convert("L") if mode == "LA" else base
    return Image.merge(mode, (*colour.split(), Image.fromarray(alpha)))


def _colour_only(fn: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], Image.Image]:
    def run(image: Image.Image) -> Image.Image:
        if image.mode not in ("LA", "RGBA"):
            return fn(image)
        *colour, alpha = image.split()
        out = fn(colour[0] if image.mode == "LA" else Image.merge("RGB", colour))
        return Image.merge("LA" if out.mode == "L" else "RGBA", (*out.split(), alpha))

    return run


def _sepia(image: Image.Image) -> Image.Image:
    rgb = image.convert("RGB")
    return Image.blend(rgb, rgb.convert("RGB", tuple(v for row in SEPIA for v in (*row, 0.0))), 0.8)


def _gamma(image: Image.Image) -> Image.Image:
    return image.point([round(255 * (i / 255) ** (1 / 1.8)) for i in range(256)] * len(image.getbands()))


CASES: dict[str, tuple[dict[str, Any], Callable[[Image.Image], Image.Image], float]] = {
    # name: (step, Pillow reference, PSNR bound for the float torch code)
    "resize bicubic 0.5": ({"op": "resize", "scale": 0.5, "method": "bicubic"},
                           lambda im: im.resize((W // 2, H // 2), Image.Resampling.BICUBIC), 40.0),
    "resize bilinear 0.7": ({"op": "resize", "width": 45, "height": 34, "method": "bilinear"},
                            lambda im: im.resize((45, 34), Image.Resampling.BILINEAR), 40.0),
    "upscale lanczos 2": ({"op": "upscale", "scale": 2, "method": "lanczos"},
                          lambda im: im.resize((W * 2, H * 2), Image.Resampling.LANCZOS), 40.0),
    "upscale nearest 3": ({"op": "upscale", "scale": 3, "method": "nearest"},
                          lambda im: im.resize((W * 3, H * 3), Image.Resampling.NEAREST), 99.0),
    "blur": ({"op": "blur", "radius": 2}, lambda im: im.filter(ImageFilter.GaussianBlur(2)), 42.0),
    "sharpen": ({"op": "sharpen", "radius": 2, "percent": 150, "threshold": 3},
                lambda im: im.filter(ImageFilter.UnsharpMask(2, 150, 3)), 30.0),
    "median": ({"op": "denoise", "method": "median", "size": 3},
               lambda im: im.filter(ImageFilter.MedianFilter(3)), 99.0),
    "edges": ({"op": "edges"}, lambda im: im.filter(ImageFilter.FIND_EDGES), 99.0),
    "emboss": ({"op": "emboss"}, lambda im: im.filter(ImageFilter.EMBOSS), 99.0),
    "autocontrast": ({"op": "autocontrast", "cutoff": 2}, _colour_only(lambda c: ImageOps.autocontrast(c, cutoff=2)),
                     99.0),
    "equalize": ({"op": "equalize"}, _colour_only(ImageOps.equalize), 99.0),
    "invert": ({"op": "invert"}, _colour_only(ImageOps.invert), 99.0),
    "gamma": ({"op": "gamma", "gamma": 1.8}, _colour_only(_gamma), 99.0),
    "brightness": ({"op": "brightness", "factor": 1.3}, lambda im: ImageEnhance.Brightness(im).enhance(1.3), 45.0),
    "contrast": ({"op": "contrast", "factor": 0.7}, lambda im: ImageEnhance.Contrast(im).enhance(0.7), 45.0),
    "saturation": ({"op": "saturation", "factor": 1.5}, lambda im: ImageEnhance.Color(im).enhance(1.5), 45.0),
    "grayscale": ({"op": "grayscale"}, _colour_only(lambda c: c.convert("L")), 50.0),
    "sepia": ({"op": "sepia", "amount": 0.8}, _colour_only(_sepia), 45.0),
    "crop": ({"op": "crop", "x": 5, "y": 7, "width": 30, "height": 20}, lambda im: im.crop((5, 7, 35, 27)), 99.0),
    "flip": ({"op": "flip", "direction": "vertical"}, lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM), 99.0),
    "rotate 90": ({"op": "rotate", "angle": 90, "expand": True}, lambda im: im.rotate(90, expand=True), 99.0),
    "rotate 17": ({"op": "rotate", "angle": 17, "fill": "#204060"},
                  lambda im: im.rotate(17, Image.Resampling.BILINEAR, fillcolor=_fill(im.mode, (32, 64, 96))), 38.0),
    "pad": ({"op": "pad", "left": 3, "top": 2, "right": 1, "bottom": 4, "fill": "#ff0000"},
            lambda im: _pad(im, (255, 0, 0)), 99.0),
}


def _fill(mode: str, rgb: tuple[int, int, int]) -> tuple[int, ...]:
    grey = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16
    return {"L": (grey,), "LA": (grey, 255), "RGB": rgb, "RGBA": (*rgb, 255)}[mode]


def _pad(image: Image.Image, rgb: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new(image.mode, (image.width + 4, image.height + 6), _fill(image.mode, rgb))
    canvas.paste(image, (3, 2))
    return canvas


def _array(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy()


def _visible(array: np.ndarray) -> np.ndarray:
    """Premultiplied colour plus alpha, as floats in levels."""
    a = array.astype(np.float64)
    if a.shape[2] in (2, 4):
        a[:, :, :-1] *= a[:, :, -1:] / 255.0
    return a


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_cpu_path_matches_pillow(name: str, mode: str) -> None:
    step, reference, _ = CASES[name]
    image = _image(mode)
    expected = np.asarray(reference(image))
    ours = _array(run_cpu(to_tensor(np.asarray(image)), normalize_steps([step])))
    expected = expected[:, :, None] if expected.ndim == 2 else expected
    assert ours.shape == expected.shape, f"{name} on {mode}: {ours.shape} vs {expected.shape}"
    diff = np.abs(ours.astype(int) - expected.astype(int))
    if step.get("method") in ("bilinear", "bicubic") and mode == "RGB":
        # torch's antialiased uint8 kernel: Pillow's weights, its own rounding.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{name} on {mode}"
    else:
        assert diff.max() == 0, f"{name} on {mode}: differs from Pillow by up to {diff.max()} levels"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_torch_path_matches_pillow(name: str, mode: str) -> None:
    step, reference, bound = CASES[name]
    image = _image(mode)
    expected = np.asarray(reference(image))
    expected = expected[:, :, None] if expected.ndim == 2 else expected
    batch = to_tensor(np.asarray(image)).unsqueeze(0).float().div(255.0)
    out = run_pipeline(batch, normalize_steps([step]))
    ours = out[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert ours.shape == expected.shape, f"{name} on {mode}: {ours.shape} vs {expected.shape}"
    if mode in ("LA", "RGBA"):
        assert np.array_equal(ours[:, :, -1] > 0, expected[:, :, -1] > 0) or bound < 99, f"{name}: alpha coverage"
    psnr = _psnr(_visible(ours), _visible(expected))
    assert psnr >= min(bound, 60.0), f"{name} on {mode}: {psnr:.1f} dB"


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_survives_a_whole_pipeline(mode: str) -> None:
    steps = normalize_steps([{"op": "resize", "scale": 0.5}, {"op": "sharpen"}, {"op": "saturation", "factor": 1.2},
                             {"op": "rotate", "angle": 10, "expand": True, "fill": "#00000000"}])
    image = _image(mode)
    for out in (run_cpu(to_tensor(np.asarray(image)), steps),
                run_pipeline(to_tensor(np.asarray(image)).unsqueeze(0).float().div(255.0), steps)[0]):
        assert out.shape[0] == len(mode)
        alpha = out[-1].float()
        assert float(alpha.max()) > 0.9 * (255 if out.dtype == torch.uint8 else 1.0)
        assert float(alpha[0, 0]) == 0.0  # the transparent fill of the expanded corner


def test_sixteen_bit_grey_runs_through_the_cpu_path_at_sixteen_bits() -> None:
    levels = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 21).astype(np.uint16)
    out = run_cpu(to_tensor(levels), normalize_steps([{"op": "flip"}, {"op": "gamma", "gamma": 1.0}]))
    assert out.dtype == torch.uint16
    assert np.array_equal(out[0].numpy(), levels[:, ::-1])
    blurred = run_cpu(to_tensor(levels), normalize_steps([{"op": "blur", "radius": 1}]))
    assert blurred.dtype == torch.uint16
    # Finer than 8 bits: neighbouring levels 21 apart stay distinct after a blur.
    assert len(np.unique(blurred[0].numpy())) > 256
