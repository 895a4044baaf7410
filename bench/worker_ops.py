"""Worker ops on the CPU: gpuroute's torch code vs Pillow/NumPy doing the same work.

A 1024x1024 photograph (scikit-image's astronaut, resized; random pixels without
scikit-image), each op through `run_pipeline` exactly as the worker's executor calls
it, including the uint8 -> float -> uint8 conversions it does around a batch. The
reference is Pillow (NumPy where Pillow has no such op) on the same image, same run.

Figures are milliseconds per megapixel of output, the fastest of a few repeats (the
cores are shared; interference only adds time). The table compares at ONE torch thread,
because Pillow runs these ops on one core: that is the per-core cost. The JSON also
holds the torch figure with all cores (`torch.get_num_threads()` at import).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from bench.common import best_of, row
from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.ops import run_pipeline

SIZE = 1024

OPS: dict[str, tuple[dict[str, Any], Callable[[Image.Image], Image.Image]]] = {
    "resize bicubic 0.5x": ({"op": "resize", "scale": 0.5, "method": "bicubic"},
                            lambda im: im.resize((im.width // 2, im.height // 2), Image.BICUBIC)),
    "upscale lanczos 2x": ({"op": "upscale", "scale": 2, "method": "lanczos"},
                           lambda im: im.resize((im.width * 2, im.height * 2), Image.LANCZOS)),
    "blur r=2": ({"op": "blur", "radius": 2}, lambda im: im.filter(ImageFilter.GaussianBlur(2))),
    "sharpen": ({"op": "sharpen", "radius": 2, "percent": 150, "threshold": 3},
                lambda im: im.filter(ImageFilter.UnsharpMask(2, 150, 3))),
    "median 3": ({"op": "denoise", "method": "median", "size": 3}, lambda im: im.filter(ImageFilter.MedianFilter(3))),
    "rotate 17deg": ({"op": "rotate", "angle": 17}, lambda im: im.rotate(17, Image.BILINEAR)),
    "equalize": ({"op": "equalize"}, ImageOps.equalize),
    "grayscale": ({"op": "grayscale"}, lambda im: im.convert("L").convert("RGB")),
    "invert": ({"op": "invert"}, ImageOps.invert),
}

_ALL_THREADS = torch.get_num_threads()


def _image() -> Image.Image:
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC)
    except ImportError:
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def run(*, ops: list[str] | None = None, repeats: int = 3, threads: int = 1) -> dict[str, Any]:
    image = _image()
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
    results: dict[str, Any] = {"size": SIZE, "torch_threads": threads, "all_threads": _ALL_THREADS, "ops": {},
                               "rows": []}
    previous = torch.get_num_threads()
    try:
        for name in ops or list(OPS):
            step, reference = OPS[name]
            steps = normalize_steps([step])

            def ours() -> torch.Tensor:
                # What BatchExecutor._execute does around run_pipeline for one image.
                out = run_pipeline(pixels.to(torch.float32).div_(255.0), steps)
                return out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

            torch.set_num_threads(threads)
            shape = ours().shape
            ref_size = reference(image).size
            if (ref_size[1], ref_size[0]) != (shape[-2], shape[-1]):
                raise AssertionError(f"{name}: gpuroute gives {shape[-1]}x{shape[-2]}, Pillow {ref_size}: not the same work")
            out_mpix = shape[-1] * shape[-2] / 1e6
            t_ours = best_of(ours, repeats)
            t_ref = best_of(lambda: reference(image), repeats)
            torch.set_num_threads(_ALL_THREADS)
            t_all = best_of(ours, repeats) if _ALL_THREADS != threads else t_ours
            results["ops"][name] = {
                "gpuroute_ms_per_mpix": round(t_ours * 1000 / out_mpix, 2),
                "gpuroute_all_threads_ms_per_mpix": round(t_all * 1000 / out_mpix, 2),
                "pillow_ms_per_mpix": round(t_ref * 1000 / out_mpix, 2),
                "output_mpix": round(out_mpix, 3),
            }
            results["rows"].append(row("worker ops (CPU)", f"{name}, {threads} thread{'s' * (threads > 1)}",
                                       t_ours * 1000 / out_mpix, "ms/Mpix", "Pillow (1 core)",
                                       t_ref * 1000 / out_mpix, higher_is_better=False))
    finally:
        torch.set_num_threads(previous)
    return results


if __name__ == "__main__":
    for op, figures in run()["ops"].items():
        print(f"{op:22s} {figures}")
    sys.exit(0)
