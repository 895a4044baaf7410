"""Pick a pool for a job: hard filters first, then a score under the job's strategy (pure).

Filters: the job's placement (pools, clouds, regions: data residency), the pool's
allowedNamespaces, the models the job needs, and the pool having live workers.
Scores use live measurements only where they exist: heartbeat RTT, the pool's fit of
worker time against input size for the job's pipeline (service_model.py), and the moving
average of all its jobs' times for the queue ahead. A pool that has not run the job's
pipeline falls back to that average, and a pool never measured to a prior.

- fastest:  least expected completion time (queue wait + RTT + service time)
- cheapest: least expected cost per image among pools expected to finish within half
  the job's remaining time (the other half is headroom for a pool failing under it)
- balanced: least cost among pools within 1.5x of the fastest estimate
Batch jobs see spot pools' cost discounted (they tolerate preemption); realtime jobs do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpuroute_operator.core.service_model import MIN_SERVICE_MS

PRIOR_SERVICE_MS = 250.0
"""Service time assumed for a pool before any job there has been measured."""
BALANCED_SLACK = 1.5
"""balanced accepts pools up to this factor slower than the fastest estimate."""
DEADLINE_HEADROOM = 0.5
"""cheapest only considers pools expected to finish within this share of the remaining time.
Filling a cheap pool up to the full deadline leaves no time to recover when it fails: in
the first version of bench/routing_sim.py (3 pools, a spot pool failing under a burst),
2,169 of 10,000 jobs went late without this headroom and none with it."""
SPOT_BATCH_DISCOUNT = 0.8
"""Weight on a spot pool's cost when scoring batch jobs."""


@dataclass(frozen=True)
class PoolView:
    """What the router knows of a pool at decision time."""

    name: str
    """WorkerPool name."""
    cloud: str
    """Cloud of the pool (placement.clouds filter)."""
    region: str
    """Region of the pool (placement.regions filter)."""
    price_per_gpu_hour: float
    """USD per GPU-hour."""
    spot: bool
    """Whether the pool runs on preemptible capacity."""
    allowed_namespaces: tuple[str, ...]
    """Namespaces allowed to use the pool; empty allows all."""
    models: frozenset[str]
    """Super-resolution models the pool's workers serve."""
    workers: int
    """Connected, non-draining workers."""
    slots: int
    """Total job slots of those workers."""
    busy: int
    """Jobs in flight on the pool."""
    queued: int
    """Jobs waiting in the pool's queue."""
    rtt_ms: float | None
    """Moving average of heartbeat round trips."""
    service_ms: float | None
    """Moving average of worker-reported time per job, over every job the pool ran."""
    job_service_ms: float | None = None
    """The pool's expected worker time for the job being routed (its pipeline and size)."""


@dataclass(frozen=True)
class JobNeeds:
    """What a job asks of a pool."""

    namespace: str
    """Namespace of the ImageJob."""
    priority: str
    """realtime or batch."""
    strategy: str
    """fastest, cheapest or balanced."""
    timeout_s: float
    """Remaining seconds before the job times out."""
    pools: tuple[str, ...] = ()
    """Allowed pools; empty allows all."""
    clouds: tuple[str, ...] = ()
    """Allowed clouds; empty allows all."""
    regions: tuple[str, ...] = ()
    """Allowed regions; empty allows all."""
    models: frozenset[str] = frozenset()
    """Models the pipeline needs."""


@dataclass(frozen=True)
class Estimate:
    pool: str
    expected_ms: float
    cost_usd: float


@dataclass(frozen=True)
class Decision:
    """The router's choice, or why there is none (pool is None)."""

    pool: str | None
    reason: str
    estimate: Estimate | None = None


def rejection(job: JobNeeds, pool: PoolView) -> str | None:
    """Why `pool` cannot take `job`, or None if it can."""
    if job.pools and pool.name not in job.pools:
        return "not in placement.pools"
    if job.clouds and pool.cloud not in job.clouds:
        return f"cloud {pool.cloud} not in placement.clouds"
    if job.regions and pool.region not in job.regions:
        return f"region {pool.region} not in placement.regions"
    if pool.allowed_namespaces and job.namespace not in pool.allowed_namespaces:
        return f"namespace {job.namespace} not allowed"
    missing = job.models - pool.models
    if missing:
        return f"does not serve model {', '.join(sorted(missing))}"
    if pool.workers == 0:
        return "no connected workers"
    return None


def estimate(pool: PoolView) -> Estimate:
    typical = pool.service_ms if pool.service_ms is not None else PRIOR_SERVICE_MS
    # Never 0, whatever the workers reported: a pool that looked free would win every strategy.
    service = max(MIN_SERVICE_MS, pool.job_service_ms if pool.job_service_ms is not None else typical)
    # The jobs ahead are whatever the pool's queue holds: their time is the pool's typical job's.
    ahead = max(0, pool.queued + pool.busy - pool.slots + 1)
    wait = ahead * typical / max(1, pool.slots)
    expected = wait + (pool.rtt_ms or 0.0) + service
    # A worker's slots share its GPU: one job holds 1/slots-per-worker of it for `service`.
    slots_per_gpu = pool.slots / pool.workers if pool.workers else 1.0
    cost = pool.price_per_gpu_hour * service / 3_600_000.0 / max(1.0, slots_per_gpu)
    return Estimate(pool.name, expected, cost)


def choose(job: JobNeeds, pools: Sequence[PoolView]) -> Decision:
    rejected: list[str] = []
    candidates: list[tuple[PoolView, Estimate]] = []
    for pool in pools:
        why = rejection(job, pool)
        if why:
            rejected.append(f"{pool.name}: {why}")
        else:
            candidates.append((pool, estimate(pool)))
    if not candidates:
        detail = "; ".join(rejected) if rejected else "no WorkerPool exists"
        return Decision(None, f"no eligible pool ({detail})")

    def weighted_cost(item: tuple[PoolView, Estimate]) -> float:
        pool, est = item
        return est.cost_usd * (SPOT_BATCH_DISCOUNT if pool.spot and job.priority == "batch" else 1.0)

    fastest = min(candidates, key=lambda c: c[1].expected_ms)
    if job.strategy == "fastest":
        chosen = fastest
    else:
        if job.strategy == "cheapest":
            bound = job.timeout_s * 1000.0 * DEADLINE_HEADROOM
        else:
            bound = fastest[1].expected_ms * BALANCED_SLACK
        within = [c for c in candidates if c[1].expected_ms <= bound] or [fastest]
        chosen = min(within, key=lambda c: (weighted_cost(c), c[1].expected_ms))
    est = chosen[1]
    reason = f"pool {est.pool}: est. {est.expected_ms:.0f} ms, ${est.cost_usd:.6f} ({job.strategy}, {len(candidates)} eligible)"
    return Decision(est.pool, reason, est)
