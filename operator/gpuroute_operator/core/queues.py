"""Per-pool job queues: realtime before batch, fair share across namespaces (pure).

Within a priority, namespaces take turns (round-robin by job), so one namespace's
burst of thousands of batch jobs delays another namespace's job by at most one job
per busy namespace, not by the whole burst.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queueable(Protocol):
    @property
    def uid(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def priority(self) -> str: ...


J = TypeVar("J", bound=Queueable)
PRIORITY_ORDER = ("realtime", "batch")


class FairQueue(Generic[J]):
    """A queue per priority, each a round-robin of per-namespace FIFOs."""

    def __init__(self) -> None:
        self._lanes: dict[str, OrderedDict[str, deque[J]]] = {p: OrderedDict() for p in PRIORITY_ORDER}
        self._members: dict[str, J] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, uid: object) -> bool:
        return uid in self._members

    def count(self, priority: str) -> int:
        return sum(len(q) for q in self._lanes[priority].values())

    def push(self, job: J, *, front: bool = False) -> None:
        """Add a job; `front` puts it ahead of its namespace's queue (a re-queued job)."""
        if job.uid in self._members:
            return
        lane = self._lanes[job.priority].setdefault(job.namespace, deque())
        lane.appendleft(job) if front else lane.append(job)
        self._members[job.uid] = job

    def pop(self) -> J | None:
        for priority in PRIORITY_ORDER:
            lanes = self._lanes[priority]
            while lanes:
                namespace, lane = next(iter(lanes.items()))
                job = lane.popleft()
                # Rotate: this namespace goes to the back of the round.
                del lanes[namespace]
                if lane:
                    lanes[namespace] = lane
                if self._members.pop(job.uid, None) is not None:
                    return job
        return None

    def remove(self, uid: str) -> J | None:
        job = self._members.pop(uid, None)
        if job is None:
            return None
        lanes = self._lanes[job.priority]
        lane = lanes.get(job.namespace)
        if lane is not None:
            lane.remove(job)
            if not lane:
                del lanes[job.namespace]
        return job

    def __iter__(self) -> Iterator[J]:
        for priority in PRIORITY_ORDER:
            for lane in self._lanes[priority].values():
                yield from lane
