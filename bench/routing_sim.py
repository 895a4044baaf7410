"""Routing simulation: the real router and fair queue against a synthetic trace.

`python -m bench.routing_sim [JOBS]` replays one trace under several policies:

- gpuroute with every job forced to `fastest`, `cheapest` or `balanced`, and with the
  trace's own per-job mix (realtime jobs ask for fastest, batch for cheapest/balanced).
  These call `gpuroute_operator.router.choose` and queue in `FairQueue`, with pool
  measurements kept as the engine keeps them (EWMA of service times, live queue/busy).
- round-robin: pools in turn, skipping dead ones (a plain load balancer).
- first-to-admit: MultiKueue-style: offered to every cluster in a fixed order, the
  first with free capacity takes it, otherwise it waits in the first cluster's queue.

Pool failure: at FAIL_AT the spot pool loses every worker and comes back at RECOVER_AT.
- gpuroute: what the engine does: jobs in flight or queued there are re-routed at once
  (front of the new queue, one more attempt).
- round-robin: given the same instant failover, so the comparison isolates routing.
- first-to-admit: Kueue's MultiKueue re-admits workloads of an unreachable worker
  cluster only after `workerLostTimeout` (15 minutes by default); jobs caught there are
  re-offered after that, by when their deadlines (5 s realtime, 120 s batch) have passed.

Cost is busy GPU time times the pool's price (what a job costs at the margin; idle
capacity is the autoscaler's business). A job that does not finish within its timeout
counts as past deadline (the operator fails it with Timeout); `lost` counts jobs that
never reach an outcome before the simulation ends.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gpuroute_operator.pools import ewma
from gpuroute_operator.router import JobNeeds, PoolView, choose
from gpuroute_operator.scheduler import FairQueue

FAIL_AT = 30.0
"""Seconds into the trace when the spot pool loses all its workers."""
RECOVER_AT = 70.0
"""Seconds into the trace when it comes back."""
MULTIKUEUE_WORKER_LOST_TIMEOUT_S = 900.0
"""Kueue's default workerLostTimeout for MultiKueue."""
HORIZON_S = 3600.0
"""The simulation ends here; anything unfinished by then is lost."""


@dataclass(frozen=True)
class PoolModel:
    """A simulated WorkerPool."""

    name: str
    cloud: str
    region: str
    price: float
    """USD per GPU-hour."""
    spot: bool
    gpus: int
    """Workers of one GPU, each running one job at a time."""
    overhead_ms: float
    """Fixed time per job (transfers, decode, encode)."""
    ms_per_mpix: float
    """Compute time per megapixel."""
    rtt_ms: float
    """Round trip between the operator and the pool."""


POOLS = (
    PoolModel("azure-a100", "azure", "westeurope", 3.70, False, 8, 20.0, 25.0, 15.0),
    PoolModel("aws-spot-t4", "aws", "us-east-1", 0.55, True, 8, 40.0, 70.0, 70.0),
    PoolModel("gcp-l4", "gcp", "europe-west4", 0.80, False, 6, 45.0, 55.0, 35.0),
)
FAILING = "aws-spot-t4"


@dataclass
class SimJob:
    uid: str
    namespace: str
    priority: str
    strategy: str
    arrival: float
    timeout_s: float
    mpix: float
    clouds: tuple[str, ...] = ()
    attempts: int = 0
    finished: float | None = None
    expired: bool = False
    cost: float = 0.0

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s


def make_trace(jobs: int, seed: int) -> list[SimJob]:
    """Poisson arrivals at 70 jobs/s, plus one namespace bursting half the jobs in 10 s."""
    rng = random.Random(seed)
    burst = jobs // 2
    out: list[SimJob] = []
    t = 0.0
    for i in range(jobs - burst):
        t += rng.expovariate(70.0)
        realtime = rng.random() < 0.35
        out.append(SimJob(
            uid=f"j{i}", namespace=rng.choice(("web", "mobile", "analytics")),
            priority="realtime" if realtime else "batch",
            strategy="fastest" if realtime else rng.choice(("cheapest", "balanced")),
            arrival=t, timeout_s=5.0 if realtime else 120.0, mpix=min(24.0, rng.lognormvariate(0.4, 0.7)),
            # Some data may not leave the EU/Azure+GCP footprint.
            clouds=("azure", "gcp") if rng.random() < 0.15 else ()))
    start = 15.0
    for i in range(burst):
        out.append(SimJob(uid=f"b{i}", namespace="bulk-reprocess", priority="batch", strategy="cheapest",
                          arrival=start + rng.uniform(0.0, 10.0), timeout_s=120.0,
                          mpix=min(24.0, rng.lognormvariate(0.2, 0.5))))
    out.sort(key=lambda j: j.arrival)
    return out


@dataclass
class PoolState:
    model: PoolModel
    alive: bool = True
    busy: dict[int, SimJob] = field(default_factory=dict)
    queue: FairQueue[SimJob] = field(default_factory=FairQueue)
    fifo: deque[SimJob] = field(default_factory=deque)
    service_ms: float | None = None
    gpu_seconds: float = 0.0

    def free_gpus(self) -> list[int]:
        return [g for g in range(self.model.gpus) if g not in self.busy] if self.alive else []

    def view(self) -> PoolView:
        m = self.model
        return PoolView(name=m.name, cloud=m.cloud, region=m.region, price_per_gpu_hour=m.price, spot=m.spot,
                        allowed_namespaces=(), models=frozenset(), workers=m.gpus if self.alive else 0,
                        slots=m.gpus if self.alive else 0, busy=len(self.busy), queued=len(self.queue) + len(self.fifo),
                        rtt_ms=m.rtt_ms, service_ms=self.service_ms)


class Simulation:
    def __init__(self, trace: list[SimJob], policy: str, seed: int) -> None:
        self.policy = policy
        self.jobs = [SimJob(**{k: v for k, v in j.__dict__.items()}) for j in trace]
        self.pools = {m.name: PoolState(m) for m in POOLS}
        self.rng = random.Random(seed + 1)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.rr = itertools.cycle([m.name for m in POOLS])
        self.unrouted: dict[str, SimJob] = {}
        self.rerouted = 0

    def at(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    # ---- policies -----------------------------------------------------------------

    def _eligible(self, job: SimJob) -> list[PoolState]:
        return [p for p in self.pools.values() if p.alive and (not job.clouds or p.model.cloud in job.clouds)]

    def route(self, job: SimJob, *, front: bool = False) -> None:
        if self.policy.startswith("gpuroute"):
            strategy = job.strategy if self.policy == "gpuroute-mix" else self.policy.split("-", 1)[1]
            needs = JobNeeds(namespace=job.namespace, priority=job.priority, strategy=strategy,
                             timeout_s=max(0.0, job.deadline - self.now), clouds=job.clouds)
            decision = choose(needs, [p.view() for p in self.pools.values()])
            if decision.pool is None:
                self.unrouted[job.uid] = job
                return
            self.pools[decision.pool].queue.push(job, front=front)
            self.dispatch(self.pools[decision.pool])
        elif self.policy == "round-robin":
            candidates = self._eligible(job)
            if not candidates:
                self.unrouted[job.uid] = job
                return
            names = {p.model.name for p in candidates}
            name = next(n for n in self.rr if n in names)
            pool = self.pools[name]
            (pool.fifo.appendleft if front else pool.fifo.append)(job)
            self.dispatch(pool)
        else:  # first-to-admit
            order = [p for p in self.pools.values() if not job.clouds or p.model.cloud in job.clouds]
            for pool in order:
                if pool.alive and pool.free_gpus() and not pool.fifo:
                    pool.fifo.append(job)
                    self.dispatch(pool)
                    return
            order[0].fifo.append(job)  # waits where it was first offered, alive or not
            self.dispatch(order[0])

    def _next(self, pool: PoolState) -> SimJob | None:
        return pool.queue.pop() if self.policy.startswith("gpuroute") else (pool.fifo.popleft() if pool.fifo else None)

    def dispatch(self, pool: PoolState) -> None:
        for gpu in pool.free_gpus():
            while True:
                job = self._next(pool)
                if job is None:
                    return
                if self.now >= job.deadline:
                    job.expired = True  # the operator fails it with Timeout
                    continue
                break
            m = pool.model
            job.attempts += 1
            service = (m.overhead_ms + m.ms_per_mpix * job.mpix) * self.rng.lognormvariate(0.0, 0.12)
            pool.busy[gpu] = job
            self.at(self.now + (m.rtt_ms + service) / 1000.0, "finish", (pool.model.name, gpu, job, service))

    # ---- events -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        for job in self.jobs:
            self.at(job.arrival, "arrive", job)
        self.at(FAIL_AT, "fail", FAILING)
        self.at(RECOVER_AT, "recover", FAILING)
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            if self.now > HORIZON_S:
                break
            getattr(self, f"_on_{kind}")(data)
        return self.summary()

    def _on_arrive(self, job: SimJob) -> None:
        self.route(job)

    def _on_finish(self, data: tuple[str, int, SimJob, float]) -> None:
        name, gpu, job, service = data
        pool = self.pools[name]
        if pool.busy.get(gpu) is not job:
            return  # the pool died under this job; it was re-routed or stranded
        del pool.busy[gpu]
        pool.service_ms = ewma(pool.service_ms, service)
        pool.gpu_seconds += service / 1000.0
        job.cost += pool.model.price * service / 3_600_000.0
        if self.now <= job.deadline:
            job.finished = self.now
        else:
            job.expired = True
        self.dispatch(pool)
        self._retry_unrouted()

    def _on_fail(self, name: str) -> None:
        pool = self.pools[name]
        pool.alive = False
        stranded = list(pool.busy.values())
        pool.busy.clear()
        queued = list(pool.queue) + list(pool.fifo)
        for job in queued:
            pool.queue.remove(job.uid)
        pool.fifo.clear()
        if self.policy == "first-to-admit":
            for job in stranded + queued:
                self.at(self.now + MULTIKUEUE_WORKER_LOST_TIMEOUT_S, "readmit", job)
            return
        for job in stranded + queued:
            self.rerouted += 1
            self.route(job, front=True)

    def _on_readmit(self, job: SimJob) -> None:
        if job.finished is None and not job.expired:
            self.route(job)

    def _on_recover(self, name: str) -> None:
        self.pools[name].alive = True
        self._retry_unrouted()
        self.dispatch(self.pools[name])

    def _retry_unrouted(self) -> None:
        for job in list(self.unrouted.values()):
            del self.unrouted[job.uid]
            if self.now >= job.deadline:
                job.expired = True
            else:
                self.route(job)

    def summary(self) -> dict[str, Any]:
        done = [j for j in self.jobs if j.finished is not None]
        latencies = sorted(j.finished - j.arrival for j in done)  # type: ignore[operator]
        late = sum(1 for j in self.jobs if j.expired and j.finished is None)
        lost = len(self.jobs) - len(done) - late
        cost = sum(j.cost for j in self.jobs)
        return {
            "policy": self.policy,
            "jobs": len(self.jobs),
            "completed": len(done),
            "past_deadline": late,
            "lost": lost,
            "rerouted": self.rerouted,
            "cost_per_1000_usd": 1000.0 * cost / max(1, len(done)),
            "p50_s": statistics.median(latencies) if latencies else math.nan,
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else math.nan,
            "realtime_p95_s": _p95([j.finished - j.arrival for j in done if j.priority == "realtime"]),  # type: ignore[operator]
        }


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.95 * (len(values) - 1))] if values else math.nan


POLICIES = ("gpuroute-mix", "gpuroute-fastest", "gpuroute-cheapest", "gpuroute-balanced", "round-robin",
            "first-to-admit")


def run(*, jobs: int = 10_000, seed: int = 0) -> dict[str, Any]:
    trace = make_trace(jobs, seed)
    started = time.perf_counter()
    results = [Simulation(trace, policy, seed).run() for policy in POLICIES]
    return {"jobs": jobs, "seed": seed, "fail_at_s": FAIL_AT, "recover_at_s": RECOVER_AT,
            "pools": [p.__dict__ for p in POOLS], "results": results,
            "seconds": round(time.perf_counter() - started, 2)}


def markdown(results: dict[str, Any]) -> str:
    rows = results["results"]
    base = next(r for r in rows if r["policy"] == "round-robin")
    lines = [
        f"Routing simulation: {results['jobs']} jobs, pools {', '.join(p['name'] for p in results['pools'])}; "
        f"{FAILING} fails at {results['fail_at_s']:.0f} s and returns at {results['recover_at_s']:.0f} s.",
        "",
        "| policy | $ / 1,000 images | vs RR | p50 s | p95 s | vs RR | realtime p95 s | past deadline | lost | re-routed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['cost_per_1000_usd']:.4f} | {r['cost_per_1000_usd'] / base['cost_per_1000_usd']:.2f}x "
            f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p95_s'] / base['p95_s']:.2f}x | {r['realtime_p95_s']:.2f} "
            f"| {r['past_deadline']} | {r['lost']} | {r['rerouted']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run(jobs=int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
    print(markdown(out))
    print(f"\n({out['seconds']} s)")
