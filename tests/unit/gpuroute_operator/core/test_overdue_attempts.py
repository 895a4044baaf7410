"""Attempts whose answer never comes: a worker (or a stolen key) that answers heartbeats but
sits on its JOBs cannot hold them until timeoutSeconds (answers.overdue, Dispatcher.tick)."""

from __future__ import annotations

from gpuroute.protocol import Accepted, AttemptId, Cancel, Heartbeat, JobRequest
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World


def _beat(world: World, routing_id: bytes) -> None:
    world.send(routing_id, Heartbeat(pong=world.now))


def test_a_job_never_accepted_is_taken_back_and_the_worker_cut() -> None:
    world = World()
    hoarder = world.connect("pool-a", "w1", capacity=4)
    world.submit("j1", placement={"pools": ["pool-a"]}, timeoutSeconds=86400)
    assert [r.job for r in world.requests(hoarder)] == [AttemptId("j1", 1)]
    for _ in range(11):  # alive all along: heartbeats answered, the JOB never accepted
        world.advance(1.0)
        _beat(world, hoarder)
        world.dispatcher.tick(world.now)
    assert hoarder in world.kicked() and hoarder not in world.dispatcher.sessions
    assert world.effects.sent(Cancel, hoarder) == [Cancel(AttemptId("j1", 1))]
    honest = world.connect("pool-a", "w2")
    retry = world.requests(honest)
    assert [r.job for r in retry] == [AttemptId("j1", 2)]
    world.send(honest, world.result(retry[0].job))
    assert world.status("j1")["phase"] == "Completed" and world.status("j1")["output"]["sha256"] == GOOD_SHA


def test_an_accepted_attempt_that_never_ends_is_given_up_after_its_share() -> None:
    world = World()
    slow = world.connect("pool-a", "w1")
    world.submit("j1", placement={"pools": ["pool-a"]}, timeoutSeconds=3000, maxAttempts=3)
    request: JobRequest = world.requests(slow)[0]
    world.send(slow, Accepted(request.job))
    # No figures for this pool yet: the attempt's share is timeoutSeconds / maxAttempts = 1000 s.
    for _ in range(99):
        world.advance(10.0)
        _beat(world, slow)
        world.dispatcher.tick(world.now)
    assert world.status("j1")["phase"] == "Processing"
    world.advance(20.0)
    _beat(world, slow)
    world.dispatcher.tick(world.now)
    assert world.effects.sent(Cancel, slow) == [Cancel(request.job)]
    assert slow not in world.kicked()  # slow is not broken: it keeps its session
    assert world.status("j1")["attempts"] == 2 and world.status("j1")["phase"] in ("Dispatched", "Queued")


def test_learned_speed_bounds_an_attempt_and_the_last_one_fails_the_job() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    world.submit("warm", placement={"pools": ["pool-a"]})
    world.send(w1, world.result(world.requests(w1)[0].job, gpu_ms=30.0))  # the pool now has figures
    world.submit("j1", placement={"pools": ["pool-a"]}, timeoutSeconds=86400, maxAttempts=1)
    request = world.requests(w1)[-1]
    assert request.job == AttemptId("j1", 1)
    world.send(w1, Accepted(request.job))
    for _ in range(7):  # the floor (60 s) applies: 10 x a few ms is far less
        world.advance(10.0)
        _beat(world, w1)
        world.dispatcher.tick(world.now)
    status = world.status("j1")
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "Timeout", 1), status
    assert "per-attempt limit" in status["message"]  # not timeoutSeconds (a day): the attempt's own bound


def test_an_answer_in_time_is_never_overdue() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    world.submit("j1", placement={"pools": ["pool-a"]})
    request = world.requests(w1)[0]
    for _ in range(9):
        world.advance(1.0)
        _beat(world, w1)
        world.dispatcher.tick(world.now)
    world.send(w1, Accepted(request.job))
    for _ in range(59):
        world.advance(1.0)
        _beat(world, w1)
        world.dispatcher.tick(world.now)
    world.send(w1, world.result(request.job))
    assert world.status("j1")["phase"] == "Completed" and world.effects.sent(Cancel) == []
