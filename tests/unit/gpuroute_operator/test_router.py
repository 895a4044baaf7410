"""The router's filters and strategies, on PoolViews built by hand."""

from __future__ import annotations

import dataclasses

import pytest

from gpuroute_operator.router import PRIOR_SERVICE_MS, JobNeeds, PoolView, choose, estimate


def pool(name: str, **overrides: object) -> PoolView:
    base = PoolView(name=name, cloud="aws", region="us-east-1", price_per_gpu_hour=2.0, spot=False,
                    allowed_namespaces=(), models=frozenset(), workers=2, slots=8, busy=0, queued=0,
                    rtt_ms=5.0, service_ms=100.0)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def job(**overrides: object) -> JobNeeds:
    return dataclasses.replace(JobNeeds(namespace="team", priority="batch", strategy="balanced", timeout_s=600),
                               **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(("needs", "view", "reason"), [
    (job(pools=("other",)), pool("p"), "not in placement.pools"),
    (job(clouds=("azure",)), pool("p"), "cloud aws not in placement.clouds"),
    (job(regions=("westeurope",)), pool("p"), "region us-east-1 not in placement.regions"),
    (job(), pool("p", allowed_namespaces=("other",)), "namespace team not allowed"),
    (job(models=frozenset({"x4"})), pool("p"), "does not serve model x4"),
    (job(), pool("p", workers=0, slots=0), "no connected workers"),
])
def test_each_filter_says_why(needs: JobNeeds, view: PoolView, reason: str) -> None:
    decision = choose(needs, [view])
    assert decision.pool is None
    assert decision.reason == f"no eligible pool (p: {reason})"


def test_no_pools_at_all() -> None:
    assert choose(job(), []).reason == "no eligible pool (no WorkerPool exists)"


def test_fastest_takes_least_expected_time_including_queue() -> None:
    idle_slow = pool("slow", service_ms=300.0)
    busy_fast = pool("fast", service_ms=100.0, busy=8, queued=40)  # 41 ahead on 8 slots
    decision = choose(job(strategy="fastest"), [idle_slow, busy_fast])
    assert decision.pool == "slow"
    assert estimate(busy_fast).expected_ms > estimate(idle_slow).expected_ms
    assert choose(job(strategy="fastest"), [idle_slow, pool("fast", service_ms=100.0)]).pool == "fast"


def test_cheapest_takes_least_cost_within_the_timeout() -> None:
    cheap_slow = pool("cheap", price_per_gpu_hour=0.5, service_ms=200.0)
    dear_fast = pool("dear", price_per_gpu_hour=4.0, service_ms=100.0)
    assert choose(job(strategy="cheapest"), [cheap_slow, dear_fast]).pool == "cheap"
    # Too slow for the deadline: cheapest falls back to what can finish in time.
    jammed = dataclasses.replace(cheap_slow, busy=8, queued=10_000)
    assert choose(job(strategy="cheapest", timeout_s=10), [jammed, dear_fast]).pool == "dear"


def test_balanced_is_cheapest_within_slack_of_fastest() -> None:
    fast = pool("fast", price_per_gpu_hour=4.0, service_ms=100.0, rtt_ms=0.0)
    near = pool("near", price_per_gpu_hour=1.0, service_ms=140.0, rtt_ms=0.0)   # 1.4x: within 1.5x
    far = pool("far", price_per_gpu_hour=0.1, service_ms=400.0, rtt_ms=0.0)     # 4x: outside
    decision = choose(job(strategy="balanced"), [fast, near, far])
    assert decision.pool == "near"
    assert decision.reason.startswith("pool near: est. 140 ms") and "(balanced, 3 eligible)" in decision.reason


def test_spot_discount_applies_to_batch_only() -> None:
    spot = pool("spot", price_per_gpu_hour=2.2, spot=True)
    ondemand = pool("ondemand", price_per_gpu_hour=2.0)
    assert choose(job(strategy="cheapest", priority="batch"), [spot, ondemand]).pool == "spot"
    assert choose(job(strategy="cheapest", priority="realtime"), [spot, ondemand]).pool == "ondemand"


def test_prior_is_used_before_any_measurement() -> None:
    unmeasured = pool("new", service_ms=None, rtt_ms=None)
    assert estimate(unmeasured).expected_ms == PRIOR_SERVICE_MS
    assert estimate(unmeasured).cost_usd == pytest.approx(2.0 * PRIOR_SERVICE_MS / 3_600_000)
