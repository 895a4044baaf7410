"""Worker ops on the CPU: gpuroute's torch code vs Pillow/NumPy doing the same work.

A 1024x1024 photograph, each op run several times; we report milliseconds per
megapixel of output and the ratio Pillow/gpuroute (> 1 means gpuroute is faster).
The torch path includes the uint8 <-> float conversion the worker does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from bench.common import row
from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import run_pipeline

SIZE = 1024

OPS: dict[str, tuple[dict[str, Any], Callable[[Image.Image], Image.Image]]] = {
    "resize bicubic 0.5x": ({"op": "resize", "scale": 0.5, "method": "bicubic"},
                            lambda im: im.resize((SIZE // 2, SIZE // 2), Image.BICUBIC)),
    "upscale lanczos 2x": ({"op": "upscale", "scale": 2, "method": "lanczos"},
                           lambda im: im.resize((SIZE * 2, SIZE * 2), Image.LANCZOS)),
    "blur r=2": ({"op": "blur", "radius": 2}, lambda im: im.filter(ImageFilter.GaussianBlur(2))),
    "sharpen": ({"op": "sharpen"}, lambda im: im.filter(ImageFilter.UnsharpMask(2, 150, 3))),
    "median 3": ({"op": "denoise", "method": "median", "size": 3}, lambda im: im.filter(ImageFilter.MedianFilter(3))),
    "rotate 17deg": ({"op": "rotate", "angle": 17}, lambda im: im.rotate(17, Image.BILINEAR)),
    "equalize": ({"op": "equalize"}, ImageOps.equalize),
    "grayscale": ({"op": "grayscale"}, lambda im: im.convert("L").convert("RGB")),
}


def _image() -> Image.Image:
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC)
    except ImportError:
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _best(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and, for torch, pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def run(*, ops: list[str] | None = None, repeats: int = 3) -> dict[str, Any]:
    image = _image()
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
    results: dict[str, Any] = {"size": SIZE, "torch_threads": torch.get_num_threads(), "ops": {}, "rows": []}
    for name in ops or list(OPS):
        step, reference = OPS[name]
        steps = normalize_steps([step])

        def ours() -> torch.Tensor:
            out = run_pipeline(pixels.float().div(255.0), steps)
            return out.mul(255.0).round().to(torch.uint8)

        out_mpix = ours().shape[-1] * ours().shape[-2] / 1e6
        t_ours = _best(ours, repeats)
        t_ref = _best(lambda: reference(image), repeats)
        results["ops"][name] = {"gpuroute_ms_per_mpix": round(t_ours * 1000 / out_mpix, 2),
                                "pillow_ms_per_mpix": round(t_ref * 1000 / out_mpix, 2)}
        results["rows"].append(row("worker ops (CPU)", name, t_ours * 1000 / out_mpix, "ms/Mpix",
                                   "Pillow", t_ref * 1000 / out_mpix, higher_is_better=False))
    return results


if __name__ == "__main__":
    for op, figures in run()["ops"].items():
        print(f"{op:22s} {figures}")
    sys.exit(0)
