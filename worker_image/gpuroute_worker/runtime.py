"""The life of one job on a worker: download, decode, compute, encode, upload.

Every JOB gets exactly one answer, RESULT or ERROR. A JOB carrying `items` (an item
group of a batch) runs each item through the same life, at most `capacity` items of
all groups at once, and is answered by one RESULT holding one answer per item, in the
order sent (Triton's contract: one result or error per request, in order); an item
that fails fails alone, with its own code. Answers are kept by job id and what the job
asks (request_digest) for a while, so a job the operator sends again (after its own
restart, or a network cut) is answered from memory instead of being computed twice, and
a job that is still running is joined rather than started again. A JOB that reuses an id
for another request is never answered with the other request's result: it is computed
(replacing the cached answer), or refused while the other request is still running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute.ops_catalog import StepError, normalize_steps
from gpuroute.protocol import CONTENT_TYPES, MAX_ITEM_TEXT, MAX_TEXT, ErrorCode, Kind, Message
from gpuroute.redact import redact
from gpuroute_worker import metrics, nvjpeg
from gpuroute_worker.codec import Decoded, DecodeError, Raster, decode_image, encode_image, output_options
from gpuroute_worker.config import WorkerConfig, transfer_config
from gpuroute_worker.executor import BatchExecutor
from gpuroute_worker.ops import OpError, OutOfMemory
from gpuroute_worker.request_digest import request_digest
from gpuroute_worker.transfer import TransferClient, TransferError, in_thread

log = logging.getLogger(__name__)

Send = Callable[[Kind, Mapping[str, Any]], None]


class JobFailed(Exception):
    """A job ends with an ERROR answer carrying `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeadlineExceeded(JobFailed):
    def __init__(self) -> None:
        super().__init__(ErrorCode.TIMEOUT, "job ran past its timeout on the worker")


class Abandoned(JobFailed):
    """Raised on the executor's thread for a job nobody waits for any more (cancelled, or
    cut off by its timeout), so the step stops at its next check and frees the thread."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.CANCELLED, "job abandoned while computing")


@dataclass(frozen=True)
class Answer:
    """The message a finished job was answered with."""

    kind: Kind
    """RESULT or ERROR."""
    header: Mapping[str, Any]
    """The header sent."""
    finished_at: float
    """time.monotonic() when the answer was produced."""
    request: str
    """request_digest of the JOB answered: only a JOB asking the same gets this answer."""


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class JobRunner:
    """Runs jobs concurrently on the event loop; compute goes to the BatchExecutor."""

    def __init__(self, config: WorkerConfig, executor: BatchExecutor, send: Send) -> None:
        self.config = config
        self.executor = executor
        self.send = send
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._requests: dict[str, str] = {}
        """request_digest of each running job."""
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        # Items of every group share the worker's capacity: 8 groups of 16 must not mean 128
        # downloads and decodes at once (memory), nor start items' timeouts while they queue.
        self._item_slots = asyncio.Semaphore(max(1, config.capacity))
        # One pooled keep-alive client for every job's downloads and uploads.
        self.transfers = TransferClient(transfer_config(config))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def handle_job(self, message: Message) -> None:
        job = str(message.header["job"])
        request = request_digest(message.header, message.payload)
        answer = self._answers.get(job)
        if answer is not None and answer.request == request:
            metrics.ANSWERED_AGAIN.labels("cache").inc()
            self.send(answer.kind, {**answer.header, "cached": True} if answer.kind is Kind.RESULT else answer.header)
            return
        if job in self._tasks:
            if self._requests.get(job) != request:
                # Its answer will carry this id, so the operator could not tell the two apart.
                log.warning("job %s sent again asking for something else while it runs; refused", job)
                self.send(Kind.ERROR, {"job": job, "code": ErrorCode.UNAVAILABLE.value, "rejected": True,
                                       "message": "a different request with this job id is running on this worker"})
                return
            # Already running: the answer will follow when it finishes.
            metrics.ANSWERED_AGAIN.labels("joined").inc()
            self.send(Kind.ACCEPTED, {"job": job})
            return
        if answer is not None:
            # The id answered something else: that answer is no answer to this request.
            log.warning("job %s sent again asking for something else; computing it", job)
            del self._answers[job]
        if len(self._tasks) >= self.config.capacity:
            # `rejected`: never started, so the operator does not count it as an attempt.
            self.send(Kind.ERROR, {"job": job, "code": ErrorCode.UNAVAILABLE.value, "rejected": True,
                                   "message": f"worker is at capacity ({self.config.capacity})"})
            return
        self.send(Kind.ACCEPTED, {"job": job})
        task = asyncio.get_running_loop().create_task(self._run(job, request, message), name=f"job {job}")
        self._tasks[job] = task
        self._requests[job] = request
        metrics.IN_FLIGHT.set(len(self._tasks))

    def cached_jobs(self) -> list[str]:
        """Jobs whose answers the result cache holds, oldest first."""
        return list(self._answers)

    def running_jobs(self) -> list[str]:
        return list(self._tasks)

    def cancel(self, job: str) -> None:
        task = self._tasks.get(job)
        if task is not None:
            task.cancel()

    def answers_since(self, since: float) -> list[Answer]:
        """Answers produced at or after `since` (monotonic), to re-send after a reconnect."""
        return [a for a in self._answers.values() if a.finished_at >= since]

    async def drain(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout_s)

    def _remember(self, job: str, request: str, kind: Kind, header: Mapping[str, Any]) -> None:
        if kind is Kind.ERROR and header.get("code") == ErrorCode.EXPIRED.value:
            # The operator re-sends this very attempt with fresh URLs: it must run again,
            # not be answered with the refusal from the cache.
            return
        self._answers[job] = Answer(kind, header, time.monotonic(), request)
        while len(self._answers) > self.config.result_cache_size:
            self._answers.popitem(last=False)

    async def _run(self, job: str, request: str, message: Message) -> None:
        kind: Kind
        header: Mapping[str, Any]
        try:
            timeout_s = float(message.header.get("timeoutS", 600))
            async with asyncio.timeout(timeout_s):
                if "items" in message.header:
                    header = await self._process_group(job, message.header, time.monotonic() + timeout_s)
                else:
                    header = {"job": job, "device": self.config.gpu_name,
                              **await self._process(job, message.header, message.payload, time.monotonic() + timeout_s)}
                    metrics.JOBS.labels("completed").inc()
            kind = Kind.RESULT
        except asyncio.CancelledError:
            kind, header = Kind.ERROR, {"job": job, "code": ErrorCode.CANCELLED.value, "message": "cancelled by the operator"}
            metrics.JOBS.labels(ErrorCode.CANCELLED.value).inc()
        except TimeoutError:
            kind, header = Kind.ERROR, {"job": job, "code": ErrorCode.TIMEOUT.value,
                                        "message": "job ran past its timeout on the worker"}
            metrics.JOBS.labels(ErrorCode.TIMEOUT.value).inc()
        except JobFailed as exc:
            kind, header = Kind.ERROR, {"job": job, "code": exc.code.value, "message": redact(exc.message)[:MAX_TEXT]}
            metrics.JOBS.labels(exc.code.value).inc()
        finally:
            self._tasks.pop(job, None)
            self._requests.pop(job, None)
            metrics.IN_FLIGHT.set(len(self._tasks))
        self._remember(job, request, kind, header)
        self.send(kind, header)

    async def _process_group(self, job: str, spec: Mapping[str, Any], deadline: float) -> dict[str, Any]:
        """An item group: every item through _process, each answered on its own."""
        item_timeout = float(spec.get("itemTimeoutS") or 0.0) or None
        output = spec["output"]

        async def one(item: Mapping[str, Any]) -> dict[str, Any]:
            async with self._item_slots:
                item_spec = {"steps": spec["steps"], "input": {"url": item["input"]},
                             "output": {**output, "url": item["output"], "headers": item.get("headers") or {}}}
                # The compute checks this deadline before every step, so an item cut off by its
                # timeout does not keep the device busy for the items behind it.
                item_deadline = min(deadline, time.monotonic() + item_timeout) if item_timeout else deadline
                try:
                    async with asyncio.timeout(item_timeout):
                        answer = await self._process(job, item_spec, None, item_deadline)
                except (TimeoutError, DeadlineExceeded):
                    metrics.JOBS.labels(ErrorCode.TIMEOUT.value).inc()
                    why = (f"item ran past itemTimeoutSeconds ({item_timeout:g} s)" if item_deadline < deadline
                           else "item ran past its group's timeout")
                    return {"code": ErrorCode.TIMEOUT.value, "message": f"{why} on the worker"}
                except JobFailed as exc:
                    metrics.JOBS.labels(exc.code.value).inc()
                    return {"code": exc.code.value, "message": redact(exc.message)[:MAX_ITEM_TEXT]}
                metrics.JOBS.labels("completed").inc()
                return answer

        answers = await asyncio.gather(*(one(item) for item in spec["items"]))
        # The group's own timing is empty: each item reports its stages.
        return {"job": job, "timing": {}, "device": self.config.gpu_name, "items": answers}

    async def _process(self, job: str, spec: Mapping[str, Any], payload: bytes | None,
                       deadline: float) -> dict[str, Any]:
        """One image: its timing, input size and output, as a RESULT (or a group item) reports them."""
        started = time.perf_counter()
        timing: dict[str, float] = {}
        try:
            steps = normalize_steps(spec["steps"])
            source = spec["input"]
            output = spec["output"]
            fmt = str(output.get("format", "png"))
            quality = int(output.get("quality", 90))
            if fmt not in CONTENT_TYPES:
                raise JobFailed(ErrorCode.INVALID_INPUT, f"spec.output.format: unknown format {fmt!r}")

            t = time.perf_counter()
            if payload is not None:
                data = payload
            else:
                url, untrusted = str(source["url"]), bool(source.get("untrusted"))
                # in_thread aborts the transfer when the job is cancelled or times out.
                data = await in_thread(lambda handle: self.transfers.download(
                    url, max_bytes=self.config.max_input_bytes, untrusted=untrusted,
                    timeout_s=max(0.001, deadline - time.monotonic()), handle=handle))
            timing["downloadMs"] = _ms(t)

            t = time.perf_counter()
            options = output_options(output)
            # A batching (GPU) executor stacks tensors: make the tensor here, on the decode
            # thread. The CPU path takes the decoder's Pillow image as it is.
            wants_tensor = self.executor.batching
            device = self.executor.device
            on_device = wants_tensor and self.config.nvjpeg and nvjpeg.available(device)

            def decode() -> tuple[Decoded | nvjpeg.DeviceDecoded, Raster]:
                if on_device and len(data) <= self.config.max_input_bytes:
                    jpeg = nvjpeg.decode_on_device(data, device, max_pixels=self.config.max_input_pixels,
                                                   keep_metadata=options.keep_metadata)
                    if jpeg is not None:
                        metrics.DECODES.labels("device").inc()
                        return jpeg, jpeg.pixels
                decoded = decode_image(data, max_bytes=self.config.max_input_bytes,
                                       max_pixels=self.config.max_input_pixels, keep_metadata=options.keep_metadata)
                metrics.DECODES.labels("host").inc()
                return decoded, decoded.pixels if wants_tensor else decoded.image

            decoded, pixels = await asyncio.to_thread(decode)
            timing["decodeMs"] = _ms(t)
            # Every step's output against the pixel and memory budget, before anything is allocated.
            need_bytes = self.executor.check_budget(steps, pixels, max_pixels=self.config.max_output_pixels,
                                                    max_bytes=self.config.max_working_bytes)

            abandoned = threading.Event()

            def check_deadline() -> None:
                if abandoned.is_set():
                    raise Abandoned()
                if time.monotonic() > deadline:
                    raise DeadlineExceeded()

            t = time.perf_counter()
            try:
                computed = await asyncio.wrap_future(self.executor.submit(steps, pixels, check_deadline,
                                                                          need_bytes=need_bytes))
            except asyncio.CancelledError:
                # CANCEL, or a timeout (asyncio.timeout cancels): the executor's thread stops
                # at its next check instead of finishing work nobody will read.
                abandoned.set()
                raise
            timing["gpuMs"] = round(computed.compute_ms, 3)
            timing["executorWaitMs"] = round(max(0.0, _ms(t) - computed.compute_ms), 3)

            t = time.perf_counter()
            encoded = await asyncio.to_thread(encode_image, computed.output, fmt=fmt, quality=quality, options=options,
                                              icc=decoded.icc, exif=decoded.exif)
            timing["encodeMs"] = _ms(t)

            t = time.perf_counter()
            headers = {"Content-Type": CONTENT_TYPES[fmt], **dict(output.get("headers") or {})}
            out_url = str(output["url"])
            await in_thread(lambda handle: self.transfers.upload(
                out_url, encoded.data, headers=headers, timeout_s=max(0.001, deadline - time.monotonic()),
                handle=handle))
            timing["uploadMs"] = _ms(t)
        except (StepError, OpError, DecodeError) as exc:
            raise JobFailed(ErrorCode.INVALID_INPUT, str(exc)) from exc
        except TransferError as exc:
            # A 403 from trusted storage (never a user's own https URL): the operator signs
            # again and re-sends without spending an attempt.
            code = ErrorCode.EXPIRED if exc.rejected else (
                ErrorCode.INVALID_INPUT if exc.permanent else ErrorCode.UNAVAILABLE)
            raise JobFailed(code, str(exc)) from exc
        except OutOfMemory as exc:
            # One image alone that does not fit will not fit on a retry either.
            code = ErrorCode.INVALID_INPUT if exc.permanent else ErrorCode.OOM
            raise JobFailed(code, f"out of device memory: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise JobFailed(ErrorCode.INVALID_INPUT, f"malformed job: {exc!r}") from exc
        except RuntimeError as exc:
            # torch raises RuntimeError for device faults; another worker may succeed.
            log.exception("job %s failed on the device", job)
            raise JobFailed(ErrorCode.UNAVAILABLE, f"device error: {exc}") from exc
        for stage, value in timing.items():
            metrics.STAGE_SECONDS.labels(stage.removesuffix("Ms")).observe(value / 1000.0)
        timing["workerMs"] = _ms(started)
        return {
            "timing": timing,
            # The operator learns each pool's speed per input megapixel from this.
            "input": {"width": decoded.width, "height": decoded.height},
            "output": {"bytes": len(encoded.data), "width": encoded.width, "height": encoded.height,
                       "sha256": encoded.sha256, "format": encoded.format},
        }
