"""The baselines gpuroute is compared with, over the same trace and service-time noise.

- round-robin: a plain load balancer over the pools, in turn, skipping pools its health
  check (the same 3 missed 1 s beats) has marked down, and pools the job's placement
  excludes. Jobs wait in each pool's own FIFO (no priorities, no namespace fairness).
  ASSUMPTION (a stateless dispatcher has no failover of accepted work): jobs queued in or
  running on a pool that fails stay there until the pool returns; then the pool's job
  controller restarts them (front of its queue) and fails those past their deadline.
  If the pool never returns they are lost.
- round-robin + failover: the same, but given gpuroute's failover (jobs moved on
  detection). Not a real system: it isolates what the router adds over the failover.
- MultiKueue first-to-admit (as the issue specifies it): the job is offered to every
  eligible cluster in a fixed order (POOLS order: fastest first, the spot pool last, as an
  operator wary of preemption would list them) and goes to the first with free quota;
  if none has any it waits in the first eligible cluster's queue (Kueue orders queues by
  priority, so realtime first, then FIFO). Price and speed play no part.
  ASSUMPTION on failure (Kueue's documented behaviour): a dead worker cluster admits
  nothing; workloads it had admitted keep their reservation for `workerLostTimeout`
  (15 minutes by default: kueue config API, MultiKueue.WorkerLostTimeout, added in
  kubernetes-sigs/kueue#1681) and are only then evicted and re-dispatched. If the cluster
  returns first, its Jobs recreate their pods there (we restart them at the front of
  that cluster's queue at once, which is generous: no pod-eviction delay).
- MultiKueue all-at-once: closer to Kueue's real AllAtOnce dispatcher (KEP-693: a copy of
  a pending workload sits in every worker cluster and the first to admit it wins), i.e.
  one global priority-FIFO queue served by whichever cluster frees quota first. Same
  failure behaviour. Shown because the issue's variant above is harsher than Kueue.
  Neither MultiKueue variant pays Kueue's own admission latency (generous).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from bench.routing_sim.kernel import PAST_DEADLINE, PENDING, Attempt, SimJob, Simulation
from bench.routing_sim.scenario import PoolModel, Scenario
from bench.routing_sim.trace import TraceJob

MULTIKUEUE_WORKER_LOST_TIMEOUT_S = 900.0
"""Kueue's default MultiKueue workerLostTimeout (15 minutes)."""


class LaneQueue:
    """FIFO (optionally realtime-first) with lazy removal: entries whose ticket changed are skipped."""

    def __init__(self, *, by_priority: bool) -> None:
        self.by_priority = by_priority
        self.lanes: dict[str, deque[tuple[int, SimJob]]] = {"realtime": deque(), "batch": deque()}

    def _lane(self, job: SimJob) -> deque[tuple[int, SimJob]]:
        return self.lanes[job.priority if self.by_priority else "batch"]

    def push(self, job: SimJob, *, front: bool = False) -> None:
        job.ticket += 1
        lane = self._lane(job)
        lane.appendleft((job.ticket, job)) if front else lane.append((job.ticket, job))

    def entries(self) -> Iterator[SimJob]:
        for lane in self.lanes.values():
            for ticket, job in lane:
                if ticket == job.ticket and job.outcome == PENDING:
                    yield job

    def take(self, eligible: Callable[[SimJob], bool] | None = None) -> SimJob | None:
        """Remove and return the first valid job (that `eligible` accepts)."""
        for lane in self.lanes.values():
            while lane and (lane[0][0] != lane[0][1].ticket or lane[0][1].outcome != PENDING):
                lane.popleft()
            for ticket, job in lane:
                if ticket == job.ticket and job.outcome == PENDING and (eligible is None or eligible(job)):
                    job.ticket += 1  # leaves the queue (lazily)
                    return job
        return None

    def empty(self) -> bool:
        return next(self.entries(), None) is None


@dataclass(eq=False)
class Cluster:
    """A pool as a baseline sees it: slots, its own queue, and work stranded by a failure."""

    model: PoolModel
    queue: LaneQueue
    running: dict[str, Attempt] = field(default_factory=dict)
    stranded: list[SimJob] = field(default_factory=list)
    """Jobs whose attempt died with the cluster, held by it until it returns."""


def eligible_for(job: SimJob, model: PoolModel) -> bool:
    # Baselines respect data residency too: a fair comparison moves no job out of its region.
    return not job.t.regions or model.region in job.t.regions


class BaselineSim(Simulation):
    """What the baselines share: clusters, per-job timeouts, restart on return."""

    failover = False
    """Whether the dispatcher itself tracks and moves jobs held by a failed cluster."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, by_priority: bool) -> None:
        super().__init__(trace, scenario, seed)
        self.clusters = {m.name: Cluster(m, LaneQueue(by_priority=by_priority)) for m in scenario.pools}

    def free(self, cluster: Cluster) -> int:
        return cluster.model.slots - len(cluster.running) if self.alive[cluster.model.name] else 0

    def start(self, job: SimJob, cluster: Cluster) -> None:
        cluster.running[job.uid] = self.start_attempt(job, cluster.model.name)

    def next_job(self, cluster: Cluster) -> SimJob | None:
        return cluster.queue.take()

    def pump(self) -> None:
        while self.dirty:
            cluster = self.clusters[self.next_dirty()]
            while self.free(cluster) > 0:
                job = self.next_job(cluster)
                if job is None:
                    break
                self.start(job, cluster)

    def result(self, att: Attempt) -> None:
        cluster = self.clusters[att.pool]
        if att.dead or cluster.running.get(att.job.uid) is not att:
            return
        del cluster.running[att.job.uid]
        self.complete(att)
        self.dirty.add(att.pool)

    def in_limbo(self, job: SimJob) -> bool:
        """Held by a failed cluster out of the dispatcher's sight: no one can time it out."""
        return (not self.failover and job.pool is not None and not self.alive[job.pool]
                and job.pool in self.clusters)

    def deadline(self, job: SimJob) -> None:
        if job.outcome != PENDING or self.in_limbo(job):
            return  # in limbo: enforced when its cluster returns (recover)
        self._expire(job)

    def _expire(self, job: SimJob) -> None:
        if job.pool is not None:
            cluster = self.clusters[job.pool]
            att = cluster.running.pop(job.uid, None)
            if att is not None:
                self.charge(att, self.now)
                self.dirty.add(job.pool)
            if job in cluster.stranded:
                cluster.stranded.remove(job)
        job.ticket += 1  # drops it from any queue
        self.settle(job, PAST_DEADLINE)

    def fail(self) -> None:
        cluster = self.clusters[self.scenario.failing]
        self.alive[self.scenario.failing] = False
        running = list(cluster.running.values())
        self.fail_pool_attempts(running)
        cluster.stranded.extend(a.job for a in running)
        cluster.running.clear()

    def recover(self) -> None:
        name = self.scenario.failing
        cluster = self.clusters[name]
        self.alive[name] = True
        self.down.discard(name)
        # The cluster's job controller enforces deadlines that passed while it was away...
        for job in list(cluster.queue.entries()) + cluster.stranded:
            if job.outcome == PENDING and self.now >= job.t.deadline:
                self._expire(job)
        # ...and restarts what it was running, ahead of its queue.
        for job in reversed(cluster.stranded):
            if job.outcome == PENDING:
                cluster.queue.push(job, front=True)
        cluster.stranded.clear()
        self.dirty.add(name)


class RoundRobinSim(BaselineSim):
    """A load balancer: pools in turn, skipping those its health check marks down."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, failover: bool) -> None:
        super().__init__(trace, scenario, seed, by_priority=False)
        self.failover = failover
        self.label = "round-robin + failover" if failover else "round-robin"
        self.order = [m.name for m in scenario.pools]
        self.next_index = 0
        self.waiting: list[SimJob] = []
        """Jobs no live, eligible pool could take: retried every tick."""
        self.moved = False

    def pick(self, job: SimJob) -> Cluster | None:
        for k in range(len(self.order)):
            name = self.order[(self.next_index + k) % len(self.order)]
            if name not in self.down and eligible_for(job, self.models[name]):
                self.next_index = (self.next_index + k + 1) % len(self.order)
                return self.clusters[name]
        return None

    def arrive(self, job: SimJob, *, front: bool = False) -> None:
        cluster = self.pick(job)
        if cluster is None:
            job.pool = None
            self.waiting.append(job)
            return
        job.pool = cluster.model.name
        cluster.queue.push(job, front=front)
        self.dirty.add(job.pool)

    def on_tick(self) -> None:
        name = self.scenario.failing
        if self.failover and not self.moved and name in self.down:
            # Given gpuroute's failover: in-flight work first (front), then the queue (back).
            self.moved = True
            cluster = self.clusters[name]
            for job in cluster.stranded:
                if job.outcome == PENDING:
                    job.rerouted = True
                    self.arrive(job, front=True)
            cluster.stranded.clear()
            for job in list(cluster.queue.entries()):
                job.rerouted = True
                self.arrive(job)
        if self.alive[name]:
            self.moved = False
        waiting, self.waiting = self.waiting, []
        for job in waiting:
            if job.outcome == PENDING:
                self.arrive(job)


class MultiKueueSim(BaselineSim):
    """First-to-admit over clusters in a fixed order; see the module docstring for the two variants."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, all_at_once: bool) -> None:
        super().__init__(trace, scenario, seed, by_priority=True)  # Kueue WorkloadPriorityClass
        self.all_at_once = all_at_once
        self.label = "MultiKueue all-at-once" if all_at_once else "MultiKueue first-to-admit"
        self.order = [self.clusters[m.name] for m in scenario.pools]
        self.pending = LaneQueue(by_priority=True)
        """all-at-once: workloads pending in every cluster at once."""

    def arrive(self, job: SimJob) -> None:
        eligible = [c for c in self.order if eligible_for(job, c.model)]
        for cluster in eligible:
            # A cluster admits a new workload if it has free quota and nothing queued ahead of it.
            if self.free(cluster) > 0 and (self.all_at_once or cluster.queue.empty()):
                self.start(job, cluster)
                return
        if self.all_at_once:
            job.pool = None
            self.pending.push(job)
        else:
            job.pool = eligible[0].model.name
            eligible[0].queue.push(job)
        self.dirty.update(c.model.name for c in eligible)

    def next_job(self, cluster: Cluster) -> SimJob | None:
        job = cluster.queue.take()  # restarted (returned cluster) work first
        if job is None and self.all_at_once:
            job = self.pending.take(lambda j: eligible_for(j, cluster.model))
        return job

    def fail(self) -> None:
        stranded_before = len(self.clusters[self.scenario.failing].stranded)
        super().fail()
        for job in self.clusters[self.scenario.failing].stranded[stranded_before:]:
            self.at(self.now + MULTIKUEUE_WORKER_LOST_TIMEOUT_S, self.readmit, job)

    def readmit(self, job: SimJob) -> None:
        """workerLostTimeout passed with the cluster still gone: evict and dispatch again."""
        cluster = self.clusters[self.scenario.failing]
        if job.outcome == PENDING and job in cluster.stranded and not self.alive[cluster.model.name]:
            cluster.stranded.remove(job)
            job.pool = None
            job.rerouted = True
            if self.now >= job.t.deadline:
                self._expire(job)
            else:
                self.arrive(job)
