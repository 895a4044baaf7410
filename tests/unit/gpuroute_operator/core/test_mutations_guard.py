"""Rules a mutation review found unguarded: re-registration, per-key identity, emptied keys,
and what admission keeps of a stored status after a restart.

Each test names the rule it pins; each fails if that rule is changed by one operator or
one dropped line (the review's mutants), deterministically.
"""

from __future__ import annotations

from gpuroute.protocol import AttemptId, Heartbeat, JobRequest
from gpuroute_operator.core.admission import Admitted, admit
from gpuroute_operator.core.grants import StorageGrants
from gpuroute_operator.core.jobs import Place, Resume
from gpuroute_operator.core.phases import Phase
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World

GRANTS = StorageGrants(("s3://bucket/",), ("s3://bucket/",))


def _requests_for(world: World, uid: str, to: bytes | None = None) -> list[AttemptId]:
    return [r.job for r in world.requests(to) if r.job.uid == uid]


# ---- sessions: re-registration ----------------------------------------------------------------

def test_a_worker_re_registering_without_its_attempt_gets_the_job_again_at_once() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    assert _requests_for(world, "j1") == [AttemptId("j1", 1)]
    # The worker restarted: same routing id, new connection, and it runs nothing.
    world.connect("pool-a", "w1", capacity=1, jobs=())
    # Attempt 1 is gone with the old connection; the job is re-queued and sent again
    # right away, not left to hang until timeoutSeconds.
    assert AttemptId("j1", 1) not in world.dispatcher.ledger.attempts
    assert _requests_for(world, "j1", w1) == [AttemptId("j1", 1), AttemptId("j1", 2)]
    assert world.dispatcher.sessions[w1].attempts == {AttemptId("j1", 2)}
    assert (world.status("j1")["phase"], world.status("j1")["attempts"]) == ("Dispatched", 2)
    world.send(w1, world.result(AttemptId("j1", 2)))
    assert world.status("j1")["phase"] == "Completed"


def test_re_registering_keeps_only_the_attempts_the_worker_lists() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=2)
    world.submit("j1", placement={"pools": ["pool-a"]})
    world.submit("j2", placement={"pools": ["pool-a"]})
    world.connect("pool-a", "w1", capacity=2, jobs=(AttemptId("j1", 1),))
    assert world.dispatcher.sessions[w1].attempts == {AttemptId("j1", 1), AttemptId("j2", 2)}
    assert _requests_for(world, "j1") == [AttemptId("j1", 1)]       # kept, not sent again
    assert _requests_for(world, "j2") == [AttemptId("j2", 1), AttemptId("j2", 2)]


# ---- sessions: identity is the key, not the pool --------------------------------------------------

def test_another_key_of_the_same_pool_cannot_speak_on_a_sessions_routing_id() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=1)
    world.connect("pool-a", "w2", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    attempt = AttemptId("j1", 1)
    assert world.dispatcher.ledger.attempts[attempt] in (w1, world.routing_id("pool-a", "w2"))
    holder = world.dispatcher.ledger.attempts[attempt]
    holder_name = "w1" if holder == w1 else "w2"
    sibling = world.principal("pool-a", "w2" if holder_name == "w1" else "w1")
    assert sibling.pool == world.dispatcher.sessions[holder].principal.pool
    # Same pool, other key, on the holder's routing id: every message is dropped.
    world.send(holder, world.result(attempt, sha="f" * 64), principal=sibling)
    assert world.dispatcher.counters.get("identity_mismatch") == 1
    assert world.status("j1")["phase"] == "Dispatched"
    assert world.terminal_events("j1") == []
    world.send(holder, world.result(attempt))
    assert world.status("j1")["output"]["sha256"] == GOOD_SHA


# ---- sessions: an emptied keys Secret cuts every session ----------------------------------------

def test_setting_no_keys_cuts_every_session_of_the_pool() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=1)
    w2 = world.connect("pool-a", "w2", capacity=1)
    b1 = world.connect("pool-b", "b1", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    world.dispatcher.set_keys("pool-a", [], world.now)
    assert {w1, w2} <= set(world.kicked())
    assert set(world.dispatcher.sessions) == {b1}
    assert not world.dispatcher.pools["pool-a"].workers
    assert world.dispatcher.ledger.attempts == {}
    # The job's attempt was taken back: it waits (pinned to pool-a) for a worker with a valid key.
    assert world.status("j1")["phase"] == "Queued" and not world.dispatcher.jobs["j1"].live


# ---- admission: what a stored status says after a restart ----------------------------------------

def test_admit_keeps_the_attempts_of_a_job_re_queued_before_a_restart() -> None:
    world = World()
    body = world.body("j1")
    body["status"] = {"phase": "Queued", "attempts": 2, "reason": "WorkerLost"}
    outcome = admit(body, GRANTS, world.now)
    assert isinstance(outcome, Admitted)
    assert outcome.resume is None and outcome.job.attempts == 2


def test_admit_resumes_a_dispatched_job_as_well_as_a_processing_one() -> None:
    world = World()
    for phase in (Phase.DISPATCHED, Phase.PROCESSING):
        body = world.body("j1")
        body["status"] = {"phase": phase.value, "attempts": 1, "pool": "pool-a", "worker": "w1",
                          "timing": {"queuedAt": "2027-01-15T08:00:00Z", "dispatchedAt": "2027-01-15T08:00:01Z"}}
        outcome = admit(body, GRANTS, world.now)
        assert isinstance(outcome, Admitted)
        assert outcome.resume == Resume(phase, 1, "pool-a", "w1")
        assert outcome.job.dispatched_at is not None


def test_after_a_restart_a_re_queued_job_spends_its_remaining_attempts_only() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=1)
    world.submit("j1", maxAttempts=2, placement={"pools": ["pool-a"]})
    world.dispatcher.on_lost(w1, "gone", world.now)
    assert (world.status("j1")["phase"], world.status("j1")["attempts"]) == ("Queued", 1)
    world.restart()
    world.submit("j1", maxAttempts=2, placement={"pools": ["pool-a"]})
    w2 = world.connect("pool-a", "w2", capacity=1)
    world.advance(world.config.startup_hold_s + 0.1)
    world.send(w2, Heartbeat(pong=world.now))  # alive through the hold
    world.dispatcher.tick(world.now, heartbeat=False)
    assert _requests_for(world, "j1", w2) == [AttemptId("j1", 2)]
    world.send(w2, world.error(AttemptId("j1", 2)))   # retryable, but the budget of 2 is spent: it ends
    status = world.status("j1")
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "WorkerUnavailable", 2)
    assert _requests_for(world, "j1") == [AttemptId("j1", 1), AttemptId("j1", 2)]


def test_after_a_restart_a_dispatched_job_waits_for_its_worker_and_is_computed_once() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    assert world.status("j1")["phase"] == "Dispatched"
    world.restart()
    # Another worker is there at once; the one running attempt 1 re-registers later than the
    # startup hold but within the resume grace.
    w2 = world.connect("pool-a", "w2", capacity=1)
    world.submit("j1", placement={"pools": ["pool-a"]})
    assert world.dispatcher.jobs["j1"].place is Place.RESUMING
    late = (world.config.startup_hold_s + world.config.resume_grace_s) / 2
    assert world.config.startup_hold_s < late < world.config.resume_grace_s
    deadline = world.now + late
    while world.now < deadline:  # w2 stays alive and free all along
        world.advance(0.5)
        world.send(w2, Heartbeat(pong=world.now))
        world.dispatcher.tick(world.now, heartbeat=False)
    assert w2 in world.dispatcher.sessions
    assert _requests_for(world, "j1", w2) == []
    world.connect("pool-a", "w1", capacity=1, jobs=(AttemptId("j1", 1),))
    assert world.dispatcher.ledger.attempts.get(AttemptId("j1", 1)) == w1
    world.send(w1, world.result(AttemptId("j1", 1)))
    status = world.status("j1")
    assert (status["phase"], status["attempts"]) == ("Completed", 1)
    assert [a for a in _requests_for(world, "j1") if a.attempt > 1] == []
    assert all(not isinstance(b, JobRequest) or b.job.uid != "j1" for b in world.effects.sent(to=w2))
