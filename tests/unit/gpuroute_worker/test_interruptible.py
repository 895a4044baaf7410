"""Long CPU work stops at the job's deadline or CANCEL inside a step, not after it: the
rank (median) filters run in row bands with the deadline checked between them, so the
executor's one thread is free for the next job at once; a step too costly for a CPU
worker at all is refused up front, naming the step."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from prometheus_client import REGISTRY

from gpuroute.ops_catalog import StepError, normalize_steps
from gpuroute.protocol import ErrorCode, Kind
from gpuroute_worker.executor import BatchExecutor
from gpuroute_worker.ops import pipeline
from gpuroute_worker.ops.cpu import run_cpu_raster
from gpuroute_worker.runtime import JobRunner
from tests.unit.gpuroute_worker.runtime_testutil import storage, wire, with_runner


class Expired(Exception):
    """The test's deadline passed."""


class Deadline:
    """A deadline that passes after its `allowed`-th check: deterministic, no clock."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.calls += 1
            if self.calls > self.allowed:
                raise Expired(f"check {self.calls}")


def _noise(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


@pytest.mark.parametrize("size", [5, 7, 9])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_banded_median_is_pillows_exactly(mode: str, size: int) -> None:
    # Many bands (the deadline is checked between them) and edges on every side.
    image = _noise(mode, 301, 67, seed=size)
    steps = normalize_steps([{"op": "denoise", "method": "median", "size": size}])
    check = Deadline(allowed=10**6)
    ours = run_cpu_raster(image, steps, check_deadline=check)
    assert np.array_equal(np.asarray(ours), np.asarray(image.filter(ImageFilter.MedianFilter(size))))


def test_a_median_step_stops_inside_the_step_when_the_deadline_passes() -> None:
    image = _noise("RGB", 600, 600)
    steps = normalize_steps([{"op": "denoise", "method": "median", "size": 9}])
    check = Deadline(allowed=1)  # the check before the step passes; the next one is past the deadline
    with pytest.raises(Expired):
        run_cpu_raster(image, steps, check_deadline=check)
    assert check.calls == 2


def test_the_torch_median_stops_between_strips() -> None:
    x = torch.rand(1, 1, 300, 200)
    check = Deadline(allowed=0)
    with pytest.raises(Expired):
        pipeline.apply_step(x, 0, normalize_steps([{"op": "denoise", "size": 9}])[0], check_deadline=check)


def test_the_executor_is_free_for_the_next_job_once_a_step_is_cut_off() -> None:
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0.0)
    try:
        long = executor.submit(normalize_steps([{"op": "denoise", "size": 9}] * 16), _noise("RGB", 600, 600),
                               Deadline(allowed=1))
        small = _noise("RGB", 8, 8)
        after = executor.submit(normalize_steps([{"op": "invert"}]), small)
        with pytest.raises(Expired):
            long.result(timeout=120.0)
        # Answered in order: the cut-off job first, then the next one on the same thread.
        assert np.array_equal(np.asarray(after.result(timeout=120.0).output), 255 - np.asarray(small))
    finally:
        executor.close()


def test_a_step_too_costly_for_a_cpu_worker_is_refused_up_front() -> None:
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0.0)
    try:
        # The finding's case: median-9 at 7696^2 fits the memory budget, but is minutes of one core.
        shape = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, 7696, 7696)
        steps = normalize_steps([{"op": "invert"}, {"op": "denoise", "size": 9}])
        with pytest.raises(StepError, match=r"spec.steps\[1\]") as caught:
            executor.check_budget(steps, shape, max_pixels=1 << 30, max_bytes=None)
        assert "denoise" in str(caught.value) and "CPU" in str(caught.value)
        # A cheap step on the same image, and the median on a phone photo, are admitted.
        executor.check_budget(normalize_steps([{"op": "blur", "radius": 3}]), shape, max_pixels=1 << 30,
                              max_bytes=None)
        photo = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, 3024, 4032)
        executor.check_budget(steps, photo, max_pixels=1 << 30, max_bytes=None)
    finally:
        executor.close()


def _denoise_steps_done() -> float:
    return REGISTRY.get_sample_value("gpuroute_worker_op_seconds_count", {"op": "denoise"}) or 0.0


def _decoded() -> float:
    return REGISTRY.get_sample_value("gpuroute_worker_decodes_total", {"where": "host"}) or 0.0


def _big_png() -> bytes:
    yy, xx = np.mgrid[0:2400, 0:2400]
    array = np.stack([(xx * 7 + yy * 3) % 251, (xx * 5 + yy * 11) % 241, (xx ^ yy) % 239], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _job(store_url: str, job: str, name: str, steps: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    return {"job": job, "steps": steps, "timeoutS": timeout_s, "input": {"url": f"{store_url}/in/{name}"},
            "output": {"url": f"{store_url}/out/{name}", "format": "png"}}


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_job_past_its_deadline_or_cancelled_frees_the_executor_for_the_next(how: str) -> None:
    # Sixteen median-9 steps on 5.8 Mpx: minutes of one core, a timeout of 1 s (or a CANCEL).
    steps = [{"op": "denoise", "method": "median", "size": 9}] * 16
    before = _denoise_steps_done()
    with storage({"/in/big.png": _big_png(), "/in/small.png": _small_png()}) as store:

        async def script(runner: JobRunner) -> None:
            decoded = _decoded()
            runner.handle_job(wire(_job(store.url, "big/1", "big.png", steps, 1.0 if how == "timeout" else 600.0)))
            while _decoded() == decoded:  # decoded: it goes to the executor next
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            if how == "cancel":
                runner.cancel("big/1")
            runner.handle_job(wire(_job(store.url, "small/1", "small.png", [{"op": "invert"}], 600.0)))
            await runner.drain(600.0)

        sent = with_runner(script)
    answers = [(kind, header["job"], header.get("code")) for kind, header in sent if kind is not Kind.ACCEPTED]
    code = ErrorCode.TIMEOUT.value if how == "timeout" else ErrorCode.CANCELLED.value
    assert answers == [(Kind.ERROR, "big/1", code), (Kind.RESULT, "small/1", None)], answers
    # with_runner joined the executor's thread: the big job never finished a single median step.
    assert _denoise_steps_done() == before


def _small_png() -> bytes:
    buffer = io.BytesIO()
    _noise("RGB", 8, 8).save(buffer, "PNG")
    return buffer.getvalue()
