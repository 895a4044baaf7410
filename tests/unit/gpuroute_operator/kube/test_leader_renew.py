"""The leader's renew deadline counts from when a renewal was sent, not from when it was answered.

A slow apiserver must not stretch the leader's term: a follower measures the Lease from
its own reads, so a renewal whose answer came late may already be too old to count on.
The LeaderElector runs for real on an injected clock, against an in-memory Lease API
whose every answer takes LATENCY_S on that clock.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException

from gpuroute_operator.kube.leader import LeaderElectionConfig, LeaderElector

LATENCY_S = 4.0
"""How long each Lease request takes on the injected clock."""
DEADLINE_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowLeases:
    """Stands in for the apiserver's Lease endpoint (compare-and-swap on resourceVersion);
    every call takes LATENCY_S on `clock`."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lease: Any = None
        self.version = 0
        self.sent_at: list[float] = []

    def _call(self) -> None:
        self.sent_at.append(self.clock.now)
        self.clock.now += LATENCY_S

    def _stored(self, body: Any) -> Any:
        self.version += 1
        body = copy.deepcopy(body)
        body.metadata.resource_version = str(self.version)
        self.lease = body
        return copy.deepcopy(body)

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        self._call()
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: Any, **_: Any) -> Any:
        self._call()
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._stored(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **_: Any) -> Any:
        self._call()
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        return self._stored(body)


def _elector(clock: Clock) -> tuple[LeaderElector, SlowLeases]:
    config = LeaderElectionConfig("gpuroute-leader", "gpuroute-system", "me", lease_duration_s=15,
                                  renew_deadline_s=DEADLINE_S, renew_period_s=5.0)
    elector = LeaderElector(ApiClient(), config, clock=clock)
    leases = SlowLeases(clock)
    elector._leases = leases  # the apiserver's Lease endpoint, answering slowly
    return elector, leases


def test_the_renew_deadline_runs_from_the_send_of_the_last_renewal() -> None:
    clock = Clock()
    elector, leases = _elector(clock)
    assert elector.try_acquire_or_renew() and elector.leading
    clock.now += 20.0
    assert elector.try_acquire_or_renew()              # a renewal: read then replace, each slow
    sent = leases.sent_at[-2]                            # the round started with its read
    answered = clock.now
    assert answered - sent == 2 * LATENCY_S
    # Past the deadline counted from the send, within it counted from the answer.
    clock.now = sent + DEADLINE_S
    assert clock.now - answered < DEADLINE_S
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    elector.start_renewing(on_lost)
    try:
        # The watchdog checks every WATCHDOG_TICK_S; the renewer sleeps renew_period_s first.
        assert lost.wait(3.0), "the leader kept leading past its renew deadline"
    finally:
        elector.release()
    assert "no successful renewal" in reasons[0]
    assert not elector.leading
