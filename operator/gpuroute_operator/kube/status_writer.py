"""Coalesced status writes and Events, off the event loop.

Which writes are due is decided by coalesce.Coalescer (pure); this module sends them.
A job's terminal Event is posted only after its terminal status write has landed, under
a name fixed per job, so it is posted at most once. Writes and Events go out on the
event loop through AsyncKube (one keep-alive aiohttp session), never through a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gpuroute.aio import stop_tasks
from gpuroute.redact import redact, redact_json
from gpuroute_operator import metrics
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.kube.api import TRANSPORT_ERRORS, AsyncKube
from gpuroute_operator.kube.coalesce import Coalescer, Pending

if TYPE_CHECKING:
    from gpuroute_operator.core.effects import TerminalEvent

log = logging.getLogger(__name__)

RETRY_DELAY_S = 1.0
"""Delay before a failed patch (API server unavailable) is tried again."""
QUEUED_WINDOW_S = 2.0
"""A job's Queued status is written only if it is still unsent this long after it was set: a
job dispatched sooner gets its Dispatched write instead, which carries the queue time, so
the common case costs two writes (Dispatched, terminal), or one when it ends within the
coalescing window."""
TERMINAL_EVENT_TRIES = 30
"""A terminal Event is tried this often (backing off to 5 s): about two minutes of API outage."""


def merge_patch_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """Status as a JSON merge patch: empty top-level fields are deleted, nested ones omitted.

    Deleting a field and setting it to "" read the same to every client; sending ""
    also trips API servers built with Go 1.19 and json-iterator's old reflect2, which
    decode an empty string as null and then reject it against the schema.
    """

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v is not None and v != ""}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {k: (None if v is None or v == "" else clean(v)) for k, v in status.items()}


def terminal_event_name(ref: ObjectRef) -> str:
    """One fixed name per job: a second post of its terminal Event is refused by the API
    server (409), so no restart or race can give a job two."""
    return f"{ref.name[:200]}.{ref.uid}.terminal"


class StatusWriter:
    def __init__(self, kube: AsyncKube, *, coalesce_s: float = 0.3, concurrency: int = 8) -> None:
        self._kube = kube
        self._coalescer: Coalescer[ObjectRef] = Coalescer(coalesce_s)
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.patches_sent = 0
        self.events_posted = 0

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="status-writer")

    def update(self, ref: ObjectRef, status: Mapping[str, Any], *, urgent: bool = False,
               terminal_event: TerminalEvent | None = None) -> None:
        window = QUEUED_WINDOW_S if ref.kind == "ImageJob" and status.get("phase") == "Queued" else None
        self._coalescer.offer(ref, status, now=time.monotonic(), urgent=urgent, event=terminal_event, window_s=window)
        if urgent:
            self._wake.set()

    def ensure_terminal_event(self, ref: ObjectRef, event: TerminalEvent) -> None:
        """Post a job's terminal Event unless it exists (after a restart that may have lost it)."""
        self._spawn(self._post_event(ref, event.reason, event.message, "Warning" if event.warning else "Normal",
                                     name=terminal_event_name(ref)))

    def forget(self, ref: ObjectRef) -> None:
        """Drop unsent status of a deleted object."""
        self._coalescer.forget(ref)

    def event(self, ref: ObjectRef, reason: str, message: str, *, warning: bool = False) -> None:
        self._spawn(self._post_event(ref, reason, message, "Warning" if warning else "Normal"))

    @property
    def backlog(self) -> int:
        return len(self._coalescer) + self._coalescer.in_flight

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Send everything pending now; used at shutdown."""
        deadline = time.monotonic() + timeout_s
        self._coalescer.urge_all()
        self._wake.set()
        while (len(self._coalescer) or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.flush()
        await stop_tasks(self._loop_task)
        await self._kube.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            next_due = self._coalescer.next_due(now)
            timeout = self._coalescer.window_s if next_due is None else max(0.0, next_due - now)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 a cancellation that races
                # wait_for's timeout comes out as TimeoutError, which this loop would swallow,
                # and the operator would never finish stopping on SIGTERM.
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            for ref, pending in self._coalescer.take_due(time.monotonic()):
                self._spawn(self._write(ref, pending))

    async def _write(self, ref: ObjectRef, pending: Pending) -> None:
        ok = False
        try:
            async with self._slots:
                found = await self._kube.patch_status(ref.kind, ref.namespace, ref.name,
                                                      redact_json(merge_patch_status(pending.status)))
            ok = True
            metrics.STATUS_PATCHES.labels("ok" if found else "gone").inc()
            self.patches_sent += 1
            if found and pending.event is not None:
                # Only now: the status that says the job ended has landed.
                self.ensure_terminal_event(ref, pending.event)
        except TRANSPORT_ERRORS as exc:
            metrics.STATUS_PATCHES.labels("error").inc()
            log.warning("status patch of %s %s/%s failed, retrying: %s", ref.kind, ref.namespace, ref.name, exc)
            await asyncio.sleep(RETRY_DELAY_S)
        finally:
            self._coalescer.done(ref, pending, ok=ok, now=time.monotonic())
            self._wake.set()

    async def _post_event(self, ref: ObjectRef, reason: str, message: str, type_: str, *,
                          name: str | None = None) -> None:
        # A named (terminal) Event is tried until it lands: posting it again is harmless.
        # Other Events are advisory: one try, so an API outage never piles them up.
        tries = TERMINAL_EVENT_TRIES if name else 1
        for attempt in range(1, tries + 1):
            try:
                async with self._slots:
                    await self._kube.post_event(ref.involved(), type_=type_, reason=reason, message=redact(message),
                                                name=name)
                self.events_posted += 1
                return
            except TRANSPORT_ERRORS as exc:
                log.warning("event %s for %s/%s not posted (try %d of %d): %s", reason, ref.namespace, ref.name,
                            attempt, tries, exc)
                if attempt < tries:
                    await asyncio.sleep(RETRY_DELAY_S * min(attempt, 5))
