"""The dispatcher's books: where every job is, which attempts are out, on which session (pure).

The Dispatcher decides; the Ledger only records, and keeps its indexes in step:
- a job is in exactly one place (job.place); the pool queues and the unrouted, held and
  resuming maps are indexes of that field, changed only by `place`;
- an attempt exists once it has been sent, on exactly one session: `attempts`, `job.live`
  and `session.attempts` change together, only in `open` and `close`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

from gpuroute.protocol import AttemptId
from gpuroute_operator.core.jobs import Job, Place
from gpuroute_operator.core.pools import PoolState, WorkerConn


class Ledger:
    def __init__(self, pools: Mapping[str, PoolState], *, finished_memory: int) -> None:
        self._pools = pools
        self._finished_memory = finished_memory
        self.jobs: dict[str, Job] = {}
        """Live jobs by uid."""
        self.sessions: dict[bytes, WorkerConn] = {}
        """Registered worker sessions by routing id."""
        self.attempts: dict[AttemptId, bytes] = {}
        """Every attempt out, and the session it was sent on."""
        self.unrouted: dict[str, Job] = {}
        """Jobs no pool can take right now."""
        self.held: dict[str, float] = {}
        """uid -> when to try signing its storage URLs again."""
        self.resuming: dict[str, float] = {}
        """uid -> when to stop waiting for a worker that may hold it (after a restart)."""
        self.finished: dict[str, None] = {}
        """Recently ended uids, oldest first: late events and duplicate results are ignored cheaply."""
        self._deadlines: list[tuple[float, str]] = []

    def add(self, job: Job) -> None:
        self.jobs[job.uid] = job
        heapq.heappush(self._deadlines, (job.deadline, job.uid))

    def remove(self, job: Job) -> None:
        """The job ended or was deleted: out of every index, remembered as finished."""
        self.place(job, Place.DONE)
        self.jobs.pop(job.uid, None)
        self.remember_finished(job.uid)

    def remember_finished(self, uid: str) -> None:
        """A job known to have ended (here, or before this process started), kept for a while so
        that its late events are ignored; the oldest are forgotten past `finished_memory`."""
        self.finished[uid] = None
        while len(self.finished) > self._finished_memory:
            del self.finished[next(iter(self.finished))]

    def past_deadline(self, now: float) -> Iterator[Job]:
        """Live jobs whose deadline has passed, earliest first (a heap: expiry never scans every job)."""
        while self._deadlines and self._deadlines[0][0] < now:
            _, uid = heapq.heappop(self._deadlines)
            job = self.jobs.get(uid)
            if job is not None:  # else it ended already
                yield job

    def place(self, job: Job, place: Place, *, front: bool = False, until: float | None = None) -> None:
        """Move `job` to `place`; `until` is the retry or give-up time of HELD and RESUMING."""
        if job.place is Place.QUEUED:
            for pool in self._pools.values():  # a handful of pools; job.pool may already name the next one
                pool.queue.remove(job.uid)
        self.unrouted.pop(job.uid, None)
        self.held.pop(job.uid, None)
        self.resuming.pop(job.uid, None)
        job.place = place
        if place is Place.QUEUED:
            assert job.pool is not None
            self._pools[job.pool].queue.push(job, front=front)
        elif place is Place.UNROUTED:
            self.unrouted[job.uid] = job
        elif place in (Place.HELD, Place.RESUMING):
            assert until is not None
            (self.held if place is Place.HELD else self.resuming)[job.uid] = until

    def open(self, job: Job, attempt: AttemptId, conn: WorkerConn) -> None:
        """`attempt` of `job` was sent on `conn`."""
        self.attempts[attempt] = conn.routing_id
        job.live.add(attempt)
        conn.attempts.add(attempt)
        self.place(job, Place.RUNNING)

    def close(self, attempt: AttemptId) -> Job | None:
        """`attempt` is answered or given up; its job, if still live."""
        routing_id = self.attempts.pop(attempt, None)
        conn = self.sessions.get(routing_id) if routing_id is not None else None
        if conn is not None:
            conn.attempts.discard(attempt)
        job = self.jobs.get(attempt.uid)
        if job is not None:
            job.live.discard(attempt)
        return job
