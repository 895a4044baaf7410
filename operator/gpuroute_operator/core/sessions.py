"""Worker sessions: who is connected, and whether a message may be believed (pure).

The broker half of the Majordomo pattern, apart from the job rules: a READY registers a
session (or is refused and the connection kicked), every later message is checked against
the session it arrived on, heartbeats measure round trips, silence ends a session, and a
revoked key or a deleted pool ends its sessions. What any of that means for jobs (adopting
attempts a returning worker still holds, re-queueing what a lost one had, handling
answers) is the dispatcher's: it is told through `SessionOwner`.

Invariants this module owns (each is tested through the dispatcher):
- a session's pool is the one ZAP admitted its key for, and its routing id is bound to
  that key (`ready_refusal`); a key holds at most maxConnectionsPerKey sessions;
- a message is believed only from the key its session registered with, and an answer
  only for an attempt sent on that session;
- a session ends once: out of the ledger and its pool, its attempts handed back.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from gpuroute.protocol import Accepted, AttemptId, Disconnect, Error, Heartbeat, Progress, Ready, Result
from gpuroute_operator import metrics
from gpuroute_operator.core.effects import Effects
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.ledger import Ledger
from gpuroute_operator.core.pools import PoolSpec, PoolState, WorkerConn, ewma, source_allowed
from gpuroute_operator.core.refs import ObjectRef

log = logging.getLogger(__name__)

Answer = Accepted | Result | Error


KEY_CONFLICT = "key connection limit"
"""How ready_refusal's message for a key over maxConnectionsPerKey begins."""
CONFLICT_ALERT_EVERY_S = 60.0
"""A KeyConflict Warning Event is posted at most this often per key (the counter counts every one)."""
RECENTLY_ENDED_KEPT = 4096
"""Ended sessions' routing ids remembered, so that a worker returning on its own id is recognised."""


class SessionOwner(Protocol):
    """What the dispatcher does when a session changes; all pure, all given `now`."""

    def joined(self, conn: WorkerConn, now: float) -> None:
        """A session registered: adopt attempts it holds, dispatch to it."""

    def answered(self, conn: WorkerConn, body: Answer, now: float) -> None:
        """An answer for an attempt that was sent on `conn`."""

    def lost(self, conn: WorkerConn, why: str, pool: PoolState | None, now: float) -> None:
        """A session ended (already out of the books): its attempts are to be re-queued."""


class WorkerSessions:
    def __init__(self, ledger: Ledger, pools: Mapping[str, PoolState], effects: Effects, owner: SessionOwner,
                 count: Callable[[str], None]) -> None:
        self.ledger = ledger
        self.pools = pools
        self.effects = effects
        self.owner = owner
        self.count = count
        """Counts a dropped or refused message by why."""
        self.recently_ended: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        """Routing ids of ended sessions (oldest first, bounded): who had each, and when it ended."""
        self.conflict_alerted: dict[Principal, float] = {}
        """When each key's last KeyConflict Event was posted."""

    def on_ready(self, routing_id: bytes, principal: Principal, ready: Ready, now: float, *, address: str = "") -> None:
        pool = self.pools.get(principal.pool)
        why = ready_refusal(routing_id, principal, ready, pool.spec if pool else None,
                            list(pool.workers.values()) if pool else [], address)
        if pool is not None and why.startswith(KEY_CONFLICT):
            why = self._key_conflict(pool, routing_id, principal, why, address, now)
        if why or pool is None:
            self.count("bad_ready")
            log.warning("refused READY from key %s: %s", principal, why)
            self.effects.kick(routing_id, why)
            return
        old = self.ledger.sessions.get(routing_id)
        carried: set[AttemptId] = set()
        if old is not None:
            # The same worker on a new connection: it keeps the attempts it still has.
            carried = set(old.attempts) & set(ready.jobs)
            old.attempts -= carried
            self.lose(old, "reconnected", now)
        conn = WorkerConn(routing_id, principal, ready.worker,
                          min(ready.capacity, pool.spec.max_in_flight_per_worker), ready.device,
                          frozenset(ready.models), last_seen=now, address=address, joined_at=now)
        conn.attempts = carried
        for attempt in carried:
            self.ledger.attempts[attempt] = routing_id
        # Attempts it runs that this operator does not follow (it restarted, or they ended):
        # their slots are busy until answered or adopted.
        conn.foreign = set(ready.jobs) - carried
        conn.answered = set(ready.answered) - carried - conn.foreign
        pool.workers[routing_id] = conn
        self.ledger.sessions[routing_id] = conn
        metrics.WORKERS.labels(pool.spec.name).set(len(pool.workers))
        log.info("worker %s joined pool %s with key %s (%s, capacity %d)", conn.worker, pool.spec.name,
                 principal.key, conn.device, conn.capacity)
        self.effects.send(routing_id, Heartbeat(ping=now))
        self.owner.joined(conn, now)

    def on_message(self, routing_id: bytes, principal: Principal, body: object, now: float) -> bool:
        """Every message after READY; True when it may have freed a slot (worth a dispatch pass)."""
        conn = self.ledger.sessions.get(routing_id)
        if conn is None:
            if not isinstance(body, Disconnect):
                # Unknown peer (this operator restarted, or expired it): ask it to register again.
                self.count("unregistered")
                self.effects.send(routing_id, Disconnect("register again"))
            return False
        if conn.principal != principal or not principal.owns(routing_id):
            self.count("identity_mismatch")
            log.warning("dropped %s on %r: sent with key %s, session belongs to %s",
                        type(body).__name__, routing_id[:64], principal, conn.principal)
            return False
        conn.last_seen = now
        if isinstance(body, Heartbeat):
            if body.pong is not None and body.pong <= now:
                conn.rtt_ms = ewma(conn.rtt_ms, (now - body.pong) * 1000.0)
            return False  # heartbeats change nothing to dispatch
        if isinstance(body, (Accepted, Progress, Result, Error)):
            if body.job in conn.foreign and isinstance(body, (Result, Error)):
                # An attempt nobody follows (yet) ended: its slot is free, and its answer stays in
                # the worker's cache, where a job admitted a moment later can still adopt it.
                conn.foreign.discard(body.job)
                conn.answered.add(body.job)
            if body.job not in conn.attempts:
                self.count("foreign_attempt")
                log.warning("dropped %s for %s from key %s: that attempt was not sent on this connection",
                            type(body).__name__, body.job, principal)
                return False
            if isinstance(body, Progress):
                return False
            self.owner.answered(conn, body, now)
            return not isinstance(body, Accepted)  # an attempt starting frees no slot
        elif isinstance(body, Disconnect):
            self.lose(conn, "shut down", now)
        else:
            self.count("unexpected_kind")
        return True

    def lose(self, conn: WorkerConn, why: str, now: float, *, kick: bool = False,
             pool: PoolState | None = None) -> None:
        """End `conn` (once); `pool`: its pool when that was already removed from the pools."""
        if self.ledger.sessions.get(conn.routing_id) is not conn:
            return
        del self.ledger.sessions[conn.routing_id]
        self.recently_ended[conn.routing_id] = (conn.principal, now)
        self.recently_ended.move_to_end(conn.routing_id)
        while len(self.recently_ended) > RECENTLY_ENDED_KEPT:
            self.recently_ended.popitem(last=False)
        pool = pool or self.pools.get(conn.pool)
        if pool is not None:
            pool.workers.pop(conn.routing_id, None)
            metrics.WORKERS.labels(conn.pool).set(len(pool.workers))
        metrics.WORKER_DISCONNECTS.labels(conn.pool, why.split()[0]).inc()
        if kick:
            self.effects.kick(conn.routing_id, why)
        log.warning("worker %s of pool %s %s; re-queueing %d jobs", conn.worker, conn.pool, why, len(conn.attempts))
        self.owner.lost(conn, why, pool, now)

    def _key_conflict(self, pool: PoolState, routing_id: bytes, principal: Principal, why: str, address: str,
                      now: float) -> str:
        """A READY over the key's maxConnectionsPerKey: a copied key, or more pods sharing a key than
        the pool allows. Always alerted (a counter, and a Warning Event on the WorkerPool at most once
        a minute per key). A worker coming back on the routing id its own session just had (the id
        carries a per-process secret, so a copy cannot use it) takes its place back from a connection
        of its key that registered since: that one is the copy which slipped in during the reconnect.
        Returns why the READY is refused ("" once the place is taken back)."""
        holders = [c for c in pool.workers.values() if c.principal == principal and c.routing_id != routing_id]
        ended = self.recently_ended.get(routing_id)
        newer = [c for c in holders if ended is not None and ended[0] == principal and c.joined_at > ended[1]]
        usurper = max(newer, key=lambda c: c.joined_at) if newer else None
        addresses = ", ".join(sorted({c.address or "?" for c in holders} | {address or "?"}))
        message = (f"key {principal.key} of pool {pool.spec.name} wanted on {len(holders) + 1} connections "
                   f"(spec.maxConnectionsPerKey={pool.spec.max_connections_per_key}) from {addresses}: "
                   + ("the worker returning on its own routing id displaces the one that took its place; a copied key? "
                      if usurper else "the newest is refused; a copied key, or more pods than the limit? ")
                   + "Rotate the key if it was copied.")
        self.count("key_conflict")
        if now - self.conflict_alerted.get(principal, float("-inf")) >= CONFLICT_ALERT_EVERY_S:
            self.conflict_alerted[principal] = now
            log.error("%s", message)
            self.effects.warn(ObjectRef("WorkerPool", pool.spec.name), "KeyConflict", message)
        if usurper is None:
            return why
        self.lose(usurper, "displaced by the worker returning on its own routing id", now, kick=True)
        del self.recently_ended[usurper.routing_id]  # a displaced connection has no place to come back to
        return ""

    def keep_allowed_sources(self, pool: PoolState, now: float) -> None:
        """The pool's allowedSourceCIDRs may have narrowed: sessions from addresses now excluded end."""
        for conn in list(pool.workers.values()):
            if not source_allowed(conn.address, pool.spec.cidrs):
                self.lose(conn, f"source address {conn.address or 'unknown'} no longer allowed", now, kick=True)

    def keep_only(self, pool: PoolState, admitted: Iterable[Principal], now: float) -> None:
        """The pool's keys are now exactly `admitted`: sessions of other keys end."""
        keep = set(admitted)
        for conn in list(pool.workers.values()):
            if conn.principal not in keep:
                self.lose(conn, "key revoked", now, kick=True)

    def check(self, now: float, *, heartbeat: bool) -> None:
        """Liveness: silent sessions end; the others get a heartbeat (and end if it cannot be sent)."""
        for conn in list(self.ledger.sessions.values()):
            if conn.expired(now):
                self.lose(conn, f"silent for {now - conn.last_seen:.1f}s", now, kick=True)
            elif heartbeat and not self.effects.send(conn.routing_id, Heartbeat(ping=now, rtt_ms=conn.rtt_ms)):
                self.lose(conn, "unreachable", now)


def ready_refusal(routing_id: bytes, principal: Principal, ready: Ready, pool: PoolSpec | None,
                  sessions: Iterable[WorkerConn], address: str = "") -> str:
    """Why a READY must be refused ("" when it may register): the pool must exist and be the
    one the key was admitted for, the routing id must be bound to the key, and the key may
    not hold more live connections than the pool allows (`sessions`: the pool's sessions)."""
    if pool is None:
        return f"pool {principal.pool} does not exist"
    if ready.pool != principal.pool:
        return f"key {principal} belongs to pool {principal.pool}, READY claims pool {ready.pool}"
    if not principal.owns(routing_id):
        return f"routing id is not bound to key {principal} (expected '<public key>/<worker>')"
    if not source_allowed(address, pool.cidrs):
        return f"source address {address or 'unknown'} is outside spec.allowedSourceCIDRs of pool {pool.name}"
    others = [c for c in sessions if c.principal == principal and c.routing_id != routing_id]
    if len(others) >= pool.max_connections_per_key:
        return (f"{KEY_CONFLICT}: key {principal} already has {len(others)} live connection(s) "
                f"(spec.maxConnectionsPerKey={pool.max_connections_per_key})")
    return ""
