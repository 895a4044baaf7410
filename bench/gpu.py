"""GPU figures (device machine only): per-op GPU time, batching gain, super-resolution.

- Per op: `run_pipeline` on a 1024x1024 image, host-to-device copy of its uint8 pixels,
  uint8 -> float -> uint8 and the copy back included (as the executor runs it), ms per output
  megapixel; baseline: Pillow doing the same op on one CPU core of the same machine.
- Batching: images/s of one pipeline (sharpen, then bicubic 0.5x) at batch 1, 8 and 32
  for 256^2 and 1024^2 inputs; baseline: batch 1 (unbatched).
- Super-resolution x4 of one 1080p frame, RRDBNet (Real-ESRGAN x4plus: 64 features, 23
  blocks, growth 32) and SRVGGNetCompact (realesr-general-x4v3: 64 features, 32 convs,
  PReLU), random weights at the published shapes, tiled as the worker tiles
  (pipeline.DEFAULT_TILE, TILE_PAD); fp32, fp16 and bf16; baseline: fp32. Random weights
  may overflow in fp16: the time is what is measured, not the picture.

Copies: every figure's call goes host -> device -> host as the executor does it
(executor.to_device_floats / to_host_levels: uint8 pixels up, uint8 levels down), and
the result lists host-to-device and device-to-host copies and bytes per image
(`copies`), so a change that adds a transfer shows.
- JPEG per image: one 1080p JPEG through decode, compute (the batching pipeline) and JPEG
  encode, each timed apart, as the worker runs a job. Decode two ways: nvJPEG on the device
  (gpuroute_worker.nvjpeg, where torchvision is installed for this torch, as in the worker
  image) against Pillow on one host thread; compute from device-decoded pixels copies
  nothing up (`jpeg.h2d_bytes`), from host-decoded ones the raw pixels.

GPU times come from CUDA events around `repeats` calls after a warm-up. Without CUDA,
`run()` returns a skip note and measures nothing. `run(device="cpu", ...)` with tiny
sizes exercises every code path on the CPU (the smoke test does that), timing with
perf_counter; such figures mean nothing for a GPU.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import best_of, row
from bench.worker_ops import OPS as CPU_OPS
from gpuroute.ops_catalog import normalize_steps
from gpuroute_worker.executor import CopyStats, to_device_floats, to_host_levels
from gpuroute_worker.ops import run_pipeline

BATCH_STEPS = [{"op": "sharpen"}, {"op": "resize", "scale": 0.5, "method": "bicubic"}]
DTYPES = ("float32", "float16", "bfloat16")


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Seconds per call of fn on `device`."""

    def cuda_time(fn: Callable[[], Any]) -> float:
        fn()  # warm-up: cuDNN picks kernels, the caching allocator fills
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats / 1000.0

    def cpu_time(fn: Callable[[], Any]) -> float:
        return best_of(fn, repeats)

    return cuda_time if device.type == "cuda" else cpu_time


COPIES = CopyStats()
"""Host-device copies made by every timed call so far."""
_CALLS = [0]


def _quantized(pixels: torch.Tensor, steps: Sequence[Any], device: torch.device | None = None) -> torch.Tensor:
    # The executor's work: uint8 up to the device, float pipeline, uint8 levels back down.
    _CALLS[0] += 1
    target = device or pixels.device
    out = run_pipeline(to_device_floats(list(pixels.cpu()), target, COPIES), steps)
    return to_host_levels(out, sixteen=False, stats=COPIES)


def _per_op(device: torch.device, size: int, timed: Callable[[Callable[[], Any]], float], pillow_repeats: int,
            out: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)  # on the host, as decoded
    for name, (step, reference) in CPU_OPS.items():
        steps = normalize_steps([step])
        result = _quantized(pixels, steps, device)
        out_mpix = result.shape[-1] * result.shape[-2] / 1e6
        gpu_s = timed(partial(_quantized, pixels, steps, device))
        pillow_s = best_of(partial(reference, image), pillow_repeats)
        out["ops"][name] = {"ms_per_mpix": round(gpu_s * 1000 / out_mpix, 4),
                            "pillow_ms_per_mpix": round(pillow_s * 1000 / out_mpix, 3)}
        out["rows"].append(row("gpu ops", f"{name} ({device.type})", gpu_s * 1000 / out_mpix, "ms/Mpix",
                               "Pillow (1 CPU core)", pillow_s * 1000 / out_mpix, higher_is_better=False))


def _batching(device: torch.device, sizes: Sequence[int], batches: Sequence[int],
              timed: Callable[[Callable[[], Any]], float], out: dict[str, Any]) -> None:
    steps = normalize_steps(BATCH_STEPS)
    for size in sizes:
        rates: dict[int, float] = {}
        for batch in batches:
            # Allocated outside the timed call: only the pipeline is measured.
            pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            rates[batch] = batch / timed(partial(_quantized, pixels, steps, device))
            del pixels
        out["batching"][f"{size}^2"] = {f"batch {b}": round(r, 1) for b, r in rates.items()}
        base = min(batches)
        for batch in batches:
            if batch != base:
                out["rows"].append(row("gpu batching", f"{size}^2, batch {batch}", rates[batch], "images/s",
                                       f"batch {base}", rates[base], higher_is_better=True))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _jpeg_per_image(device: torch.device, frame_hw: tuple[int, int], timed: Callable[[Callable[[], Any]], float],
                    repeats: int, out: dict[str, Any]) -> None:
    from gpuroute_worker import nvjpeg
    from gpuroute_worker.codec import decode_image, encode_image

    h, w = frame_hw
    rng = np.random.default_rng(1)
    # Smooth gradients plus noise: compresses like a photograph, not like pure noise.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) * 255 // max(1, h + w - 2)], -1)
    array = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    limit = 1 << 30
    steps = normalize_steps(BATCH_STEPS)
    host_pixels = decode_image(data, max_bytes=limit, max_pixels=limit).pixels
    figures: dict[str, Any] = {"frame": f"{w}x{h}", "jpeg_bytes": len(data), "raw_bytes": host_pixels.numel()}
    figures["decode_host_ms"] = round(best_of(lambda: decode_image(data, max_bytes=limit, max_pixels=limit).pixels,
                                              repeats) * 1000, 3)
    stats = CopyStats()
    source = host_pixels
    if nvjpeg.available(device):
        def device_decode() -> torch.Tensor:
            decoded = nvjpeg.decode_on_device(data, device, max_pixels=limit, keep_metadata=False)
            assert decoded is not None, "nvJPEG refused the benchmark's JPEG"
            return decoded.pixels

        figures["decode_device_ms"] = round(timed(device_decode) * 1000, 3)
        source = device_decode()
    else:
        figures["decode_device_ms"] = None
        figures["nvjpeg"] = "off: needs CUDA and a torchvision built for this torch"

    calls = [0]

    def compute() -> torch.Tensor:
        calls[0] += 1
        return to_host_levels(run_pipeline(to_device_floats([source], device, stats), steps), sixteen=False,
                              stats=stats)

    levels = compute()
    figures["compute_ms"] = round(timed(compute) * 1000, 3)
    figures["h2d_bytes_per_image"] = round(stats.h2d_bytes / calls[0])
    figures["encode_ms"] = round(best_of(lambda: encode_image(levels[0], fmt="jpeg", quality=90), repeats) * 1000, 3)
    out["jpeg"] = figures
    if figures["decode_device_ms"] is not None:
        out["rows"].append(row("gpu jpeg", f"decode {w}x{h} JPEG, nvJPEG on the device", figures["decode_device_ms"],
                               "ms/image", "Pillow, 1 host thread", figures["decode_host_ms"], higher_is_better=False))
    for stage in ("compute", "encode"):
        out["rows"].append(row("gpu jpeg", f"{stage} {w}x{h} per image ({device.type})", figures[f"{stage}_ms"],
                               "ms/image", "host decode of the same image", figures["decode_host_ms"],
                               higher_is_better=False))


def _super_resolution(device: torch.device, frame_hw: tuple[int, int], dtypes: Sequence[str], rrdb_blocks: int,
                      timed: Callable[[Callable[[], Any]], float], out: dict[str, Any]) -> None:
    from gpuroute_worker.ops.pipeline import DEFAULT_TILE, TILE_PAD
    from gpuroute_worker.sr.rrdbnet import RRDBNet
    from gpuroute_worker.sr.srvgg import SRVGGNetCompact
    from gpuroute_worker.sr.tiling import tiled_forward

    models: dict[str, Callable[[], torch.nn.Module]] = {
        "RRDBNet x4": lambda: RRDBNet(3, 3, scale=4, num_feat=64, num_block=rrdb_blocks, num_grow_ch=32),
        "SRVGGNetCompact x4": lambda: SRVGGNetCompact(3, 3, num_feat=64, num_conv=32, upscale=4, act_type="prelu"),
    }
    frame = torch.rand(1, 3, *frame_hw, device=device)
    label = f"{frame_hw[1]}x{frame_hw[0]}"
    for name, make in models.items():
        torch.manual_seed(0)
        model = make().to(device).eval()
        multiple = int(getattr(model, "input_multiple", 1))
        timings: dict[str, float] = {}
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            typed_model, typed_frame = model.to(dtype), frame.to(dtype)
            with torch.inference_mode():
                seconds = timed(partial(tiled_forward, typed_model, typed_frame, 4, tile=DEFAULT_TILE, pad=TILE_PAD,
                                        multiple=multiple))
            timings[dtype_name] = seconds * 1000.0
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["sr"][name] = {"frame": label, "ms_per_frame": {k: round(v, 2) for k, v in timings.items()}}
        for dtype_name in dtypes:
            if dtype_name != "float32" and "float32" in timings:
                out["rows"].append(row("gpu super-resolution", f"{name}, {label} frame, {dtype_name}",
                                       timings[dtype_name], "ms/frame", "float32", timings["float32"],
                                       higher_is_better=False))


def run(*, device: str | None = None, op_size: int = 1024, batch_sizes: Sequence[int] = (256, 1024),
        batches: Sequence[int] = (1, 8, 32), sr_frame: tuple[int, int] = (1080, 1920), dtypes: Sequence[str] = DTYPES,
        rrdb_blocks: int = 23, repeats: int = 10, sr_repeats: int = 3,
        jpeg_frame: tuple[int, int] = (1080, 1920)) -> dict[str, Any]:
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine", "rows": []}
        device = "cuda"
    dev = torch.device(device)
    started = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "torch": torch.__version__, "ops": {}, "batching": {}, "sr": {}, "rows": []}
    if dev.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    before = (COPIES.h2d, COPIES.d2h, COPIES.h2d_bytes, COPIES.d2h_bytes)
    calls_before = _CALLS[0]
    _per_op(dev, op_size, _timer(dev, repeats), 3, out)
    calls = max(1, _CALLS[0] - calls_before)
    out["copies"] = {"per_call_h2d": round((COPIES.h2d - before[0]) / calls, 2),
                     "per_call_d2h": round((COPIES.d2h - before[1]) / calls, 2),
                     "h2d_bytes_per_call": round((COPIES.h2d_bytes - before[2]) / calls),
                     "d2h_bytes_per_call": round((COPIES.d2h_bytes - before[3]) / calls)}
    _batching(dev, batch_sizes, batches, _timer(dev, repeats), out)
    _jpeg_per_image(dev, jpeg_frame, _timer(dev, repeats), repeats, out)
    _super_resolution(dev, sr_frame, dtypes, rrdb_blocks, _timer(dev, sr_repeats), out)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


if __name__ == "__main__":
    result = run(device=sys.argv[1] if len(sys.argv) > 1 else None)
    print({k: v for k, v in result.items() if k != "rows"})
    sys.exit(0)
