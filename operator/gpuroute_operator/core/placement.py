"""Where a job should go: its needs, the pools' views priced for it, whether a worker that
says it holds an attempt may keep it, and what finished jobs teach about each pool's speed
(pure; the dispatcher places the job where this decides).

Every pool is scored on the job at hand: its pipeline, and its size where known (inline
input) or else the typical size of that pipeline (service_model.PipelinePriors). What a
RESULT teaches is checked first (`Placer.learn`): the input size against what the operator
knows, the time against the other pools' workers (service_model.plausible_ms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from gpuroute.ops_catalog import models_used
from gpuroute.protocol import AttemptId, OutputInfo, Result
from gpuroute_operator.core.jobs import Job, Place
from gpuroute_operator.core.pools import PoolState, WorkerConn
from gpuroute_operator.core.router import Decision, JobNeeds, PoolView, choose, rejection
from gpuroute_operator.core.service_model import MAX_LEARNED_MPIX, PipelinePriors, ServiceFit, band_floor, plausible_ms

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

    def _size(self, job: Job) -> tuple[str, float | None, ServiceFit | None]:
        """The job's pipeline class, its input megapixels (known, or typical for the class) and the
        class's fit over every pool: what every service-time estimate for it starts from."""
        pixels = job.spec.input_pixels
        cost_class = job.spec.cost_class
        return (cost_class, self.priors.expected_mpix(cost_class, pixels / 1e6 if pixels else None),
                self.priors.shape(cost_class))

    def expected_ms(self, job: Job, pool: PoolState) -> float | None:
        """What `pool` is expected to take for `job` (worker ms), from what it has learned; None if nothing."""
        return pool.job_service_ms(*self._size(job))

    def views(self, job: Job) -> list[PoolView]:
        """Every pool as the router sees it for `job`. A pool's expected worker time is the mean
        over its worker keys, each credited with no less than RATE_BAND under the median of
        the other pools' keys (a pool that never ran the pipeline: its typical time, as low)."""
        cost_class, mpix, shape = self._size(job)
        keys = {name: pool.key_predictions(cost_class, mpix, shape) for name, pool in self.pools.items()}
        views = []
        for name, pool in self.pools.items():
            floor = band_floor(ms for other, predictions in keys.items() if other != name for ms in predictions)
            service = pool.job_service_ms(cost_class, mpix, shape, floor, keys[name])
            if service is None and pool.service_ms is not None:
                service = max(floor, pool.service_ms)
            views.append(pool.view(service))
        return views

    def decide(self, job: Job, now: float) -> Decision:
        views = self.views(job)
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

    def learn(self, job: Job, conn: WorkerConn, result: Result) -> None:
        """A computed (not cached) result from `conn`: its pool's speed on this pipeline (the
        share of `conn`'s key), and the pipeline's typical size."""
        pool = self.pools.get(conn.pool)
        if pool is None or result.cached:
            return
        key = conn.principal.user_id
        if result.output is not None:
            self._learn(pool, key, job, result.timing.worker_ms, result.output,
                        result.input_width * result.input_height)
        for item in result.items:  # an item group: each item is a sample of the pool's speed
            if item.output is not None:
                self._learn(pool, key, job, item.timing.worker_ms, item.output, item.input_width * item.input_height)

    def _learn(self, pool: PoolState, key: str, job: Job, worker_ms: float, output: OutputInfo,
               reported_pixels: int) -> None:
        cost_class = job.spec.cost_class
        if job.spec.input_pixels:
            pixels = job.spec.input_pixels  # read from the inline input's header: the claim is not needed
        elif reported_pixels / 1e6 > MAX_LEARNED_MPIX:
            return  # a size no worker reads: the whole result is suspect
        else:
            pixels = reported_pixels  # 0: unknown
        shape = self.priors.shape(cost_class)
        mpix = pixels / 1e6 if pixels else self.priors.expected_mpix(cost_class, None)
        others = (ms for other in self.pools.values() if other is not pool
                  for ms in other.key_predictions(cost_class, mpix, shape))
        checked = plausible_ms(worker_ms, others)
        if checked is None:
            return
        pool.record_result(checked, output.width * output.height, cost_class=cost_class, input_pixels=pixels, key=key)
        if pixels:
            self.priors.add(cost_class, pixels / 1e6, checked)
