"""Every policy over one trace, in two scenarios, plus checks on the router's own numbers.

Two scenarios over the same trace: the failed pool returns at RECOVER_AT_S, or never does.
`router_diagnostics` checks the router's own numbers (the estimate it writes into
status.decision against the actual cost and completion time) and runs two
counterfactuals that change only what the views show the router (a filter in front of
`router.choose`, for those runs only), to size what better inputs would still gain.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.routing_sim.baselines import MultiKueueSim, RoundRobinSim
from bench.routing_sim.gpuroute_adapter import GpurouteSim
from bench.routing_sim.kernel import COMPLETED, Simulation
from bench.routing_sim.scenario import PoolModel, Scenario
from bench.routing_sim.trace import TraceJob, make_trace
from gpuroute_operator.core.router import PoolView, estimate

Factory = Callable[[Sequence[TraceJob], Scenario, int], Simulation]

POLICIES: tuple[tuple[str, Factory], ...] = (
    ("gpuroute-mix", lambda t, s, seed: GpurouteSim(t, s, seed, strategy=None)),
    ("gpuroute-fastest", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="fastest")),
    ("gpuroute-cheapest", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="cheapest")),
    ("gpuroute-balanced", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="balanced")),
    ("round-robin", lambda t, s, seed: RoundRobinSim(t, s, seed, failover=False)),
    ("round-robin-failover", lambda t, s, seed: RoundRobinSim(t, s, seed, failover=True)),
    ("multikueue", lambda t, s, seed: MultiKueueSim(t, s, seed, all_at_once=False)),
    ("multikueue-all-at-once", lambda t, s, seed: MultiKueueSim(t, s, seed, all_at_once=True)),
)


def run_scenario(trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> list[dict[str, Any]]:
    rows = []
    for key, factory in POLICIES:
        row = factory(trace, scenario, seed).run()
        row["key"] = key
        rows.append(row)
    return rows


def router_diagnostics(trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> dict[str, Any]:
    """Checks on the router's own numbers (estimates vs what happened), for the report."""
    sim = GpurouteSim(trace, scenario, seed, strategy=None)
    row = sim.run()
    out: dict[str, Any] = {"estimated_vs_actual_per_pool": {}}
    for name in sim.models:
        done = [j for j in sim.jobs if j.outcome == COMPLETED and j.pool == name and j.expected_usd is not None]
        estimated, actual = sum(j.expected_usd for j in done), sum(j.usd for j in done)  # type: ignore[misc]
        out["estimated_vs_actual_per_pool"][name] = {
            "jobs": len(done), "router_usd_per_image": estimated / len(done) if done else math.nan,
            "actual_usd_per_image": actual / len(done) if done else math.nan,
            "ratio": estimated / actual if actual else math.nan}
    for priority in ("realtime", "batch"):
        ratios = [(j.finished_at - j.routed_at) * 1000.0 / j.expected_ms for j in sim.jobs  # type: ignore[operator]
                  if j.outcome == COMPLETED and j.priority == priority and j.expected_ms]
        out[f"{priority}_actual_over_expected_median"] = statistics.median(ratios) if ratios else math.nan
    keys = ("cost_per_1000_usd", "p95_s", "realtime_p95_s", "past_deadline", "lost")
    out["engine_views"] = {k: row[k] for k in keys}
    for name in ("realtime-queue", "oracle-service"):
        other = GpurouteSim(trace, scenario, seed, strategy=None, counterfactual=name).run()
        out[name] = {k: other[k] for k in keys}
    return out


def pool_estimates(trace: Sequence[TraceJob], pools: Sequence[PoolModel]) -> dict[str, dict[str, float]]:
    """The router's `estimate` for each idle pool given its true mean service time, next to the truth."""
    mean_mpix = statistics.fmean(t.mpix for t in trace) if trace else 1.0
    out = {}
    for m in pools:
        service = m.service_ms(mean_mpix, 1.0)
        view = PoolView(name=m.name, cloud=m.cloud, region=m.region, price_per_gpu_hour=m.price_per_gpu_hour,
                        spot=m.spot, allowed_namespaces=(), models=frozenset(), workers=m.workers, slots=m.slots,
                        busy=0, queued=0, rtt_ms=m.rtt_ms, service_ms=service)
        est = estimate(view)
        out[m.name] = {"mean_mpix": mean_mpix, "expected_ms": est.expected_ms, "true_ms": m.rtt_ms + service,
                       "router_usd_per_image": est.cost_usd, "true_usd_per_image": m.usd(service)}
    return out


def run(*, jobs: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Every policy over one trace, with the failed pool returning and never returning."""
    started = time.perf_counter()
    trace = make_trace(jobs, seed)
    returns = Scenario()
    never = dataclasses.replace(returns, recover_at_s=None)
    out: dict[str, Any] = {
        "jobs": jobs, "seed": seed, "failing": returns.failing, "fail_at_s": returns.fail_at_s,
        "recover_at_s": returns.recover_at_s, "pools": [dataclasses.asdict(p) for p in returns.pools],
        "results": run_scenario(trace, returns, seed),
        "never_returns": run_scenario(trace, never, seed),
        "diagnostics": router_diagnostics(trace, returns, seed),
        "pool_estimates": pool_estimates(trace, returns.pools),
    }
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out
