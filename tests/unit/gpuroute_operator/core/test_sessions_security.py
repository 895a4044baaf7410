"""Session rules against a copied key and a narrowed allowedSourceCIDRs (core/sessions.py)."""

from __future__ import annotations

from gpuroute.protocol import AttemptId
from gpuroute_operator.core.pools import parse_pool_spec
from tests.unit.gpuroute_operator.core.dispatcher_world import World


def _warnings(world: World, reason: str) -> list[str]:
    return [r.args["message"] for r in world.effects.log if r.kind == "warn" and r.args["reason"] == reason]


def test_a_key_over_its_limit_is_alerted_once_a_minute_and_counted_every_time() -> None:
    world = World()
    key = world.principal("pool-a", "w1")
    first = world.connect("pool-a", "w1")
    for n in range(3):
        copy = world.connect("pool-a", "w1", principal=key, routing_id=first + f"-copy{n}".encode())
        assert copy in world.kicked()
        world.advance(1.0)
    assert set(world.dispatcher.sessions) == {first}
    assert world.dispatcher.counters["key_conflict"] == 3
    alerts = _warnings(world, "KeyConflict")
    assert len(alerts) == 1 and "maxConnectionsPerKey=1" in alerts[0] and "copied key" in alerts[0]
    world.advance(60.0)
    world.connect("pool-a", "w1", principal=key, routing_id=first + b"-copy-later")
    assert len(_warnings(world, "KeyConflict")) == 2


def test_the_worker_returning_on_its_own_id_displaces_a_copy_that_slipped_in() -> None:
    """The review's lockout: the genuine worker's connection drops, a copy of its key registers at
    once, and the genuine worker's READY on its own (secret) routing id used to be refused."""
    world = World()
    key = world.principal("pool-a", "w1")
    genuine = world.connect("pool-a", "w1")
    world.advance(0.5)
    world.dispatcher.on_lost(genuine, "disconnected", world.now)
    world.advance(0.1)
    copy = world.connect("pool-a", "w1", principal=key, routing_id=world.routing_id("pool-a", "w1") + b"-copy")
    assert copy in world.dispatcher.sessions
    world.advance(0.5)
    back = world.connect("pool-a", "w1")
    assert back == genuine and genuine in world.dispatcher.sessions
    assert copy not in world.dispatcher.sessions and copy in world.kicked()
    assert _warnings(world, "KeyConflict")
    # The displaced copy trying again is refused: the genuine worker holds the key's one place.
    world.advance(0.5)
    again = world.connect("pool-a", "w1", principal=key, routing_id=copy)
    assert set(world.dispatcher.sessions) == {genuine} and world.kicked().count(again) == 2


def test_a_new_id_does_not_displace_anyone() -> None:
    world = World()
    key = world.principal("pool-a", "w1")
    holder = world.connect("pool-a", "w1")
    world.advance(1.0)
    newcomer = world.connect("pool-a", "w1", principal=key, routing_id=holder + b"-new")
    assert set(world.dispatcher.sessions) == {holder} and newcomer in world.kicked()


def _narrow(world: World, pool: str, cidrs: list[str]) -> None:
    spec = parse_pool_spec(pool, {"cloud": "c", "region": pool, "pricePerGpuHour": 1.0,
                                  "workerKeysSecretRef": {"name": f"{pool}-keys"}, "allowedSourceCIDRs": cidrs},
                           generation=2, default_namespace="gpuroute-system")
    world.dispatcher.set_pool(spec, world.now)


def _connect_from(world: World, worker: str, address: str) -> bytes:
    from gpuroute.protocol import Ready

    routing_id = world.routing_id("pool-a", worker)
    world.dispatcher.on_ready(routing_id, world.principal("pool-a", worker),
                              Ready(pool="pool-a", worker=worker, capacity=2, device="cpu"), world.now, address=address)
    return routing_id


def test_narrowing_allowed_source_cidrs_ends_sessions_from_addresses_now_excluded() -> None:
    world = World()
    inside = _connect_from(world, "w1", "10.1.2.3")
    outside = _connect_from(world, "w2", "192.0.2.7")
    world.submit("j1", placement={"pools": ["pool-a"]})
    world.submit("j2", placement={"pools": ["pool-a"]})
    assert len(world.requests()) == 2
    _narrow(world, "pool-a", ["10.0.0.0/8"])
    assert outside in world.kicked() and outside not in world.dispatcher.sessions
    assert inside in world.dispatcher.sessions
    # Its attempt went back to the queue and on to the worker still allowed.
    held_by_outside = [r.job for r in world.requests(outside)]
    assert held_by_outside
    for attempt in held_by_outside:
        assert AttemptId(attempt.uid, 2) in [r.job for r in world.requests(inside)]
    # A READY from an excluded address is refused too (the socket's address, not the worker's word).
    again = _connect_from(world, "w2", "192.0.2.7")
    assert again not in world.dispatcher.sessions


def test_an_unknown_address_is_served_only_by_pools_without_cidrs() -> None:
    world = World()
    unknown = _connect_from(world, "w1", "")
    assert unknown in world.dispatcher.sessions
    _narrow(world, "pool-a", ["10.0.0.0/8"])
    assert unknown not in world.dispatcher.sessions
    assert AttemptId("none", 1) not in world.dispatcher.ledger.attempts
