"""Batch ImageJobs, carried out: list inputs, feed items to the dispatcher, journal and report.

One asyncio task per running batch. It lists the inputs page by page (in a thread),
hands items to the dispatcher in item groups (up to `group_items` items per dispatcher
job: one JOB, one RESULT) within a bounded window of items (so 50,000 inputs never sit
in the dispatcher at once), retries an item that failed for a retryable reason in a
later group, appends every finished item to a journal in object storage
(one part per flush, under the output prefix), and writes the batch's status every
few seconds: never one API write per item. The journal is the durable record: after
an operator restart the batch reads it back and skips every finished input.

The counting, manifest lines and ETA are pure (batch.py); listing and journal I/O are
in batch_io.py; the rules of routing items are the dispatcher's, since items are jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, ItemAnswer
from gpuroute_operator.batch.state import (
    BatchState,
    ItemOutcome,
    ItemVerdict,
    group_cell,
    group_spec,
    group_uid,
    journal_part,
    journal_prefix,
    judge_item,
    results_uri,
)
from gpuroute_operator.batch.store import BatchStore, StorageIOError, first
from gpuroute_operator.core import admission
from gpuroute_operator.core.dispatcher import Dispatcher
from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.grants import READ_ANNOTATION, WRITE_ANNOTATION, StorageGrants
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase, conditions
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import BatchSpec, SpecError, StorageURI, item_output, parse_batch_spec
from gpuroute_operator.core.timestamps import now_rfc3339, parse_rfc3339
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
    restart_grace_s: float = 2 * HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    """After the operator starts, a resumed batch waits this long for workers to register
    again, so the groups they still run or hold answers for are adopted rather than computed
    elsewhere: a worker notices the old leader's loss only after HEARTBEAT_LIVENESS silent
    intervals, then reconnects with backoff; twice that window leaves room on a busy machine
    (a group of 16 items recomputed costs far more than a few seconds' wait)."""
    listing_tries: int = 4
    """A failed listing page is tried this often (backing off) before the batch fails."""


GrantsLookup = Callable[[str], Awaitable[StorageGrants]]


@dataclass(frozen=True)
class Listed:
    """One item on its way: its place in the listing, its input and its output."""

    position: int
    """Index in the listing order (fixes the item's group cell)."""
    source: StorageURI
    """The input."""
    output: StorageURI
    """Where its output goes."""


class BatchRun:
    """One batch ImageJob being processed."""

    def __init__(self, ref: ObjectRef, generation: int, spec: BatchSpec, grants: StorageGrants, state: BatchState,
                 *, resumed: bool) -> None:
        self.ref = ref
        self.generation = generation
        self.spec = spec
        self.grants = grants
        self.state = state
        self.resumed = resumed
        self.deadline = state.queued_at + spec.timeout_s
        self.outstanding: dict[str, tuple[Listed, ...]] = {}
        """Group uid -> its items, for groups the dispatcher has."""
        self.items_out = 0
        """Items in `outstanding`."""
        self.pending: deque[tuple[int, StorageURI | SpecError]] = deque()
        """Listed items not yet handed out, with their position in the listing."""
        self.again: deque[Listed] = deque()
        """Items to run again in a later group (a retryable failure), in listing order."""
        self.spent: dict[str, int] = {}
        """Input URI -> attempts its groups spent on it so far (this run)."""
        self.seen: set[str] = set()
        """Input URIs listed so far in this run: a repeated line is not another item."""
        self.lines: list[str] = []
        """Journal lines not yet written."""
        self.parts = 0
        self.wake = asyncio.Event()
        self.stop: tuple[Phase, str, str] | None = None
        self.task: asyncio.Task[None] | None = None
        self.conditions: list[dict[str, Any]] = []
        self.phase = Phase.QUEUED
        self.journal = journal_prefix(spec.output_prefix, ref.uid)
        self.results = results_uri(spec.output_prefix, ref.name)
        self.last_status = float("-inf")
        self.last_flush = float("-inf")


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
        self._refill = max(1, self.config.window // 8)
        """Free window slots that are worth waking a batch's loop for."""

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
        raw_status = body.get("status")
        status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
        if status.get("phase") in (Phase.COMPLETED.value, Phase.FAILED.value, Phase.CANCELLED.value):
            return
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 1)
        now = time.time()
        timing = status.get("timing") if isinstance(status.get("timing"), Mapping) else {}
        queued_at = min(parse_rfc3339((timing or {}).get("queuedAt")) or now, now)
        self._admitting.add(ref.uid)
        try:
            grants = await self.grants(ref.namespace or "")
            spec = parse_batch_spec(body.get("spec"))
            _check_grants(spec, grants, ref.namespace or "")
        except SpecError as exc:
            if ref.uid not in self._admitting:
                return  # deleted while grants loaded
            self._admitting.discard(ref.uid)
            refused = admission.refuse(ref, exc, generation=generation, queued_at=queued_at, now=time.time())
            self.writer.update(ref, refused.status, urgent=True, terminal_event=refused.event)
            return
        if ref.uid not in self._admitting:
            return  # deleted while grants loaded
        self._admitting.discard(ref.uid)
        state = BatchState(queued_at, results_uri(spec.output_prefix, ref.name).uri)
        run = BatchRun(ref, generation, spec, grants, state, resumed=bool(status.get("phase")))
        self.runs[ref.uid] = run
        if admission.cancel_requested(body):
            run.stop = (Phase.CANCELLED, "CancelRequested", f"cancelled by annotation {admission.CANCEL_ANNOTATION}")
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
        for uid in list(run.outstanding):
            self.dispatcher.forget(uid, now)
        run.outstanding.clear()
        self.writer.forget(run.ref)
        return True

    def on_item(self, job: Job, *, terminal: bool) -> None:
        """The dispatcher's report on one item group (effects.item): count it, never write per item."""
        run = self.runs.get(job.batch or "")
        if run is None:
            return
        if not terminal:
            entry = run.outstanding.get(job.uid)
            if entry is not None:
                run.state.track(job.uid, job.phase, len(entry))
            return
        items = run.outstanding.pop(job.uid, None)
        if items is None:
            return
        run.items_out -= len(items)
        run.state.untrack(job.uid)
        if job.phase is not Phase.CANCELLED:  # a cancelled item is not done: a resumed batch would run it
            answers: tuple[ItemAnswer | None, ...] = job.item_answers or (None,) * len(items)
            for item, answer in zip(items, answers, strict=True):
                self._settle(run, job, item, answer)
        # Woken once a refill's worth of the window is free (or nothing is out), not per group:
        # the groups still queued keep the workers busy meanwhile, and the loop's own 0.5 s tick
        # flushes the journal and writes status.
        if run.items_out <= self.config.window - self._refill or not run.outstanding:
            run.wake.set()

    def _settle(self, run: BatchRun, group: Job, item: Listed, answer: ItemAnswer | None) -> None:
        """One item of a group that ended: done, failed, or queued again for a later group."""
        source = item.source.uri
        spent = run.spent.get(source, 0) + max(1, group.attempts)
        verdict = judge_item(answer, spent, run.spec.item.max_attempts)
        if verdict is ItemVerdict.NOT_DONE:
            return
        if verdict is ItemVerdict.AGAIN:
            run.spent[source] = spent
            run.again.append(item)
            return
        run.spent.pop(source, None)
        reason = error = ""
        if verdict is ItemVerdict.EXHAUSTED and answer is not None:
            reason, error = "MaxAttemptsExceeded", f"no attempt succeeded after {spent} attempts; last: {answer.message}"
        outcome = ItemOutcome.from_answer(group, answer, source, item.output.uri, attempts=spent, reason=reason,
                                          error=error)
        run.lines.append(run.state.record(outcome))

    # ---- one batch --------------------------------------------------------------------------------

    async def _run(self, run: BatchRun) -> None:
        try:
            self._publish(run, time.time())
            found = await asyncio.to_thread(lambda: run.state.resume(self.store.read_journal(run.journal)))
            run.parts = await asyncio.to_thread(self.store.journal_parts, run.journal)
            if found:
                log.info("batch %s/%s resumes: %d items already finished", run.ref.namespace, run.ref.name, found)
            if run.resumed:
                # Workers still running this batch's items re-register first, so those attempts are adopted.
                await asyncio.sleep(max(0.0, self.started_at + self.config.restart_grace_s - time.monotonic()))
            listing = self._listing(run)
            while run.stop is None:
                now = time.time()
                if now > run.deadline:
                    run.stop = (Phase.FAILED, "Timeout", f"not completed within timeoutSeconds={run.spec.timeout_s}: "
                                f"{run.state.finished} of {run.state.total} items finished")
                    break
                await self._fill(run, listing, now)
                if run.state.complete:
                    run.stop = run.state.ending()
                    break
                await self._flush(run, now)
                if now - run.last_status >= self.config.status_period_s:
                    self._publish(run, now)
                run.wake.clear()
                try:
                    async with asyncio.timeout(0.5):
                        await run.wake.wait()
                except TimeoutError:
                    pass
            await self._end(run)
        except asyncio.CancelledError:
            raise
        except StorageIOError as exc:
            log.warning("batch %s/%s: %s", run.ref.namespace, run.ref.name, exc)
            run.stop = (Phase.FAILED, "StorageUnavailable", str(exc))
            await self._end(run)
        except Exception as exc:  # a bug must end in a status, never in a silent stuck batch
            log.exception("batch %s/%s failed", run.ref.namespace, run.ref.name)
            run.stop = (Phase.FAILED, "InternalError", f"{type(exc).__name__}: {exc}")
            await self._end(run)

    def _listing(self, run: BatchRun) -> Iterator[list[StorageURI | SpecError]]:
        if run.spec.prefix is not None:
            return iter(self.store.list_prefix(run.spec.prefix, run.spec.match))
        assert run.spec.list_uri is not None
        return self.store.list_file(run.spec.list_uri)

    async def _fill(self, run: BatchRun, listing: Iterator[list[StorageURI | SpecError]], now: float) -> None:
        state = run.state
        while not state.listing_complete and len(run.pending) < self.config.lookahead:
            page = await self._page(run, listing)
            if page is None:
                state.listing_complete = True
                break
            run.pending.extend(enumerate(page, start=state.listed))
            state.listed += len(page)
            if run.items_out < self.config.window // 2 and self._whole_cell_pending(run):
                break  # start work before the whole lookahead is listed
        while run.items_out < self.config.window and run.stop is None:
            group = self._next_group(run, now)
            if group is None:
                break
            if group:
                self._admit(run, group, now)

    async def _page(self, run: BatchRun, listing: Iterator[list[StorageURI | SpecError]]) -> list[StorageURI | SpecError] | None:
        for attempt in range(1, self.config.listing_tries + 1):
            try:
                page: list[StorageURI | SpecError] | None = await asyncio.to_thread(first, listing)
                return page
            except StorageIOError:
                if attempt == self.config.listing_tries:
                    raise
                await asyncio.sleep(attempt)
        return None

    def _whole_cell_pending(self, run: BatchRun) -> bool:
        """The pending items hold at least one whole group cell (or the listing is done)."""
        if run.state.listing_complete or not run.pending:
            return True
        size = self.config.group_items
        return group_cell(run.pending[0][0], size) != group_cell(run.pending[-1][0], size)

    def _next_group(self, run: BatchRun, now: float) -> list[Listed] | None:
        """The next group's items: retries first, then listed items, one group cell at a time.
        None when nothing can go now; an empty list when a cell had nothing left to run."""
        size = self.config.group_items
        if run.again:
            cell = group_cell(run.again[0].position, size)
            group: list[Listed] = []
            while run.again and group_cell(run.again[0].position, size) == cell and len(group) < size:
                group.append(run.again.popleft())
            return group
        if not run.pending or not self._whole_cell_pending(run):
            return None  # nothing listed, or the rest of this cell is on the next page
        cell = group_cell(run.pending[0][0], size)
        group = []
        while run.pending and group_cell(run.pending[0][0], size) == cell:
            position, entry = run.pending.popleft()
            item = self._checked(run, position, entry, now)
            if item is not None:
                group.append(item)
        return group

    def _checked(self, run: BatchRun, position: int, entry: StorageURI | SpecError, now: float) -> Listed | None:
        """A listed entry as an item to run; None when it is done already, or ends here (its
        manifest line written): a bad list line, storage the namespace was not granted."""
        state = run.state
        if isinstance(entry, SpecError):
            run.lines.append(state.record(ItemOutcome(input=f"({entry.field})", output="", ok=False,
                                                      reason=entry.reason, error=str(entry), completed_at=now)))
            return None
        source = entry.uri
        if source in run.seen:
            state.listed -= 1  # a list object named it twice: one item
            return None
        run.seen.add(source)
        if source in state.done:
            return None  # finished before a restart
        output = item_output(run.spec, entry)
        problem = ""
        if not run.grants.may_read(source):
            problem = f"{source} is outside the read prefixes granted ({READ_ANNOTATION})"
        elif not run.grants.may_write(output.uri):
            problem = f"{output.uri} is outside the write prefixes granted ({WRITE_ANNOTATION})"
        if problem:
            run.lines.append(state.record(ItemOutcome(input=source, output=output.uri, ok=False,
                                                      reason="StorageNotGranted", error=problem, completed_at=now)))
            return None
        return Listed(position, entry, output)

    def _admit(self, run: BatchRun, group: list[Listed], now: float) -> None:
        retry = max(run.spent.get(item.source.uri, 0) for item in group)
        uid = group_uid(run.ref.uid, [item.source.uri for item in group], retry)
        # The worker bounds each item by itemTimeoutSeconds from when it starts it, so a group
        # ends within a few of them once running; a group waiting in a queue must not expire
        # for that, so the group itself is bounded by the batch's deadline alone.
        timeout = int(max(1.0, run.deadline - now))
        spec = group_spec(run.spec, [(item.source, item.output) for item in group], timeout)
        job = Job(uid, run.ref.namespace or "", run.ref.name, run.generation, spec, queued_at=now, batch=run.ref.uid)
        # Tracked before admit: the dispatcher may end it at once (storage it cannot sign).
        run.outstanding[uid] = tuple(group)
        run.items_out += len(group)
        run.state.track(uid, Phase.QUEUED, len(group))
        self.dispatcher.admit(job, now)

    async def _flush(self, run: BatchRun, now: float, *, force: bool = False) -> None:
        if not run.lines or (not force and now - run.last_flush < self.config.journal_period_s):
            return
        lines, run.lines = run.lines, []
        run.last_flush = now
        part = journal_part(run.journal, run.parts + 1)
        try:
            await asyncio.to_thread(self.store.write, part, "".join(f"{line}\n" for line in lines))
        except StorageIOError as exc:
            run.lines = lines + run.lines  # kept for the next flush
            log.warning("batch %s/%s: journal not written, retrying: %s", run.ref.namespace, run.ref.name, exc)
            if force:
                raise
            return
        run.parts += 1

    async def _end(self, run: BatchRun) -> None:
        assert run.stop is not None
        phase, reason, message = run.stop
        now = time.time()
        for uid in list(run.outstanding):
            self.dispatcher.cancel(uid, f"batch ended: {reason}", now)
        run.outstanding.clear()
        run.pending.clear()
        run.again.clear()
        try:
            await self._flush(run, now, force=True)
            await asyncio.to_thread(self.store.write_manifest, run.journal, run.results)
        except StorageIOError as exc:
            if phase is Phase.COMPLETED:
                phase, reason = Phase.FAILED, "StorageUnavailable"
            message = f"{message}; results manifest not written: {exc}"
        run.phase = phase
        run.conditions = conditions(phase, reason=reason, message=message, now=now_rfc3339(now),
                                    generation=run.generation, previous=run.conditions)
        status = self._status(run, now, reason, message)
        self.writer.update(run.ref, status, urgent=True,
                           terminal_event=TerminalEvent(phase.value if phase is not Phase.FAILED else reason, message,
                                                        warning=phase is Phase.FAILED))
        self.status_writes += 1
        self.runs.pop(run.ref.uid, None)
        log.info("batch %s/%s ended %s (%s): %s", run.ref.namespace, run.ref.name, phase.value, reason, message)

    def _publish(self, run: BatchRun, now: float) -> None:
        phase = Phase.PROCESSING if run.state.running or run.state.finished else Phase.QUEUED
        if phase is not run.phase or not run.conditions:
            run.phase = phase
            run.conditions = conditions(phase, reason=phase.value, message="", now=now_rfc3339(now),
                                        generation=run.generation, previous=run.conditions)
        message = ("listing inputs" if not run.state.listing_complete and not run.state.finished
                   else f"{run.state.finished} of {run.state.total} items finished")
        self.writer.update(run.ref, self._status(run, now, phase.value, message))
        run.last_status = now
        self.status_writes += 1

    def _status(self, run: BatchRun, now: float, reason: str, message: str) -> dict[str, Any]:
        timing: dict[str, Any] = {"queuedAt": now_rfc3339(run.state.queued_at)}
        if run.phase.terminal:
            timing.update(completedAt=now_rfc3339(now), totalMs=round((now - run.state.queued_at) * 1000.0, 3))
        return {"phase": run.phase.value, "reason": reason, "message": message, "conditions": run.conditions,
                "observedGeneration": run.generation, "timing": timing, **run.state.status(now)}


def _check_grants(spec: BatchSpec, grants: StorageGrants, namespace: str) -> None:
    source_field, source = (("spec.input.prefix", spec.prefix) if spec.prefix is not None
                            else ("spec.input.list", spec.list_uri))
    assert source is not None
    if not grants.may_read(source.uri):
        raise SpecError(source_field, f"{source.uri} is outside the read prefixes granted to namespace {namespace!r} "
                        f"({READ_ANNOTATION}: {', '.join(grants.read) or 'none'})", "StorageNotGranted")
    if not grants.may_write(spec.output_prefix.uri):
        raise SpecError("spec.output.prefix", f"{spec.output_prefix.uri} is outside the write prefixes granted to "
                        f"namespace {namespace!r} ({WRITE_ANNOTATION}: {', '.join(grants.write) or 'none'})",
                        "StorageNotGranted")
