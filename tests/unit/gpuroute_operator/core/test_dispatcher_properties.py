"""Random event sequences against the real dispatcher, with every invariant checked after each step.

Workers here are honest unless a rule forges: they remember what was sent to them, answer
it, lose it when they die, and announce what they still hold when they reconnect. The
operator restarts with no memory and re-admits every job from the statuses it wrote.
Time passes far enough for deadlines to expire, errors spend attempts up to their budget,
and keys are revoked and restored. At the end every worker comes back and answers
everything: no job may be lost.

GPUROUTE_PROPERTY_EXAMPLES sets the number of runs (default: a CI-sized number that
still catches identity and attempt-counting mutants every run; raise it for a soak).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpuroute.protocol import AttemptId, Cancel, ErrorCode, Heartbeat, JobRequest, Result
from gpuroute_operator.core.jobs import Place
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World, timing_violations

WORKERS = (("pool-a", "a1"), ("pool-a", "a2"), ("pool-b", "b1"))
JOBS = tuple(f"j{i}" for i in range(6))
PINNED = {"j4", "j5"}
"""Jobs whose placement allows pool-b only (data residency)."""
SPECS: dict[str, dict[str, object]] = {
    "j0": {}, "j1": {"maxAttempts": 1}, "j2": {"maxAttempts": 2, "timeoutSeconds": 30},
    "j3": {"timeoutSeconds": 20}, "j4": {"maxAttempts": 2}, "j5": {"timeoutSeconds": 25},
}
"""Budgets small enough for random runs to spend: attempts and deadlines run out."""
DEFAULT_TIMEOUT_S = 600.0
"""timeoutSeconds of a spec that sets none (the World's default)."""
DEFAULT_MAX_ATTEMPTS = 3
"""maxAttempts of a spec that sets none (the World's default)."""
RETRYABLE = (ErrorCode.OOM, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
EXAMPLES = int(os.environ.get("GPUROUTE_PROPERTY_EXAMPLES", "500"))


class DispatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.submitted: list[str] = []
        self.holding: dict[tuple[str, str], set[AttemptId]] = {w: set() for w in WORKERS}
        self.answered: dict[tuple[str, str], dict[AttemptId, object]] = {w: {} for w in WORKERS}
        self.connected: set[tuple[str, str]] = set()
        self.revoked: set[tuple[str, str]] = set()
        """Workers whose key is out of their pool's Secret: ZAP refuses them, so they say nothing."""
        self.submitted_at: dict[str, float] = {}
        self.invalid_sent: set[str] = set()
        """Jobs an honest worker reported invalid input for: the only ones that may fail so."""
        self.most_attempts: dict[str, int] = {}
        """The highest status.attempts seen per job: it may never go back."""
        self.seen = 0

    # ---- helpers -----------------------------------------------------------------------------

    def _spec(self, uid: str) -> dict[str, object]:
        return {**SPECS[uid], **({"placement": {"pools": ["pool-b"]}} if uid in PINNED else {})}

    def _max_attempts(self, uid: str) -> int:
        return int(SPECS[uid].get("maxAttempts", DEFAULT_MAX_ATTEMPTS))  # type: ignore[call-overload]

    def _deadline(self, uid: str) -> float:
        return self.submitted_at[uid] + float(SPECS[uid].get("timeoutSeconds", DEFAULT_TIMEOUT_S))  # type: ignore[arg-type]

    def _set_keys(self, pool: str) -> None:
        admitted = [self.world.principal(*w) for w in WORKERS if w[0] == pool and w not in self.revoked]
        self.world.dispatcher.set_keys(pool, admitted, self.world.now)

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
            self.submitted_at[uid] = self.world.now
            self.world.submit(uid, **self._spec(uid))
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def connect(self, worker: tuple[str, str]) -> None:
        if worker in self.revoked:
            return  # ZAP refuses its key: the dispatcher never hears of it
        cached = tuple(sorted(a for a, body in self.answered[worker].items() if isinstance(body, Result)))
        self.world.connect(*worker, jobs=tuple(sorted(self.holding[worker])), answered=cached)
        self.connected.add(worker)
        self._deliver()

    def _busy(self) -> list[tuple[str, str]]:
        """Connected workers that hold attempts: the ones with something to answer."""
        return [w for w in WORKERS if w in self.connected and self.holding[w]]

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self._busy()))
        attempt = data.draw(st.sampled_from(sorted(self.holding[worker])))
        self._answer(worker, attempt, self.world.result(attempt))
        self._deliver()

    @precondition(lambda self: bool(self._busy()))
    @rule(code=st.sampled_from(list(ErrorCode)), rejected=st.booleans(), data=st.data())
    def fail_one(self, code: ErrorCode, rejected: bool, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self._busy()))
        attempt = data.draw(st.sampled_from(sorted(self.holding[worker])))
        if code is ErrorCode.INVALID_INPUT and not rejected:
            self.invalid_sent.add(attempt.uid)
        job = self.world.dispatcher.jobs.get(attempt.uid)
        # The budget's last attempt failing for real (not refused, not a URL to re-sign) ends
        # the job at once, with that error's reason: no further attempt is even tried.
        last = (job is not None and job.live == {attempt} and attempt.attempt == job.spec.max_attempts
                and not rejected and code is not ErrorCode.EXPIRED
                and self.world.dispatcher.ledger.attempts.get(attempt) == self.world.routing_id(*worker))
        self._answer(worker, attempt, self.world.error(attempt, code, rejected=rejected))
        if last:
            status = self.world.status(attempt.uid)
            assert status.get("phase") == "Failed" and status.get("reason") != "MaxAttemptsExceeded", \
                (attempt, code, status.get("phase"), status.get("reason"))
        self._deliver()

    @precondition(lambda self: bool(self._busy()))
    @rule(code=st.sampled_from(RETRYABLE), data=st.data())
    def spend_attempt(self, code: ErrorCode, data: st.DataObject) -> None:
        """A retryable failure: the attempt is spent, the job retried until its budget runs out."""
        self.fail_one(code, False, data)

    def _impostors(self, same_pool: bool) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        """(victim, impostor) pairs: a connected victim holding attempts, another admitted key."""
        return [(victim, other) for victim in WORKERS if victim in self.connected and self.holding[victim]
                for other in WORKERS if other != victim and other not in self.revoked
                and (other[0] == victim[0]) == same_pool]

    def _answer_as(self, pair: tuple[tuple[str, str], tuple[str, str]], forged: bool, data: st.DataObject) -> None:
        victim, impostor = pair
        attempt = data.draw(st.sampled_from(sorted(self.holding[victim])))
        body = self.world.result(attempt, sha="f" * 64) if forged else self.world.error(attempt, ErrorCode.INVALID_INPUT)
        self.world.send(self.world.routing_id(*victim), body, principal=self.world.principal(*impostor))
        self._deliver()

    @precondition(lambda self: bool(self._impostors(same_pool=True)))
    @rule(data=st.data(), forged=st.booleans())
    def sibling_answers(self, data: st.DataObject, forged: bool) -> None:
        """Another key of the victim's own pool answers, with a forged digest or a fatal error, for
        an attempt the victim really holds, on the victim's routing id."""
        self._answer_as(data.draw(st.sampled_from(self._impostors(same_pool=True))), forged, data)

    @precondition(lambda self: bool(self._impostors(same_pool=False)))
    @rule(data=st.data(), forged=st.booleans())
    def stranger_answers(self, data: st.DataObject, forged: bool) -> None:
        """The same from a key of another pool."""
        self._answer_as(data.draw(st.sampled_from(self._impostors(same_pool=False))), forged, data)

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
        if worker != victim and worker not in self.revoked:
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

    @rule(worker=st.sampled_from(WORKERS))
    def worker_restarts(self, worker: tuple[str, str]) -> None:
        """The worker process restarts faster than the operator notices: a new READY on the same
        routing id that lists nothing, while its old session still holds attempts."""
        self.holding[worker].clear()
        self.answered[worker].clear()
        self.connect(worker)

    @rule(seconds=st.floats(0.1, 7.0), beat=st.booleans())
    def tick(self, seconds: float, beat: bool) -> None:
        self.world.advance(seconds)
        if beat:
            for worker in self.connected:
                self.world.send(self.world.routing_id(*worker), Heartbeat())
        self.world.dispatcher.tick(self.world.now)
        self._deliver()
        self.connected &= {w for w in WORKERS if self.world.routing_id(*w) in self.world.dispatcher.sessions}
        self._deadlines_kept()

    @rule(seconds=st.floats(5.0, 40.0))
    def wait_long(self, seconds: float) -> None:
        """Long enough for deadlines to pass; live workers keep answering heartbeats."""
        self.tick(seconds, True)

    def _deadlines_kept(self) -> None:
        """After a tick, every job past its timeoutSeconds has ended."""
        for uid in self.submitted:
            if self.world.now > self._deadline(uid) + 0.01:
                assert self.world.status(uid).get("phase") in ("Completed", "Failed", "Cancelled"), \
                    (uid, "past its deadline", self.world.status(uid).get("phase"))

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.world.restart()
        self.connected.clear()
        for uid in data.draw(st.permutations(self.submitted)):
            self.world.submit(uid, **self._spec(uid))
        for pool in {w[0] for w in self.revoked}:
            self._set_keys(pool)  # the new process reads the Secrets as they are
        self._deliver()

    @rule(uid=st.sampled_from(JOBS))
    def cancel(self, uid: str) -> None:
        self.world.dispatcher.cancel(uid, "test", self.world.now)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def revoke_and_restore(self, worker: tuple[str, str]) -> None:
        """A key out of the Secret and back between two reads: its session ends all the same."""
        was_revoked = worker in self.revoked
        self.revoked.add(worker)
        self._set_keys(worker[0])
        if not was_revoked:
            self.revoked.discard(worker)
            self._set_keys(worker[0])
        self.connected.discard(worker)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def revoke(self, worker: tuple[str, str]) -> None:
        """The worker's key leaves its pool's Secret (pool-b's only key: the Secret is empty)."""
        self.revoked.add(worker)
        self._set_keys(worker[0])
        self.connected.discard(worker)
        self._deliver()

    @rule(worker=st.sampled_from(WORKERS))
    def restore(self, worker: tuple[str, str]) -> None:
        self.revoked.discard(worker)
        self._set_keys(worker[0])
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

    @invariant()
    def attempts_never_go_back_nor_past_the_budget(self) -> None:
        for uid in self.submitted:
            attempts = int(self.world.status(uid).get("attempts") or 0)
            assert attempts >= self.most_attempts.get(uid, 0), (uid, attempts, self.most_attempts[uid])
            assert attempts <= self._max_attempts(uid), (uid, attempts)
            self.most_attempts[uid] = attempts
        for job in self.world.dispatcher.jobs.values():
            assert job.attempts <= job.spec.max_attempts, (job.uid, job.attempts)
            assert all(a.attempt <= job.spec.max_attempts for a in job.live)

    @invariant()
    def a_failure_for_attempts_spent_them_all(self) -> None:
        for uid in self.submitted:
            status = self.world.status(uid)
            if status.get("phase") != "Failed":
                continue
            if status.get("reason") == "InvalidInput":
                assert uid in self.invalid_sent, f"{uid}: failed for an InvalidInput its worker never reported"
                continue
            spent = int(status.get("attempts") or 0) == self._max_attempts(uid)
            timed_out = status.get("reason") == "Timeout" and self.world.now >= self._deadline(uid) - 0.01
            assert spent or timed_out, (uid, status.get("reason"), status.get("attempts"), status.get("message"))

    @invariant()
    def revoked_keys_hold_no_session(self) -> None:
        revoked = {self.world.principal(*w) for w in self.revoked}
        for routing_id, session in self.world.dispatcher.sessions.items():
            assert session.principal not in revoked, (routing_id, session.principal)

    def teardown(self) -> None:
        """Everyone comes back and works honestly: every job ends."""
        for worker in sorted(self.revoked):
            self.restore(worker)
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
        for uid in self.submitted:
            event(f"ended {self.world.status(uid).get('reason')}")


DispatcherMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
test_dispatcher_properties = DispatcherMachine.TestCase
