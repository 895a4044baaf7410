"""ImageJobs from a raw list + watch on the event loop, instead of kopf.

Every status patch the operator makes comes back as a MODIFIED event. kopf spends
several times the CPU of a raw watch on each one (deep copies, diffs, a log line per event;
bench/watch_cost.py measures both in one run, figures in bench/results/latest.md), for events that the engine ignores anyway.
This loop reads the stream on AsyncKube's keep-alive session, decodes each event and
drops, before anything else runs, those that cannot change anything for the engine:
same uid, same metadata.generation, same cancel annotation as the event already handed
over. What remains (a new job, a spec change, a cancel, a deletion) goes to the engine's
entry points, one object at a time in order, as kopf's per-object workers did.

Informer rules: list (paged) and watch from the list's resourceVersion with bookmarks,
resume from the last resourceVersion seen after a stream ends or breaks, list again on
410 Gone (objects that vanished meanwhile are forgotten), back off on errors. Memory is
bounded by the live ImageJobs: one small key per uid, dropped on deletion.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gpuroute.aio import stop_tasks
from gpuroute_operator.core.admission import CANCEL_ANNOTATION
from gpuroute_operator.kube.api import TRANSPORT_ERRORS, AsyncKube, KubeAPIError

log = logging.getLogger(__name__)

IMAGEJOBS_PATH = "/apis/gpuroute.io/v1alpha1/imagejobs"
"""All namespaces: the operator is cluster-wide."""
RELIST_AFTER_FAILURES = 3
"""Consecutive failed watches after which the resourceVersion is dropped and the list redone."""
MAX_LINE_BYTES = 4 << 20
"""One watch event at most: etcd stores objects up to 1.5 MiB, so this is never a real object."""


@dataclass(frozen=True)
class WatchConfig:
    """Timeouts and backoff of the ImageJob watch."""

    path: str = IMAGEJOBS_PATH
    """Collection to list and watch."""
    server_timeout_s: int = 300
    """The API server ends each watch after this (timeoutSeconds): cloud load balancers drop
    idle long-lived streams silently, so the stream is re-opened well before they would."""
    read_timeout_s: float = 330.0
    """No byte for this long (bookmarks arrive about every minute) means a dead stream."""
    connect_timeout_s: float = 10.0
    """Opening a connection to the API server."""
    backoff_s: tuple[float, ...] = (0.25, 1.0, 2.0, 5.0, 10.0)
    """Waits after consecutive failures; a management-cluster blip should not stall dispatch long."""
    page_size: int = 500
    """Objects per list page: a large cluster is listed without one huge response."""
    skip_unchanged: bool = True
    """Drop events that cannot change anything for the engine; False only to benchmark the raw stream."""


@dataclass(frozen=True)
class JobKey:
    """What of an ImageJob can change the engine's view once the job is known to it."""

    generation: int
    """metadata.generation: moves on spec changes only (status patches leave it alone)."""
    cancel: str | None
    """The cancel annotation's value."""


def job_key(obj: Mapping[str, Any]) -> JobKey:
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return JobKey(int(meta.get("generation") or 1), annotations.get(CANCEL_ANNOTATION))


class Gone(Exception):
    """The resourceVersion to resume from is too old (410): list again."""


class EventFilter:
    """Which events reach the engine: the first sight of a uid, then only key changes.

    Pure bookkeeping, no I/O. `seen` holds one key per live uid, so it is bounded by the
    objects in the cluster.
    """

    def __init__(self, *, skip_unchanged: bool = True) -> None:
        self.seen: dict[str, JobKey] = {}
        self._skip = skip_unchanged

    def accept(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """True if the event goes to the engine (and is then remembered)."""
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        if not uid:
            return False
        if kind == "DELETED":
            return self.seen.pop(uid, None) is not None or not self._skip
        key = job_key(obj)
        if self._skip and self.seen.get(uid) == key:
            return False
        self.seen[uid] = key
        return True

    def unsee(self, uid: str) -> None:
        """The engine failed on this uid's event: let the next event through again."""
        self.seen.pop(uid, None)

    def relisted(self, items: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
        """Events equivalent to a fresh list: ADDED for new or changed objects, DELETED for
        remembered uids the list no longer has (their deletion fell in a gap of the watch)."""
        events: list[tuple[str, Mapping[str, Any]]] = []
        present: set[str] = set()
        for obj in items:
            present.add(str((obj.get("metadata") or {}).get("uid") or ""))
            if self.accept("ADDED", obj):
                events.append(("ADDED", obj))
        for uid in [u for u in self.seen if u not in present]:
            del self.seen[uid]
            events.append(("DELETED", {"metadata": {"uid": uid}}))
        return events


class LineSplitter:
    """Newline-delimited JSON from arbitrary chunks, with a bound on one line."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > self._max:
            raise ValueError(f"watch event longer than {self._max} bytes")
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]


def resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def decode_event(line: bytes) -> tuple[str, Mapping[str, Any]]:
    """(type, object) of one watch line; raises Gone for a 410 ERROR event."""
    event = json.loads(line)
    kind, obj = str(event.get("type") or ""), event.get("object") or {}
    if kind == "ERROR":
        code = obj.get("code")
        if code == 410:
            raise Gone(str(obj.get("message") or "resourceVersion too old"))
        raise KubeAPIError(int(code or 500), json.dumps(obj))
    return kind, obj


Observe = Callable[[Mapping[str, Any]], Awaitable[None]]
Forget = Callable[[str], None]


class ImageJobWatch:
    """List + watch ImageJobs into `observe(body)` (added, changed) and `forget(uid)` (deleted)."""

    def __init__(self, api: AsyncKube, observe: Observe, forget: Forget, config: WatchConfig | None = None) -> None:
        self.api = api
        self.config = config or WatchConfig()
        self.filter = EventFilter(skip_unchanged=self.config.skip_unchanged)
        self._observe = observe
        self._forget = forget
        self.resource_version: str | None = None
        """Where the next watch resumes; None means list first."""
        self.received = 0
        """Events read from the stream (bookmarks excluded), for tests and benchmarks."""
        self.delivered = 0
        """Events handed to the engine."""
        self.listed = 0
        """Completed lists (the first one, then one per 410 Gone)."""
        self.synced = asyncio.Event()
        """Set once the first list has been handed over."""
        # One lane per uid with work in progress: events of one object run in order, and
        # only the latest waiting one matters (the engine reads state, not deltas).
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="imagejob-watch")

    async def stop(self) -> None:
        await stop_tasks(self._task, *self._lanes.values())
        self._lanes.clear()
        self._waiting.clear()

    # ---- the stream ----------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    failures = 0
                if await self._watch():
                    failures = 0
            except Gone as exc:
                log.info("ImageJob watch: %s; listing again", exc)
                self.resource_version = None
            except (*TRANSPORT_ERRORS, ValueError) as exc:  # ValueError: a malformed or oversized line
                delay = self.config.backoff_s[min(failures, len(self.config.backoff_s) - 1)]
                failures += 1
                if failures >= RELIST_AFTER_FAILURES:
                    # A resourceVersion the server keeps refusing (not only with 410) is not worth resuming from.
                    self.resource_version = None
                log.warning("ImageJob watch failed (%s: %s); again in %.2f s", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: list[Mapping[str, Any]] = []
        token = ""
        while True:
            query = f"?limit={self.config.page_size}" + (f"&continue={token}" if token else "")
            code, body = await self.api.request("GET", self.config.path + query)
            if code == 410:  # the continue token expired mid-list
                raise Gone("list continue token expired")
            if code >= 300:
                raise KubeAPIError(code, json.dumps(body))
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        for kind, obj in self.filter.relisted(items):
            self._deliver(kind, obj)
        self.resource_version = str(meta.get("resourceVersion") or "") or None
        self.listed += 1
        self.synced.set()

    async def _watch(self) -> bool:
        """One watch request, until the server ends it; True if it delivered anything."""
        params = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(self.config.server_timeout_s),
                  "resourceVersion": self.resource_version or ""}
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                        sock_read=self.config.read_timeout_s)
        progressed = False
        async with self.api.stream(self.config.path, params, timeout=timeout) as response:
            if response.status == 410:
                raise Gone("resourceVersion too old")
            if response.status >= 300:
                raise KubeAPIError(response.status, (await response.text())[:300])
            lines = LineSplitter()
            async for chunk in response.content.iter_any():
                for line in lines.feed(chunk):
                    self._on_line(line)
                    progressed = True
        return progressed

    def _on_line(self, line: bytes) -> None:
        kind, obj = decode_event(line)
        version = resource_version(obj)
        if version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        self.received += 1
        if self.filter.accept(kind, obj):
            self._deliver(kind, obj)

    # ---- handing over, one lane per object --------------------------------------------------

    def _deliver(self, kind: str, obj: Mapping[str, Any]) -> None:
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        self.delivered += 1
        if uid in self._lanes:
            self._waiting[uid] = (kind, obj)
            return
        self._lanes[uid] = asyncio.get_running_loop().create_task(self._lane(uid, kind, obj), name=f"imagejob-{uid}")

    async def _lane(self, uid: str, kind: str, obj: Mapping[str, Any]) -> None:
        try:
            while True:
                try:
                    if kind == "DELETED":
                        self._forget(uid)
                    else:
                        await self._observe(obj)
                except Exception:  # one object's failure must not stop the watch for the others
                    log.exception("ImageJob %s: handling its %s event failed", uid, kind)
                    self.filter.unsee(uid)
                waiting = self._waiting.pop(uid, None)
                if waiting is None:
                    return
                kind, obj = waiting
        finally:
            self._lanes.pop(uid, None)
