"""What every policy shares: the event loop, the GPU side of an attempt, outcomes and cost.

`Simulation` runs the clock (arrivals, deadlines, the pool failing and returning, the
heartbeat tick) and leaves routing and queueing to its subclasses (`gpuroute`,
`baselines`); its `summary` is one row of the report.

Outcomes. A job is `completed` if its result arrives by its deadline (arrival + timeout);
`past_deadline` if the system ends it at its deadline (a Kubernetes Job's
activeDeadlineSeconds for the baselines); `failed` if it ran out of attempts. For gpuroute
these are the dispatcher's terminal statuses (Completed; Failed with reason Timeout;
any other Failed), so its deadline is checked on its tick: a result up to TICK_S after
the deadline still completes, as in the operator. A job is `lost` if it never reaches any
of these before the run ends, which happens only to jobs a failed cluster holds out of
the dispatcher's sight (nobody can time them out, re-run them, or report them). The run
ends one second after the last deadline in the trace: nothing after that could finish
on time.
Latency percentiles are over completed jobs (arrival to result at the dispatcher).

Cost: GPU-seconds used times the pool's price per GPU-hour. A worker is one GPU shared
by its slots (maxInFlightPerWorker jobs at once), so a job holding a slot for t seconds
uses t / slots GPU-seconds. Work cut short (a timeout cancelling it, a pool failing
under it) is charged up to that moment; work sent to an already dead pool costs nothing.
Cost per 1,000 images is all GPU spend over the images delivered on time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import percentile
from bench.routing_sim.scenario import DETECT_AFTER_S, Scenario
from bench.routing_sim.trace import TraceJob
from gpuroute import protocol
from gpuroute.protocol import AttemptId

PENDING, COMPLETED, PAST_DEADLINE, FAILED = "pending", "completed", "past_deadline", "failed"


@dataclass(eq=False)  # identity equality: the baselines' deque.remove compares jobs
class SimJob:
    """A job's state during one policy's run."""

    t: TraceJob
    uid: str
    namespace: str
    priority: str
    outcome: str = PENDING
    finished_at: float | None = None
    pool: str | None = None
    """Pool the job is queued at, running on, or completed on."""
    attempts: int = 0
    rerouted: bool = False
    ticket: int = 0
    """Bumped whenever the job leaves a baseline queue: stale queue entries are skipped."""
    routed_at: float = 0.0
    expected_ms: float | None = None
    """The router's expected completion at the job's last routing decision."""
    expected_usd: float | None = None
    """The router's expected cost at that decision."""
    usd: float = 0.0
    """GPU cost of its last attempt."""


@dataclass(eq=False)
class Attempt:
    job: SimJob
    pool: str
    job_id: str
    started: float
    service_ms: float
    rtt_ms: float
    routing_id: bytes = b""
    """gpuroute: the worker session it was sent on."""
    attempt: AttemptId | None = None
    """gpuroute: the dispatcher's id for it."""
    dead: bool = False
    """Its pool failed under it (or it was sent to a dead pool): no result will come."""
    charged: bool = False


class Simulation:
    """Event loop, outcomes and cost accounting; subclasses route and queue."""

    label = ""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.models = {m.name: m for m in scenario.pools}
        self.alive = {m.name: True for m in scenario.pools}
        self.jobs = [SimJob(t, t.uid, t.namespace, t.priority) for t in trace]
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.horizon = max((t.deadline for t in trace), default=0.0) + 1.0
        self.gpu_usd = 0.0
        self.pool_usd = {m.name: 0.0 for m in scenario.pools}
        self.pool_done = {m.name: 0 for m in scenario.pools}
        self.last_heard = {m.name: 0.0 for m in scenario.pools}
        self.idle_slot_s = 0.0
        self.idle_since = 0.0
        self.idle_now = 0
        self.dirty: set[str] = set()
        """Pools whose queue or free slots changed since the last pump."""
        self.down: set[str] = set()
        """Pools the health check has declared gone (baselines; gpuroute: the dispatcher's own liveness)."""

    # ---- event loop -------------------------------------------------------------------

    def at(self, when: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.events, (when, next(self.seq), handler, args))

    def run(self) -> dict[str, Any]:
        for job in self.jobs:
            self.at(job.t.arrival, self.arrive, job)
            self.at(job.t.deadline, self.deadline, job)
        self.at(self.scenario.fail_at_s, self.fail)
        if self.scenario.recover_at_s is not None:
            self.at(self.scenario.recover_at_s, self.recover)
        self.at(0.0, self.tick)
        while self.events:
            when, _, handler, args = heapq.heappop(self.events)
            if when > self.horizon:
                break
            self.now = when
            self.account_idle(when)
            handler(*args)
            self.pump()
            self.idle_now = self.idle_slots()
        return self.summary()

    def account_idle(self, until: float) -> None:
        self.idle_slot_s += (until - self.idle_since) * self.idle_now
        self.idle_since = until

    def idle_slots(self) -> int:
        """Free slots on live pools while jobs wait in another pool's queue (0 where not tracked)."""
        return 0

    def tick(self) -> None:
        """Once per heartbeat interval: what each side learns from heartbeats (or their absence)."""
        for name, alive in self.alive.items():
            if alive:
                self.last_heard[name] = self.now
            elif self.now - self.last_heard[name] > DETECT_AFTER_S:
                self.down.add(name)  # a health check's verdict, on the operator's liveness rule
        self.on_tick()
        if self.now + protocol.HEARTBEAT_INTERVAL_S <= self.horizon:
            self.at(self.now + protocol.HEARTBEAT_INTERVAL_S, self.tick)

    # ---- attempts, outcomes and cost --------------------------------------------------

    def start_attempt(self, job: SimJob, pool: str) -> Attempt:
        job.attempts += 1
        job.pool = pool
        return self.run_attempt(job, pool, f"{job.uid}/{job.attempts}")

    def run_attempt(self, job: SimJob, pool: str, job_id: str, routing_id: bytes = b"") -> Attempt:
        """The GPU side of one attempt: its result comes back after RTT + service time, unless the pool is dead."""
        model = self.models[pool]
        att = Attempt(job, pool, job_id, self.now, model.service_ms(job.t.mpix, job.t.noise),
                      model.rtt_ms * (0.9 + 0.2 * (job.t.noise * 1000.0 % 1.0)), routing_id)
        if self.alive[pool]:
            self.at(self.now + (att.rtt_ms + att.service_ms) / 1000.0, self.result, att)
        else:
            att.dead = att.charged = True  # sent into a dead pool: never runs, costs nothing
        return att

    def charge(self, att: Attempt, until: float) -> None:
        """GPU time of an attempt: all of it on a result, up to `until` when cut short."""
        if att.charged:
            return
        att.charged = True
        used = min(att.service_ms, max(0.0, (until - att.started) * 1000.0 - att.rtt_ms / 2.0))
        usd = self.models[att.pool].usd(used)
        att.job.usd = usd
        self.gpu_usd += usd
        self.pool_usd[att.pool] += usd

    def complete(self, att: Attempt) -> None:
        self.charge(att, self.now)
        job = att.job
        self.settle(job, COMPLETED)
        job.pool = att.pool
        self.pool_done[att.pool] += 1

    def settle(self, job: SimJob, outcome: str) -> None:
        """Give a job its one outcome; a second one would be a bug in the simulation (or the engine)."""
        if job.outcome != PENDING:
            raise RuntimeError(f"{self.label}: {job.uid} already {job.outcome}, now {outcome}")
        job.outcome, job.finished_at = outcome, self.now

    def fail_pool_attempts(self, running: Sequence[Attempt]) -> None:
        for att in running:
            self.charge(att, self.now)  # a preempted spot VM is billed until it goes
            att.dead = True

    # ---- subclass hooks -----------------------------------------------------------------

    def arrive(self, job: SimJob) -> None:
        raise NotImplementedError

    def result(self, att: Attempt) -> None:
        raise NotImplementedError

    def deadline(self, job: SimJob) -> None:
        raise NotImplementedError

    def fail(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        raise NotImplementedError

    def on_tick(self) -> None:
        pass

    def next_dirty(self) -> str:
        """The first pool (in POOLS order) with something to dispatch: set order would vary with hash seeds."""
        name = next(n for n in self.models if n in self.dirty)
        self.dirty.discard(name)
        return name

    def pump(self) -> None:
        pass

    # ---- results ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        done = [j for j in self.jobs if j.outcome == COMPLETED]
        latency = [j.finished_at - j.t.arrival for j in done]  # type: ignore[operator]
        realtime = [j.finished_at - j.t.arrival for j in done if j.priority == "realtime"]  # type: ignore[operator]
        batch = [j.finished_at - j.t.arrival for j in done if j.priority == "batch"]  # type: ignore[operator]
        counts = {k: sum(1 for j in self.jobs if j.outcome == k) for k in (COMPLETED, PAST_DEADLINE, FAILED)}
        return {
            "policy": self.label,
            "jobs": len(self.jobs),
            "completed": counts[COMPLETED],
            "past_deadline": counts[PAST_DEADLINE],
            "failed": counts[FAILED],
            "lost": sum(1 for j in self.jobs if j.outcome == PENDING),
            "realtime_past_deadline": sum(1 for j in self.jobs
                                          if j.priority == "realtime" and j.outcome == PAST_DEADLINE),
            "rerouted": sum(1 for j in self.jobs if j.rerouted),
            "idle_slot_s_while_queued_elsewhere": round(self.idle_slot_s, 1),
            "gpu_usd": self.gpu_usd,
            "cost_per_1000_usd": 1000.0 * self.gpu_usd / counts[COMPLETED] if counts[COMPLETED] else math.nan,
            "p50_s": percentile(latency, 0.50),
            "p95_s": percentile(latency, 0.95),
            "realtime_p95_s": percentile(realtime, 0.95),
            "batch_p95_s": percentile(batch, 0.95),
            "completed_per_pool": dict(self.pool_done),
            "usd_per_pool": {k: round(v, 6) for k, v in self.pool_usd.items()},
        }
