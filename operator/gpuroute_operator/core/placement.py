"""Where a job should go: its needs, the pools' views priced for it, whether a worker that
says it holds an attempt may keep it, and what finished jobs teach about each pool's speed
(pure; the dispatcher places the job where this decides).

Every pool is scored on the job at hand: its pipeline, and its size where known (inline
input) or else the typical size of that pipeline (service_model.PipelinePriors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from gpuroute.ops_catalog import models_used
from gpuroute.protocol import AttemptId, OutputInfo, Result
from gpuroute_operator.core.jobs import Job, Place
from gpuroute_operator.core.pools import PoolState, WorkerConn
from gpuroute_operator.core.router import Decision, JobNeeds, PoolView, choose, rejection
from gpuroute_operator.core.service_model import PipelinePriors

Chooser = Callable[[JobNeeds, Sequence[PoolView]], Decision]
"""router.choose, or a stand-in that changes what the views show (the counterfactuals in bench/routing_sim/gpuroute.py)."""


class Placer:
    def __init__(self, pools: Mapping[str, PoolState], *, choose: Chooser = choose) -> None:
        self.pools = pools
        self.priors = PipelinePriors()
        self.choose = choose

    def needs(self, job: Job, now: float) -> JobNeeds:
        placement = job.spec.placement
        return JobNeeds(namespace=job.namespace, priority=job.priority, strategy=placement.strategy,
                        timeout_s=max(0.0, job.deadline - now), pools=placement.pools,
                        clouds=placement.clouds, regions=placement.regions, models=models_used(job.spec.steps))

    def eligible(self, job: Job, pool: PoolState, now: float) -> bool:
        """The pool could take the job if it had a free worker."""
        view = pool.view()
        view = dataclasses.replace(view, workers=max(1, view.workers), slots=max(1, view.slots))
        return rejection(self.needs(job, now), view) is None

    def expected_ms(self, job: Job, pool: PoolState) -> float | None:
        """What `pool` is expected to take for `job` (worker ms), from what it has learned; None if nothing."""
        pixels = job.spec.input_pixels
        cost_class = job.spec.cost_class
        mpix = self.priors.expected_mpix(cost_class, pixels / 1e6 if pixels else None)
        return pool.job_service_ms(cost_class, mpix, self.priors.shape(cost_class))

    def decide(self, job: Job, now: float) -> Decision:
        pixels = job.spec.input_pixels
        cost_class = job.spec.cost_class
        mpix = self.priors.expected_mpix(cost_class, pixels / 1e6 if pixels else None)
        shape = self.priors.shape(cost_class)
        views = [p.view(p.job_service_ms(cost_class, mpix, shape)) for p in self.pools.values()]
        needs = self.needs(job, now)
        decision = self.choose(needs, views)
        prefer = job.pool
        if prefer and decision.pool and prefer in self.pools and prefer != decision.pool:
            # A re-queued job goes back to its pool if that is still eligible: its worker may hold the result.
            alt = self.choose(dataclasses.replace(needs, pools=(prefer,)), views)
            decision = alt if alt.pool else decision
        return decision

    def may_adopt(self, job: Job, attempt: AttemptId, conn: WorkerConn, now: float) -> bool:
        """A worker's claim to hold `attempt` is believed only if it is the job's current attempt
        or the next one (whose Dispatched status may not have landed before a restart), nothing
        else runs the job, and the job may run in the worker's authenticated pool. A claim can
        therefore neither burn a job's attempts nor pull it out of its placement."""
        return (not job.phase.terminal and not job.live
                and attempt.attempt in (job.attempts, job.attempts + 1)
                and attempt.attempt <= job.spec.max_attempts
                and job.place in (Place.NEW, Place.RESUMING, Place.QUEUED, Place.UNROUTED, Place.HELD)
                and conn.pool in self.pools and self.eligible(job, self.pools[conn.pool], now))

    def holder_of(self, job: Job, sessions: Iterable[WorkerConn], now: float) -> tuple[WorkerConn, AttemptId] | None:
        """A session that holds an attempt of `job` it may adopt (the latest such attempt), if any."""
        for conn in sessions:
            if not conn.foreign and not conn.answered:
                continue
            for attempt in sorted(conn.foreign | conn.answered, reverse=True):
                if attempt.uid == job.uid and self.may_adopt(job, attempt, conn, now):
                    return conn, attempt
        return None

    def waiting_for(self, pool: PoolState, unrouted: Iterable[Job], now: float) -> int:
        """Unrouted jobs this pool could take if it had workers: demand that scales it up from zero."""
        view = dataclasses.replace(pool.view(), workers=1, slots=1)
        return sum(1 for job in unrouted if rejection(self.needs(job, now), view) is None)

    def learn(self, job: Job, pool_name: str, result: Result) -> None:
        """A computed (not cached) result: the pool's speed on this pipeline, and its typical size."""
        pool = self.pools.get(pool_name)
        if pool is None or result.cached:
            return
        if result.output is not None:
            self._learn(pool, job, result.timing.worker_ms, result.output, result.input_width * result.input_height)
        for item in result.items:  # an item group: each item is a sample of the pool's speed
            if item.output is not None:
                self._learn(pool, job, item.timing.worker_ms, item.output, item.input_width * item.input_height)

    def _learn(self, pool: PoolState, job: Job, worker_ms: float, output: OutputInfo, input_pixels: int) -> None:
        pool.record_result(worker_ms, output.width * output.height, cost_class=job.spec.cost_class,
                           input_pixels=input_pixels)
        if input_pixels:
            self.priors.add(job.spec.cost_class, input_pixels / 1e6, worker_ms)
