"""The routing simulation accounts for every job, survives a pool failure, and orders the strategies.

Every assertion is on the simulation's own outputs; for gpuroute those come from the
operator's own Dispatcher, driven directly (checked below). A small trace keeps the run
to a few seconds.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import routing_sim
from bench.routing_sim import (
    FAILING,
    POLICIES,
    CounterfactualPlacer,
    GpurouteSim,
    MultiKueueSim,
    Scenario,
    TraceJob,
    markdown,
    run,
)
from gpuroute_operator.core import router
from gpuroute_operator.core.dispatcher import Dispatcher

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


def test_router_checks_read_the_dispatchers_estimates(out: dict[str, Any]) -> None:
    # The estimates are read back from status.decision: a change in its wording must not
    # silently empty the report.
    diag = out["diagnostics"]
    assert 0.3 < diag["realtime_actual_over_expected_median"] < 3.0
    ratios = [v["ratio"] for v in diag["estimated_vs_actual_per_pool"].values() if v["jobs"]]
    assert ratios and all(0.3 < r < 3.0 for r in ratios), diag


def _job(uid: str, arrival: float, *, mpix: float = 5.0) -> TraceJob:
    return TraceJob(uid, "team-a", "batch", "cheapest", arrival, 300.0, mpix, 1.0)


def test_gpuroute_runs_the_operators_dispatcher_unmodified() -> None:
    trace = [_job(f"j{i}", 0.1 + i * 0.05) for i in range(40)]
    sim = GpurouteSim(trace, Scenario(fail_at_s=0.5, recover_at_s=None), 0, strategy=None)
    assert type(sim.dispatcher) is Dispatcher and sim.dispatcher.effects is sim.effects
    row = sim.run()
    # Every outcome is a terminal status the dispatcher published through the effects port.
    assert set(sim.effects.terminal) == {j.uid for j in sim.jobs}
    for job in sim.jobs:
        status, event = sim.effects.terminal[job.uid]
        assert (status["phase"], event.reason, job.outcome) == ("Completed", "Completed", "completed")
        assert status["attempts"] == job.attempts and status["pool"] == job.pool
    assert row["completed"] == 40
    # Each attempt was a JOB the dispatcher sent; the learning it did came from the RESULTs.
    assert sim.effects.counts["JobRequest"] == sum(j.attempts for j in sim.jobs)
    assert any(p.fits for p in sim.dispatcher.pools.values())
    # No engine logic is kept in the bench: the structures it used to copy are not even imported.
    for name in ("PoolState", "WorkerConn", "FairQueue", "PipelinePriors", "ewma", "DEFAULT_MAX_ATTEMPTS"):
        assert not hasattr(routing_sim, name), name


def test_counterfactuals_only_filter_what_the_router_sees() -> None:
    # The one subclass overrides no rule: it notes the job being routed and returns the real needs.
    assert {k for k in vars(CounterfactualPlacer) if not k.startswith("__")} == {"needs", "routing"}
    trace = [_job(f"j{i}", 0.1 + i * 0.05) for i in range(20)]
    sim = GpurouteSim(trace, Scenario(), 0, strategy=None, counterfactual="oracle-service")
    assert isinstance(sim.dispatcher.placement, CounterfactualPlacer)
    assert sim.dispatcher.placement.choose != router.choose
    assert sim.run()["completed"] == 20
    assert GpurouteSim(trace, Scenario(), 0, strategy=None).dispatcher.placement.choose is router.choose


def test_failover_requeues_in_flight_jobs_through_the_dispatcher() -> None:
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
    assert sim.effects.counts["warn:Requeued"] == 10 and sim.effects.counts["kick"] == 10
    # The router's measurements are the dispatcher's own PoolState, fed by the RESULTs.
    pools = sim.dispatcher.pools
    assert all(p.service_ms is None or p.service_ms > 0 for p in pools.values())
    assert sum(p.service_ms is not None for p in pools.values()) >= 1
    assert not pools[FAILING].workers


def test_workers_back_before_detection_re_register_and_their_jobs_are_re_sent() -> None:
    # The spot pool's workers restart at 2 s, before the 3 s of silence that would expose them:
    # their READY (with no jobs) replaces the old sessions, whose attempts are re-queued.
    trace = [_job(f"j{i}", 0.1 + i * 0.001) for i in range(10)]
    sim = GpurouteSim(trace, Scenario(fail_at_s=0.5, recover_at_s=2.0), 0, strategy=None)
    row = sim.run()
    assert row["completed"] == 10 and row["lost"] == 0
    assert sim.effects.counts["kick"] == 0 and sim.effects.counts["warn:Requeued"] == 10
    assert sorted(j.attempts for j in sim.jobs) == [2] * 10
    assert all(j.finished_at is not None and j.finished_at > 2.0 for j in sim.jobs)


def test_a_job_with_no_pool_left_times_out_by_the_dispatchers_clock() -> None:
    # Pinned to the spot pool's region; the pool dies under it and never returns. The dispatcher
    # finds the worker silent, has nowhere to send the job, and fails it at its deadline.
    job = TraceJob("pinned", "team-a", "realtime", "fastest", 0.1, 5.0, 20.0, 1.0, ("us-east-1",))
    sim = GpurouteSim([job], Scenario(fail_at_s=0.5, recover_at_s=None), 0, strategy=None)
    row = sim.run()
    assert row["past_deadline"] == 1 and row["realtime_past_deadline"] == 1 and row["completed"] == 0
    status, event = sim.effects.terminal["pinned"]
    assert (status["phase"], event.reason, status["attempts"]) == ("Failed", "Timeout", 1)
    finished = sim.jobs[0].finished_at
    assert finished is not None and 5.1 < finished <= 5.1 + routing_sim.TICK_S
    # Its one attempt (sent at 0.1 s, 2 s of work) ran on the spot GPU until the pool died at 0.5 s:
    # charged that long (less half its 0.9 x 70 ms round trip), no more.
    spot = sim.models[FAILING]
    assert math.isclose(row["gpu_usd"], spot.usd((0.5 - 0.1) * 1000.0 - 0.9 * spot.rtt_ms / 2.0))


def test_multikueue_holds_jobs_of_a_lost_cluster_until_worker_lost_timeout() -> None:
    # Fill the three on-demand clusters so that the fixed order reaches the spot cluster.
    trace = [_job(f"j{i}", 0.1 + i * 0.0001, mpix=20.0) for i in range(40)]
    sim = MultiKueueSim(trace, Scenario(fail_at_s=0.5, recover_at_s=None), 0, all_at_once=False)
    row = sim.run()
    on_spot = [j for j in sim.jobs if j.pool == FAILING]
    assert on_spot and row["lost"] == len(on_spot)  # the run ends long before 15 minutes pass
    back = MultiKueueSim(trace, Scenario(fail_at_s=0.5, recover_at_s=5.0), 0, all_at_once=False).run()
    assert back["lost"] == 0 and back["completed"] == 40
