"""Worker ops on the CPU: what a CPU worker's executor runs vs Pillow doing the same work.

A 1024x1024 photograph (scikit-image's astronaut, resized; random pixels without
scikit-image). Both sides do the same work, from what the decoder produces to what the
encoder saves:
- gpuroute: `ops.cpu.run_cpu_raster` exactly as the executor calls it on a CPU device,
  on the Pillow image `codec.decode_image` hands over, plus the conversion the encoder
  makes when the result is a tensor (`codec.as_image`; none when a Pillow step ran last);
- Pillow: the op on the same Pillow image, whose result the encoder saves as it is.
Any tensor<->Pillow copy the worker makes is inside its figure; none is added that the
worker's path does not make. The JSON also holds the torch float code the GPU runs
(`run_pipeline` with the executor's uint8 -> float -> uint8 conversions), measured on
this CPU, which is what CPU workers ran before.

Figures are milliseconds per megapixel of output, the fastest of interleaved repeats
(the cores are shared; interference only adds time): at least `repeats`, and for fast ops
as many as fit in about 0.4 s, up to 400, so that a 1% difference is a difference. The table compares at ONE torch thread,
because Pillow runs these ops on one core: that is the per-core cost. The JSON also
holds the torch figure with all cores (`torch.get_num_threads()` at import).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from bench.common import best_of, row
from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.codec import as_image, to_tensor
from gpuroute_worker.ops import run_pipeline
from gpuroute_worker.ops.cpu import run_cpu_raster

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
    "resize bilinear 0.5x": ({"op": "resize", "scale": 0.5, "method": "bilinear"},
                             lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR)),
    "upscale bicubic 2x": ({"op": "upscale", "scale": 2, "method": "bicubic"},
                           lambda im: im.resize((im.width * 2, im.height * 2), Image.BICUBIC)),
    "autocontrast": ({"op": "autocontrast", "cutoff": 1}, lambda im: ImageOps.autocontrast(im, cutoff=1)),
    "equalize": ({"op": "equalize"}, ImageOps.equalize),
    "brightness": ({"op": "brightness", "factor": 1.2}, lambda im: ImageEnhance.Brightness(im).enhance(1.2)),
    "contrast": ({"op": "contrast", "factor": 1.2}, lambda im: ImageEnhance.Contrast(im).enhance(1.2)),
    "saturation": ({"op": "saturation", "factor": 1.2}, lambda im: ImageEnhance.Color(im).enhance(1.2)),
    "edges": ({"op": "edges"}, lambda im: im.filter(ImageFilter.FIND_EDGES)),
    "grayscale": ({"op": "grayscale"}, lambda im: im.convert("L")),
    "invert": ({"op": "invert"}, ImageOps.invert),
    "flip": ({"op": "flip"}, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
}

_ALL_THREADS = torch.get_num_threads()


def _image() -> Image.Image:
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC)
    except ImportError:
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def run(*, ops: list[str] | None = None, repeats: int = 5, threads: int = 1) -> dict[str, Any]:
    image = _image()  # what codec.decode_image hands a CPU executor
    pixels = to_tensor(np.asarray(image).copy()).unsqueeze(0)  # what a GPU executor gets
    results: dict[str, Any] = {"size": SIZE, "torch_threads": threads, "all_threads": _ALL_THREADS, "ops": {},
                               "rows": []}
    previous = torch.get_num_threads()
    try:
        for name in ops or list(OPS):
            step, reference = OPS[name]
            steps = normalize_steps([step])

            def ours(steps: Any = steps) -> Image.Image:
                # What BatchExecutor._execute_cpu does for one image, and the encoder's
                # conversion of a tensor result into the Pillow image it saves.
                return as_image(run_cpu_raster(image, steps))

            def torch_float(steps: Any = steps) -> torch.Tensor:
                # The GPU code on this CPU, with the executor's conversions around a batch.
                out = run_pipeline(pixels.to(torch.float32).div_(255.0), steps)
                return out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

            torch.set_num_threads(threads)
            mine, theirs = ours(), reference(image)
            if (mine.size, mine.mode) != (theirs.size, theirs.mode):
                raise AssertionError(f"{name}: gpuroute gives {mine.mode} {mine.size}, Pillow {theirs.mode} "
                                     f"{theirs.size}: not the same work")
            out_mpix = mine.width * mine.height / 1e6
            # Interleaved rounds, fastest of each: drift on the shared cores hits both alike.
            # Fast ops get more rounds (about 0.4 s of calls in all): the minimum of five calls
            # of a 0.3 ms op moves by a few percent from run to run, of a few hundred it does not.
            t_ours, t_ref = best_of(ours, 1), best_of(partial(reference, image), 1)
            rounds = min(400, max(repeats, int(0.4 / max(1e-6, t_ours + t_ref))))
            for _ in range(rounds):
                t_ours = min(t_ours, best_of(ours, 1, warmup=0))
                t_ref = min(t_ref, best_of(partial(reference, image), 1, warmup=0))
            t_float = best_of(torch_float, 1)
            results["ops"][name] = {
                "gpuroute_ms_per_mpix": round(t_ours * 1000 / out_mpix, 2),
                "pillow_ms_per_mpix": round(t_ref * 1000 / out_mpix, 2),
                "torch_float_ms_per_mpix": round(t_float * 1000 / out_mpix, 2),
                "ratio": round(t_ref / t_ours, 2),
                "output_mpix": round(out_mpix, 3),
            }
            torch.set_num_threads(_ALL_THREADS)
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
