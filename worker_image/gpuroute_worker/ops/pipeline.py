"""Running a normalized pipeline on a batch, and predicting its output size.

Steps arrive normalized by gpuroute.ops_catalog.normalize_steps, so every parameter is
present and within its catalogue bounds; what is checked here is what depends on the
image: crop rectangles, output sizes, model names. output_shape does those checks
without touching the device, and run_pipeline calls it first, so a bad step fails
before any work is spent on the batch.

Device memory: a CUDA out-of-memory error anywhere in the pipeline splits the batch in
halves and reruns each half; at batch 1 the model step retries with ever smaller tiles
down to MIN_TILE before giving up with OutOfMemory, which the runtime reports as a
retryable error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gpuroute.ops_catalog import MAX_DIMENSION
from gpuroute_worker.ops import enhance, filters, resample, transforms
from gpuroute_worker.ops.channels import join_alpha, split_alpha, to_rgb
from gpuroute_worker.ops.errors import OpError, OutOfMemory, step_field
from gpuroute_worker.sr.registry import ModelRegistry, UnknownModel
from gpuroute_worker.sr.tiling import tiled_forward

DEFAULT_TILE = 512
"""Model steps on images larger than this (either side) run tile by tile."""
TILE_PAD = 16
"""Context pixels around each tile, discarded after inference."""
MIN_TILE = 64
"""Smallest tile tried after out-of-memory errors before giving up."""
ASSUMED_MODEL_SCALE = 4
"""Scale output_shape assumes for a model step when no registry is given."""
MODEL_RESIZE_METHOD = "lanczos"
"""Filter that brings a model's native output to a requested scale/width/height."""

Step = Mapping[str, Any]
Deadline = Callable[[], None] | None


@dataclass(frozen=True)
class _Ctx:
    index: int
    models: ModelRegistry | None
    check_deadline: Deadline


def model_dtype(device: torch.device) -> torch.dtype:
    """Precision models run in: half on CUDA, as Real-ESRGAN's inference does; float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------- shapes


def _check_dims(index: int, field: str, height: int, width: int) -> tuple[int, int]:
    if height > MAX_DIMENSION or width > MAX_DIMENSION:
        raise OpError(
            step_field(index, field),
            f"output would be {width}x{height} pixels; the largest side allowed is {MAX_DIMENSION}",
        )
    return height, width


def _size_field(step: Step, fallback: str) -> str:
    for name in ("scale", "width", "height"):
        if step.get(name) is not None:
            return name
    return fallback


def _has_target(step: Step) -> bool:
    return any(step.get(name) is not None for name in ("scale", "width", "height"))


def _resize_target(height: int, width: int, step: Step) -> tuple[int, int]:
    return resample.target_size(
        height, width, scale=step.get("scale"), out_width=step.get("width"), out_height=step.get("height")
    )


def _model_scale(index: int, step: Step, models: ModelRegistry | None) -> int:
    if models is None:
        return ASSUMED_MODEL_SCALE
    try:
        return models.scale(step["model"])
    except UnknownModel as exc:
        raise OpError(step_field(index, "model"), str(exc)) from exc


def _step_shape(height: int, width: int, index: int, step: Step, models: ModelRegistry | None) -> tuple[int, int]:
    op = step["op"]
    if op in ("upscale", "resize"):
        if op == "upscale" and step.get("method") == "model":
            scale = _model_scale(index, step, models)
            native = _check_dims(index, "model", height * scale, width * scale)
            if not _has_target(step):
                return native
        return _check_dims(index, _size_field(step, "scale"), *_resize_target(height, width, step))
    if op == "crop":
        x, y = step["x"], step["y"]
        if x >= width:
            raise OpError(step_field(index, "x"), f"{x} is outside the {width}x{height} image")
        if y >= height:
            raise OpError(step_field(index, "y"), f"{y} is outside the {width}x{height} image")
        if x + step["width"] > width:
            raise OpError(step_field(index, "width"), f"x + width = {x + step['width']} exceeds the image width {width}")
        if y + step["height"] > height:
            raise OpError(step_field(index, "height"), f"y + height = {y + step['height']} exceeds the image height {height}")
        return step["height"], step["width"]
    if op == "pad":
        out_h = height + step["top"] + step["bottom"]
        out_w = width + step["left"] + step["right"]
        if out_w > MAX_DIMENSION:
            return _check_dims(index, "left" if step["left"] >= step["right"] else "right", out_h, out_w)
        return _check_dims(index, "top" if step["top"] >= step["bottom"] else "bottom", out_h, out_w)
    if op == "rotate":
        plan = transforms.rotate_plan(height, width, step["angle"], step["expand"])
        return _check_dims(index, "angle", plan.height, plan.width)
    return height, width


def step_shapes(
    height: int, width: int, steps: Sequence[Step], *, models: ModelRegistry | None = None
) -> list[tuple[int, int]]:
    """The input's (h, w) followed by every step's output (h, w), validating every step.

    Raises OpError for crops outside the image, sides over MAX_DIMENSION and unknown
    models. Without a registry a model step is assumed to upscale x4 (ASSUMED_MODEL_SCALE);
    with one, the model's native scale is read from its weights (once, then cached).
    Nothing is allocated: the runtime checks these shapes against its budget before any
    step runs (gpuroute.ops_catalog.check_budget).
    """
    shapes = [(height, width)]
    for index, step in enumerate(steps):
        height, width = _step_shape(height, width, index, step, models)
        shapes.append((height, width))
    return shapes


def output_shape(
    height: int, width: int, steps: Sequence[Step], *, models: ModelRegistry | None = None
) -> tuple[int, int]:
    """(h, w) the pipeline produces from a height x width input, validating every step (see step_shapes)."""
    return step_shapes(height, width, steps, models=models)[-1]


# ---------------------------------------------------------------------------- memory


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tiled_with_shrinking(model: torch.nn.Module, x: Tensor, scale: int, multiple: int, check: Deadline) -> Tensor:
    tile = DEFAULT_TILE
    while True:
        try:
            return tiled_forward(model, x, scale, tile=tile, pad=TILE_PAD, check_deadline=check, multiple=multiple)
        except torch.cuda.OutOfMemoryError as exc:
            if x.shape[0] > 1:
                raise  # run_pipeline halves the batch before tiles get smaller
            if tile <= MIN_TILE:
                raise OutOfMemory(
                    f"model step does not fit in device memory even with {MIN_TILE}-pixel tiles at batch 1"
                ) from exc.with_traceback(None)
        # Outside the handler: the exception's traceback no longer pins the failed
        # attempt's tensors, so the cache can actually hand their memory back.
        _release(x.device)
        tile = max(MIN_TILE, min(tile, max(x.shape[-2:])) // 2)


# ---------------------------------------------------------------------------- steps


def _upscale_model(x: Tensor, step: Step, ctx: _Ctx) -> Tensor:
    """Models see RGB: grey is expanded and brought back to one channel; alpha is
    resampled on its own with the model-resize filter."""
    colour, alpha = split_alpha(x)
    grey = colour.shape[1] == 1
    out = _upscale_model_rgb(to_rgb(colour).contiguous(), step, ctx)
    if grey:
        out = out.mean(dim=1, keepdim=True)
    if alpha is not None:
        alpha = resample.resize(alpha, out.shape[-2], out.shape[-1], MODEL_RESIZE_METHOD).clamp_(0.0, 1.0)
    return join_alpha(out, alpha)


def _upscale_model_rgb(x: Tensor, step: Step, ctx: _Ctx) -> Tensor:
    if ctx.models is None:
        raise OpError(step_field(ctx.index, "model"), "this worker serves no super-resolution models")
    name = step["model"]
    scale = _model_scale(ctx.index, step, ctx.models)
    try:
        model = ctx.models.load(name, x.device, model_dtype(x.device))
    except UnknownModel as exc:
        raise OpError(step_field(ctx.index, "model"), str(exc)) from exc
    multiple = int(getattr(model, "input_multiple", 1))
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        # Pixel-unshuffle models need sides divisible by their factor; mirrored pixels
        # are added at the bottom/right and their output is cut off again.
        x = transforms.pad(x, 0, 0, pad_w, pad_h, "reflect", "#000000")
    out = _tiled_with_shrinking(model, x.to(model_dtype(x.device)), scale, multiple, ctx.check_deadline)
    out = out[..., : h * scale, : w * scale].float().clamp_(0.0, 1.0)
    if not _has_target(step):
        return out
    target_h, target_w = _resize_target(h, w, step)
    return resample.resize(out, target_h, target_w, MODEL_RESIZE_METHOD)


def _resize(x: Tensor, step: Step, ctx: _Ctx) -> Tensor:
    if step["op"] == "upscale" and step.get("method") == "model":
        return _upscale_model(x, step, ctx)
    h, w = _resize_target(x.shape[-2], x.shape[-1], step)
    return resample.resize(x, h, w, step["method"])


OpFn = Callable[[Tensor, Step, _Ctx], Tensor]


def _colour_only(fn: OpFn) -> OpFn:
    """Tone and colour ops change the colour channels and keep alpha (see ops.channels)."""

    def run(x: Tensor, step: Step, ctx: _Ctx) -> Tensor:
        colour, alpha = split_alpha(x)
        return join_alpha(fn(colour, step, ctx), alpha)

    return run


_OPS: dict[str, OpFn] = {
    "upscale": _resize,
    "resize": _resize,
    "denoise": lambda x, s, c: enhance.denoise(x, s["method"], s["size"], s["radius"], c.check_deadline),
    "sharpen": lambda x, s, c: enhance.sharpen(x, s["radius"], s["percent"], s["threshold"]),
    "autocontrast": _colour_only(lambda x, s, c: enhance.autocontrast(x, s["cutoff"])),
    "equalize": _colour_only(lambda x, s, c: enhance.equalize(x)),
    "gamma": _colour_only(lambda x, s, c: enhance.gamma(x, s["gamma"])),
    "brightness": _colour_only(lambda x, s, c: enhance.brightness(x, s["factor"])),
    "contrast": _colour_only(lambda x, s, c: enhance.contrast(x, s["factor"])),
    "saturation": _colour_only(lambda x, s, c: enhance.saturation(x, s["factor"])),
    "blur": lambda x, s, c: filters.gaussian_blur(x, s["radius"]),
    "edges": lambda x, s, c: filters.find_edges(x),
    "emboss": lambda x, s, c: filters.emboss(x),
    "grayscale": _colour_only(lambda x, s, c: filters.grayscale(x)),
    "sepia": _colour_only(lambda x, s, c: filters.sepia(x, s["amount"])),
    "invert": _colour_only(lambda x, s, c: filters.invert(x)),
    "crop": lambda x, s, c: transforms.crop(x, s["x"], s["y"], s["width"], s["height"]),
    "rotate": lambda x, s, c: transforms.rotate(x, s["angle"], s["expand"], s["method"], s["fill"]),
    "flip": lambda x, s, c: transforms.flip(x, s["direction"]),
    "pad": lambda x, s, c: transforms.pad(x, s["left"], s["top"], s["right"], s["bottom"], s["mode"], s["fill"]),
}


StepTimer = Callable[[str, float], None] | None


def apply_step(x: Tensor, index: int, step: Step, *, models: ModelRegistry | None = None,
               check_deadline: Deadline = None) -> Tensor:
    """One normalized step on a (N, C, H, W) float batch (the CPU path's fallback for
    16-bit images and model steps)."""
    return _OPS[step["op"]](x, step, _Ctx(index, models, check_deadline))


def _run_steps(x: Tensor, steps: Sequence[Step], models: ModelRegistry | None, check: Deadline,
               on_step: StepTimer = None) -> Tensor:
    for index, step in enumerate(steps):
        if check is not None:
            check()
        started = time.perf_counter()
        x = _OPS[step["op"]](x, step, _Ctx(index, models, check))
        if on_step is not None:
            # CUDA runs asynchronously: wait for the step so its time is its own.
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            on_step(step["op"], time.perf_counter() - started)
    return x.clamp(0.0, 1.0)


def _run_splitting(x: Tensor, steps: Sequence[Step], models: ModelRegistry | None, check: Deadline,
                   on_step: StepTimer = None) -> Tensor:
    try:
        return _run_steps(x, steps, models, check, on_step)
    except torch.cuda.OutOfMemoryError as exc:
        if x.shape[0] == 1:
            raise OutOfMemory(f"pipeline does not fit in device memory at batch 1: {exc}") from exc.with_traceback(None)
    # Released outside the handler, for the same reason as in _tiled_with_shrinking.
    _release(x.device)
    half = (x.shape[0] + 1) // 2
    first = _run_splitting(x[:half], steps, models, check, on_step)
    second = _run_splitting(x[half:], steps, models, check, on_step)
    return torch.cat((first, second))


def run_pipeline(
    batch: Tensor,
    steps: Sequence[Step],
    *,
    models: ModelRegistry | None = None,
    check_deadline: Callable[[], None] | None = None,
    on_step: StepTimer = None,
) -> Tensor:
    """Apply normalized `steps` to a (N, C, H, W) float batch in [0, 1]; returns (N, C', H', W') in [0, 1].

    C is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA); grayscale and sepia change the
    colour channel count, alpha is kept through every op (see ops.channels).

    `check_deadline` is called between steps and between tiles and may raise to abort.
    `on_step(op, seconds)`, when given, receives each step's wall time (for metrics).
    """
    if batch.dim() != 4 or batch.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"expected a (N, C, H, W) batch with C in 1..4, got shape {tuple(batch.shape)}")
    output_shape(batch.shape[-2], batch.shape[-1], steps, models=models)
    with torch.no_grad():
        return _run_splitting(batch.to(torch.float32), steps, models, check_deadline, on_step)
