"""The dispatcher's rules, driven directly: no sockets, no API server, a clock we move by hand."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gpuroute.protocol import (
    Accepted,
    AttemptId,
    Cancel,
    Disconnect,
    ErrorCode,
    Heartbeat,
    JobRequest,
    Ready,
    StageTiming,
)
from gpuroute_operator.core.dispatcher import DispatcherConfig
from gpuroute_operator.core.jobs import Place
from gpuroute_operator.core.router import Decision, JobNeeds, PoolView
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World, timing_violations


@pytest.fixture
def world() -> World:
    return World()


def _only_request(world: World, to: bytes | None = None) -> JobRequest:
    requests = world.requests(to)
    assert len(requests) == 1, requests
    return requests[0]


def test_a_job_goes_to_a_free_worker_and_completes_once(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", placement={"pools": ["pool-a"]})
    request = _only_request(world, w1)
    assert request.job == AttemptId("j1", 1)
    assert world.status("j1")["phase"] == "Dispatched" and world.status("j1")["attempts"] == 1
    world.advance(0.05)
    world.send(w1, Accepted(request.job))
    assert world.status("j1")["phase"] == "Processing"
    world.advance(0.2)
    world.send(w1, world.result(request.job))
    status = world.status("j1")
    assert status["phase"] == "Completed" and status["output"]["sha256"] == GOOD_SHA
    assert timing_violations(status) == []
    assert [e.reason for e in world.terminal_events("j1")] == ["Completed"]
    # A duplicate of the same RESULT changes nothing.
    world.send(w1, world.result(request.job, sha="b" * 64))
    assert world.status("j1")["output"]["sha256"] == GOOD_SHA
    assert len(world.terminal_events("j1")) == 1
    assert world.dispatcher.sessions[w1].attempts == set()


def test_queue_ms_counts_the_wait_in_the_operator_and_for_the_device(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    request = _only_request(world)
    world.advance(1.0)
    timing = StageTiming(download_ms=5.0, decode_ms=2.0, gpu_ms=30.0, encode_ms=3.0, upload_ms=4.0,
                         executor_wait_ms=400.0)
    world.send(w1, world.result(request.job, timing=timing))
    status = world.status("j1")
    assert timing_violations(status) == []
    # Sent at once, answered 1 s later after 444 ms on the worker: 556 ms on the network;
    # the 400 ms the job waited for the worker's GPU is queueing, not network or compute.
    assert status["timing"]["queueMs"] == pytest.approx(400.0, abs=0.01)
    assert status["timing"]["networkMs"] == pytest.approx(556.0, abs=0.01)
    assert status["timing"]["totalMs"] == pytest.approx(1000.0, abs=0.01)


def test_no_normal_event_for_queued_or_dispatched(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    world.send(w1, world.result(_only_request(world).job))
    assert [r for r in world.effects.log if r.kind == "warn"] == []
    assert len(world.terminal_events("j1")) == 1


def test_timing_adds_up_even_for_a_cached_answer(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    request = _only_request(world)
    world.advance(0.01)  # the answer comes back far sooner than its (cached) stage times
    world.send(w1, world.result(request.job, cached=True, gpu_ms=5_000.0))
    status = world.status("j1")
    assert status["timing"]["gpuMs"] == 5000.0
    assert timing_violations(status) == []


# ---- identity ------------------------------------------------------------------------------------

def test_a_result_for_an_attempt_not_sent_on_that_connection_is_dropped(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    w2 = world.connect("pool-a", "w2")
    world.submit("j1")
    request = world.requests()[0]
    other = w2 if world.dispatcher.ledger.attempts[request.job] == w1 else w1
    world.send(other, world.result(request.job, sha="f" * 64))
    world.send(other, world.error(request.job, ErrorCode.INVALID_INPUT))
    world.send(other, Accepted(request.job))
    assert world.status("j1")["phase"] == "Dispatched"
    assert world.dispatcher.counters["foreign_attempt"] == 3
    # A job id that was never sent anywhere is dropped the same way.
    world.send(other, world.result(AttemptId("never-sent", 1)))
    assert world.dispatcher.counters["foreign_attempt"] == 4


def test_a_worker_of_pool_a_cannot_act_for_pool_b(world: World) -> None:
    b1 = world.connect("pool-b", "b1")
    world.submit("pinned", placement={"pools": ["pool-b"]})
    request = _only_request(world, b1)
    intruder = world.principal("pool-a", "a1")
    # READY claiming pool B with pool A's key: refused and cut.
    spoof = world.connect("pool-a", "a1", claims="pool-b")
    assert spoof in world.kicked() and spoof not in world.dispatcher.sessions
    # Taking over B's routing id with A's key: the id is not bound to A's key.
    world.connect("pool-b", "b1", principal=intruder, routing_id=b1, claims="pool-a")
    assert world.dispatcher.sessions[b1].principal == world.principal("pool-b", "b1")
    # Messages on B's routing id that arrive with A's key are dropped.
    world.send(b1, world.result(request.job, sha="f" * 64), principal=intruder)
    assert world.dispatcher.counters["identity_mismatch"] == 1
    assert world.status("pinned")["phase"] == "Dispatched"
    world.send(b1, world.result(request.job))
    assert world.status("pinned")["output"]["sha256"] == GOOD_SHA
    assert all(isinstance(r, JobRequest) is False or r.job.uid != "pinned"
               for r in world.effects.sent(to=spoof))


def test_routing_id_must_be_bound_to_the_key(world: World) -> None:
    rogue = world.connect("pool-a", "a1", routing_id=b"pool-a/a1")
    assert rogue in world.kicked() and not world.dispatcher.sessions
    assert world.dispatcher.counters["bad_ready"] == 1


def test_one_connection_per_key_unless_the_pool_allows_more() -> None:
    world = World({"pool-a": {}, "pool-b": {"maxConnectionsPerKey": 2}})
    key = world.principal("pool-a", "w1")
    first = world.connect("pool-a", "w1")
    second = world.connect("pool-a", "w1", principal=key, routing_id=first + b"-again")
    assert second in world.kicked() and set(world.dispatcher.sessions) == {first}
    b_key = world.principal("pool-b", "w1")
    b_first = world.connect("pool-b", "w1")
    b_second = world.connect("pool-b", "w1", principal=b_key, routing_id=b_first + b"-2")
    b_third = world.connect("pool-b", "w1", principal=b_key, routing_id=b_first + b"-3")
    assert {b_first, b_second} <= set(world.dispatcher.sessions) and b_third in world.kicked()


def test_the_same_worker_reconnecting_keeps_what_it_still_runs(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    request = _only_request(world)
    world.connect("pool-a", "w1", jobs=(request.job,))  # new connection, same routing id
    assert world.dispatcher.sessions[w1].attempts == {request.job}
    world.send(w1, world.result(request.job))
    assert world.status("j1")["phase"] == "Completed" and world.status("j1")["attempts"] == 1


def test_unregistered_peers_are_told_to_register(world: World) -> None:
    stranger = world.routing_id("pool-a", "ghost")
    world.send(stranger, Heartbeat(pong=world.now))
    world.send(stranger, world.result(AttemptId("x", 1)))
    assert world.dispatcher.counters["unregistered"] == 2
    assert world.effects.sent(Disconnect, stranger)


def test_revoked_key_loses_its_session_and_its_jobs_move(world: World) -> None:
    w1 = world.connect("pool-a", "w1", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    assert world.dispatcher.ledger.attempts
    w2 = world.connect("pool-a", "w2", capacity=1)
    world.dispatcher.set_keys("pool-a", [world.principal("pool-a", "w2")], world.now)
    assert w1 in world.kicked() and w1 not in world.dispatcher.sessions
    second = _only_request(world, w2)
    assert second.job == AttemptId("j1", 2)
    world.send(w1, world.result(AttemptId("j1", 1), sha="f" * 64))  # the revoked key's late answer
    assert world.status("j1")["phase"] == "Dispatched"


def test_deleting_a_pool_disconnects_its_workers(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.dispatcher.remove_pool("pool-a", world.now)
    assert w1 in world.kicked() and not world.dispatcher.sessions


# ---- retries and attempts -----------------------------------------------------------------------

def test_a_full_worker_refusal_is_not_an_attempt_and_pauses_it() -> None:
    world = World(config=DispatcherConfig(reject_pause_s=1.0))
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", placement={"pools": ["pool-a"]})
    first = _only_request(world, w1)
    world.effects.clear()
    world.send(w1, world.error(first.job, rejected=True))
    assert world.requests() == []                      # w1 is paused, nobody else is there
    assert world.status("j1")["attempts"] == 1
    world.advance(1.1)
    world.dispatcher.tick(world.now, heartbeat=False)
    assert _only_request(world, w1).job == AttemptId("j1", 1)   # the same attempt, re-sent


@pytest.mark.parametrize(("code", "reason"), [(ErrorCode.OOM, "OutOfMemory"),
                                               (ErrorCode.UNAVAILABLE, "WorkerUnavailable"),
                                               (ErrorCode.TIMEOUT, "Timeout")])
def test_retryable_errors_retry_until_max_attempts(world: World, code: ErrorCode, reason: str) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", maxAttempts=3)
    for number in (1, 2, 3):
        request = world.requests()[-1]
        assert request.job == AttemptId("j1", number)
        world.send(w1, world.error(request.job, code))
    status = world.status("j1")
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", reason, 3)
    assert len(world.terminal_events("j1")) == 1 and world.terminal_events("j1")[0].warning
    assert len(world.requests()) == 3


def test_a_retry_can_succeed(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    world.send(w1, world.error(world.requests()[-1].job, ErrorCode.OOM))
    world.send(w1, world.result(world.requests()[-1].job))
    assert (world.status("j1")["phase"], world.status("j1")["attempts"]) == ("Completed", 2)


def test_a_rejected_url_is_signed_again_once_without_spending_an_attempt(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", maxAttempts=2)
    world.send(w1, world.error(world.requests()[-1].job, ErrorCode.EXPIRED))
    again = world.requests()[-1]
    assert again.job == AttemptId("j1", 1) and len(world.requests()) == 2   # same attempt, new URLs
    world.send(w1, world.error(again.job, ErrorCode.EXPIRED))               # twice: now it costs an attempt
    assert world.requests()[-1].job == AttemptId("j1", 2)
    world.send(w1, world.error(world.requests()[-1].job, ErrorCode.EXPIRED))
    status = world.status("j1")
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "StorageURLRejected", 2)


def test_invalid_input_fails_at_once(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    world.send(w1, world.error(world.requests()[-1].job, ErrorCode.INVALID_INPUT))
    assert (world.status("j1")["phase"], world.status("j1")["reason"]) == ("Failed", "InvalidInput")
    assert len(world.requests()) == 1


def test_a_late_result_of_an_earlier_attempt_is_accepted_once(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    first = world.requests()[-1]
    world.send(w1, world.error(first.job, ErrorCode.TIMEOUT))   # the operator gave up on attempt 1...
    second = world.requests()[-1]
    assert second.job.attempt == 2
    # ...whose result arrives anyway: it was not sent on w1 any more (closed), so it is dropped,
    # and attempt 2 completes the job.
    world.send(w1, world.result(first.job, sha="c" * 64))
    world.send(w1, world.result(second.job))
    assert world.status("j1")["output"]["sha256"] == GOOD_SHA
    assert len(world.terminal_events("j1")) == 1


def test_worker_loss_requeues_and_a_cut_off_attempt_may_still_finish(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    w2 = world.connect("pool-a", "w2")
    world.submit("j1")
    first = world.requests()[-1]
    holder = world.dispatcher.ledger.attempts[first.job]
    world.dispatcher.on_lost(holder, "silent", world.now)
    second = world.requests()[-1]
    assert second.job.attempt == 2 and world.dispatcher.ledger.attempts[second.job] != holder
    assert world.status("j1")["phase"] == "Dispatched"
    world.send(w1 if holder == w2 else w2, world.result(second.job))
    assert world.status("j1")["phase"] == "Completed"


def test_signing_outage_holds_the_job_without_spending_attempts(world: World) -> None:
    world.signing_down = True
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    assert world.requests() == [] and world.status("j1")["reason"] == "StorageUnavailable"
    assert world.dispatcher.jobs["j1"].place is Place.HELD
    for _ in range(3):
        world.advance(5.1)
        world.send(w1, Heartbeat())
        world.dispatcher.tick(world.now, heartbeat=False)
    assert world.status("j1")["attempts"] == 0
    world.signing_down = False
    world.advance(5.1)
    world.send(w1, Heartbeat())
    world.dispatcher.tick(world.now, heartbeat=False)
    assert _only_request(world, w1).job == AttemptId("j1", 1)
    assert len([r for r in world.effects.log if r.kind == "warn"]) == 1  # one Warning per outage


def test_unreachable_worker_send_is_not_an_attempt(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.effects.unreachable.add(w1)
    world.submit("j1")
    assert w1 not in world.dispatcher.sessions
    assert world.dispatcher.jobs["j1"].attempts == 0
    world.effects.unreachable.clear()
    w2 = world.connect("pool-a", "w2")
    assert _only_request(world, w2).job == AttemptId("j1", 1)


def test_timeout_fails_the_job_and_cancels_its_attempt(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", timeoutSeconds=10)
    request = world.requests()[-1]
    world.advance(11)
    world.dispatcher.expire(world.now)
    assert (world.status("j1")["phase"], world.status("j1")["reason"]) == ("Failed", "Timeout")
    assert world.effects.sent(Cancel, w1) == [Cancel(request.job)]
    assert timing_violations(world.status("j1")) == []


def test_a_result_after_the_deadline_is_a_timeout(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", timeoutSeconds=10)
    request = world.requests()[-1]
    world.advance(10.2)                                  # before the next tick
    world.send(w1, world.result(request.job))
    assert (world.status("j1")["phase"], world.status("j1")["reason"]) == ("Failed", "Timeout")


def test_cancel_stops_the_attempt_and_ignores_its_result(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    request = world.requests()[-1]
    world.dispatcher.cancel("j1", "user asked", world.now)
    assert world.effects.sent(Cancel, w1) == [Cancel(request.job)]
    world.send(w1, world.result(request.job))
    assert world.status("j1")["phase"] == "Cancelled"
    assert [e.reason for e in world.terminal_events("j1")] == ["Cancelled"]
    assert world.dispatcher.sessions[w1].attempts == set()


def test_a_job_cancelled_before_admission_is_never_sent(world: World) -> None:
    world.connect("pool-a", "w1")
    body = world.body("j1")
    body["metadata"]["annotations"] = {"gpuroute.io/cancel": "true"}
    from gpuroute_operator.core.admission import admit
    from gpuroute_operator.core.grants import StorageGrants
    outcome = admit(body, StorageGrants(("s3://bucket/",), ("s3://bucket/",)), world.now)
    world.dispatcher.admit(outcome.job, world.now, outcome.resume, cancel=outcome.cancel)
    assert world.requests() == [] and world.status("j1")["phase"] == "Cancelled"


def test_deleted_job_is_forgotten_and_cancelled(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    request = world.requests()[-1]
    world.dispatcher.forget("j1", world.now)
    assert world.effects.sent(Cancel, w1) == [Cancel(request.job)]
    assert "j1" not in world.dispatcher.jobs and not world.dispatcher.ledger.attempts


def test_no_eligible_pool_waits_then_routes_when_one_appears(world: World) -> None:
    world.submit("j1", placement={"pools": ["pool-b"]})
    assert world.dispatcher.jobs["j1"].place is Place.UNROUTED
    assert world.status("j1")["reason"] == "NoEligiblePool"
    b1 = world.connect("pool-b", "b1")
    assert _only_request(world, b1).job == AttemptId("j1", 1)


def test_unrouted_jobs_cost_no_routing_work_per_tick(world: World) -> None:
    # Review finding 10: every unroutable job was routed again on every tick, on the loop that
    # carries heartbeats. Only a change of pools or workers can make one routable.
    decisions: list[str] = []
    choose = world.dispatcher.placement.choose

    def counting(needs: JobNeeds, views: Sequence[PoolView]) -> Decision:
        decisions.append(needs.namespace)
        return choose(needs, views)

    world.dispatcher.placement.choose = counting
    world.connect("pool-a", "a1")
    for i in range(50):
        world.submit(f"u{i}", placement={"pools": ["pool-b"]})
    assert len(world.dispatcher.unrouted) == 50
    decisions.clear()
    for _ in range(20):
        world.advance(0.1)
        world.dispatcher.tick(world.now)
    assert decisions == []
    world.connect("pool-b", "b1")
    assert not world.dispatcher.unrouted
    assert [job.pool for job in world.dispatcher.jobs.values()] == ["pool-b"] * 50
    # A job past its deadline while unrouted still times out on the tick.
    world.submit("late", placement={"pools": ["nowhere"]}, timeoutSeconds=1)
    world.advance(1.5)
    world.dispatcher.tick(world.now)
    assert world.status("late")["reason"] == "Timeout"


def test_silent_worker_is_lost_and_kicked(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.advance(3.5)
    world.dispatcher.tick(world.now)
    assert w1 in world.kicked() and w1 not in world.dispatcher.sessions


# ---- restarts -------------------------------------------------------------------------------------

def test_resume_re_sends_the_same_attempt_to_the_worker_that_has_it(world: World) -> None:
    world.connect("pool-a", "w1")
    world.submit("j1")
    first = world.requests()[-1]
    world.restart()
    world.effects.clear()
    world.submit("j1")                                  # kopf lists it again: Dispatched, attempts 1
    assert world.dispatcher.jobs["j1"].place is Place.RESUMING
    w1 = world.connect("pool-a", "w1", jobs=(first.job,))
    again = _only_request(world, w1)
    assert again.job == first.job                       # joined or answered from cache, not recomputed
    world.send(w1, world.result(first.job, cached=True))
    status = world.status("j1")
    assert (status["phase"], status["attempts"]) == ("Completed", 1)
    assert timing_violations(status) == []


def test_resume_when_the_worker_registers_first(world: World) -> None:
    world.connect("pool-a", "w1")
    world.submit("j1")
    first = world.requests()[-1]
    world.restart()
    world.effects.clear()
    w1 = world.connect("pool-a", "w1", jobs=(first.job,))
    assert world.requests() == []                       # its slot is busy with the unknown job
    world.submit("j1")
    assert _only_request(world, w1).job == first.job


def test_two_running_jobs_are_both_followed_after_a_restart(world: World) -> None:
    world.connect("pool-a", "w1", capacity=2)
    world.submit("j1")
    world.submit("j2")
    out = [r.job for r in world.requests()]
    world.restart()
    world.effects.clear()
    w1 = world.connect("pool-a", "w1", capacity=2, jobs=tuple(out))
    world.submit("j1")
    world.submit("j2")
    assert sorted(r.job for r in world.requests(w1)) == sorted(out)


def test_resume_gives_up_waiting_and_starts_a_new_attempt(world: World) -> None:
    world.connect("pool-a", "w1")
    world.submit("j1")
    world.restart()
    world.effects.clear()
    world.submit("j1")
    w2 = world.connect("pool-a", "w2")
    assert world.requests() == []                       # still waiting for w1
    world.advance(world.config.resume_grace_s / 2)
    world.send(w2, Heartbeat())
    world.advance(world.config.resume_grace_s / 2 + 0.1)
    world.send(w2, Heartbeat())
    world.dispatcher.tick(world.now, heartbeat=False)
    assert _only_request(world, w2).job == AttemptId("j1", 2)


def test_a_job_whose_dispatched_status_was_lost_is_adopted_not_recomputed(world: World) -> None:
    world.connect("pool-a", "w1")
    world.submit("j1")
    first = world.requests()[-1]
    world.effects.statuses.pop(world.ref("j1"))      # the operator died before any write landed
    world.restart()
    world.effects.clear()
    w1 = world.connect("pool-a", "w1", jobs=(first.job,))
    w2 = world.connect("pool-a", "w2")
    world.submit("j1")
    assert _only_request(world).job == first.job and world.requests(w1) and not world.requests(w2)
    world.send(w1, world.result(first.job, cached=True))
    assert (world.status("j1")["phase"], world.status("j1")["attempts"]) == ("Completed", 1)


def test_after_a_takeover_a_job_without_status_waits_briefly_for_its_worker(world: World) -> None:
    world.restart()                                          # this process just took over
    world.submit("j1")
    w2 = world.connect("pool-a", "w2")
    assert world.requests() == []                            # held: a worker may be running it
    w1 = world.connect("pool-a", "w1", jobs=(AttemptId("j1", 1),))
    assert _only_request(world, w1).job == AttemptId("j1", 1) and not world.requests(w2)


def test_after_the_startup_hold_a_job_is_routed(world: World) -> None:
    world.restart()
    world.submit("j1")
    w2 = world.connect("pool-a", "w2")
    world.advance(world.config.startup_hold_s + 0.1)
    world.send(w2, Heartbeat())
    world.dispatcher.tick(world.now, heartbeat=False)
    assert _only_request(world, w2).job == AttemptId("j1", 1)


def test_a_result_lost_with_the_old_leader_is_answered_from_the_workers_cache(world: World) -> None:
    world.connect("pool-a", "w1", capacity=1)
    world.submit("j1")
    first = world.requests()[-1]
    world.restart()                                   # the RESULT never reached a status write
    world.effects.clear()
    world.submit("j1")
    world.connect("pool-a", "w2", capacity=1)
    w1 = world.connect("pool-a", "w1", capacity=1)    # a bare READY: nothing running...
    world.dispatcher.on_ready(w1, world.principal("pool-a", "w1"),
                              Ready(pool="pool-a", worker="w1", capacity=1, answered=(first.job,)), world.now)
    assert _only_request(world, w1).job == first.job  # ...but the answer is in its cache
    assert world.dispatcher.sessions[w1].free(world.now) == 0   # now it is followed, in a slot


def test_an_answer_sent_before_its_job_is_admitted_is_adopted_later(world: World) -> None:
    world.restart()
    w1 = world.connect("pool-a", "w1", jobs=(AttemptId("j1", 1),))   # it re-sends its answer...
    world.send(w1, world.result(AttemptId("j1", 1)))                   # ...before j1 is known: dropped
    w2 = world.connect("pool-a", "w2")
    world.submit("j1")                                                 # admitted afterwards
    assert _only_request(world, w1).job == AttemptId("j1", 1) and not world.requests(w2)


def test_a_claimed_attempt_cannot_burn_attempts(world: World) -> None:
    world.submit("j1")
    w1 = world.connect("pool-a", "w1", jobs=(AttemptId("j1", 3),))
    request = _only_request(world, w1)
    assert request.job == AttemptId("j1", 1)            # the claim was not believed


def test_a_worker_cannot_adopt_a_job_of_another_pool(world: World) -> None:
    world.connect("pool-b", "b1")
    world.submit("pinned", placement={"pools": ["pool-b"]})
    first = world.requests()[-1]
    world.restart()
    world.effects.clear()
    world.submit("pinned", placement={"pools": ["pool-b"]})
    a1 = world.connect("pool-a", "a1", jobs=(first.job,))
    assert world.requests(a1) == []


def test_a_terminal_job_is_not_run_again_after_a_restart(world: World) -> None:
    w1 = world.connect("pool-a", "w1")
    world.submit("j1")
    world.send(w1, world.result(world.requests()[-1].job))
    world.restart()
    world.effects.clear()
    world.submit("j1")
    assert world.requests() == [] and "j1" not in world.dispatcher.jobs
    assert len(world.terminal_events("j1")) == 1
