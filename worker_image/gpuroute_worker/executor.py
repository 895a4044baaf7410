"""The GPU executor: one thread that owns the device and runs dynamic batches.

Triton's contract, per batch: initialize once (the thread and its models), execute a
batch, and resolve exactly one result or error per request, in order. Requests are
batched when they share a pipeline and an input shape, up to `max_batch` requests or
`max_wait_ms` after the first one arrived. Decoding, encoding and transfers happen on
other threads so the device is never idle waiting for I/O.

On the CPU there is no batching and no wait: each request runs as soon as it is taken,
through ops.cpu (Pillow's C and torch's uint8 kernels), one image at a time. A CPU
request may be the decoder's Pillow image itself, and its result is whatever form the
last step left (a Pillow image or a tensor), which the encoder takes as it is: no
tensor<->Pillow copy is made that no step needs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gpuroute.ops_catalog import CPU_STEP_SECONDS, Budget, check_budget
from gpuroute_worker import metrics
from gpuroute_worker.codec import Raster, as_tensor, shape_of
from gpuroute_worker.ops import OutOfMemory, run_pipeline
from gpuroute_worker.ops.cpu import run_cpu_raster, runs_on_8bit
from gpuroute_worker.ops.pipeline import step_shapes
from gpuroute_worker.sr.registry import ModelRegistry

log = logging.getLogger(__name__)

_STOP = object()

DEVICE_MEMORY_SHARE = 0.6
"""Share of a GPU's memory one image's pipeline may plan to use."""
CPU_WORKING_BYTES = 4 << 30
"""Working-memory budget of one image on the CPU (4 GiB)."""


@dataclass
class CopyStats:
    """Host-device traffic, counted where it happens (bench/gpu.py reports it)."""

    h2d: int = 0
    """Host-to-device copies."""
    d2h: int = 0
    """Device-to-host copies."""
    h2d_bytes: int = 0
    d2h_bytes: int = 0


def to_device_floats(pixels: Sequence[torch.Tensor], device: torch.device, stats: CopyStats | None = None) -> torch.Tensor:
    """Stack (C, H, W) uint8/uint16 images on `device` as float in [0, 1].

    Host images are stacked and copied up once: the integer pixels cross the bus (a quarter
    of float32's bytes) and the conversion runs on the device. Images already there (JPEGs
    that nvJPEG decoded on the device) are not copied at all.
    """
    images = list(pixels)
    on_host = [i for i, image in enumerate(images) if image.device.type == "cpu"]
    if device.type != "cpu" and on_host:
        uploaded = _upload(torch.stack([images[i] for i in on_host]), device, stats)
        for k, i in enumerate(on_host):
            images[i] = uploaded[k]
    stacked = torch.stack(images)
    scale = 65535.0 if stacked.dtype in (torch.uint16, torch.int32) else 255.0
    if stacked.dtype == torch.uint16:
        stacked = stacked.to(torch.int32)  # CUDA kernels for uint16 arithmetic are sparse
    return stacked.to(torch.float32).div_(scale)


def _upload(stacked: torch.Tensor, device: torch.device, stats: CopyStats | None) -> torch.Tensor:
    if stacked.dtype == torch.uint16:
        stacked = stacked.to(torch.int32)  # CUDA kernels for uint16 arithmetic are sparse
    if stats is not None:
        stats.h2d += 1
        stats.h2d_bytes += stacked.numel() * stacked.element_size()
    return stacked.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else stacked.to(device)


def to_host_levels(out: torch.Tensor, *, sixteen: bool, stats: CopyStats | None = None) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] on any device -> uint8 (uint16 for 16-bit grey) on the host."""
    if sixteen and out.shape[1] == 1:
        levels = out.clamp(0.0, 1.0).mul_(65535.0).round_().to(torch.int32)
    else:
        levels = out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    if levels.device.type != "cpu":
        if stats is not None:
            stats.d2h += 1
            stats.d2h_bytes += levels.numel() * levels.element_size()
        levels = levels.cpu()
    return levels.to(torch.uint16) if levels.dtype == torch.int32 else levels


@dataclass(frozen=True)
class ComputeResult:
    """One request's share of a batch run."""

    output: Raster
    """The result on the host: a (C', H', W') uint8 (uint16 for 16-bit grey) tensor, or on
    the CPU path a Pillow image when a Pillow step ran last (encode_image takes either)."""
    compute_ms: float
    """Wall time of the batch this request ran in, device work included."""
    batch_size: int
    """How many requests shared the batch."""

    @property
    def pixels(self) -> torch.Tensor:
        """The result as a (C', H', W') tensor (a copy when it is a Pillow image)."""
        return as_tensor(self.output)


@dataclass
class _Request:
    steps: Sequence[Mapping[str, Any]]
    pixels: Raster
    check_deadline: Callable[[], None] | None
    future: Future[ComputeResult] = field(default_factory=Future)
    key: tuple[str, int, int, int, str] = ("", 0, 0, 0, "")
    """Requests batch together only when their keys (steps, shape, depth) are equal."""
    need_bytes: int = 0
    """Estimated peak memory of this image's pipeline (check_budget); a batch's members'
    estimates together must fit the working budget."""


def _observe_step(op: str, seconds: float) -> None:
    metrics.OP_SECONDS.labels(op).observe(seconds)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class BatchExecutor:
    """Forms batches of compatible requests and runs them on one device."""

    def __init__(self, device: torch.device, models: ModelRegistry | None, *, max_batch: int, max_wait_ms: float,
                 batching: bool | None = None, max_working_bytes: int | None = None) -> None:
        self.device = device
        self.batching = device.type != "cpu" if batching is None else batching
        """Form batches (GPU); off, each request runs at once through ops.cpu (CPU default)."""
        self.models = models
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_budget = self.working_budget(max_working_bytes)
        """Bytes a whole batch may plan to use: the sum of its members' need_bytes."""
        self._inbox: queue.Queue[object] = queue.Queue()
        # Requests taken from the inbox that did not fit the batch being formed.
        self._held: deque[_Request] = deque()
        self.copies = CopyStats()
        """Host-device copies made so far (none on the CPU)."""
        self._thread = threading.Thread(target=self._run, name="gpu-executor", daemon=True)
        self._thread.start()

    def submit(self, steps: Sequence[Mapping[str, Any]], pixels: Raster,
               check_deadline: Callable[[], None] | None = None, *, need_bytes: int = 0) -> Future[ComputeResult]:
        """Queue one image, a (C, H, W) uint8 (or 16-bit grey) tensor or a Pillow image; the
        future resolves to its result or error. Batching executors want tensors (a Pillow
        image is converted on the device thread); the CPU path runs Pillow images as they are.
        `need_bytes` is the image's check_budget estimate: a batch takes a request only while
        the estimates of all its members fit `batch_budget`."""
        sixteen = (pixels.mode.startswith("I;16") if isinstance(pixels, Image.Image)
                   else pixels.dtype == torch.uint16)
        key = (json.dumps(steps, sort_keys=True), *shape_of(pixels), "uint16" if sixteen else "uint8")
        request = _Request(steps, pixels, check_deadline, key=key, need_bytes=need_bytes)
        self._inbox.put(request)
        return request.future

    def working_budget(self, max_bytes: int | None) -> int:
        """Bytes one image's pipeline may use: `max_bytes`, or a share of the device."""
        if max_bytes is not None:
            return max_bytes
        if self.device.type == "cuda":
            # Room for the models, the allocator's cache and a batch-mate or two.
            return int(torch.cuda.get_device_properties(self.device).total_memory * DEVICE_MEMORY_SHARE)
        return CPU_WORKING_BYTES

    def check_budget(self, steps: Sequence[Mapping[str, Any]], pixels: Raster, *, max_pixels: int,
                     max_bytes: int | None) -> int:
        """Refuse (OpError/StepError, never retried) a pipeline whose any step would break
        the pixel or memory budget, or on the CPU run too long for the one executor thread;
        nothing is allocated. Returns the peak bytes."""
        channels, height, width = shape_of(pixels)
        shapes = step_shapes(height, width, steps, models=self.models)
        sixteen = (pixels.mode.startswith("I;16") if isinstance(pixels, Image.Image)
                   else pixels.dtype == torch.uint16)
        return check_budget(steps, shapes, channels,
                            Budget(max_pixels=max_pixels, max_bytes=self.working_budget(max_bytes),
                                   max_step_cpu_s=CPU_STEP_SECONDS if self.device.type == "cpu" else None),
                            on_host=None if self.batching else runs_on_8bit(steps, sixteen))

    def close(self, timeout: float = 5.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def _next(self, timeout: float | None) -> _Request | object | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _form_batch(self, first: _Request) -> list[_Request]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        skipped: list[_Request] = []
        # The first request runs whatever its estimate (check_budget admitted it alone);
        # every batch-mate is charged, so a batch never plans more than the budget.
        planned = first.need_bytes

        def take(candidate: _Request) -> None:
            nonlocal planned
            if candidate.key == first.key and planned + candidate.need_bytes <= self.batch_budget:
                planned += candidate.need_bytes
                batch.append(candidate)
            else:
                skipped.append(candidate)

        # Held requests first: they have waited longest.
        while self._held and len(batch) < self.max_batch:
            take(self._held.popleft())
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                self._inbox.put(_STOP)
                break
            assert isinstance(item, _Request)
            take(item)
        self._held.extendleft(reversed(skipped))
        return batch

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            item = self._next(timeout=None)
            if item is _STOP:
                return
            assert isinstance(item, _Request)
            if not self.batching:
                # Batching buys nothing on the CPU: run each image now, never wait.
                if self._still_wanted(item):
                    self._execute_cpu(item)
                continue
            batch = [r for r in self._form_batch(item) if self._still_wanted(r)]
            if batch:
                self._execute(batch)

    @staticmethod
    def _still_wanted(request: _Request) -> bool:
        if not request.future.set_running_or_notify_cancel():
            return False
        if request.check_deadline is not None:
            try:
                request.check_deadline()
            except Exception as exc:  # the deadline's own exception type is the caller's
                request.future.set_exception(exc)
                return False
        return True

    def _execute(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        steps = batch[0].steps
        checks = [r.check_deadline for r in batch if r.check_deadline is not None]

        def check_all() -> None:
            # A batch is abandoned only when every member has run out of time.
            errors = []
            for check in checks:
                try:
                    check()
                except Exception as exc:  # collected to decide below
                    errors.append(exc)
            if checks and len(errors) == len(checks):
                raise errors[0]

        try:
            with torch.inference_mode():
                pixels = [as_tensor(r.pixels) for r in batch]
                images = to_device_floats(pixels, self.device, self.copies)
                out = run_pipeline(images, steps, models=self.models, check_deadline=check_all,
                                   on_step=_observe_step)
                quantized = to_host_levels(out, sixteen=pixels[0].dtype == torch.uint16, stats=self.copies)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # every request in the batch gets exactly one answer
            log.info("batch of %d failed: %s", len(batch), exc)
            if isinstance(exc, OutOfMemory) and len(batch) == 1:
                # It ran alone on the device and still did not fit: retrying cannot help.
                exc = OutOfMemory(str(exc), permanent=True)
            for request in batch:
                request.future.set_exception(exc)
            self._release_memory()
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.COMPUTE_SECONDS.observe(elapsed_ms / 1000.0)
        for index, request in enumerate(batch):
            request.future.set_result(ComputeResult(quantized[index], elapsed_ms, len(batch)))
        if self.device.type == "cuda":
            metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated(self.device))

    def _execute_cpu(self, request: _Request) -> None:
        started = time.perf_counter()
        try:
            out = run_cpu_raster(request.pixels, request.steps, models=self.models,
                                 check_deadline=request.check_deadline, on_step=_observe_step)
        except Exception as exc:  # the request gets exactly one answer
            log.info("job failed on the CPU: %s", exc)
            request.future.set_exception(exc)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        metrics.BATCH_SIZE.observe(1)
        metrics.COMPUTE_SECONDS.observe(elapsed_ms / 1000.0)
        request.future.set_result(ComputeResult(out, elapsed_ms, 1))

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
