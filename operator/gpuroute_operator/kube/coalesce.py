"""Which status writes are due, and when (pure; the StatusWriter does the I/O).

Callers hand over an object's whole desired status; only the latest per object is kept.
It is due once its first unsent change is `window_s` old, or at once when urgent
(terminal phases). A job that goes Queued -> Dispatched -> Processing within the window
therefore costs one write, and the terminal write carries everything. An offer may ask
for a longer window (a job waiting in a queue: its Queued status is worth a write only
if the wait lasts); the write is due at the earliest due time of the changes it holds,
so a later change with the normal window brings it forward. At most one write
per object is in flight, so writes to an object are never reordered. The cost of an
offer and of a due write is O(log n) in the number of pending objects: a heap of due
times and a queue of urgent objects, never a scan.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Pending:
    """The newest unsent status of one object."""

    status: Mapping[str, Any]
    """What to write."""
    due: float
    """When it should be written: the earliest of its changes' offer time plus window."""
    urgent: bool = False
    """Write at once."""
    event: Any = None
    """Posted after this status has been written (a job's terminal Event)."""


class Coalescer(Generic[K]):
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._pending: dict[K, Pending] = {}
        self._in_flight: set[K] = set()
        self._timers: list[tuple[float, int, K]] = []
        self._urgent: deque[K] = deque()
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def offer(self, key: K, status: Mapping[str, Any], *, now: float, urgent: bool = False, event: Any = None,
              window_s: float | None = None) -> None:
        """The newest status of `key`; due `window_s` (default: the coalescer's window) from now."""
        due = now + (self.window_s if window_s is None else window_s)
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = Pending(status, due, urgent, event)
            heapq.heappush(self._timers, (due, next(self._order), key))
            if urgent:
                self._urgent.append(key)
            return
        pending.status = status
        pending.event = event or pending.event
        if due < pending.due:
            # The earlier timer supersedes; the later one is skipped as stale when it pops.
            pending.due = due
            if key not in self._in_flight:
                heapq.heappush(self._timers, (due, next(self._order), key))
        if urgent and not pending.urgent:
            pending.urgent = True
            self._urgent.append(key)

    def forget(self, key: K) -> None:
        self._pending.pop(key, None)

    def urge_all(self) -> None:
        for key, pending in self._pending.items():
            if not pending.urgent:
                pending.urgent = True
                self._urgent.append(key)

    def take_due(self, now: float) -> list[tuple[K, Pending]]:
        """Everything due now, marked in flight until `done`."""
        due: list[tuple[K, Pending]] = []
        while self._urgent:
            self._take(self._urgent.popleft(), due)
        while self._timers and self._timers[0][0] <= now:
            _, _, key = heapq.heappop(self._timers)
            pending = self._pending.get(key)
            # Stale timers (written since, or re-armed later) are skipped, not searched for.
            if pending is not None and pending.due <= now:
                self._take(key, due)
        return due

    def _take(self, key: K, due: list[tuple[K, Pending]]) -> None:
        if key in self._in_flight or key not in self._pending:
            return  # re-armed by done()
        due.append((key, self._pending.pop(key)))
        self._in_flight.add(key)

    def done(self, key: K, sent: Pending, *, ok: bool, now: float) -> None:
        """A write finished; a failed one is tried again unless a newer status replaced it."""
        self._in_flight.discard(key)
        newer = self._pending.get(key)
        if not ok:
            if newer is None:
                self._pending[key] = newer = Pending(sent.status, now + self.window_s, True, sent.event)
            elif newer.event is None:
                newer.event = sent.event
        if newer is None:
            return
        if newer.urgent:
            self._urgent.append(key)
        else:
            heapq.heappush(self._timers, (max(now, newer.due), next(self._order), key))

    def next_due(self, now: float) -> float | None:
        """When take_due next has something (now if urgent work waits), None when nothing is pending."""
        if self._urgent:
            return now
        return self._timers[0][0] if self._timers else None
