"""The synthetic trace: every policy replays the same ImageJobs (`make_trace`, `TraceJob`).

Poisson arrivals with short bursts (rate x5 for 3 s, every ~25 s on average) from four
namespaces mixing realtime and batch work, plus one namespace (`bulk-reprocess`)
submitting 5,000 batch jobs within 15 s. Work per job is lognormal in megapixels; every
job has its own timeout and strategy; some jobs must stay in the EU (placement.regions).
Each job carries its own service-time noise, the same under every policy (common random
numbers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BULK_JOBS = 5_000
"""Batch jobs the bursting namespace submits (capped at half the trace for small runs)."""
BACKGROUND_SPAN_S = 80.0
"""The background traffic lasts about this long (about 44 jobs/s outside bursts at 10,000 jobs)."""
BULK_WINDOW_S = (20.0, 35.0)
"""When the bulk namespace submits them."""
EU_REGIONS = ("westeurope", "eu-west-1", "europe-west4")
"""placement.regions of jobs whose data must stay in the EU."""


@dataclass(frozen=True)
class TraceJob:
    """One ImageJob of the trace, identical for every policy."""

    uid: str
    namespace: str
    priority: str
    strategy: str
    arrival: float
    timeout_s: float
    mpix: float
    noise: float
    """Service-time factor of this job, the same on every pool and policy (common random numbers)."""
    regions: tuple[str, ...] = ()

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s


# namespace: (share of background jobs, share of them realtime)
NAMESPACES = {"web": (0.35, 0.7), "mobile": (0.25, 0.5), "analytics": (0.25, 0.0), "ml-data": (0.15, 0.0)}


def make_trace(jobs: int, seed: int) -> list[TraceJob]:
    """Background Poisson traffic with bursts, plus one namespace's burst of batch jobs."""
    rng = random.Random(seed)
    bulk = min(BULK_JOBS, jobs // 2)
    out: list[TraceJob] = []
    names, weights = list(NAMESPACES), [w for w, _ in NAMESPACES.values()]
    # A Markov-modulated Poisson process: a base rate, x5 within burst windows (3 s, every ~25 s).
    # The base rate spreads the background over ~BACKGROUND_SPAN_S whatever the job count, so the
    # pool failure hits live traffic in small runs too.
    burst_len, burst_gap, burst_factor = 3.0, 25.0, 5.0
    mean_factor = 1.0 + (burst_factor - 1.0) * burst_len / (burst_len + burst_gap)
    base_rate = max(1.0, (jobs - bulk) / BACKGROUND_SPAN_S / mean_factor)
    burst_rate = base_rate * burst_factor
    t_burst = rng.expovariate(1.0 / burst_gap)
    t = 0.0
    for i in range(jobs - bulk):
        while t_burst + burst_len < t:
            t_burst += burst_len + rng.expovariate(1.0 / burst_gap)
        rate = burst_rate if t_burst <= t <= t_burst + burst_len else base_rate
        t += rng.expovariate(rate)
        namespace = rng.choices(names, weights)[0]
        realtime = rng.random() < NAMESPACES[namespace][1]
        if realtime:
            strategy = rng.choices(("fastest", "balanced"), (0.7, 0.3))[0]
            timeout, mpix = rng.choice((5.0, 10.0, 15.0)), rng.lognormvariate(0.0, 0.5)
        else:
            strategy = rng.choices(("cheapest", "balanced", "fastest"), (0.5, 0.35, 0.15))[0]
            timeout, mpix = rng.choice((120.0, 300.0, 600.0)), rng.lognormvariate(0.8, 0.7)
        eu_only = namespace in ("web", "mobile") and rng.random() < 0.15
        out.append(TraceJob(f"{namespace}-{i}", namespace, "realtime" if realtime else "batch", strategy, t, timeout,
                            min(32.0, max(0.05, mpix)), rng.lognormvariate(0.0, 0.15), EU_REGIONS if eu_only else ()))
    lo, hi = BULK_WINDOW_S
    for i in range(bulk):
        out.append(TraceJob(f"bulk-{i}", "bulk-reprocess", "batch", "cheapest", rng.uniform(lo, hi), 300.0,
                            min(32.0, rng.lognormvariate(0.5, 0.4)), rng.lognormvariate(0.0, 0.15)))
    out.sort(key=lambda j: (j.arrival, j.uid))
    return out
