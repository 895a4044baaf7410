"""A test double of the dispatcher's Effects port that records every call (tests only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuroute.protocol import Body
from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.refs import ObjectRef


@dataclass
class Recorded:
    """One effect, as RecordingEffects keeps it."""

    kind: str
    """send, kick, publish, forget or warn."""
    args: dict[str, Any] = field(default_factory=dict)
    """The call's arguments."""


class RecordingEffects:
    """An Effects sink that records every call: for tests and the routing simulation.

    `unreachable` lists routing ids whose sends fail, as a vanished peer's would.
    """

    def __init__(self) -> None:
        self.log: list[Recorded] = []
        self.unreachable: set[bytes] = set()
        self.statuses: dict[ObjectRef, Mapping[str, Any]] = {}
        self.terminal_events: dict[ObjectRef, list[TerminalEvent]] = {}
        self.items: dict[str, Mapping[str, Any]] = {}
        self.ended_items: dict[str, Job] = {}
        """Batch jobs (item groups) by uid, as they were when they ended."""

    def send(self, routing_id: bytes, body: Body, payload: bytes | None = None) -> bool:
        if routing_id in self.unreachable:
            return False
        self.log.append(Recorded("send", {"routing_id": routing_id, "body": body}))
        return True

    def kick(self, routing_id: bytes, reason: str) -> None:
        self.log.append(Recorded("kick", {"routing_id": routing_id, "reason": reason}))

    def publish(self, ref: ObjectRef, status: Mapping[str, Any], *, urgent: bool = False,
                terminal_event: TerminalEvent | None = None) -> None:
        self.statuses[ref] = status
        self.log.append(Recorded("publish", {"ref": ref, "status": status, "urgent": urgent}))
        if terminal_event is not None:
            self.terminal_events.setdefault(ref, []).append(terminal_event)

    def forget(self, ref: ObjectRef) -> None:
        self.log.append(Recorded("forget", {"ref": ref}))

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        self.log.append(Recorded("warn", {"ref": ref, "reason": reason, "message": message}))

    def item(self, job: Job, *, terminal: bool) -> None:
        self.items[job.uid] = job.status()
        if terminal:
            self.ended_items[job.uid] = job
        self.log.append(Recorded("item", {"uid": job.uid, "batch": job.batch, "terminal": terminal}))

    def sent(self, kind: type | None = None, to: bytes | None = None) -> list[Any]:
        """Bodies sent, optionally of one type and to one peer."""
        return [r.args["body"] for r in self.log if r.kind == "send"
                and (kind is None or isinstance(r.args["body"], kind)) and (to is None or r.args["routing_id"] == to)]

    def clear(self) -> None:
        self.log.clear()
