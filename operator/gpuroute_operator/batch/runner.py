"""Batch ImageJobs, carried out: list inputs, feed items to the dispatcher, journal and report.

One asyncio task per running batch. It lists the inputs page by page (in a thread),
hands items to the dispatcher in item groups (up to `group_items` items per dispatcher
job: one JOB, one RESULT) within a bounded window of items (so 50,000 inputs never sit
in the dispatcher at once), retries an item that failed for a retryable reason in a
later group, appends every finished item to a journal in object storage
(one part per flush, under the output prefix), and writes the batch's status every
few seconds: never one API write per item. The journal is the durable record: after
an operator restart the batch reads it back and skips every finished input.

The counting, manifest lines and ETA are pure (state.py), and so are the rules of which
items form the next group, retries, and when the journal and status are due (plan.py);
listing and journal I/O are in store.py; the rules of routing items are the dispatcher's,
since items are jobs. This module is the async shell around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from gpuroute_operator.batch.plan import BatchPlan, Entry, PlanConfig, Stop
from gpuroute_operator.batch.state import journal_part
from gpuroute_operator.batch.store import BatchStore, JournalCorrupt, StorageIOError, first
from gpuroute_operator.core import admission
from gpuroute_operator.core.dispatcher import Dispatcher
from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.grants import StorageGrants
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase, conditions
from gpuroute_operator.core.timestamps import now_rfc3339
from gpuroute_operator.kube.status_writer import StatusWriter
from gpuroute_operator.storage.presign import Presigner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """How a batch is fed and reported."""

    window: int = 512
    """Items handed to the dispatcher and not finished, per batch: bounds the operator's memory
    and how long an item waits in the queue."""
    group_items: int = 16
    """Items per item group (at most protocol.MAX_GROUP_ITEMS). Each group costs the operator
    one job's bookkeeping and two messages, whatever its size; 16 small images keep a CPU
    worker's slot busy for well under a second, so failover and cancellation stay prompt."""
    lookahead: int = 5000
    """Listed inputs held ahead of the window (keys only)."""
    status_period_s: float = 3.0
    """A running batch's status is written at most this often (its counts are not worth an
    API write per item)."""
    journal_period_s: float = 1.0
    """Finished items are appended to the journal this often: what a crash can lose (and
    then recompute, or answer from the worker's result cache)."""
    journal_lines: int = 2000
    """...or as soon as this many are waiting (PlanConfig.journal_lines)."""
    restart_grace_s: float = 2 * HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    """After the operator starts, a resumed batch waits this long for workers to register
    again, so the groups they still run or hold answers for are adopted rather than computed
    elsewhere: a worker notices the old leader's loss only after HEARTBEAT_LIVENESS silent
    intervals, then reconnects with backoff; twice that window leaves room on a busy machine
    (a group of 16 items recomputed costs far more than a few seconds' wait)."""
    listing_tries: int = 4
    """A failed listing page is tried this often (backing off) before the batch fails."""

    def plan(self) -> PlanConfig:
        return PlanConfig(window=self.window, group_items=self.group_items, lookahead=self.lookahead,
                          status_period_s=self.status_period_s, journal_period_s=self.journal_period_s,
                          journal_lines=self.journal_lines)


GrantsLookup = Callable[[str], Awaitable[StorageGrants]]


class BatchRun:
    """One batch ImageJob being processed: its plan and what the shell needs around it."""

    def __init__(self, plan: BatchPlan, *, resumed: bool) -> None:
        self.plan = plan
        self.ref = plan.ref
        self.resumed = resumed
        self.parts = 0
        """Journal parts written so far (the next is numbered one more)."""
        self.wake = asyncio.Event()
        self.stop: Stop | None = None
        self.task: asyncio.Task[None] | None = None
        self.conditions: list[dict[str, Any]] = []
        self.phase = Phase.QUEUED


class BatchRunner:
    def __init__(self, dispatcher: Dispatcher, writer: StatusWriter, presigner: Presigner, grants: GrantsLookup,
                 config: BatchConfig | None = None) -> None:
        self.dispatcher = dispatcher
        self.writer = writer
        self.store = BatchStore(presigner)
        self.grants = grants
        self.config = config or BatchConfig()
        self.runs: dict[str, BatchRun] = {}
        self._admitting: set[str] = set()
        """Batches whose grants are being read; a uid leaves it when deleted meanwhile."""
        self.started_at = time.monotonic()
        self.status_writes = 0

    def start(self) -> None:
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()
        for run in list(self.runs.values()):
            if run.task is not None:
                try:
                    await run.task
                except asyncio.CancelledError:
                    pass

    # ---- events from the ImageJob watch and the dispatcher -------------------------------------

    async def observe(self, body: Mapping[str, Any]) -> None:
        """Any event of a batch ImageJob except deletion; idempotent."""
        ref = admission.object_ref(body)
        if ref.uid in self._admitting:
            return
        run = self.runs.get(ref.uid)
        if run is not None:
            if admission.cancel_requested(body) and run.stop is None:
                run.stop = (Phase.CANCELLED, "CancelRequested", f"cancelled by annotation {admission.CANCEL_ANNOTATION}")
                run.wake.set()
            return
        if admission.is_ended(body):
            return
        self._admitting.add(ref.uid)
        try:
            grants = await self.grants(ref.namespace or "")
        finally:
            deleted = ref.uid not in self._admitting
            self._admitting.discard(ref.uid)
        if deleted:
            return  # deleted while grants loaded
        outcome = admission.admit_batch(body, grants, time.time())
        if isinstance(outcome, admission.Refused):
            self.writer.update(ref, outcome.status, urgent=True, terminal_event=outcome.event)
            return
        if isinstance(outcome, admission.Ended):
            return
        plan = BatchPlan(ref, outcome.generation, outcome.spec, grants, outcome.queued_at, self.config.plan())
        run = BatchRun(plan, resumed=outcome.resumed)
        self.runs[ref.uid] = run
        if outcome.cancel is not None:
            run.stop = (Phase.CANCELLED, "CancelRequested", outcome.cancel)
        run.task = asyncio.get_running_loop().create_task(self._run(run), name=f"batch-{ref.namespace}-{ref.name}")

    def forget(self, uid: str) -> bool:
        """The ImageJob was deleted; True if it was a batch. Its items stop, nothing more is written."""
        if uid in self._admitting:
            self._admitting.discard(uid)
            return True
        run = self.runs.pop(uid, None)
        if run is None:
            return False
        if run.task is not None:
            run.task.cancel()
        now = time.time()
        for group in run.plan.drop_outstanding():
            self.dispatcher.forget(group, now)
        self.writer.forget(run.ref)
        return True

    def on_item(self, job: Job, *, terminal: bool) -> None:
        """The dispatcher's report on one item group (effects.item): count it, never write per item."""
        run = self.runs.get(job.batch or "")
        if run is None:
            return
        if not terminal:
            run.plan.group_changed(job)
        elif run.plan.group_ended(job):
            run.wake.set()

    # ---- one batch --------------------------------------------------------------------------------

    async def _run(self, run: BatchRun) -> None:
        """One batch from start to end. Whatever goes wrong ends this batch alone, with a status:
        never the process, never a batch left without an end."""
        try:
            await self._carry_out(run)
        except asyncio.CancelledError:
            raise
        except StorageIOError as exc:
            log.warning("batch %s/%s: %s", run.ref.namespace, run.ref.name, exc)
            run.stop = (Phase.FAILED, "StorageUnavailable", str(exc))
        except JournalCorrupt as exc:
            log.warning("batch %s/%s: %s", run.ref.namespace, run.ref.name, exc)
            run.stop = (Phase.FAILED, "JournalCorrupt", f"{exc}; delete the journal or re-create the ImageJob")
        except Exception as exc:  # a bug must end in a status, never in a silent stuck batch
            log.exception("batch %s/%s failed", run.ref.namespace, run.ref.name)
            run.stop = (Phase.FAILED, "InternalError", f"{type(exc).__name__}: {exc}")
        try:
            await self._end(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the journal or manifest write itself failed oddly: report without them
            log.exception("batch %s/%s: ending it failed", run.ref.namespace, run.ref.name)
            self._end_without_storage(run, exc)

    async def _carry_out(self, run: BatchRun) -> None:
        plan = run.plan
        self._publish(run, time.time())
        found = await asyncio.to_thread(lambda: plan.resume(self.store.read_journal(plan.journal)))
        run.parts = await asyncio.to_thread(self.store.journal_parts, plan.journal)
        if found:
            log.info("batch %s/%s resumes: %d items already finished", run.ref.namespace, run.ref.name, found)
        if run.resumed:
            # Workers still running this batch's items re-register first, so those attempts are adopted.
            await asyncio.sleep(max(0.0, self.started_at + self.config.restart_grace_s - time.monotonic()))
        listing = self._listing(run)
        while run.stop is None:
            now = time.time()
            if (overdue := plan.overdue(now)) is not None:
                run.stop = overdue
                break
            await self._fill(run, listing, now)
            if run.stop is not None:
                break
            if plan.state.complete:
                run.stop = plan.state.ending()
                break
            await self._flush(run, now)
            if plan.status_due(now):
                self._publish(run, now)
            if plan.more_now():
                await asyncio.sleep(0)  # each round lists a page: I/O in a thread, never a busy loop
                continue
            run.wake.clear()
            try:
                async with asyncio.timeout(0.5):
                    await run.wake.wait()
            except TimeoutError:
                pass

    def _listing(self, run: BatchRun) -> Iterator[list[Entry]]:
        spec = run.plan.spec
        if spec.prefix is not None:
            return iter(self.store.list_prefix(spec.prefix, spec.match))
        assert spec.list_uri is not None
        return self.store.list_file(spec.list_uri)

    async def _fill(self, run: BatchRun, listing: Iterator[list[Entry]], now: float) -> None:
        plan = run.plan
        # Grants are read again each round (the lookup caches them for seconds): an admin's
        # revocation reaches the items of this batch not yet handed out, not only new batches.
        plan.grants = await self.grants(run.ref.namespace or "")
        while plan.wants_page():
            page = await self._page(listing)
            if page is None:
                plan.listing_done()
                break
            start = plan.add_page(page)
            if (refused := plan.too_many()) is not None:
                run.stop = refused
                return
            if start:
                break  # start work before the whole lookahead is listed
        while plan.has_room() and run.stop is None:
            job = plan.next_group(now)
            if job is None:
                break
            self.dispatcher.admit(job, now)

    async def _page(self, listing: Iterator[list[Entry]]) -> list[Entry] | None:
        for attempt in range(1, self.config.listing_tries + 1):
            try:
                page: list[Entry] | None = await asyncio.to_thread(first, listing)
                return page
            except StorageIOError:
                if attempt == self.config.listing_tries:
                    raise
                await asyncio.sleep(attempt)
        return None

    async def _flush(self, run: BatchRun, now: float, *, force: bool = False) -> None:
        lines = run.plan.take_lines(now, force=force)
        if not lines:
            return
        part = journal_part(run.plan.journal, run.parts + 1)
        try:
            await asyncio.to_thread(self.store.write, part, "".join(f"{line}\n" for line in lines))
        except StorageIOError as exc:
            run.plan.unwritten(lines)  # kept for the next flush
            log.warning("batch %s/%s: journal not written, retrying: %s", run.ref.namespace, run.ref.name, exc)
            if force:
                raise
            return
        run.parts += 1

    async def _end(self, run: BatchRun) -> None:
        assert run.stop is not None
        phase, reason, message = run.stop
        now = time.time()
        for uid in run.plan.drop_outstanding():
            self.dispatcher.cancel(uid, f"batch ended: {reason}", now)
        try:
            await self._flush(run, now, force=True)
            await asyncio.to_thread(self.store.write_manifest, run.plan.journal, run.plan.results)
        except StorageIOError as exc:
            if phase is Phase.COMPLETED:
                phase, reason = Phase.FAILED, "StorageUnavailable"
            message = f"{message}; results manifest not written: {exc}"
        run.phase = phase
        run.conditions = conditions(phase, reason=reason, message=message, now=now_rfc3339(now),
                                    generation=run.plan.generation, previous=run.conditions)
        status = self._status(run, now, reason, message)
        self.writer.update(run.ref, status, urgent=True,
                           terminal_event=TerminalEvent(phase.value if phase is not Phase.FAILED else reason, message,
                                                        warning=phase is Phase.FAILED))
        self.status_writes += 1
        self.runs.pop(run.ref.uid, None)
        log.info("batch %s/%s ended %s (%s): %s", run.ref.namespace, run.ref.name, phase.value, reason, message)

    def _end_without_storage(self, run: BatchRun, exc: Exception) -> None:
        assert run.stop is not None
        now = time.time()
        for uid in run.plan.drop_outstanding():
            self.dispatcher.cancel(uid, "batch ended: InternalError", now)
        _, reason, message = run.stop
        if reason not in ("InternalError", "JournalCorrupt", "StorageUnavailable"):
            reason = "InternalError"
        message = f"{message}; ending it failed too: {type(exc).__name__}: {exc}"
        run.phase = Phase.FAILED
        run.conditions = conditions(Phase.FAILED, reason=reason, message=message, now=now_rfc3339(now),
                                    generation=run.plan.generation, previous=run.conditions)
        self.runs.pop(run.ref.uid, None)
        self.writer.update(run.ref, self._status(run, now, reason, message), urgent=True,
                           terminal_event=TerminalEvent(reason, message, warning=True))

    def _publish(self, run: BatchRun, now: float) -> None:
        state = run.plan.state
        phase = Phase.PROCESSING if state.running or state.finished else Phase.QUEUED
        if phase is not run.phase or not run.conditions:
            run.phase = phase
            run.conditions = conditions(phase, reason=phase.value, message="", now=now_rfc3339(now),
                                        generation=run.plan.generation, previous=run.conditions)
        message = ("listing inputs" if not state.listing_complete and not state.finished
                   else f"{state.finished} of {state.total} items finished")
        self.writer.update(run.ref, self._status(run, now, phase.value, message))
        run.plan.last_status = now
        self.status_writes += 1

    def _status(self, run: BatchRun, now: float, reason: str, message: str) -> dict[str, Any]:
        state = run.plan.state
        timing: dict[str, Any] = {"queuedAt": now_rfc3339(state.queued_at)}
        if run.phase.terminal:
            timing.update(completedAt=now_rfc3339(now), totalMs=round((now - state.queued_at) * 1000.0, 3))
        return {"phase": run.phase.value, "reason": reason, "message": message, "conditions": run.conditions,
                "observedGeneration": run.plan.generation, "timing": timing, **state.status(now)}
