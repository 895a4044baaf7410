"""GPU figures (device machine only): per-op GPU time, batching gain, super-resolution.

Without CUDA it returns a skip note and measures nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import row
from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import run_pipeline

OPS = ({"op": "resize", "scale": 0.5, "method": "bicubic"}, {"op": "upscale", "scale": 2, "method": "lanczos"},
       {"op": "blur", "radius": 2}, {"op": "sharpen"}, {"op": "denoise", "size": 3}, {"op": "rotate", "angle": 17},
       {"op": "equalize"}, {"op": "grayscale"})


def _cuda_time(fn: Callable[[], Any], repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1000.0


def run() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine", "rows": []}
    from gpuroute_worker.sr.rrdbnet import RRDBNet
    from gpuroute_worker.sr.srvgg import SRVGGNetCompact

    device = torch.device("cuda")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "ops_ms_per_mpix": {}, "batching": {}, "sr": {},
                           "rows": []}
    image = torch.rand(1, 3, 1024, 1024, device=device)
    for step in OPS:
        steps = normalize_steps([step])
        seconds = _cuda_time(lambda: run_pipeline(image, steps))
        out["ops_ms_per_mpix"][step["op"]] = round(seconds * 1000 / 1.048576, 3)
    steps = normalize_steps([{"op": "sharpen"}, {"op": "resize", "scale": 0.5}])
    for size in (256, 1024):
        single = _cuda_time(lambda: run_pipeline(torch.rand(1, 3, size, size, device=device), steps))
        for batch in (8, 32):
            batched = _cuda_time(lambda: run_pipeline(torch.rand(batch, 3, size, size, device=device), steps))
            gain = (batch / batched) / (1 / single)
            out["batching"][f"{size}^2 batch {batch}"] = {"images_per_s": round(batch / batched, 1),
                                                          "unbatched_images_per_s": round(1 / single, 1)}
            out["rows"].append(row("gpu batching", f"{size}^2 batch {batch}", batch / batched, "images/s",
                                   "batch 1", 1 / single, higher_is_better=True))
            del gain
    frame = torch.rand(1, 3, 1080, 1920, device=device)
    for name, model in (("RRDBNet x4", RRDBNet(3, 3, scale=4, num_feat=64, num_block=23, num_grow_ch=32)),
                        ("SRVGGNetCompact x4", SRVGGNetCompact(3, 3, num_feat=64, num_conv=32, upscale=4, act_type="prelu"))):
        model = model.to(device).eval()
        timings = {}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            typed = model.to(dtype)
            with torch.inference_mode():
                # A 1080p x4 output is 8K: tile like the worker does to bound memory.
                from gpuroute_worker.sr.tiling import tiled_forward

                timings[str(dtype).split(".")[-1]] = round(_cuda_time(
                    lambda: tiled_forward(typed, frame.to(dtype), 4, tile=512, pad=16), repeats=2) * 1000, 1)
        out["sr"][name] = {"ms_per_1080p_frame": timings}
        out["rows"].append(row("gpu super-resolution", f"{name} 1080p, fp16", timings["float16"], "ms/frame",
                               "fp32", timings["float32"], higher_is_better=False))
    return out


if __name__ == "__main__":
    print(run())
    sys.exit(0)
