"""What the dispatcher asks the outside world to do, and the port it asks through.

The dispatcher is synchronous and pure: it never touches a socket or the API server.
Everything it wants done goes through an `Effects` implementation: the operator's
async shell (engine.py) sends on the ROUTER socket and hands status and Events to the
StatusWriter; the unit tests (a recording double) and the routing simulation stand in for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


