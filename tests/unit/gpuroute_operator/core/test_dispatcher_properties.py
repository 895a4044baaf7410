"""Random event sequences against the real dispatcher, with every invariant checked after each step.

Workers here are honest unless a rule forges: they remember what was sent to them, answer
it, lose it when they die, and announce what they still hold when they reconnect. The
operator restarts with no memory and re-admits every job from the statuses it wrote.
At the end every worker comes back and answers everything: no job may be lost.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpuroute.protocol import AttemptId, Cancel, ErrorCode, Heartbeat, JobRequest, Result
from gpuroute_operator.core.jobs import Place
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World, timing_violations

WORKERS = (("pool-a", "a1"), ("pool-a", "a2"), ("pool-b", "b1"))
JOBS = tuple(f"j{i}" for i in range(6))
PINNED = {"j4", "j5"}
"""Jobs whose placement allows pool-b only (data residency)."""


class DispatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.submitted: list[str] = []
        self.holding: dict[tuple[str, str], set[AttemptId]] = {w: set() for w in WORKERS}
        self.answered: dict[tuple[str, str], dict[AttemptId, object]] = {w: {} for w in WORKERS}
        self.connected: set[tuple[str, str]] = set()
        self.seen = 0

    # ---- helpers -----------------------------------------------------------------------------

    def _spec(self, uid: str) -> dict[str, object]:
        return {"placement": {"pools": ["pool-b"]}} if uid in PINNED else {}

    def _deliver(self) -> None:
        """Workers receive what the operator sent them since the last step."""
        log = self.world.effects.log
        for record in log[self.seen:]:
            if record.kind != "send":
                continue
            for worker in WORKERS:
                if record.args["routing_id"] != self.world.routing_id(*worker):
                    continue
                body = record.args["body"]
                if isinstance(body, JobRequest):
                    assert not (body.job.uid in PINNED and worker[0] != "pool-b"), "pinned job left its pool"
                    self.holding[worker].add(body.job)
                elif isinstance(body, Cancel):
                    self.holding[worker].discard(body.job)
        self.seen = len(log)

    def _answer(self, worker: tuple[str, str], attempt: AttemptId, body: object) -> None:
        self.holding[worker].discard(attempt)
        self.answered[worker][attempt] = body
        self.world.send(self.world.routing_id(*worker), body)

    # ---- rules -----------------------------------------------------------------------------------

    @rule(uid=st.sampled_from(JOBS))
    def submit(self, uid: str) -> None:
        if uid not in self.submitted:
            self.submitted.append(uid)
            self.world.submit(uid, **self._spec(uid))
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def connect(self, worker: tuple[str, str]) -> None:
        cached = tuple(sorted(a for a, body in self.answered[worker].items() if isinstance(body, Result)))
        self.world.connect(*worker, jobs=tuple(sorted(self.holding[worker])), answered=cached)
        self.connected.add(worker)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def finish_one(self, worker: tuple[str, str], data: st.DataObject) -> None:
        if worker in self.connected and self.holding[worker]:
            attempt = data.draw(st.sampled_from(sorted(self.holding[worker])))
            self._answer(worker, attempt, self.world.result(attempt))
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS), code=st.sampled_from(list(ErrorCode)), rejected=st.booleans(),
          data=st.data())
    def fail_one(self, worker: tuple[str, str], code: ErrorCode, rejected: bool, data: st.DataObject) -> None:
        if worker in self.connected and self.holding[worker]:
            attempt = data.draw(st.sampled_from(sorted(self.holding[worker])))
            self._answer(worker, attempt, self.world.error(attempt, code, rejected=rejected))
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS), uid=st.sampled_from(JOBS), number=st.integers(1, 4))
    def forge(self, worker: tuple[str, str], uid: str, number: int) -> None:
        """A RESULT with a forged digest for an attempt this worker was not given."""
        attempt = AttemptId(uid, number)
        if attempt not in self.holding[worker]:
            self.world.send(self.world.routing_id(*worker), self.world.result(attempt, sha="f" * 64))
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS), victim=st.sampled_from(WORKERS), uid=st.sampled_from(JOBS))
    def impersonate(self, worker: tuple[str, str], victim: tuple[str, str], uid: str) -> None:
        """Another key's messages on the victim's routing id, and a READY trying to take it over."""
        if worker != victim:
            intruder = self.world.principal(*worker)
            target = self.world.routing_id(*victim)
            self.world.send(target, self.world.result(AttemptId(uid, 1), sha="f" * 64), principal=intruder)
            self.world.connect(*worker, principal=intruder, routing_id=target, claims=victim[0])
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def duplicate(self, worker: tuple[str, str]) -> None:
        if worker in self.connected:
            for body in list(self.answered[worker].values())[-2:]:
                self.world.send(self.world.routing_id(*worker), body)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS), died=st.booleans())
    def lose(self, worker: tuple[str, str], died: bool) -> None:
        """The worker dies (forgetting its jobs) or is cut off (keeping them)."""
        self.world.dispatcher.on_lost(self.world.routing_id(*worker), "test", self.world.now)
        self.connected.discard(worker)
        if died:
            self.holding[worker].clear()
            self.answered[worker].clear()
        self._deliver()

    @rule(seconds=st.floats(0.1, 7.0), beat=st.booleans())
    def tick(self, seconds: float, beat: bool) -> None:
        self.world.advance(seconds)
        if beat:
            for worker in self.connected:
                self.world.send(self.world.routing_id(*worker), Heartbeat())
        self.world.dispatcher.tick(self.world.now)
        self._deliver()
        self.connected &= {w for w in WORKERS if self.world.routing_id(*w) in self.world.dispatcher.sessions}

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.world.restart()
        self.connected.clear()
        for uid in data.draw(st.permutations(self.submitted)):
            self.world.submit(uid, **self._spec(uid))
        self._deliver()

    @rule(uid=st.sampled_from(JOBS))
    def cancel(self, uid: str) -> None:
        self.world.dispatcher.cancel(uid, "test", self.world.now)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def revoke_and_restore(self, worker: tuple[str, str]) -> None:
        pool = worker[0]
        keep = [self.world.principal(*w) for w in WORKERS if w[0] == pool and w != worker]
        self.world.dispatcher.set_keys(pool, keep, self.world.now)
        self.world.dispatcher.set_keys(pool, [*keep, self.world.principal(*worker)], self.world.now)
        self.connected.discard(worker)
        self._deliver()

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def terminal_exactly_once_and_consistent(self) -> None:
        for uid in self.submitted:
            events = self.world.terminal_events(uid)
            assert len(events) <= 1, f"{uid}: {len(events)} terminal events"
            status = self.world.status(uid)
            if status.get("phase") in ("Completed", "Failed", "Cancelled"):
                assert events, f"{uid} ended without its terminal event"
                assert timing_violations(status) == [], (uid, timing_violations(status))
            if status.get("phase") == "Completed":
                assert status["output"]["sha256"] == GOOD_SHA, f"{uid}: a forged result was accepted"

    @invariant()
    def one_place_per_job_and_attempts_in_step(self) -> None:
        d = self.world.dispatcher
        for uid, job in d.jobs.items():
            assert job.place is not Place.DONE
            assert (uid in d.ledger.unrouted) == (job.place is Place.UNROUTED)
            assert (uid in d.ledger.held) == (job.place is Place.HELD)
            assert (uid in d.ledger.resuming) == (job.place is Place.RESUMING)
            queued_in = [name for name, pool in d.pools.items() if uid in pool.queue]
            assert queued_in == ([job.pool] if job.place is Place.QUEUED else []), (uid, job.place, queued_in)
            assert job.live == {a for a in d.ledger.attempts if a.uid == uid}
            assert (job.place is Place.RUNNING) == bool(job.live), (uid, job.place, job.live)
            assert all(a.attempt <= job.attempts for a in job.live)
        for attempt, routing_id in d.ledger.attempts.items():
            assert attempt.uid in d.jobs
            assert attempt in d.sessions[routing_id].attempts
        for routing_id, session in d.sessions.items():
            assert session.principal.owns(routing_id)
            assert all(d.ledger.attempts.get(a) == routing_id for a in session.attempts)
            assert routing_id in d.pools[session.pool].workers

    def teardown(self) -> None:
        """Everyone comes back and works honestly: every job ends."""
        for _ in range(40):
            if all(self.world.status(uid).get("phase") in ("Completed", "Failed", "Cancelled")
                   for uid in self.submitted):
                break
            for worker in WORKERS:
                if worker not in self.connected:
                    self.connect(worker)
                for attempt in sorted(self.holding[worker]):
                    self._answer(worker, attempt, self.world.result(attempt))
                self._deliver()
            self.tick(2.0, True)
        for uid in self.submitted:
            assert self.world.status(uid).get("phase") in ("Completed", "Failed", "Cancelled"), \
                (uid, self.world.status(uid).get("phase"), self.world.dispatcher.jobs.get(uid))
        self.terminal_exactly_once_and_consistent()


DispatcherMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
test_dispatcher_properties = DispatcherMachine.TestCase
