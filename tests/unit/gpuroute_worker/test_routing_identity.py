"""A worker's routing id: bound to its key, and unguessable (gpuroute.protocol.routing_id_for)."""

from __future__ import annotations

from gpuroute import protocol
from gpuroute.curve_keys import KeyPair
from gpuroute_worker.config import WorkerConfig


def test_real_workers_use_unguessable_routing_ids() -> None:
    """Two processes of one worker get different secret nonces; the key prefix stays, so the
    operator's ownership check still applies."""
    key = KeyPair.generate()
    first, second = (WorkerConfig("tcp://127.0.0.1:1", "pool-a", "w1", key.secret, key.public) for _ in range(2))
    ids = {protocol.routing_id_for(key.public.decode(), "w1", c.routing_nonce) for c in (first, second)}
    assert len(ids) == 2 and all(i.startswith(key.public + b"/") and i.endswith(b"/w1") for i in ids)
    assert len(first.routing_nonce) >= 20
