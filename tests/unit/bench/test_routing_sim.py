"""The routing simulation accounts for every job, survives a pool failure, and orders the strategies.

Every assertion is on the simulation's own outputs (the real router, FairQueue and PoolState
drive it); a small trace keeps the run to a few seconds.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.routing_sim import FAILING, POLICIES, GpurouteSim, MultiKueueSim, Scenario, TraceJob, markdown, run

JOBS = 2_000
GPUROUTE = ("gpuroute-mix", "gpuroute-fastest", "gpuroute-cheapest", "gpuroute-balanced")


@pytest.fixture(scope="module")
def out() -> dict[str, Any]:
    return run(jobs=JOBS, seed=3)


def rows(out: dict[str, Any], scenario: str) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in out[scenario]}


@pytest.mark.parametrize("scenario", ["results", "never_returns"])
def test_every_job_is_accounted_for_exactly_once(out: dict[str, Any], scenario: str) -> None:
    by_key = rows(out, scenario)
    assert set(by_key) == {key for key, _ in POLICIES}
    for r in by_key.values():
        # Outcomes are exclusive (a second one raises inside the simulation), so they must add up.
        assert r["completed"] + r["past_deadline"] + r["failed"] + r["lost"] == r["jobs"] == JOBS, r
        assert sum(r["completed_per_pool"].values()) == r["completed"], r
        assert r["completed"] > JOBS // 2, r
        assert r["realtime_past_deadline"] <= r["past_deadline"], r


def test_gpuroute_loses_no_job_when_a_pool_fails_for_good(out: dict[str, Any]) -> None:
    by_key = rows(out, "never_returns")
    for key in GPUROUTE:
        assert by_key[key]["lost"] == 0 and by_key[key]["failed"] == 0, by_key[key]
    # The failure did hit work: cheapest had queued on the spot pool and had to move it...
    assert by_key["gpuroute-cheapest"]["rerouted"] > 0
    assert by_key["gpuroute-mix"]["rerouted"] > 0
    # ...and a dispatcher without failover lost what the dead pool held.
    assert by_key["round-robin"]["lost"] > 0


@pytest.mark.parametrize("scenario", ["results", "never_returns"])
def test_cheapest_costs_less_and_fastest_finishes_sooner(out: dict[str, Any], scenario: str) -> None:
    by_key = rows(out, scenario)
    cheapest, fastest = by_key["gpuroute-cheapest"], by_key["gpuroute-fastest"]
    assert cheapest["cost_per_1000_usd"] <= fastest["cost_per_1000_usd"]
    assert fastest["p50_s"] <= cheapest["p50_s"]
    assert fastest["p95_s"] <= cheapest["p95_s"]


def test_same_seed_same_results() -> None:
    first, second = run(jobs=400, seed=11), run(jobs=400, seed=11)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    other = run(jobs=400, seed=12)
    assert other["results"] != first["results"]


def test_markdown_prints_every_policy_with_ratios(out: dict[str, Any]) -> None:
    text = markdown(out)
    for r in out["results"]:
        assert f"| {r['policy']} |" in text
    assert "cost vs RR" in text and "p95 vs RR" in text
    assert text.count("| round-robin | ") == 2  # both scenarios
    assert "| round-robin | " in text and " 1.00x " in text


def _job(uid: str, arrival: float, *, mpix: float = 5.0) -> TraceJob:
    return TraceJob(uid, "team-a", "batch", "cheapest", arrival, 300.0, mpix, 1.0)


def test_failover_requeues_in_flight_jobs_like_the_engine() -> None:
    # 15 cheapest batch jobs: the spot pool (10 single-slot workers) takes them all, runs 10 and
    # queues 5; it dies at 0.5 s, before any finishes. Missing heartbeats expose it after 3 s.
    trace = [_job(f"j{i}", 0.1 + i * 0.001) for i in range(15)]
    sim = GpurouteSim(trace, Scenario(fail_at_s=0.5, recover_at_s=None), 0, strategy=None)
    row = sim.run()
    assert row["completed"] == 15 and row["lost"] == 0 and row["rerouted"] == 15
    for job in sim.jobs:
        assert job.pool != FAILING
        assert job.finished_at is not None and job.finished_at > 0.5 + 3.0  # not before detection
    # The ten in flight were sent once to the dead pool, so they completed on their second attempt;
    # the five still queued there were re-routed without ever being sent.
    assert sorted(j.attempts for j in sim.jobs) == [1] * 5 + [2] * 10
    # The router's measurements came from the real PoolState: results fed the EWMA.
    assert all(p.service_ms is None or p.service_ms > 0 for p in sim.pools.values())
    assert sum(p.service_ms is not None for p in sim.pools.values()) >= 1


def test_multikueue_holds_jobs_of_a_lost_cluster_until_worker_lost_timeout() -> None:
    # Fill the three on-demand clusters so that the fixed order reaches the spot cluster.
    trace = [_job(f"j{i}", 0.1 + i * 0.0001, mpix=20.0) for i in range(40)]
    sim = MultiKueueSim(trace, Scenario(fail_at_s=0.5, recover_at_s=None), 0, all_at_once=False)
    row = sim.run()
    on_spot = [j for j in sim.jobs if j.pool == FAILING]
    assert on_spot and row["lost"] == len(on_spot)  # the run ends long before 15 minutes pass
    back = MultiKueueSim(trace, Scenario(fail_at_s=0.5, recover_at_s=5.0), 0, all_at_once=False).run()
    assert back["lost"] == 0 and back["completed"] == 40
