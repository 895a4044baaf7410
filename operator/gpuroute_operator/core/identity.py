"""Who a worker connection is: decided by the operator from ZAP, never by the worker."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpuroute.protocol import Ready, routing_id_for

if TYPE_CHECKING:
    from gpuroute_operator.core.pools import PoolSpec, WorkerConn


@dataclass(frozen=True)
class Principal:
    """Who a connection is, as ZAP authenticated it: never what the worker says."""

    pool: str
    """The pool whose keys Secret lists the key."""
    key: str
    """The key's name in that Secret."""
    public_key: str
    """The Z85 public key (40 characters)."""

    @property
    def user_id(self) -> str:
        """ZAP's User-Id for this principal; every frame of the connection carries it."""
        return f"{self.pool}/{self.key}/{self.public_key}"

    @classmethod
    def from_user_id(cls, user_id: str) -> Principal | None:
        pool, _, rest = user_id.partition("/")
        key, _, public_key = rest.partition("/")
        if not pool or not key or len(public_key) != 40:
            return None
        return cls(pool, key, public_key)

    def owns(self, routing_id: bytes) -> bool:
        """Routing ids are bound to keys: `<public key>/<worker id>`, so no key can occupy another's ids."""
        return routing_id.startswith(routing_id_for(self.public_key, ""))

    def __str__(self) -> str:
        return f"{self.pool}/{self.key}"



def ready_refusal(routing_id: bytes, principal: Principal, ready: Ready, pool: PoolSpec | None,
                  sessions: Iterable[WorkerConn]) -> str:
    """Why a READY must be refused ("" when it may register): the pool must exist and be the
    one the key was admitted for, the routing id must be bound to the key, and the key may
    not hold more live connections than the pool allows (`sessions`: the pool's sessions)."""
    if pool is None:
        return f"pool {principal.pool} does not exist"
    if ready.pool != principal.pool:
        return f"key {principal} belongs to pool {principal.pool}, READY claims pool {ready.pool}"
    if not principal.owns(routing_id):
        return f"routing id is not bound to key {principal} (expected '<public key>/<worker>')"
    others = [c for c in sessions if c.principal == principal and c.routing_id != routing_id]
    if len(others) >= pool.max_connections_per_key:
        return (f"key {principal} already has {len(others)} live connection(s) "
                f"(spec.maxConnectionsPerKey={pool.max_connections_per_key})")
    return ""
