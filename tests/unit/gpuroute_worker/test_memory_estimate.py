"""The catalogue's per-step memory estimate against what each op's torch code really
allocates, measured on CPU tensors with torch's own allocator events (the profiler's
memory records: every allocation and free, in order, deterministic): the estimate is an
upper bound, and not a wild one. The input is counted as live; allocations made inside
the step are summed in order and their running maximum taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gpuroute.ops_catalog import normalize_step, step_bytes
from gpuroute_worker.ops import pipeline

STEPS: list[dict[str, Any]] = [
    {"op": "upscale", "scale": 2.0, "method": "bicubic"}, {"op": "upscale", "scale": 4.0, "method": "lanczos"},
    {"op": "upscale", "scale": 3.0, "method": "nearest"}, {"op": "resize", "scale": 0.5, "method": "lanczos"},
    {"op": "resize", "scale": 0.1, "method": "bilinear"}, {"op": "resize", "width": 50, "method": "bicubic"},
    {"op": "denoise", "size": 3}, {"op": "denoise", "size": 9}, {"op": "denoise", "method": "gaussian", "radius": 5},
    {"op": "sharpen"}, {"op": "sharpen", "radius": 50}, {"op": "autocontrast", "cutoff": 2}, {"op": "equalize"},
    {"op": "gamma", "gamma": 2}, {"op": "brightness", "factor": 1.5}, {"op": "contrast", "factor": 1.5},
    {"op": "saturation", "factor": 1.5}, {"op": "blur", "radius": 2}, {"op": "blur", "radius": 50}, {"op": "edges"},
    {"op": "emboss"}, {"op": "grayscale"}, {"op": "sepia"}, {"op": "invert"},
    {"op": "crop", "x": 3, "y": 4, "width": 20, "height": 15}, {"op": "rotate", "angle": 17, "expand": True},
    {"op": "rotate", "angle": 45, "fill": "#ff000080"}, {"op": "flip"},
    {"op": "pad", "left": 50, "top": 40, "right": 30, "bottom": 20},
    {"op": "pad", "left": 50, "top": 40, "mode": "reflect"},
]
SIZES = [(37, 53), (300, 450)]
SENSIBLE = 8.0
"""The estimate may overshoot the measured peak by at most this much on these sizes (for
colour: grey is counted as three channels on purpose, since colour ops may expand it)."""


def measured_peak(x: torch.Tensor, step: dict[str, Any]) -> tuple[int, torch.Tensor]:
    """Bytes live at the step's peak: its input plus the running maximum of what it allocates."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = pipeline.apply_step(x, 0, step)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return x.numel() * x.element_size() + peak, out


def _label(step: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in step.items())


@pytest.mark.parametrize("raw", STEPS, ids=_label)
def test_estimate_bounds_the_measured_peak(raw: dict[str, Any]) -> None:
    step = normalize_step(0, raw)
    for channels in (1, 3, 4):
        for h, w in SIZES:
            x = torch.rand(1, channels, h, w, generator=torch.Generator().manual_seed(h + channels))
            peak, out = measured_peak(x, step)
            estimate = step_bytes(step["op"], channels, (h, w), (int(out.shape[-2]), int(out.shape[-1])), step)
            where = f"{_label(raw)} on {channels}x{h}x{w}: estimate {estimate}, measured {peak}"
            assert estimate >= peak, where
            assert channels < 3 or estimate <= SENSIBLE * peak, where


def test_median_estimate_bounds_a_median_gathered_in_several_strips() -> None:
    # 600 x 900 RGB, size 9: each strip holds 2^25 window samples, so the rows go in four strips.
    step = normalize_step(0, {"op": "denoise", "size": 9})
    x = torch.rand(1, 3, 600, 900, generator=torch.Generator().manual_seed(1))
    peak, _ = measured_peak(x, step)
    estimate = step_bytes("denoise", 3, (600, 900), (600, 900), step)
    assert peak <= estimate <= 2 * peak, (estimate, peak)
