"""The router's filters and strategies, on PoolViews built by hand."""

from __future__ import annotations

import dataclasses

import pytest

from gpuroute_operator.core.router import (
    BALANCED_SLACK,
    DEADLINE_HEADROOM,
    PRIOR_SERVICE_MS,
    SPOT_BATCH_DISCOUNT,
    Decision,
    Estimate,
    JobNeeds,
    PoolView,
    choose,
    estimate,
    rejection,
)


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
    (job(models=frozenset({"x4", "a2", "x8"})), pool("p", models=frozenset({"x8"})), "does not serve model a2, x4"),
    (job(), pool("p", workers=0, slots=0), "no connected workers"),
])
def test_each_filter_says_why(needs: JobNeeds, view: PoolView, reason: str) -> None:
    assert rejection(needs, view) == reason
    decision = choose(needs, [view])
    assert decision == Decision(None, f"no eligible pool (p: {reason})", None)


@pytest.mark.parametrize(("needs", "view"), [
    (job(pools=("p", "q")), pool("p")),
    (job(clouds=("gcp", "aws")), pool("p")),
    (job(regions=("us-east-1",)), pool("p")),
    (job(), pool("p", allowed_namespaces=("x", "team"))),
    (job(models=frozenset({"x4"})), pool("p", models=frozenset({"x4", "x2"}))),
    (job(), pool("p", busy=8, queued=100)),
])
def test_passing_filters(needs: JobNeeds, view: PoolView) -> None:
    assert rejection(needs, view) is None
    assert choose(needs, [view]).pool == "p"


def test_filter_order_reports_the_first_reason() -> None:
    needs = job(pools=("x",), clouds=("gcp",))
    assert rejection(needs, pool("p", workers=0)) == "not in placement.pools"


def test_no_eligible_pool_lists_every_rejection() -> None:
    needs = job(regions=("eu-west-1",), models=frozenset({"x4"}))
    views = [
        pool("us", region="us-east-1"),
        pool("eu-nomodel", region="eu-west-1"),
        pool("eu-empty", region="eu-west-1", models=frozenset({"x4"}), workers=0, slots=0),
    ]
    decision = choose(needs, views)
    assert decision.pool is None and decision.estimate is None
    assert decision.reason == ("no eligible pool (us: region us-east-1 not in placement.regions; "
                               "eu-nomodel: does not serve model x4; eu-empty: no connected workers)")


def test_no_pools_at_all() -> None:
    assert choose(job(), []) == Decision(None, "no eligible pool (no WorkerPool exists)")


def test_estimate_arithmetic() -> None:
    # 8 slots, 8 busy, 40 queued: 41 jobs ahead of one more on 8 slots.
    est = estimate(pool("p", service_ms=100.0, rtt_ms=5.0, busy=8, queued=40, slots=8, price_per_gpu_hour=3.6))
    assert est.pool == "p"
    assert est.expected_ms == pytest.approx(41 * 100.0 / 8 + 5.0 + 100.0)
    # 8 slots on 2 workers: 4 jobs share each GPU.
    assert est.cost_usd == pytest.approx(3.6 * 100.0 / 3_600_000 / 4)
    assert isinstance(est, Estimate)
    idle = estimate(pool("p", service_ms=100.0, rtt_ms=5.0, busy=2, queued=0, slots=8))
    assert idle.expected_ms == pytest.approx(105.0)  # free slots: no wait
    no_rtt = estimate(pool("p", rtt_ms=None, busy=0, queued=0))
    assert no_rtt.expected_ms == pytest.approx(100.0)


def test_the_jobs_own_estimate_sets_its_service_and_cost_the_typical_job_its_wait() -> None:
    # 41 typical jobs (100 ms) ahead on 8 slots, then this job's own 900 ms (a super-resolution).
    est = estimate(pool("p", service_ms=100.0, job_service_ms=900.0, rtt_ms=5.0, busy=8, queued=40, slots=8,
                        price_per_gpu_hour=3.6))
    assert est.expected_ms == pytest.approx(41 * 100.0 / 8 + 5.0 + 900.0)
    assert est.cost_usd == pytest.approx(3.6 * 900.0 / 3_600_000 / 4)
    # A pool that has not run this pipeline yet is judged by its typical job.
    assert estimate(pool("p", service_ms=100.0, job_service_ms=None, rtt_ms=0.0)).expected_ms == pytest.approx(100.0)


def test_pools_are_compared_on_the_job_not_on_their_history() -> None:
    # "big" ran large images (typical 800 ms) but is faster for this job; "small" ran thumbnails.
    big = pool("big", service_ms=800.0, job_service_ms=150.0, rtt_ms=0.0)
    small = pool("small", service_ms=60.0, job_service_ms=400.0, rtt_ms=0.0)
    assert choose(job(strategy="fastest"), [big, small]).pool == "big"


def test_prior_is_used_before_any_measurement() -> None:
    unmeasured = pool("new", service_ms=None, rtt_ms=None)
    assert PRIOR_SERVICE_MS == 250.0
    assert estimate(unmeasured).expected_ms == PRIOR_SERVICE_MS
    assert estimate(unmeasured).cost_usd == pytest.approx(2.0 * PRIOR_SERVICE_MS / 3_600_000 / 4)
    # fastest: a measured pool at 200 ms beats an unmeasured one (prior 250 ms)...
    assert choose(job(strategy="fastest"), [unmeasured, pool("measured", service_ms=200.0, rtt_ms=None)]).pool == "measured"
    # ...and an unmeasured one beats a measured pool at 300 ms.
    assert choose(job(strategy="fastest"), [unmeasured, pool("slow", service_ms=300.0, rtt_ms=None)]).pool == "new"


def test_fastest_takes_least_expected_time_including_queue() -> None:
    idle_slow = pool("slow", service_ms=300.0)
    busy_fast = pool("fast", service_ms=100.0, busy=8, queued=40)  # 41 ahead on 8 slots
    decision = choose(job(strategy="fastest"), [idle_slow, busy_fast])
    assert decision.pool == "slow"
    assert estimate(busy_fast).expected_ms > estimate(idle_slow).expected_ms
    assert choose(job(strategy="fastest"), [idle_slow, pool("fast", service_ms=100.0)]).pool == "fast"


def test_fastest_ignores_price_and_counts_rtt() -> None:
    near = pool("near", price_per_gpu_hour=9.0, service_ms=100.0, rtt_ms=1.0)
    far = pool("far", price_per_gpu_hour=0.1, service_ms=90.0, rtt_ms=50.0)
    decision = choose(job(strategy="fastest"), [far, near])
    assert decision.pool == "near"
    assert decision.estimate == estimate(near)
    assert decision.reason == f"pool near: est. 101 ms, ${estimate(near).cost_usd:.6f} (fastest, 2 eligible)"


def test_cheapest_takes_least_cost_within_the_timeout() -> None:
    cheap_slow = pool("cheap", price_per_gpu_hour=0.5, service_ms=200.0)
    dear_fast = pool("dear", price_per_gpu_hour=4.0, service_ms=100.0)
    assert choose(job(strategy="cheapest"), [cheap_slow, dear_fast]).pool == "cheap"
    # Too slow for the deadline: cheapest falls back to what can finish in time.
    jammed = dataclasses.replace(cheap_slow, busy=8, queued=10_000)
    assert choose(job(strategy="cheapest", timeout_s=10), [jammed, dear_fast]).pool == "dear"


def test_cheapest_keeps_half_the_deadline_as_headroom() -> None:
    assert DEADLINE_HEADROOM == 0.5
    # cheap pool expected at 6,000 ms; the dear one at 105 ms.
    cheap = pool("cheap", price_per_gpu_hour=0.1, service_ms=1000.0, rtt_ms=0.0, busy=8, queued=39, slots=8)
    dear = pool("dear", price_per_gpu_hour=4.0, service_ms=100.0, rtt_ms=5.0)
    assert estimate(cheap).expected_ms == pytest.approx(6000.0)
    assert choose(job(strategy="cheapest", timeout_s=12), [cheap, dear]).pool == "cheap"    # 6 s <= 12 s / 2
    assert choose(job(strategy="cheapest", timeout_s=11.9), [cheap, dear]).pool == "dear"   # 6 s > 5.95 s


def test_cheapest_with_nothing_in_time_takes_the_fastest() -> None:
    slow_a = pool("a", price_per_gpu_hour=0.1, service_ms=5000.0)
    slow_b = pool("b", price_per_gpu_hour=5.0, service_ms=3000.0)
    assert choose(job(strategy="cheapest", timeout_s=1), [slow_a, slow_b]).pool == "b"


def test_balanced_is_cheapest_within_slack_of_fastest() -> None:
    assert BALANCED_SLACK == 1.5
    fast = pool("fast", price_per_gpu_hour=4.0, service_ms=100.0, rtt_ms=0.0)
    near = pool("near", price_per_gpu_hour=1.0, service_ms=140.0, rtt_ms=0.0)   # 1.4x: within 1.5x
    far = pool("far", price_per_gpu_hour=0.1, service_ms=400.0, rtt_ms=0.0)     # 4x: outside
    decision = choose(job(strategy="balanced"), [fast, near, far])
    assert decision.pool == "near"
    assert decision.reason.startswith("pool near: est. 140 ms") and "(balanced, 3 eligible)" in decision.reason


def test_balanced_slack_boundary() -> None:
    fast = pool("fast", price_per_gpu_hour=4.0, service_ms=100.0, rtt_ms=0.0)
    at_bound = pool("edge", price_per_gpu_hour=1.0, service_ms=150.0, rtt_ms=0.0)    # exactly 1.5x
    beyond = pool("beyond", price_per_gpu_hour=1.0, service_ms=151.0, rtt_ms=0.0)
    assert choose(job(strategy="balanced"), [fast, at_bound]).pool == "edge"
    assert choose(job(strategy="balanced"), [fast, beyond]).pool == "fast"


def test_equal_cost_prefers_the_faster_pool() -> None:
    a = pool("a", price_per_gpu_hour=2.0, service_ms=100.0, busy=8, queued=8)
    b = pool("b", price_per_gpu_hour=2.0, service_ms=100.0)
    assert estimate(a).cost_usd == estimate(b).cost_usd
    assert choose(job(strategy="cheapest"), [a, b]).pool == "b"


def test_spot_discount_applies_to_batch_only() -> None:
    assert SPOT_BATCH_DISCOUNT == 0.8
    spot = pool("spot", price_per_gpu_hour=2.2, spot=True)
    ondemand = pool("ondemand", price_per_gpu_hour=2.0)
    assert choose(job(strategy="cheapest", priority="batch"), [spot, ondemand]).pool == "spot"
    assert choose(job(strategy="cheapest", priority="realtime"), [spot, ondemand]).pool == "ondemand"
    assert choose(job(strategy="balanced", priority="batch"), [spot, ondemand]).pool == "spot"
    assert choose(job(strategy="balanced", priority="realtime"), [spot, ondemand]).pool == "ondemand"
    # The discount shapes the choice only; the reported cost is the real one.
    decision = choose(job(strategy="cheapest", priority="batch"), [spot, ondemand])
    assert decision.estimate is not None
    assert decision.estimate.cost_usd == pytest.approx(2.2 * 100.0 / 3_600_000 / 4)


def test_spot_discount_is_not_unlimited() -> None:
    spot = pool("spot", price_per_gpu_hour=2.6, spot=True)   # 2.6 * 0.8 = 2.08 > 2.0
    ondemand = pool("ondemand", price_per_gpu_hour=2.0)
    assert choose(job(strategy="cheapest", priority="batch"), [spot, ondemand]).pool == "ondemand"


def test_ineligible_pools_never_win() -> None:
    cheap_elsewhere = pool("cheap", price_per_gpu_hour=0.01, region="ap-south-1")
    fast_elsewhere = pool("fast", service_ms=1.0, region="ap-south-1")
    only = pool("only", price_per_gpu_hour=9.0, service_ms=900.0)
    for strategy in ("fastest", "cheapest", "balanced"):
        decision = choose(job(strategy=strategy, regions=("us-east-1",)), [cheap_elsewhere, fast_elsewhere, only])
        assert decision.pool == "only"
        assert decision.estimate == estimate(only)
        assert decision.reason.endswith(f"({strategy}, 1 eligible)")


def test_cost_counts_the_gpu_share_of_one_slot() -> None:
    one_slot = estimate(pool("a", workers=4, slots=4, price_per_gpu_hour=3.6, service_ms=100.0))
    four_slots = estimate(pool("b", workers=4, slots=16, price_per_gpu_hour=3.6, service_ms=100.0))
    assert one_slot.cost_usd == pytest.approx(0.0001)
    assert four_slots.cost_usd == pytest.approx(one_slot.cost_usd / 4)


def test_a_pool_reported_free_is_still_priced() -> None:
    for service, job_service in ((0.0, 0.0), (0.0, None), (None, 0.0)):
        est = estimate(pool("p", service_ms=service, job_service_ms=job_service, price_per_gpu_hour=9.0))
        assert est.cost_usd > 0.0 and est.expected_ms > 0.0
