"""The catalogue of image operations: names, parameters, defaults and bounds.

One table serves three readers: the operator validates `spec.steps` against it before a
job is admitted, the worker fills defaults from it before running a step, and a test
checks that the CRD schema documents every parameter listed here. It imports neither
kopf nor torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuroute.fields import FieldError

MAX_STEPS = 16
MAX_DIMENSION = 16384
"""Largest width or height any step may ask for, in pixels."""

RESAMPLING_METHODS = ("nearest", "bilinear", "bicubic", "lanczos")
_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?$")


class StepError(FieldError, ValueError):
    """A step the worker cannot run; `field` names the offending spec path."""


@dataclass(frozen=True)
class Param:
    """One parameter of an op."""

    kind: str
    """One of: number, integer, boolean, string, enum, color."""
    default: Any = None
    """Value used when the step omits the parameter; None means optional without default."""
    minimum: float | None = None
    """Inclusive lower bound for number and integer parameters."""
    maximum: float | None = None
    """Inclusive upper bound for number and integer parameters."""
    choices: tuple[str, ...] = ()
    """Allowed values for enum parameters."""
    required: bool = False
    """Whether the step must set the parameter."""
    doc: str = ""
    """One line for `kubectl explain` and the README."""


@dataclass(frozen=True)
class OpSpec:
    """An operation in the catalogue."""

    family: str
    """upscale, enhance, filter or transform."""
    doc: str
    """What the op does, in one line."""
    params: Mapping[str, Param] = field(default_factory=dict)
    """The op's parameters by name."""


def _num(default: float | None, lo: float, hi: float, doc: str, *, required: bool = False) -> Param:
    return Param("number", default, lo, hi, required=required, doc=doc)


def _int(default: int | None, lo: int, hi: int, doc: str, *, required: bool = False) -> Param:
    return Param("integer", default, lo, hi, required=required, doc=doc)


_FACTOR = _num(1.0, 0.0, 10.0, "Enhancement factor as in Pillow's ImageEnhance: 1.0 leaves the image unchanged.", required=True)
_FILL = Param("color", "#000000",
              doc="Fill colour as #rrggbb (opaque) or #rrggbbaa (aa: alpha, 00 transparent) for uncovered pixels.")

CATALOG: Mapping[str, OpSpec] = {
    "upscale": OpSpec(
        "upscale",
        "Enlarge by `scale` or to `width`/`height` with a classical filter or a super-resolution model.",
        {
            "scale": _num(None, 0.01, 16.0, "Scale factor applied to both sides."),
            "width": _int(None, 1, MAX_DIMENSION, "Target width in pixels; height follows the aspect ratio if unset."),
            "height": _int(None, 1, MAX_DIMENSION, "Target height in pixels; width follows the aspect ratio if unset."),
            "method": Param("enum", "bicubic", choices=(*RESAMPLING_METHODS, "model"),
                            doc="Resampling filter, or `model` for learned super-resolution."),
            "model": Param("string", None, doc="Name of a super-resolution model the pool serves (method: model)."),
        },
    ),
    "denoise": OpSpec(
        "enhance",
        "Remove noise with a median filter or a Gaussian blur.",
        {
            "method": Param("enum", "median", choices=("median", "gaussian"), doc="Median (keeps edges) or Gaussian smoothing."),
            "size": _int(3, 3, 9, "Median window size in pixels (odd)."),
            "radius": _num(1.0, 0.1, 10.0, "Gaussian standard deviation in pixels."),
        },
    ),
    "sharpen": OpSpec(
        "enhance",
        "Unsharp mask with Pillow's UnsharpMask semantics.",
        {
            "radius": _num(2.0, 0.1, 50.0, "Blur radius of the mask in pixels."),
            "percent": _int(150, 0, 500, "Strength of the sharpening in percent."),
            "threshold": _int(3, 0, 255, "Minimum brightness change, in 8-bit levels, that is sharpened."),
        },
    ),
    "autocontrast": OpSpec(
        "enhance",
        "Stretch each channel's histogram to the full range (Pillow ImageOps.autocontrast).",
        {"cutoff": _num(0.0, 0.0, 49.0, "Percent of darkest and lightest pixels ignored.")},
    ),
    "equalize": OpSpec("enhance", "Equalize each channel's histogram (Pillow ImageOps.equalize)."),
    "gamma": OpSpec(
        "enhance",
        "Gamma correction: out = in ** (1 / gamma), so gamma above 1 brightens.",
        {"gamma": _num(1.0, 0.05, 10.0, "Gamma value.", required=True)},
    ),
    "brightness": OpSpec("enhance", "Scale brightness (Pillow ImageEnhance.Brightness).", {"factor": _FACTOR}),
    "contrast": OpSpec("enhance", "Scale contrast around the mean grey (Pillow ImageEnhance.Contrast).", {"factor": _FACTOR}),
    "saturation": OpSpec("enhance", "Scale colour saturation (Pillow ImageEnhance.Color).", {"factor": _FACTOR}),
    "blur": OpSpec(
        "filter",
        "Gaussian blur (Pillow ImageFilter.GaussianBlur).",
        {"radius": _num(2.0, 0.1, 50.0, "Standard deviation in pixels.")},
    ),
    "edges": OpSpec("filter", "Edge detection with Pillow's FIND_EDGES kernel."),
    "emboss": OpSpec("filter", "Emboss with Pillow's EMBOSS kernel."),
    "grayscale": OpSpec("filter", "Luma (ITU-R 601-2, as Pillow's convert('L')): one grey channel (alpha kept)."),
    "sepia": OpSpec(
        "filter",
        "Sepia tone with the classic sepia matrix.",
        {"amount": _num(1.0, 0.0, 1.0, "Blend between the original (0) and full sepia (1).")},
    ),
    "invert": OpSpec("filter", "Invert every channel (Pillow ImageOps.invert)."),
    "resize": OpSpec(
        "transform",
        "Resize to `width`/`height` or by `scale`, antialiased when shrinking.",
        {
            "scale": _num(None, 0.01, 16.0, "Scale factor applied to both sides."),
            "width": _int(None, 1, MAX_DIMENSION, "Target width in pixels; height follows the aspect ratio if unset."),
            "height": _int(None, 1, MAX_DIMENSION, "Target height in pixels; width follows the aspect ratio if unset."),
            "method": Param("enum", "bicubic", choices=RESAMPLING_METHODS, doc="Resampling filter."),
        },
    ),
    "crop": OpSpec(
        "transform",
        "Cut out the rectangle at (`x`, `y`) of `width` x `height`.",
        {
            "x": _int(0, 0, MAX_DIMENSION, "Left edge in pixels."),
            "y": _int(0, 0, MAX_DIMENSION, "Top edge in pixels."),
            "width": _int(None, 1, MAX_DIMENSION, "Width in pixels.", required=True),
            "height": _int(None, 1, MAX_DIMENSION, "Height in pixels.", required=True),
        },
    ),
    "rotate": OpSpec(
        "transform",
        "Rotate counter-clockwise by any angle (Pillow Image.rotate).",
        {
            "angle": _num(None, -360.0, 360.0, "Angle in degrees, counter-clockwise.", required=True),
            "expand": Param("boolean", False, doc="Grow the canvas to hold the whole rotated image."),
            "method": Param("enum", "bilinear", choices=("nearest", "bilinear"), doc="Sampling filter."),
            "fill": _FILL,
        },
    ),
    "flip": OpSpec(
        "transform",
        "Mirror the image.",
        {"direction": Param("enum", "horizontal", choices=("horizontal", "vertical"),
                            doc="horizontal mirrors left-right, vertical top-bottom.")},
    ),
    "pad": OpSpec(
        "transform",
        "Add a border.",
        {
            "left": _int(0, 0, 4096, "Pixels added on the left."),
            "top": _int(0, 0, 4096, "Pixels added on the top."),
            "right": _int(0, 0, 4096, "Pixels added on the right."),
            "bottom": _int(0, 0, 4096, "Pixels added on the bottom."),
            "mode": Param("enum", "constant", choices=("constant", "edge", "reflect"),
                          doc="constant uses `fill`; edge repeats the border; reflect mirrors it."),
            "fill": _FILL,
        },
    ),
}

FAMILIES = ("upscale", "enhance", "filter", "transform")


def _check_param(path: str, name: str, param: Param, value: Any) -> Any:
    where = f"{path}.{name}"
    if param.kind in ("number", "integer"):
        # bool is an int subclass; a YAML `true` is never a valid number.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StepError(where, f"must be a {param.kind}, got {type(value).__name__}")
        if param.kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise StepError(where, f"must be an integer, got {value}")
            value = int(value)
        elif not math.isfinite(value):
            raise StepError(where, "must be finite")
        else:
            value = float(value)
        if param.minimum is not None and value < param.minimum:
            raise StepError(where, f"must be at least {param.minimum:g}, got {value:g}")
        if param.maximum is not None and value > param.maximum:
            raise StepError(where, f"must be at most {param.maximum:g}, got {value:g}")
        return value
    if param.kind == "boolean":
        if not isinstance(value, bool):
            raise StepError(where, f"must be true or false, got {value!r}")
        return value
    if param.kind == "enum":
        if value not in param.choices:
            raise StepError(where, f"must be one of {', '.join(param.choices)}; got {value!r}")
        return value
    if param.kind == "color":
        if not isinstance(value, str) or not _HEX_COLOR.match(value):
            raise StepError(where, f"must be a colour as #rrggbb or #rrggbbaa, got {value!r}")
        return value.lower()
    if not isinstance(value, str) or not value or len(value) > 253:
        raise StepError(where, "must be a non-empty string of at most 253 characters")
    return value


def _check_cross_field(path: str, op: str, params: dict[str, Any]) -> None:
    if op in ("upscale", "resize"):
        sized = [k for k in ("width", "height") if params.get(k) is not None]
        if params.get("scale") is None and not sized and not (op == "upscale" and params.get("method") == "model"):
            raise StepError(path, f"{op} needs `scale` or `width`/`height`")
        if params.get("scale") is not None and sized:
            raise StepError(f"{path}.scale", "set either `scale` or `width`/`height`, not both")
        if op == "upscale" and params.get("method") == "model" and not params.get("model"):
            raise StepError(f"{path}.model", "method `model` needs the name of a model the pool serves")
        if op == "upscale" and params.get("model") and params.get("method") != "model":
            raise StepError(f"{path}.method", "`model` is set, so `method` must be `model`")
    if op == "denoise" and params["size"] % 2 == 0:
        raise StepError(f"{path}.size", f"must be odd, got {params['size']}")


def normalize_step(index: int, step: Any) -> dict[str, Any]:
    """Validate one step and return it with every default filled in."""
    path = f"spec.steps[{index}]"
    if not isinstance(step, Mapping):
        raise StepError(path, f"must be an object like {{op: blur, radius: 2}}, got {type(step).__name__}")
    op = step.get("op")
    if not isinstance(op, str) or op not in CATALOG:
        raise StepError(f"{path}.op", f"unknown op {op!r}; known ops: {', '.join(sorted(CATALOG))}")
    spec = CATALOG[op]
    unknown = sorted(set(step) - set(spec.params) - {"op"})
    if unknown:
        allowed = ", ".join(sorted(spec.params)) or "none"
        raise StepError(f"{path}.{unknown[0]}", f"is not a parameter of {op} (parameters: {allowed})")
    out: dict[str, Any] = {"op": op}
    for name, param in spec.params.items():
        if step.get(name) is None:
            if param.required:
                raise StepError(f"{path}.{name}", f"is required for {op}")
            out[name] = param.default
        else:
            out[name] = _check_param(path, name, param, step[name])
    _check_cross_field(path, op, out)
    return out


def normalize_steps(steps: Any) -> tuple[dict[str, Any], ...]:
    """Validate a whole pipeline; raises StepError naming the first bad field."""
    if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
        raise StepError("spec.steps", "must be a list of steps")
    if not 1 <= len(steps) <= MAX_STEPS:
        raise StepError("spec.steps", f"must hold 1 to {MAX_STEPS} steps, got {len(steps)}")
    return tuple(normalize_step(i, step) for i, step in enumerate(steps))


def models_used(steps: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """Names of the super-resolution models a normalized pipeline needs."""
    return frozenset(s["model"] for s in steps if s["op"] == "upscale" and s.get("method") == "model")


_COST_PARAMS: dict[str, tuple[str, ...]] = {
    "upscale": ("method", "model", "scale"),
    "resize": ("method", "scale"),
    "denoise": ("method", "size", "radius"),
    "blur": ("radius",),
    "sharpen": ("radius",),
}
"""Parameters that change an op's cost per pixel; the rest (factors, colours, offsets) do not."""


def cost_class(steps: Sequence[Mapping[str, Any]]) -> str:
    """A name shared by normalized pipelines that cost about the same per input pixel,
    e.g. `upscale(method=model,model=realesrgan-x4,scale=4)>sharpen(radius=2)`: the key
    under which the operator learns each pool's speed."""
    parts = []
    for step in steps:
        params = [f"{name}={step[name]:g}" if isinstance(step.get(name), float) else f"{name}={step[name]}"
                  for name in _COST_PARAMS.get(step["op"], ()) if step.get(name) is not None]
        parts.append(f"{step['op']}({','.join(params)})" if params else step["op"])
    return ">".join(parts)


def parse_color(value: str) -> tuple[int, int, int]:
    """#rrggbb to an (r, g, b) tuple of 8-bit levels."""
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


def parse_rgba(value: str) -> tuple[int, int, int, int]:
    """#rrggbb (alpha 255) or #rrggbbaa to an (r, g, b, a) tuple of 8-bit levels."""
    alpha = int(value[7:9], 16) if len(value) == 9 else 255
    return (*parse_color(value), alpha)


# ---------------------------------------------------------------------------- budgets

BYTES_PER_SAMPLE = 4
"""Working precision of a step: float32 per channel and pixel."""
_MEMORY_FACTOR: dict[str, float] = {
    "blur": 9.0,          # float64 copy, edge-padded copy, running sums, window, per pass
    "sharpen": 9.0,       # the blur, plus the difference and the mask
    "denoise": 9.0,       # Gaussian as blur; the median is counted on its own (_median_bytes)
    "rotate": 7.5,        # source coordinates, weights and gathered samples per output pixel
    "upscale": 4.0,       # the horizontal pass, its matrix product and the bands joined
    "resize": 4.0,
    "equalize": 4.0,      # 8-bit levels as int64 for the lookup
    "autocontrast": 4.0,
    "contrast": 3.0,
    "edges": 2.5,
    "emboss": 2.5,
    "saturation": 2.0,
}
"""Peak memory of a step's torch code as a multiple of its input plus output, in float32
with at least three channels: the worst measured with torch's CPU allocator (the
profiler's memory events) over grey, RGB and RGBA at 0.4 and 1.6 Mpx, plus about 15%.
tests/unit/gpuroute_worker/test_memory_estimate.py measures every op against it."""
DEFAULT_MEMORY_FACTOR = 2.0
"""Every other step: measured at most 1.5 (a copy, a mask or a channel at a time)."""
RESAMPLE_DENSE_LIMIT = 1 << 22
"""Entries of one resize weight band (ops.resample cuts an axis into bands above it)."""
STEP_OVERHEAD_BYTES = 1 << 16
"""What a step allocates whatever the image's size: histograms, tables, index vectors."""
MEDIAN_STRIP_ELEMENTS = 1 << 25
"""Window samples the torch median gathers at once (ops.filters strips its rows by it)."""


def _blur_margin(op: str, params: Mapping[str, Any]) -> int:
    """Pixels the blur family pads each side with (its box radius, about sigma, plus two)."""
    if op in ("blur", "sharpen") or (op == "denoise" and params.get("method") == "gaussian"):
        return math.ceil(float(params.get("radius") or 0.0)) + 2
    return 0


def _median_bytes(channels: int, in_hw: tuple[int, int], size: int) -> int:
    """The torch median: its input, the edge-padded copy (two while it is built), the strips
    of size^2 window samples with their values and int64 indices, and the output joined."""
    (h, w), half = in_hw, size // 2
    pixels = h * w
    padded = (h + 2 * half) * (w + 2 * half)
    strip_rows = max(1, MEDIAN_STRIP_ELEMENTS // max(1, channels * w * size * size))
    strip = min(h, strip_rows) * w * channels
    windows = strip * size * size * BYTES_PER_SAMPLE
    return channels * (pixels + 2 * padded + 2 * pixels) * BYTES_PER_SAMPLE + windows + strip * 12 + STEP_OVERHEAD_BYTES


def step_bytes(op: str, channels: int, in_hw: tuple[int, int], out_hw: tuple[int, int],
               params: Mapping[str, Any] | None = None) -> int:
    """Estimated peak memory of one step on one image, in bytes: an upper bound for the
    torch code (the GPU path and the CPU path's float steps), whose Pillow steps need less.
    `params` is the normalized step (radius, size, method), when known."""
    params = params or {}
    channels = max(channels, 3)
    if op == "denoise" and params.get("method", "median") == "median" and "size" in params:
        return _median_bytes(channels, in_hw, int(params["size"]))
    margin = _blur_margin(op, params)
    pixels = (in_hw[0] + 2 * margin) * (in_hw[1] + 2 * margin) + out_hw[0] * out_hw[1]
    need = int(pixels * channels * BYTES_PER_SAMPLE * _MEMORY_FACTOR.get(op, DEFAULT_MEMORY_FACTOR))
    if op in ("upscale", "resize"):
        # One weight band per axis on the device (on the host they are numpy, cached).
        need += BYTES_PER_SAMPLE * sum(min(o * i, RESAMPLE_DENSE_LIMIT) for o, i in zip(out_hw, in_hw, strict=True))
    return need + STEP_OVERHEAD_BYTES


@dataclass(frozen=True)
class Budget:
    """What one image's pipeline may use at its largest step."""

    max_pixels: int
    """Largest output of any step, width x height."""
    max_bytes: int
    """Largest working set of any step (input, output and scratch in float32)."""
    max_step_cpu_s: float | None = None
    """Longest any step may take on one CPU core, by step_cpu_seconds; None: not checked
    (a GPU worker, where the costliest step is a hundred times faster)."""


RANK_SECONDS_PER_MPX = 0.03
"""Seconds of one core a rank (median) filter of size >= 5 takes per input megapixel and
per window sample (size^2): Pillow sorts every window. Measured 0.03 on a current server
core (median-9 at 7696^2: 135 s), 0.06 to 0.07 on a slow shared one. Median-3 has a fast
path (about 0.03 s per megapixel in all)."""
CPU_SECONDS_PER_MPX = 0.05
"""Seconds of one core any other step takes per megapixel of input plus output, rounded up
from the slowest measured (Lanczos upscale, unsharp mask: 0.03): no other step comes near
the per-step limit inside the pixel budget."""
CPU_STEP_SECONDS = 120.0
"""Longest one step may run on a CPU worker's single executor thread (Budget.max_step_cpu_s)."""


def step_cpu_seconds(step: Mapping[str, Any], channels: int, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
    """Estimated seconds of one CPU core for one normalized step on one image."""
    scale = max(channels, 3) / 3.0
    in_mpx = in_hw[0] * in_hw[1] / 1e6
    size = int(step.get("size", 3))
    if step["op"] == "denoise" and step.get("method") == "median" and size > 3:
        return in_mpx * size**2 * RANK_SECONDS_PER_MPX * scale
    return (in_mpx + out_hw[0] * out_hw[1] / 1e6) * CPU_SECONDS_PER_MPX * scale


HOST_BYTES_PER_PIXEL = 4
"""Bytes per pixel of an 8-bit Pillow image of any mode but L (RGB is stored as RGBX)."""
HOST_MEMORY_FACTOR = 4.0
"""Working memory of an 8-bit CPU-path step (Pillow, or numpy for median-3 and pad) as a
multiple of its input plus output: a copy or two, or median-3's sorted columns."""


def host_step_bytes(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Estimated peak memory of a step the CPU path runs on 8-bit pixels (Pillow's C or
    numpy), a quarter of the float32 code's and without its float64 scratch."""
    pixels = in_hw[0] * in_hw[1] + out_hw[0] * out_hw[1]
    return int(pixels * HOST_BYTES_PER_PIXEL * HOST_MEMORY_FACTOR) + STEP_OVERHEAD_BYTES


def check_budget(steps: Sequence[Mapping[str, Any]], shapes: Sequence[tuple[int, int]], channels: int,
                 budget: Budget, *, on_host: Sequence[bool] | None = None) -> int:
    """Refuse a pipeline whose any step would exceed `budget` (pixels, memory and, on a CPU
    worker, time of one core); returns the peak bytes.

    `shapes` holds the input's (h, w) followed by every step's output (h, w), as the
    worker's output-shape check computes them before anything is allocated. Channels are
    counted as at least three because colour ops may expand grey. `on_host` marks the steps
    a CPU worker runs on 8-bit pixels (host_step_bytes); the others run the float32 torch
    code (step_bytes), as every step does on a GPU.
    """
    if len(shapes) != len(steps) + 1:
        raise ValueError("shapes must hold the input shape and one shape per step")
    peak = 0
    for index, step in enumerate(steps):
        (in_h, in_w), (out_h, out_w) = shapes[index], shapes[index + 1]
        if out_h * out_w > budget.max_pixels:
            raise StepError(f"spec.steps[{index}]",
                            f"{step['op']} would produce {out_w}x{out_h} = {out_h * out_w / 1e6:.1f} Mpx, over this "
                            f"pool's limit of {budget.max_pixels / 1e6:.1f} Mpx for any step")
        need = (host_step_bytes((in_h, in_w), (out_h, out_w)) if on_host is not None and on_host[index]
                else step_bytes(step["op"], channels, (in_h, in_w), (out_h, out_w), step))
        if need > budget.max_bytes:
            raise StepError(f"spec.steps[{index}]",
                            f"{step['op']} on {in_w}x{in_h} -> {out_w}x{out_h} needs about {need / 2**30:.1f} GiB, "
                            f"over this pool's working-memory budget of {budget.max_bytes / 2**30:.1f} GiB per image")
        if budget.max_step_cpu_s is not None:
            seconds = step_cpu_seconds(step, channels, (in_h, in_w), (out_h, out_w))
            if seconds > budget.max_step_cpu_s:
                raise StepError(f"spec.steps[{index}]",
                                f"{step['op']} on {in_w}x{in_h} would take about {seconds:.0f} s of one CPU core, over "
                                f"this CPU pool's limit of {budget.max_step_cpu_s:.0f} s per step (a GPU pool runs it)")
        peak = max(peak, need)
    return peak
