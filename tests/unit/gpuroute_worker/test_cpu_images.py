"""The CPU path on Pillow images as the decoder hands them over: no tensor round trip,
the same pixels as from a tensor, exact against Pillow; the executor and the encoder take
either form; a whole job through JobRunner on the CPU."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from gpuroute.ops_catalog import normalize_steps
from gpuroute.protocol import Kind, Message
from gpuroute_worker.codec import decode_image, encode_image, from_pil, to_tensor
from gpuroute_worker.config import WorkerConfig
from gpuroute_worker.executor import BatchExecutor
from gpuroute_worker.ops.cpu import run_cpu, run_cpu_raster
from gpuroute_worker.runtime import JobRunner
from tests.unit.gpuroute_worker.http_testutil import Reply, serving
from tests.unit.gpuroute_worker.test_ops_channels import CASES, MODES, _image


def _array(raster: Image.Image | torch.Tensor) -> np.ndarray:
    if isinstance(raster, Image.Image):
        array = np.asarray(raster)
        return array[:, :, None] if array.ndim == 2 else array
    return raster.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_pillow_input_gives_the_tensor_paths_pixels(name: str, mode: str) -> None:
    step, _, _ = CASES[name]
    image = _image(mode)
    steps = normalize_steps([step])
    from_image = run_cpu_raster(image.copy(), steps)
    from_tensor = run_cpu(to_tensor(np.asarray(image)), steps)
    assert np.array_equal(_array(from_image), _array(from_tensor)), f"{name} on {mode}"


@pytest.mark.parametrize("name", ["blur", "saturation", "autocontrast", "rotate 17", "brightness", "flip", "invert"])
def test_pillow_steps_keep_a_pillow_image(name: str) -> None:
    # The encoder saves it as it is: no conversion on the way out.
    out = run_cpu_raster(_image("RGB"), normalize_steps([CASES[name][0]]))
    assert isinstance(out, Image.Image)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [0.0, 0.37, 1.0, 1.2, 2.5])
def test_brightness_and_contrast_tables_are_exact_on_every_level(mode: str, factor: float) -> None:
    # Every level in every band, and a mean that is not mid-grey.
    levels = np.arange(256, dtype=np.uint8)
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = np.stack([np.roll(levels, 37 * b) for b in range(bands)], axis=-1).reshape(16, 16, bands)
    array[:4, :, :] //= 3
    image = Image.fromarray(array[:, :, 0] if bands == 1 else array)
    for op, enhancer in (("brightness", ImageEnhance.Brightness), ("contrast", ImageEnhance.Contrast)):
        ours = run_cpu_raster(image, normalize_steps([{"op": op, "factor": factor}]))
        expected = enhancer(image).enhance(factor)
        assert np.array_equal(_array(ours), _array(expected)), f"{op} {factor} on {mode}"


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_invert_and_gamma_tables_keep_alpha(mode: str) -> None:
    image = _image(mode)
    inverted = run_cpu_raster(image, normalize_steps([{"op": "invert"}]))
    *colour, alpha = image.split()
    merged = ImageOps.invert(colour[0] if mode == "LA" else Image.merge("RGB", colour))
    assert np.array_equal(_array(inverted), _array(Image.merge(mode, (*merged.split(), alpha))))
    assert np.array_equal(np.asarray(inverted)[..., -1], np.asarray(alpha))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 1), (2, 3), (31, 17)])
def test_median_3_is_pillows_on_any_size(mode: str, size: tuple[int, int]) -> None:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(size[0] * 100 + size[1]).integers(0, 256, (*size, bands), dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if bands == 1 else array)
    ours = run_cpu_raster(image, normalize_steps([{"op": "denoise", "method": "median", "size": 3}]))
    assert np.array_equal(_array(ours), _array(image.filter(ImageFilter.MedianFilter(3))))


def test_sixteen_bit_pillow_input_stays_sixteen_bits() -> None:
    levels = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    out = run_cpu_raster(Image.fromarray(levels), normalize_steps([{"op": "flip"}, {"op": "blur", "radius": 1}]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint16
    assert len(np.unique(out[0].numpy())) > 256


def test_deadline_is_checked_before_every_step_on_pillow_images() -> None:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise TimeoutError("past the deadline")

    steps = normalize_steps([{"op": "blur", "radius": 1}, {"op": "invert"}, {"op": "flip"}])
    with pytest.raises(TimeoutError):
        run_cpu_raster(_image("RGB"), steps, check_deadline=check)
    assert len(calls) == 2


@pytest.mark.parametrize("mode", MODES + ("I;16",))
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoding_a_pillow_image_gives_the_tensors_bytes(mode: str, fmt: str) -> None:
    image = Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80) if mode == "I;16" \
        else _image(mode)
    tensor = from_pil(image)
    assert encode_image(image, fmt=fmt, quality=90).data == encode_image(tensor, fmt=fmt, quality=90).data


def test_cpu_executor_runs_the_decoders_image_and_answers_once() -> None:
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=4, max_wait_ms=5000.0)
    try:
        image = _image("RGBA")
        steps = normalize_steps([{"op": "blur", "radius": 1}])
        assert executor.check_budget(steps, image, max_pixels=1 << 20, max_bytes=None) > 0
        result = executor.submit(steps, image).result(timeout=5.0)
        assert isinstance(result.output, Image.Image) and result.output.mode == "RGBA"
        expected = image.filter(ImageFilter.GaussianBlur(1))
        assert np.array_equal(np.asarray(result.output), np.asarray(expected))
        assert torch.equal(result.pixels, from_pil(expected))
        bad = executor.submit(normalize_steps([{"op": "crop", "x": 500, "y": 0, "width": 1, "height": 1}]), image)
        with pytest.raises(Exception, match="outside"):
            bad.result(timeout=5.0)
    finally:
        executor.close()


def test_a_job_on_the_cpu_round_trips_through_the_runner() -> None:
    image = _image("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    sent: list[tuple[Kind, Mapping[str, Any]]] = []
    config = WorkerConfig(operator_endpoint="tcp://127.0.0.1:1", pool="p", worker_id="w", secret_key=b"",
                          server_public_key=b"", device="cpu", health_port=None)
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0.0)
    steps = [{"op": "saturation", "factor": 1.5}, {"op": "resize", "scale": 0.5, "method": "bicubic"}]
    try:
        with serving([Reply(200)]) as server:
            runner = JobRunner(config, executor, lambda kind, header: sent.append((kind, header)))
            header = {"job": "j1", "steps": steps, "timeoutS": 30, "input": {"inline": True},
                      "output": {"url": f"http://127.0.0.1:{server.port}/out.png", "format": "png"}}

            async def main() -> None:
                runner.handle_job(Message(Kind.JOB, header, payload=buffer.getvalue()))
                await runner.drain(30.0)

            asyncio.run(main())
            uploaded = server.requests[-1].body
    finally:
        executor.close()
    kinds = [kind for kind, _ in sent]
    assert kinds == [Kind.ACCEPTED, Kind.RESULT], sent
    result = sent[-1][1]
    assert result["input"] == {"width": image.width, "height": image.height}
    out = decode_image(uploaded, max_bytes=1 << 24, max_pixels=1 << 24).image
    expected = ImageEnhance.Color(image).enhance(1.5).resize((image.width // 2, image.height // 2),
                                                              Image.Resampling.BICUBIC)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out), np.asarray(expected))
