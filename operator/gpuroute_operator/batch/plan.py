"""The rules of carrying out one batch (pure: no asyncio, no I/O; the clock is passed in).

A BatchPlan holds what a running batch has listed and not yet handed out, what the
dispatcher holds of it, and which items run again: the shell (runner.py) feeds it listing
pages, asks it for the next item group, hands the group's Job to the dispatcher, reports
each group's end back, and asks it when the journal and the status are due. The window
bounds the items out at once; groups are cut from fixed cells of the listing order, so
after a restart the unfinished items of a cell form the same group (and uid) again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpuroute.protocol import ItemAnswer
from gpuroute_operator.batch.digests import DigestSet
from gpuroute_operator.batch.state import (
    BatchState,
    ItemOutcome,
    group_cell,
    group_spec,
    group_uid,
    journal_prefix,
    results_uri,
)
from gpuroute_operator.core.answers import ItemVerdict, judge_item
from gpuroute_operator.core.grants import READ_ANNOTATION, WRITE_ANNOTATION, StorageGrants
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import (
    MAX_ITEMS_CAP,
    BatchSpec,
    SpecError,
    StorageURI,
    item_output,
    parse_storage_uri,
    under_prefix,
)

Entry = StorageURI | SpecError
"""One listed line: an input, or a list-object line that is none (it fails alone)."""
Stop = tuple[Phase, str, str]
"""How a batch ends: phase, reason, message."""
COLLISION = "OutputCollision"
"""Reason of an item whose output name an earlier input of the batch has taken."""


@dataclass(frozen=True)
class PlanConfig:
    """How a batch is fed: the window, group size, lookahead and how often it reports."""

    window: int = 512
    """Items handed to the dispatcher and not finished, per batch: bounds the operator's memory
    and how long an item waits in the queue."""
    group_items: int = 16
    """Items per item group (at most protocol.MAX_GROUP_ITEMS)."""
    lookahead: int = 5000
    """Listed inputs held ahead of the window (keys only)."""
    status_period_s: float = 3.0
    """A running batch's status is written at most this often."""
    journal_period_s: float = 1.0
    """Finished items are appended to the journal this often."""
    journal_lines: int = 2000
    """...or as soon as this many are waiting: items that end without a group (not granted,
    a bad list line) end by the thousand, and the lines held must not grow with the batch."""


@dataclass(frozen=True)
class Listed:
    """One item on its way: its place in the listing, its input and its output."""

    position: int
    """Index in the listing order (fixes the item's group cell)."""
    source: StorageURI
    """The input."""
    output: StorageURI
    """Where its output goes."""


class BatchPlan:
    """One batch's items between the listing and the journal; mutable on purpose (one per batch)."""

    def __init__(self, ref: ObjectRef, generation: int, spec: BatchSpec, grants: StorageGrants, queued_at: float,
                 config: PlanConfig | None = None) -> None:
        self.ref = ref
        self.generation = generation
        self.spec = spec
        self.grants = grants
        """The namespace's storage grants every item is checked against when its group is cut
        (retries too); the shell refreshes them before each round, so a revoked prefix stops
        getting signed URLs for the items not yet handed out."""
        self.config = config or PlanConfig()
        self.state = BatchState(queued_at, results_uri(spec.output_prefix, ref.name).uri)
        self.deadline = queued_at + spec.timeout_s
        self.journal = journal_prefix(spec.output_prefix, ref.uid)
        self.results = results_uri(spec.output_prefix, ref.name)
        self.outstanding: dict[str, tuple[Listed, ...]] = {}
        """Group uid -> its items, for groups the dispatcher has."""
        self.items_out = 0
        """Items in `outstanding`."""
        self.pending: deque[tuple[int, Entry]] = deque()
        """Listed items not yet handed out, with their position in the listing."""
        self.again: deque[Listed] = deque()
        """Items to run again in a later group (a retryable failure), in listing order."""
        self.spent: dict[str, int] = {}
        """Input URI -> attempts its groups spent on it so far (this run)."""
        self.seen: DigestSet | None = DigestSet() if spec.list_uri is not None else None
        """A list object's input URIs listed so far in this run (by digest): a repeated line is
        not another item. None for a prefix: a listing names each object once."""
        self.outputs = DigestSet()
        """Output URIs taken by the inputs listed so far (by digest), finished before a restart
        or not: two inputs whose names differ only in extension (`a.jpg`, `a.png`) name the same
        output, and the later one in the listing order fails rather than overwrite it."""
        self.lines: list[str] = []
        """Journal lines not yet written."""
        self.last_status = float("-inf")
        self.last_flush = float("-inf")
        self._refill = max(1, self.config.window // 8)
        """Free window slots that are worth waking the batch's loop for."""

    def resume(self, lines: Iterable[str]) -> int:
        """Take in the journal written before a restart: its items are not run again, and the
        outputs they took stay taken (so the same input wins a clash after the restart)."""
        return self.state.resume(lines, self._taken)

    def _taken(self, outcome: ItemOutcome) -> None:
        if outcome.reason == COLLISION or outcome.input.startswith("("):
            return  # a clash lost, or a list line that was no URI: took no output
        try:
            source = parse_storage_uri(outcome.input, "journal")
        except SpecError:
            return
        self.outputs.add(item_output(self.spec, source).uri)

    # ---- listing -------------------------------------------------------------------------------

    def wants_page(self) -> bool:
        """Another listing page is worth reading now."""
        return not self.state.listing_complete and len(self.pending) < self.config.lookahead

    def add_page(self, page: Sequence[Entry]) -> bool:
        """A listing page came in; True when work should start before more is listed."""
        self.pending.extend(enumerate(page, start=self.state.listed))
        self.state.listed += len(page)
        return self.items_out < self.config.window // 2 and self.whole_cell_pending()

    def too_many(self) -> Stop | None:
        """Failed as TooManyItems once the listing passes spec.input.maxItems, or None."""
        if self.state.listed <= self.spec.max_items:
            return None
        return (Phase.FAILED, "TooManyItems", f"the input lists more than spec.input.maxItems={self.spec.max_items} "
                f"items; split it into several batches or raise spec.input.maxItems (at most {MAX_ITEMS_CAP})")

    def listing_done(self) -> None:
        self.state.listing_complete = True

    def whole_cell_pending(self) -> bool:
        """The pending items hold at least one whole group cell (or the listing is done)."""
        if self.state.listing_complete or not self.pending:
            return True
        size = self.config.group_items
        return group_cell(self.pending[0][0], size) != group_cell(self.pending[-1][0], size)

    # ---- groups --------------------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.items_out < self.config.window

    def more_now(self) -> bool:
        """The window has room and the listing goes on: list and hand out more now rather than
        wait for a group to end (items that end without a group, finished before a restart or
        not granted, never wake the loop)."""
        return self.has_room() and not self.state.listing_complete

    def next_group(self, now: float) -> Job | None:
        """The next item group to hand to the dispatcher, tracked as out already (the dispatcher
        may end it at once); None when nothing can go now."""
        while True:
            group = self._next_items(now)
            if group is None:
                return None
            if group:
                return self._group_job(group, now)

    def _next_items(self, now: float) -> list[Listed] | None:
        """Retries first, then listed items, one group cell at a time. None when nothing can go
        now; an empty list when a cell had nothing left to run."""
        size = self.config.group_items
        if self.again:
            cell = group_cell(self.again[0].position, size)
            group: list[Listed] = []
            while self.again and group_cell(self.again[0].position, size) == cell and len(group) < size:
                retry = self.again.popleft()
                if self._still_granted(retry, now):
                    group.append(retry)
            return group
        if not self.pending or not self.whole_cell_pending():
            return None  # nothing listed, or the rest of this cell is on the next page
        cell = group_cell(self.pending[0][0], size)
        group = []
        while self.pending and group_cell(self.pending[0][0], size) == cell:
            position, entry = self.pending.popleft()
            item = self._checked(position, entry, now)
            if item is not None:
                group.append(item)
        return group

    def _checked(self, position: int, entry: Entry, now: float) -> Listed | None:
        """A listed entry as an item to run; None when it is done already, or ends here (its
        manifest line written): a bad list line, storage the namespace was not granted."""
        state = self.state
        if isinstance(entry, SpecError):
            self.lines.append(state.record(ItemOutcome(input=f"({entry.field})", output="", ok=False,
                                                       reason=entry.reason, error=str(entry), completed_at=now)))
            return None
        source = entry.uri
        if self.seen is not None and not self.seen.add(source):
            state.listed -= 1  # a list object named it twice: one item
            return None
        if len(state.done) and source in state.done:
            return None  # finished before a restart
        output = item_output(self.spec, entry)
        reason = problem = ""
        if under_prefix(entry, self.spec.output_prefix):
            reason, problem = "InputUnderOutput", (f"{source} lies under spec.output.prefix "
                                                   f"{self.spec.output_prefix.uri}: outputs could overwrite it")
        elif not self.outputs.add(output.uri):
            reason, problem = COLLISION, (f"{output.uri} is already the output of an input listed before {source} "
                                          "(outputs keep the input's name, not its extension)")
        else:
            reason, problem = "StorageNotGranted", self._not_granted(source, output.uri)
        if problem:
            self.lines.append(state.record(ItemOutcome(input=source, output=output.uri, ok=False,
                                                       reason=reason, error=problem, completed_at=now)))
            return None
        return Listed(position, entry, output)

    def _still_granted(self, item: Listed, now: float) -> bool:
        """A retry is checked against the grants again: they may have been revoked since its
        first group, and a new group gets freshly signed URLs."""
        problem = self._not_granted(item.source.uri, item.output.uri)
        if problem:
            attempts = self.spent.pop(item.source.uri, 0)
            self.lines.append(self.state.record(ItemOutcome(
                input=item.source.uri, output=item.output.uri, ok=False, reason="StorageNotGranted", error=problem,
                attempts=attempts, completed_at=now)))
        return not problem

    def _not_granted(self, source: str, output: str) -> str:
        """Why the namespace's grants do not cover an item, or ""."""
        if not self.grants.may_read(source):
            return f"{source} is outside the read prefixes granted ({READ_ANNOTATION})"
        if not self.grants.may_write(output):
            return f"{output} is outside the write prefixes granted ({WRITE_ANNOTATION})"
        return ""

    def _group_job(self, group: list[Listed], now: float) -> Job:
        retry = max(self.spent.get(item.source.uri, 0) for item in group)
        uid = group_uid(self.ref.uid, [item.source.uri for item in group], retry)
        # The worker bounds each item by itemTimeoutSeconds from when it starts it, so a group
        # ends within a few of them once running; a group waiting in a queue must not expire
        # for that, so the group itself is bounded by the batch's deadline alone.
        timeout = int(max(1.0, self.deadline - now))
        spec = group_spec(self.spec, [(item.source, item.output) for item in group], timeout)
        job = Job(uid, self.ref.namespace or "", self.ref.name, self.generation, spec, queued_at=now,
                  batch=self.ref.uid)
        self.outstanding[uid] = tuple(group)
        self.items_out += len(group)
        self.state.track(uid, Phase.QUEUED, len(group))
        return job

    def group_changed(self, job: Job) -> None:
        """A group the dispatcher holds changed phase (not terminal)."""
        entry = self.outstanding.get(job.uid)
        if entry is not None:
            self.state.track(job.uid, job.phase, len(entry))

    def group_ended(self, job: Job) -> bool:
        """A group ended: each of its items done, failed, or queued again. True when the batch's
        loop is worth waking: a refill's worth of the window is free, or nothing is out (not per
        group: the groups still queued keep the workers busy meanwhile)."""
        items = self.outstanding.pop(job.uid, None)
        if items is None:
            return False
        self.items_out -= len(items)
        self.state.untrack(job.uid)
        if job.phase is not Phase.CANCELLED:  # a cancelled item is not done: a resumed batch would run it
            answers: tuple[ItemAnswer | None, ...] = job.item_answers or (None,) * len(items)
            for item, answer in zip(items, answers, strict=True):
                self._settle(job, item, answer)
        return self.items_out <= self.config.window - self._refill or not self.outstanding

    def _settle(self, group: Job, item: Listed, answer: ItemAnswer | None) -> None:
        """One item of a group that ended: done, failed, or queued again for a later group."""
        source = item.source.uri
        spent = self.spent.get(source, 0) + max(1, group.attempts)
        verdict = judge_item(answer, spent, self.spec.item.max_attempts)
        if verdict is ItemVerdict.NOT_DONE:
            return
        if verdict is ItemVerdict.AGAIN:
            self.spent[source] = spent
            self.again.append(item)
            return
        self.spent.pop(source, None)
        reason = error = ""
        if verdict is ItemVerdict.EXHAUSTED and answer is not None:
            reason, error = "MaxAttemptsExceeded", f"no attempt succeeded after {spent} attempts; last: {answer.message}"
        outcome = ItemOutcome.from_answer(group, answer, source, item.output.uri, attempts=spent, reason=reason,
                                          error=error)
        self.lines.append(self.state.record(outcome))

    def drop_outstanding(self) -> list[str]:
        """The batch ends or is deleted: the uids of the groups the dispatcher still has; nothing
        more is handed out."""
        uids = list(self.outstanding)
        self.outstanding.clear()
        self.pending.clear()
        self.again.clear()
        self.spent.clear()
        # Nothing is listed or resumed any more: the digests go before the manifest is written.
        for digests in (self.seen, self.outputs, self.state.done):
            if digests is not None:
                digests.clear()
        return uids

    # ---- when to end, write and report ------------------------------------------------------

    def overdue(self, now: float) -> Stop | None:
        """Failed by its deadline, or None."""
        if now <= self.deadline:
            return None
        return (Phase.FAILED, "Timeout", f"not completed within timeoutSeconds={self.spec.timeout_s}: "
                f"{self.state.finished} of {self.state.total} items finished")

    def take_lines(self, now: float, *, force: bool = False) -> list[str]:
        """The journal lines to write now (none when no flush is due); give them back with
        `unwritten` if the write fails."""
        due = force or len(self.lines) >= self.config.journal_lines or now - self.last_flush >= self.config.journal_period_s
        if not self.lines or not due:
            return []
        lines, self.lines = self.lines, []
        self.last_flush = now
        return lines

    def unwritten(self, lines: list[str]) -> None:
        """A journal write failed: its lines go out with the next flush."""
        self.lines = lines + self.lines

    def status_due(self, now: float) -> bool:
        return now - self.last_status >= self.config.status_period_s
