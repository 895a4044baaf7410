"""The CPU path: each step where it runs fastest on one core, with Pillow's semantics.

On a GPU every op is the torch code in this package. On the CPU that code (float32
tensors, matrix-product resizing) is 3 to 14 times slower than Pillow's hand-tuned 8-bit
C, so a worker without a GPU runs 8-bit images step by step through:

- torch's uint8 channels-last kernels where they beat Pillow: bilinear and bicubic
  resizing of RGB (F.interpolate with antialias, which uses Pillow's filter weights:
  at most one level apart, on a few pixels in a hundred thousand);
- Pillow itself for everything else: the ops are defined by Pillow's results, so these
  are exact, and Pillow's alpha rules (premultiplied resampling, ImageEnhance keeping
  alpha) come with them;
- the torch float code for what Pillow cannot do: 16-bit images and model steps.

The image stays in the form the last step left it in: the decoder's Pillow image goes
through Pillow steps untouched and comes out as the Pillow image the encoder saves, and a
conversion (about 1 ms/Mpix each way, as much as a cheap op) happens only where a torch
step follows a Pillow one or the reverse. Tone ops that map each level on its own
(brightness, contrast, gamma, invert) are one lookup table over every band, alpha mapped
to itself: Pillow's own blend computes the table on a 256-level ramp, so the result is
Pillow's, without ImageEnhance's full-size degenerate image or a split and merge.

Consecutive torch float steps stay in float between them; every other step works on
8-bit pixels, as Pillow does. Nothing waits for batch-mates: the executor runs each CPU
request as soon as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageEnhance, ImageFilter, ImageOps, ImageStat
from torch import Tensor

from gpuroute_worker.codec import MODES, Raster, as_tensor, from_pil, shape_of, to_array, to_pil, to_tensor
from gpuroute_worker.ops import pipeline, resample
from gpuroute_worker.ops.filters import SEPIA
from gpuroute_worker.ops.transforms import fill_levels
from gpuroute_worker.sr.registry import ModelRegistry

Step = Mapping[str, Any]
Deadline = Callable[[], None] | None
StepTimer = Callable[[str, float], None] | None

_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_SEPIA_MATRIX = tuple(v for row in SEPIA for v in (*row, 0.0))


# ---------------------------------------------------------------------------- frames


class _Frame:
    """The image between steps: a Pillow image, a uint8/uint16 tensor or a float batch."""

    def __init__(self, source: Raster) -> None:
        self._image: Image.Image | None = None
        self._pixels: Tensor | None = None
        self._float: Tensor | None = None
        self.sixteen = False
        if isinstance(source, Image.Image):
            self.set_image(source)
        else:
            self.set_pixels(source)

    def result(self) -> Raster:
        """The image as it is now: a Pillow image after a Pillow step, else a tensor."""
        return self._image if self._image is not None else self.pixels()

    def image(self) -> Image.Image:
        if self._image is None:
            self._image = to_pil(self.pixels())
            self._pixels = self._float = None
        return self._image

    def pixels(self) -> Tensor:
        if self._pixels is None:
            if self._float is not None:
                self._pixels = _quantize(self._float[0], sixteen=self.sixteen)
            else:
                assert self._image is not None
                self._pixels = from_pil(self._image)
            self._image = self._float = None
        return self._pixels

    def floats(self) -> Tensor:
        if self._float is None:
            pixels = self.pixels()
            scale = 65535.0 if pixels.dtype == torch.uint16 else 255.0
            self._float = pixels.to(torch.float32).unsqueeze(0).div_(scale)
            self._pixels = self._image = None
        return self._float

    def set_image(self, image: Image.Image) -> None:
        self._image, self._pixels, self._float = image, None, None
        self.sixteen = image.mode.startswith("I;16")

    def set_pixels(self, pixels: Tensor) -> None:
        self._image, self._pixels, self._float = None, pixels, None
        self.sixteen = pixels.dtype == torch.uint16

    def set_floats(self, x: Tensor) -> None:
        self._image, self._pixels, self._float = None, None, x


def _quantize(x: Tensor, *, sixteen: bool) -> Tensor:
    """(C, H, W) float in [0, 1] -> uint8, or uint16 for grey that came in at 16 bits."""
    if sixteen and x.shape[0] == 1:
        levels = x.clamp(0.0, 1.0).mul(65535.0).round_().to(torch.int32)
        return to_tensor(levels.permute(1, 2, 0).numpy().astype(np.uint16))
    out = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return to_tensor(to_array(out))


# ---------------------------------------------------------------------------- Pillow steps


def _split(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if image.mode in ("LA", "RGBA"):
        bands = image.split()
        colour = bands[0] if image.mode == "LA" else Image.merge("RGB", bands[:3])
        return colour, bands[-1]
    return image, None


def _join(colour: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return colour
    if colour.mode == "L":
        return Image.merge("LA", (colour, alpha))
    return Image.merge("RGBA", (*colour.split(), alpha))


_IDENTITY = list(range(256))
_RAMP = Image.frombytes("L", (256, 1), bytes(_IDENTITY))
"""Every 8-bit level once: Pillow's per-level functions evaluated on it give their table."""


def _tone(image: Image.Image, colour_table: Sequence[int]) -> Image.Image:
    """`colour_table` on every colour band, alpha unchanged, in one pass over the pixels."""
    bands = len(image.getbands())
    alpha = image.mode in ("LA", "RGBA")
    return image.point(list(colour_table) * (bands - alpha) + _IDENTITY * alpha)


def _blend_table(base: int, factor: float) -> list[int]:
    """Image.blend(base, level, factor) for every level, by Pillow's own blend (its float
    arithmetic and truncation), so the table gives exactly ImageEnhance's result."""
    return list(Image.blend(Image.new("L", (256, 1), base), _RAMP, factor).tobytes())


def _brightness(image: Image.Image, factor: float) -> Image.Image:
    # ImageEnhance.Brightness blends with black; its alpha is the image's own, so alpha
    # blends with itself and stays.
    return _tone(image, _blend_table(0, factor))


def _contrast(image: Image.Image, factor: float) -> Image.Image:
    # ImageEnhance.Contrast blends with the grey of the image's mean luma (rounded), alpha
    # again the image's own.
    grey = image if image.mode == "L" else image.convert("L")
    mean = int(ImageStat.Stat(grey).mean[0] + 0.5)
    return _tone(image, _blend_table(mean, factor))


def _gamma(image: Image.Image, value: float) -> Image.Image:
    # The float op computes in ** (1 / gamma) and rounds once; this table does the same.
    return _tone(image, [round(255.0 * (i / 255.0) ** (1.0 / value)) for i in range(256)])


def _invert(image: Image.Image) -> Image.Image:
    return _tone(image, _IDENTITY[::-1])


def _sepia(amount: float) -> Callable[[Image.Image], Image.Image]:
    def run(colour: Image.Image) -> Image.Image:
        rgb = colour.convert("RGB")
        toned = rgb.convert("RGB", _SEPIA_MATRIX)
        return Image.blend(rgb, toned, amount)

    return run


def _grayscale(colour: Image.Image) -> Image.Image:
    return colour if colour.mode == "L" else colour.convert("L")


def _fill(fill: str, mode: str) -> tuple[int, ...]:
    levels = fill_levels(fill, len(mode))
    if mode in ("LA", "RGBA") and levels[-1] < 255:
        # Pillow resamples RGBA premultiplied and reads the fill in that space too.
        alpha = levels[-1]
        levels = (*((v * alpha + 127) // 255 for v in levels[:-1]), alpha)
    return levels


def _rotate(image: Image.Image, step: Step) -> Image.Image:
    method = _FILTERS[step["method"]]
    fill = fill_levels(step["fill"], len(image.mode))
    if image.mode in ("LA", "RGBA") and method != Image.Resampling.NEAREST:
        fill = _fill(step["fill"], image.mode)
    return image.rotate(step["angle"], resample=method, expand=step["expand"], fillcolor=fill)


def _sort3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low, high = np.minimum(a, b), np.maximum(a, b)
    return np.minimum(low, c), np.minimum(high, np.maximum(low, c)), np.maximum(high, c)


def _median3(image: Image.Image) -> Image.Image:
    """ImageFilter.MedianFilter(3), exactly, about 5x faster than Pillow's generic rank
    filter (which sorts every window): sort each column of three once, then the median of
    a 3x3 window is the median of (largest column minimum, median of column medians,
    smallest column maximum). Every band on its own, alpha included, and the edges
    replicated, as Pillow does."""
    array = np.asarray(image)
    wide = array.ndim == 3
    padded = np.pad(array, ((1, 1), (1, 1)) + (((0, 0),) if wide else ()), mode="edge")
    width = array.shape[1]
    low, mid, high = _sort3(padded[:-2], padded[1:-1], padded[2:])
    cols = [slice(i, i + width) for i in range(3)]
    lows = np.maximum(np.maximum(low[:, cols[0]], low[:, cols[1]]), low[:, cols[2]])
    highs = np.minimum(np.minimum(high[:, cols[0]], high[:, cols[1]]), high[:, cols[2]])
    mids = _sort3(mid[:, cols[0]], mid[:, cols[1]], mid[:, cols[2]])[1]
    out = _sort3(lows, mids, highs)[1]
    return Image.fromarray(out, mode=image.mode)


def _pad(image: Image.Image, step: Step) -> Image.Image:
    left, top, right, bottom = step["left"], step["top"], step["right"], step["bottom"]
    if step["mode"] == "constant":
        canvas = Image.new(image.mode, (image.width + left + right, image.height + top + bottom),
                           fill_levels(step["fill"], len(image.mode)))
        canvas.paste(image, (left, top))
        return canvas
    array = np.asarray(image)
    widths = ((top, bottom), (left, right)) + (((0, 0),) if array.ndim == 3 else ())
    mode = "edge" if step["mode"] == "edge" or min(array.shape[:2]) == 1 else "reflect"
    return Image.fromarray(np.pad(array, widths, mode=mode))  # type: ignore[call-overload]  # numpy stubs lack str modes


def _resize_pillow(image: Image.Image, step: Step) -> Image.Image:
    h, w = resample.target_size(image.height, image.width, scale=step.get("scale"),
                                out_width=step.get("width"), out_height=step.get("height"))
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), _FILTERS[step["method"]])


def _colour_step(fn: Callable[[Image.Image, Step], Image.Image]) -> Callable[[Image.Image, Step], Image.Image]:
    def run(image: Image.Image, step: Step) -> Image.Image:
        colour, alpha = _split(image)
        return _join(fn(colour, step), alpha)

    return run


_RANK_BAND_WORK = 1 << 22
"""Window samples (pixels x size^2) one band of a banded rank filter sorts: about a tenth
of a second of one core, the longest a deadline or CANCEL waits inside such a step."""


def _median_banded(image: Image.Image, size: int, check_deadline: Deadline) -> Image.Image:
    """ImageFilter.MedianFilter(size), exactly, in row bands with `check_deadline` between
    them. Pillow's rank filter cannot be interrupted and costs about size^2 per pixel (a
    median-9 of a 60 Mpx image runs minutes on one core). Each band is filtered with `half`
    real rows of context on either side, so only the image's own top and bottom rows see
    Pillow's edge replication, as in one call."""
    half = size // 2
    rows = max(1, _RANK_BAND_WORK // max(1, image.width * size * size))
    if rows >= image.height:
        return image.filter(ImageFilter.MedianFilter(size))
    out = Image.new(image.mode, image.size)
    for top in range(0, image.height, rows):
        if check_deadline is not None:
            check_deadline()
        bottom = min(top + rows, image.height)
        above, below = min(half, top), min(half, image.height - bottom)
        band = image.crop((0, top - above, image.width, bottom + below)).filter(ImageFilter.MedianFilter(size))
        out.paste(band.crop((0, above, image.width, above + bottom - top)), (0, top))
    return out


def _denoise(image: Image.Image, step: Step, check_deadline: Deadline = None) -> Image.Image:
    if step["method"] != "median":
        return image.filter(ImageFilter.GaussianBlur(step["radius"]))
    return _median3(image) if step["size"] == 3 else _median_banded(image, step["size"], check_deadline)


def _invert_step(image: Image.Image, step: Step) -> Image.Image:
    # Without alpha, ImageChops' C loop: the same 255 - v as a table, with no table to build
    # (Image.point rounds all 768 entries of a table in Python on every call).
    return ImageChops.invert(image) if image.mode in ("L", "RGB") else _invert(image)


_PILLOW_STEPS: dict[str, Callable[[Image.Image, Step], Image.Image]] = {
    "upscale": _resize_pillow,
    "resize": _resize_pillow,
    "blur": lambda im, step: im.filter(ImageFilter.GaussianBlur(step["radius"])),
    "sharpen": lambda im, step: im.filter(ImageFilter.UnsharpMask(step["radius"], step["percent"], step["threshold"])),
    "denoise": _denoise,
    "autocontrast": _colour_step(lambda c, step: ImageOps.autocontrast(c, cutoff=step["cutoff"])),
    "equalize": _colour_step(lambda c, step: ImageOps.equalize(c)),
    "gamma": lambda im, step: _gamma(im, step["gamma"]),
    "brightness": lambda im, step: _brightness(im, step["factor"]),
    "contrast": lambda im, step: _contrast(im, step["factor"]),
    "saturation": lambda im, step: ImageEnhance.Color(im).enhance(step["factor"]),
    "edges": lambda im, step: im.filter(ImageFilter.FIND_EDGES),
    "emboss": lambda im, step: im.filter(ImageFilter.EMBOSS),
    "grayscale": _colour_step(lambda c, step: _grayscale(c)),
    "sepia": _colour_step(lambda c, step: _sepia(step["amount"])(c)),
    "invert": _invert_step,
    "crop": lambda im, step: im.crop((step["x"], step["y"], step["x"] + step["width"], step["y"] + step["height"])),
    "flip": lambda im, step: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if step["direction"] == "horizontal"
                                          else Image.Transpose.FLIP_TOP_BOTTOM),
    "rotate": _rotate,
    "pad": _pad,
}
"""Steps Pillow runs on the CPU, each (image, normalized step) -> image; built once, not per call."""
_INTERRUPTIBLE_STEPS: dict[str, Callable[[Image.Image, Step, Deadline], Image.Image]] = {"denoise": _denoise}
"""Pillow steps long enough to check the deadline inside themselves, given it as a third argument."""


def _pillow_step(step: Step) -> Callable[[Image.Image, Step], Image.Image] | None:
    if step["op"] == "upscale" and step.get("method") == "model":
        return None
    return _PILLOW_STEPS.get(step["op"])


# ---------------------------------------------------------------------------- torch uint8 steps


def _interpolate_u8(pixels: Tensor, step: Step) -> Tensor:
    """Antialiased uint8 channels-last resize: torch's AVX2 kernel, Pillow's weights."""
    h, w = resample.target_size(pixels.shape[1], pixels.shape[2], scale=step.get("scale"),
                                out_width=step.get("width"), out_height=step.get("height"))
    if (h, w) == tuple(pixels.shape[1:]):
        return pixels
    batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(batch, size=(h, w), mode=step["method"], antialias=True, align_corners=False)
    return out[0]


def _tensor_step(step: Step, pixels: Tensor) -> Tensor | None:
    """Exact uint8 tensor versions of ops too cheap to pay a Pillow round trip for."""
    op = step["op"]
    if op == "crop":
        return pixels[:, step["y"]: step["y"] + step["height"], step["x"]: step["x"] + step["width"]]
    if pixels.dtype != torch.uint8:
        return None  # torch has no uint16 kernels for these: the float path handles 16-bit
    if op == "flip":
        out = pixels.flip(-1 if step["direction"] == "horizontal" else -2)
    elif op == "invert":
        out = pixels.clone()
        colour = out[:-1] if pixels.shape[0] in (2, 4) else out
        torch.sub(255, colour, out=colour)
    else:
        return None
    # Keep the (H, W, C) layout Pillow and the encoder read without another copy.
    return to_tensor(out.permute(1, 2, 0).contiguous().numpy())


def _uses_interpolate(step: Step, mode: str) -> bool:
    # The uint8 kernel handles 3 (and 4) channels-last; with alpha Pillow premultiplies,
    # which the kernel does not, so RGB only.
    return (step["op"] in ("upscale", "resize") and step.get("method") in ("bilinear", "bicubic")
            and mode == "RGB")


# ---------------------------------------------------------------------------- driver


def runs_on_8bit(steps: Sequence[Step], sixteen: bool) -> list[bool]:
    """Per step, whether run_cpu_raster runs it on 8-bit pixels (Pillow, numpy or torch's
    uint8 kernels) rather than the float32 torch code: 16-bit grey and model steps go the
    float way, and a model step's float result is quantized to 8 bits for the next step."""
    return [not sixteen and _pillow_step(step) is not None for step in steps]


def _mode_of(frame: _Frame) -> str:
    if frame._image is not None:
        return frame._image.mode
    pixels = frame._pixels if frame._pixels is not None else frame._float
    assert pixels is not None
    channels = pixels.shape[-3]
    return "I;16" if frame.sixteen and channels == 1 else MODES[channels - 1]


def run_cpu(pixels: Raster, steps: Sequence[Step], *, models: ModelRegistry | None = None,
            check_deadline: Deadline = None, on_step: StepTimer = None) -> Tensor:
    """run_cpu_raster, with the result as a (C', H', W') tensor."""
    return as_tensor(run_cpu_raster(pixels, steps, models=models, check_deadline=check_deadline, on_step=on_step))


def run_cpu_raster(source: Raster, steps: Sequence[Step], *, models: ModelRegistry | None = None,
                   check_deadline: Deadline = None, on_step: StepTimer = None) -> Raster:
    """Run normalized `steps` on one image: a Pillow image (L, LA, RGB, RGBA, I;16) or a
    (C, H, W) uint8 (or 16-bit grey) tensor. Returns the result in the form the last step
    left it (a Pillow image or a tensor), which codec.encode_image takes as it is.

    Shapes and parameters are validated first (pipeline.output_shape), as on the GPU;
    `check_deadline` runs before every step, and inside the steps that can run long (rank
    filters, model tiles) between bands.
    """
    _, height, width = shape_of(source)
    pipeline.output_shape(height, width, steps, models=models)
    frame = _Frame(source)
    for index, step in enumerate(steps):
        if check_deadline is not None:
            check_deadline()
        started = time.perf_counter()
        mode = _mode_of(frame)
        pillow = None if mode == "I;16" else _pillow_step(step)
        quick = _tensor_step(step, frame._pixels) if frame._pixels is not None else None
        if quick is not None:
            frame.set_pixels(quick)
        elif _uses_interpolate(step, mode):
            frame.set_pixels(_interpolate_u8(frame.pixels(), step))
        elif pillow is not None and step["op"] in _INTERRUPTIBLE_STEPS:
            frame.set_image(_INTERRUPTIBLE_STEPS[step["op"]](frame.image(), step, check_deadline))
        elif pillow is not None:
            frame.set_image(pillow(frame.image(), step))
        else:
            # 16-bit grey and model steps: the float torch op, as on the GPU.
            with torch.inference_mode():
                x = pipeline.apply_step(frame.floats(), index, step, models=models, check_deadline=check_deadline)
            frame.set_floats(x.clamp(0.0, 1.0))
        if on_step is not None:
            on_step(step["op"], time.perf_counter() - started)
    return frame.result()
