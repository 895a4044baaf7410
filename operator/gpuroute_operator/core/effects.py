"""What the dispatcher asks the outside world to do, and the port it asks through.

The dispatcher is synchronous and pure: it never touches a socket or the API server.
Everything it wants done goes through an `Effects` implementation: the operator's
async shell (engine.py) sends on the ROUTER socket and hands status and Events to the
StatusWriter; tests and the routing simulation record them instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gpuroute.protocol import Body
from gpuroute_operator.core.refs import ObjectRef

if TYPE_CHECKING:
    from gpuroute_operator.core.jobs import Job


@dataclass(frozen=True)
class TerminalEvent:
    """The one Event a job gets when it ends; posted only once its terminal status is written."""

    reason: str
    """Completed, Cancelled, or the failure reason."""
    message: str
    """For `kubectl describe`."""
    warning: bool
    """Warning for failures, Normal otherwise."""


class Effects(Protocol):
    def send(self, routing_id: bytes, body: Body, payload: bytes | None = None) -> bool:
        """Send without blocking; False when the peer is unreachable (nothing was sent)."""

    def kick(self, routing_id: bytes, reason: str) -> None:
        """Tell the peer to go (DISCONNECT) and close its connection."""

    def publish(self, ref: ObjectRef, status: Mapping[str, Any], *, urgent: bool = False,
                terminal_event: TerminalEvent | None = None) -> None:
        """Write this status (coalesced unless urgent); post `terminal_event` after it has landed."""

    def forget(self, ref: ObjectRef) -> None:
        """The object was deleted: drop its unsent status."""

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        """A Warning Event about a problem (not a phase change)."""

    def item(self, job: Job, *, terminal: bool) -> None:
        """A batch item changed (job.batch is set): its batch aggregates it, nothing is written per item."""


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
