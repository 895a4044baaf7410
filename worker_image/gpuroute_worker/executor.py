"""The GPU executor: one thread that owns the device and runs dynamic batches.

Triton's contract, per batch: initialize once (the thread and its models), execute a
batch, and resolve exactly one result or error per request, in order. Requests are
batched when they share a pipeline and an input shape, up to `max_batch` requests or
`max_wait_ms` after the first one arrived. Decoding, encoding and transfers happen on
other threads so the device is never idle waiting for I/O.
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

from gpuroute_worker import metrics
from gpuroute_worker.ops import run_pipeline
from gpuroute_worker.sr.registry import ModelRegistry

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class ComputeResult:
    """One request's share of a batch run."""

    pixels: torch.Tensor
    """(3, H', W') uint8 on the CPU."""
    compute_ms: float
    """Wall time of the batch this request ran in, device work included."""
    batch_size: int
    """How many requests shared the batch."""


@dataclass
class _Request:
    steps: Sequence[Mapping[str, Any]]
    pixels: torch.Tensor
    check_deadline: Callable[[], None] | None
    future: Future[ComputeResult] = field(default_factory=Future)
    key: tuple[str, int, int] = ("", 0, 0)


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

    def __init__(self, device: torch.device, models: ModelRegistry | None, *, max_batch: int, max_wait_ms: float) -> None:
        self.device = device
        self.models = models
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._inbox: queue.Queue[object] = queue.Queue()
        # Requests taken from the inbox that did not fit the batch being formed.
        self._held: deque[_Request] = deque()
        self._thread = threading.Thread(target=self._run, name="gpu-executor", daemon=True)
        self._thread.start()

    def submit(self, steps: Sequence[Mapping[str, Any]], pixels: torch.Tensor,
               check_deadline: Callable[[], None] | None = None) -> Future[ComputeResult]:
        """Queue one (3, H, W) uint8 image; the future resolves to its result or error."""
        key = (json.dumps(steps, sort_keys=True), int(pixels.shape[1]), int(pixels.shape[2]))
        request = _Request(steps, pixels, check_deadline, key=key)
        self._inbox.put(request)
        return request.future

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
        # Held requests first: they have waited longest.
        while self._held and len(batch) < self.max_batch:
            candidate = self._held.popleft()
            (batch if candidate.key == first.key else skipped).append(candidate)
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
            (batch if item.key == first.key else skipped).append(item)
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
                stacked = torch.stack([r.pixels for r in batch]).to(self.device, non_blocking=True)
                images = stacked.to(torch.float32).div_(255.0)
                out = run_pipeline(images, steps, models=self.models, check_deadline=check_all,
                                   on_step=_observe_step)
                quantized = out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # every request in the batch gets exactly one answer
            log.info("batch of %d failed: %s", len(batch), exc)
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

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
