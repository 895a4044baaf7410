"""Who a worker connection is: decided by the operator from ZAP, never by the worker."""

from __future__ import annotations

from dataclasses import dataclass

from gpuroute.protocol import routing_id_for


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
