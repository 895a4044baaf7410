"""The operator's job rules, in one pure, synchronous place: admission, routing, attempts,
answers, retries, endings. The Dispatcher is the entry point for everything that happens;
its parts, each pure too:

- ledger.py: the books (where every job is, which attempts are out, on which session);
- sessions.py: may this connection say this? (READY, the identity of every message, liveness, loss);
- placement.py: which pool a job should go to, and whether a worker may adopt an attempt;
- answers.py: whether an answer is right and what it means (ERROR retry policy, RESULT checks);
- reports.py: how a job's changes reach the Effects port (resource status or batch item).

Nothing here does I/O or reads a clock: every entry point takes `now` (seconds, wall
clock) and every outcome goes through the injected `Effects` port. That is what lets
the unit tests, the property test and bench/routing_sim/ drive the very code the
operator runs.

Invariants the dispatcher and its parts keep (each is tested):
- A job is in exactly one place (job.place); the pool queues and the unrouted, held and
  resuming maps are indexes of that field, changed only by `Ledger.place`.
- An attempt exists once it has been sent, on exactly one session: the ledger's attempts,
  `job.live` and `session.attempts` change together, only in `Ledger.open` and `Ledger.close`.
  `job.attempts` counts up only when an attempt is sent, never back.
- A session may only answer attempts sent on it; its pool is the one ZAP admitted its
  key for, and its routing id must be bound to that key (sessions.py).
- A job reaches one terminal phase, once; its terminal Event rides on the terminal status
  write. Timestamps are ordered and the stage times add up to totalMs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpuroute import protocol
from gpuroute.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    Accepted,
    AttemptId,
    Cancel,
    Error,
    ErrorCode,
    InputSource,
    ItemTarget,
    JobRequest,
    OutputTarget,
    Ready,
    Result,
)
from gpuroute.redact import redact
from gpuroute_operator import metrics
from gpuroute_operator.core import answers, reports
from gpuroute_operator.core.answers import Action
from gpuroute_operator.core.effects import Effects
from gpuroute_operator.core.errors import SigningUnavailable
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.jobs import Job, Place, Resume
from gpuroute_operator.core.ledger import Ledger
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.placement import Placer
from gpuroute_operator.core.pools import PoolSpec, PoolState, WorkerConn
from gpuroute_operator.core.sessions import WorkerSessions
from gpuroute_operator.core.spec import SpecError

log = logging.getLogger(__name__)

Signed = tuple[InputSource, OutputTarget, tuple[ItemTarget, ...]]
"""A job's URLs: its input and output, or (an item group) every item's."""
Signer = Callable[[Job, float], Signed]
"""Signs a job's storage URLs at `now`; raises SigningUnavailable (try later) or SpecError (never)."""


@dataclass(frozen=True)
class DispatcherConfig:
    """Timing rules of the dispatcher."""

    reject_pause_s: float = 0.5
    """A worker that refused a job for capacity gets no new job for this long."""
    signing_retry_s: float = 5.0
    """A job whose storage cannot be signed right now is tried again this often, until its timeout."""
    resume_grace_s: float = 2 * HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    """After a restart, how long a resumed job waits for the worker that ran it to re-register
    (6 s: a worker learns of the new leader at its next heartbeat and registers again at once,
    or after HEARTBEAT_LIVENESS silent beats at worst; twice that leaves room on a busy machine,
    as for batches, since a recomputed image costs far more than a few seconds' wait)."""
    startup_hold_s: float = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    """After taking over, how long a job whose status shows no attempt waits before one is sent
    (3 s from when the socket serves): its Dispatched write may have been lost with the previous
    leader while a worker runs it. At 2 s, a loaded machine recomputed such a job now and then."""
    finished_memory: int = 100_000
    """Terminal job uids remembered, so late events and duplicate results are ignored cheaply."""
    accept_within_s: float = 10.0
    """A JOB not ACCEPTED this long after it was sent (workers accept on receipt, and heartbeats
    show the session alive) is taken back and the worker cut: it is broken, or a stolen key."""
    attempt_floor_s: float = 60.0
    """Least time an accepted attempt gets before it is given up (see answers.overdue)."""
    attempt_slack: float = 10.0
    """An accepted attempt may take this many times the pool's expected time for it."""


class Dispatcher:
    def __init__(self, effects: Effects, sign: Signer, config: DispatcherConfig | None = None, *,
                 started_at: float | None = None) -> None:
        """`started_at`: when this operator process started leading. Jobs admitted within
        startup_hold_s of it wait that long for their workers to re-register before a first
        attempt is sent: one of them may be running it already (None: no such wait)."""
        self.effects = effects
        self.sign = sign
        self.config = config or DispatcherConfig()
        self.started_at = started_at
        self.pools: dict[str, PoolState] = {}
        self.ledger = Ledger(self.pools, finished_memory=self.config.finished_memory)
        self.placement = Placer(self.pools)
        self.counters: dict[str, int] = {}
        """Dropped and refused messages by why (also exported as metrics)."""
        self.registry = WorkerSessions(self.ledger, self.pools, effects, self, self._count)

    # What the shell, the status page and tests read: the ledger's books.
    @property
    def jobs(self) -> dict[str, Job]:
        return self.ledger.jobs

    @property
    def sessions(self) -> dict[bytes, WorkerConn]:
        return self.ledger.sessions

    @property
    def unrouted(self) -> Mapping[str, Job]:
        """Jobs no pool can take right now, by uid."""
        return self.ledger.unrouted

    def held_count(self) -> int:
        """Jobs waiting for storage signing to work again."""
        return len(self.ledger.held)

    def is_finished(self, uid: str) -> bool:
        """The job ended (here or, as `ended_elsewhere` recorded, before this process); its events are stale."""
        return uid in self.ledger.finished

    def ended_elsewhere(self, uid: str) -> None:
        """A job found terminal at admission (or refused there) never enters the books; remember it
        as finished so that its later events are ignored."""
        self.ledger.remember_finished(uid)

    def demand(self, pool: PoolState, now: float) -> int:
        """Jobs this pool should be sized for: its queue plus unrouted jobs only it could take."""
        return len(pool.queue) + self.placement.waiting_for(pool, self.ledger.unrouted.values(), now)

    # ---- pools and keys ------------------------------------------------------------------

    def set_pool(self, spec: PoolSpec, now: float) -> None:
        pool = self.pools.get(spec.name)
        if pool is None:
            self.pools[spec.name] = PoolState(spec)
        else:
            pool.spec = spec
            self.registry.keep_allowed_sources(pool, now)
        self._reroute_unrouted(now)
        self.pump(now)

    def remove_pool(self, name: str, now: float) -> None:
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        for conn in list(pool.workers.values()):
            self.registry.lose(conn, "pool deleted", now, kick=True, pool=pool)
        for job in list(pool.queue):
            pool.queue.remove(job.uid)
            job.place = Place.NEW
            self._route(job, now)
        self.pump(now)

    def set_keys(self, pool_name: str, admitted: Iterable[Principal], now: float) -> None:
        """The pool's keys Secret now lists exactly `admitted`: sessions of other keys end."""
        pool = self.pools.get(pool_name)
        if pool is None:
            return
        self.registry.keep_only(pool, admitted, now)
        self.pump(now)

    # ---- jobs -------------------------------------------------------------------------------

    def admit(self, job: Job, now: float, resume: Resume | None = None, *, cancel: str | None = None) -> None:
        """A valid ImageJob seen for the first time in this process (idempotent per uid).

        `resume`: its stored status says an attempt was out (the operator restarted).
        `cancel`: it already carries the cancel annotation; it ends Cancelled at once.
        """
        if job.uid in self.jobs or job.uid in self.ledger.finished:
            return
        self.ledger.add(job)
        metrics.labelled(metrics.JOBS_ADMITTED, job.priority).inc()
        if cancel is not None:
            self._finish(job, Phase.CANCELLED, "CancelRequested", cancel, now)
            return
        resumed = resume is not None and resume.attempts >= 1
        if resume is not None and resumed:
            job.resume(resume, now)
        else:
            job.move(Phase.QUEUED, at=now, reason="Admitted", message="waiting for a worker")
        holder = self.placement.holder_of(job, self.sessions.values(), now)
        if holder is not None:
            # A worker has it (after a restart, even if its Dispatched status never landed).
            self._dispatch(job, holder[0], now, number=holder[1].attempt)
        elif resumed:
            job.reuse_attempt = True
            self.ledger.place(job, Place.RESUMING, until=now + self.config.resume_grace_s)
        elif self.started_at is not None and now < self.started_at + self.config.startup_hold_s:
            # Just took over: its status may simply not have caught up with an attempt a
            # worker is running. Wait for the workers' READY before computing it again.
            self.ledger.place(job, Place.RESUMING, until=self.started_at + self.config.startup_hold_s)
            reports.changed(self.effects, job)
        else:
            self._route(job, now)
            reports.changed(self.effects, job)
        self.pump(now)

    def cancel(self, uid: str, message: str, now: float) -> None:
        job = self.jobs.get(uid)
        if job is not None:
            self._finish(job, Phase.CANCELLED, "CancelRequested", message, now)

    def forget(self, uid: str, now: float) -> None:
        """The ImageJob was deleted: stop its work everywhere, write nothing more."""
        job = self.jobs.get(uid)
        if job is None:
            return
        self._cancel_attempts(job)
        self.ledger.remove(job)
        self.effects.forget(job.ref)

    def spec_changed(self, uid: str, generation: int) -> None:
        job = self.jobs.get(uid)
        if job is not None and generation != job.generation:
            job.generation = generation
            reports.warn(self.effects, job, "SpecChangeIgnored", "spec changes after admission are ignored; "
                              "delete and re-create the ImageJob to run a new spec")
            reports.changed(self.effects, job)

    # ---- routing and dispatch ------------------------------------------------------------------

    def _route(self, job: Job, now: float, *, front: bool = False) -> None:
        decision = self.placement.decide(job, now)
        if decision.pool is None:
            job.reason, job.message = "NoEligiblePool", decision.reason
            self.ledger.place(job, Place.UNROUTED)
            return
        job.pool = decision.pool
        job.decision = decision.reason
        self.ledger.place(job, Place.QUEUED, front=front)

    def pump(self, now: float) -> None:
        """Dispatch queued jobs to free workers, pool by pool."""
        for pool in list(self.pools.values()):
            while len(pool.queue):
                conn = pool.free_worker(now)
                if conn is None:
                    break
                job = pool.queue.pop()
                if job is None:
                    break
                self.ledger.place(job, Place.NEW)
                preferred = pool.free_worker(now, job.preferred_worker) if job.preferred_worker else conn
                self._dispatch(job, preferred or conn, now)

    def _dispatch(self, job: Job, conn: WorkerConn, now: float, *, number: int | None = None) -> None:
        """Send the job's next attempt (or attempt `number`, one a worker already holds) to `conn`."""
        reuse = number is not None or job.reuse_attempt
        if number is None:
            number = job.attempts if reuse and job.attempts >= 1 else job.attempts + 1
        if number > job.spec.max_attempts:
            self._finish(job, Phase.FAILED, "MaxAttemptsExceeded",
                         f"no attempt succeeded after {job.attempts} attempts; last: {job.message}", now)
            return
        attempt = AttemptId(job.uid, number)
        try:
            source, target, items = self.sign(job, now)
        except SigningUnavailable as exc:
            self._hold(job, str(exc), now)
            return
        except SpecError as exc:
            self._finish(job, Phase.FAILED, exc.reason, str(exc), now)
            return
        request = JobRequest(attempt, tuple(job.spec.steps), source, target, max(1.0, job.deadline - now), items,
                             float(job.spec.item_timeout_s))
        conn.foreign.discard(attempt)
        conn.answered.discard(attempt)
        if not self.effects.send(conn.routing_id, request, job.spec.inline):
            # Never left the operator: not an attempt. The session is gone; so is its pool's claim.
            job.reuse_attempt = reuse
            self.registry.lose(conn, "unreachable", now)
            self._route(job, now, front=True)
            return
        first = job.dispatched_at is None
        self.ledger.open(job, attempt, conn)
        job.sent(number, conn.pool, conn.worker, conn.device, now)
        if first:
            metrics.DISPATCH_SECONDS.observe(max(0.0, now - job.queued_at))
        reports.changed(self.effects, job)

    def _hold(self, job: Job, why: str, now: float) -> None:
        first = job.reason != "StorageUnavailable"
        job.move(Phase.QUEUED, at=now, reason="StorageUnavailable",
                 message=f"{why}; retrying every {self.config.signing_retry_s:g} s until timeoutSeconds")
        self.ledger.place(job, Place.HELD, until=now + self.config.signing_retry_s)
        reports.changed(self.effects, job)
        if first:  # one Event per outage, not one per retry
            metrics.JOBS_REQUEUED.labels("StorageUnavailable").inc()
            reports.warn(self.effects, job, "StorageUnavailable", job.message)

    def _requeue(self, job: Job, reason: str, message: str, now: float) -> None:
        job.worker = None
        job.move(Phase.QUEUED, at=now, reason=reason, message=message)
        metrics.JOBS_REQUEUED.labels(reason).inc()
        self._route(job, now, front=True)
        reports.changed(self.effects, job)
        reports.warn(self.effects, job, "Requeued", f"{message}; {job.decision or job.message}")

    def _cancel_attempts(self, job: Job, *, keep: AttemptId | None = None) -> None:
        for attempt in list(job.live):
            if attempt == keep:
                continue
            routing_id = self.ledger.attempts.get(attempt)
            if routing_id is not None:
                self.effects.send(routing_id, Cancel(attempt))
            self.ledger.close(attempt)

    # ---- endings ------------------------------------------------------------------------------

    def _finish(self, job: Job, phase: Phase, reason: str, message: str, now: float,
                result: Result | None = None) -> None:
        if job.phase.terminal:
            return
        job.move(phase, at=now, reason=reason, message=message)
        self._cancel_attempts(job, keep=result.job if result else None)
        if result is not None:
            self.ledger.close(result.job)
        self.ledger.remove(job)
        job.completed_at = now
        job.timing = _timing(job, result, now)
        reports.ended(self.effects, job)
        metrics.labelled(metrics.JOBS_FINISHED, phase.value, reason).inc()

    # ---- worker sessions ------------------------------------------------------------------------

    def on_ready(self, routing_id: bytes, principal: Principal, ready: Ready, now: float, *, address: str = "") -> None:
        """A worker's READY; `address`: its IP address as the socket saw it ("" when unknown)."""
        self.registry.on_ready(routing_id, principal, ready, now, address=address)

    def joined(self, conn: WorkerConn, now: float) -> None:
        for attempt in sorted(conn.foreign | conn.answered):
            job = self.jobs.get(attempt.uid)
            if job is not None and self.placement.may_adopt(job, attempt, conn, now):
                self._dispatch(job, conn, now, number=attempt.attempt)
        self._reroute_unrouted(now)
        self.pump(now)

    def on_message(self, routing_id: bytes, principal: Principal, body: object, now: float) -> None:
        """Every message after READY."""
        if self.registry.on_message(routing_id, principal, body, now):
            self.pump(now)  # a slot may have freed

    def answered(self, conn: WorkerConn, body: Accepted | Result | Error, now: float) -> None:
        if isinstance(body, Accepted):
            self._accepted(conn, body, now)
        elif isinstance(body, Result):
            self.on_result(conn, body, now)
        else:
            self.on_error(conn, body, now)

    def _accepted(self, conn: WorkerConn, body: Accepted, now: float) -> None:
        job = self.jobs.get(body.job.uid)
        if job is not None and job.phase is Phase.DISPATCHED and body.job == job.current_attempt:
            job.started_at = now
            job.move(Phase.PROCESSING, at=now, reason="Processing", message=f"running on {conn.pool}/{conn.worker}")
            reports.changed(self.effects, job)

    def on_result(self, conn: WorkerConn, result: Result, now: float) -> None:
        job = self.jobs.get(result.job.uid)
        if job is None or job.phase.terminal:
            self.ledger.close(result.job)
            self._count("duplicate_result")
            return
        if now > job.deadline:  # timeoutSeconds bounds the job, whatever arrives between two ticks
            self.ledger.close(result.job)
            self.expire(now)
            return
        mismatch = answers.result_mismatch(job, result)
        if mismatch is not None:  # the attempt is spent; another worker (or this one) may answer properly
            self._count("malformed_result")
            log.warning("dropped a RESULT for %s from %s/%s: %s", result.job, conn.pool, conn.worker, mismatch.message)
            self.on_error(conn, mismatch, now)
            return
        self.placement.learn(job, conn, result)
        job.pool, job.worker, job.gpu = conn.pool, conn.worker, result.device or conn.device
        message = answers.record_output(job, result)
        metrics.labelled(metrics.E2E_SECONDS, conn.pool).observe(max(0.0, now - job.queued_at))
        self._finish(job, Phase.COMPLETED, "Succeeded", message, now, result=result)

    def on_error(self, conn: WorkerConn, error: Error, now: float) -> None:
        error = dataclasses.replace(error, message=redact(error.message))  # a worker's text never reaches status unredacted
        job = self.ledger.close(error.job)
        if job is None or job.phase.terminal or job.live:
            return  # gone, or another attempt is still out and will decide
        verdict = answers.judge(job, error, f"{conn.pool}/{conn.worker}")
        if verdict.action is Action.FAIL:
            self._finish(job, Phase.FAILED, verdict.reason, verdict.message, now)
        elif verdict.action is Action.RETRY:
            self._requeue(job, verdict.reason, verdict.message, now)
        else:
            if verdict.pause_worker:
                conn.paused_until = now + self.config.reject_pause_s
            job.resigned = job.resigned or verdict.resign
            job.reuse_attempt = error.job == job.current_attempt
            job.move(Phase.QUEUED, at=now, reason=verdict.reason, message=verdict.message)
            self._route(job, now, front=True)
            reports.changed(self.effects, job)

    def on_lost(self, routing_id: bytes, why: str, now: float, *, kick: bool = False) -> None:
        conn = self.sessions.get(routing_id)
        if conn is not None:
            self.registry.lose(conn, why, now, kick=kick)
            self.pump(now)

    def lost(self, conn: WorkerConn, why: str, pool: PoolState | None, now: float) -> None:
        for attempt in sorted(conn.attempts):
            job = self.ledger.close(attempt)
            if job is not None and not job.live and not job.phase.terminal:
                self._requeue(job, "WorkerLost", f"worker {conn.pool}/{conn.worker} {why} during attempt {job.attempts}", now)
        if pool is not None and not pool.workers:
            # Jobs waiting in this pool may now be better off elsewhere.
            for job in list(pool.queue):
                self._route(job, now)
                reports.changed(self.effects, job)

    # ---- time passing -----------------------------------------------------------------------------

    def tick(self, now: float, *, heartbeat: bool = True) -> None:
        """Liveness, deadlines, retries; then dispatch what can go."""
        self.registry.check(now, heartbeat=heartbeat)
        self.expire(now)
        self._give_up_overdue(now)
        for uid, retry_at in list(self.ledger.held.items()):
            if retry_at <= now:
                self._route(self.jobs[uid], now)
        for uid, give_up_at in list(self.ledger.resuming.items()):
            if give_up_at <= now:
                job = self.jobs[uid]
                job.reuse_attempt = False  # the worker that had it did not come back
                self._route(job, now)
        # Unrouted jobs are not looked at here: only a pool or a worker appearing can make one
        # routable (set_pool, joined), and one ImageJob per tick each would tax the heartbeat loop.
        self.pump(now)

    def expire(self, now: float) -> None:
        for job in list(self.ledger.past_deadline(now)):
            self._finish(job, Phase.FAILED, "Timeout",
                         f"not completed within timeoutSeconds={job.spec.timeout_s} (last phase {job.phase.value})", now)

    def _give_up_overdue(self, now: float) -> None:
        """Attempts whose answer is overdue end as the worker's ERROR would; a worker that never
        accepted is cut, since its heartbeats alone say nothing (answers.overdue_attempts)."""
        for conn, error in answers.overdue_attempts(list(self.sessions.values()), self.jobs, self.pools,
                                                    self.placement.expected_ms, now, self.config):
            self._count("overdue_attempt")
            log.warning("attempt %s on %s/%s: %s", error.job, conn.pool, conn.worker, error.message)
            self.effects.send(conn.routing_id, Cancel(error.job))
            self.on_error(conn, error, now)
            if error.code is ErrorCode.UNAVAILABLE:
                self.registry.lose(conn, "unresponsive (a JOB was never accepted)", now, kick=True)

    def _reroute_unrouted(self, now: float) -> None:
        """Route again every job no pool could take: after a change that may have made one eligible."""
        for job in list(self.ledger.unrouted.values()):
            self._route(job, now)
            if job.place is not Place.UNROUTED:
                reports.changed(self.effects, job)

    def _count(self, why: str) -> None:
        self.counters[why] = self.counters.get(why, 0) + 1
        metrics.REJECTED_MESSAGES.labels(why).inc()


def _timing(job: Job, result: Result | None, now: float) -> dict[str, float]:
    """Durations for the terminal status, with the timestamps made consistent with them.

    Stage times come from the worker (for a cached answer, the original ones). The
    worker's stages end when the result arrives, so they start `worker_ms` earlier; the
    dispatch and queue times fill what is left. Each timestamp is clamped into order, so
    queuedAt <= dispatchedAt <= startedAt <= completedAt and the parts add up to totalMs.
    """
    completed = now
    if result is None:
        dispatched = job.dispatched_at
        job.queued_at = min(job.queued_at, completed)
        if dispatched is not None:
            job.dispatched_at = min(max(dispatched, job.queued_at), completed)
        if job.started_at is not None:
            job.started_at = min(max(job.started_at, job.dispatched_at or job.queued_at), completed)
        return {"totalMs": round((completed - job.queued_at) * 1000.0, 3)}
    stages = result.timing
    started = completed - stages.worker_ms / 1000.0
    dispatched = min(job.dispatched_at if job.dispatched_at is not None else started, started)
    queued = min(job.queued_at, dispatched)
    job.queued_at, job.dispatched_at, job.started_at = queued, dispatched, started
    queue_ms = (dispatched - queued) * 1000.0 + stages.executor_wait_ms
    network_ms = (started - dispatched) * 1000.0
    return {
        # Queueing happens twice: in the operator, and on the worker waiting for its device.
        "queueMs": round(queue_ms, 3),
        "networkMs": round(network_ms, 3),
        **{key: round(value, 3) for key, value in stages.stages().items()},
        "totalMs": round((completed - queued) * 1000.0, 3),
    }


__all__ = ["Dispatcher", "DispatcherConfig", "Resume", "Signer", "protocol"]
