"""Leader election against the real kube-apiserver: separate processes contend for one
Lease (tests/integration/lease_holder.py runs gpuroute's LeaderElector)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gpuroute_dev.localenv.controlplane import ControlPlane

pytestmark = pytest.mark.integration

HOLDER = Path(__file__).with_name("lease_holder.py")
NAMESPACE = "leader-election-test"
TAKEOVER_GOAL_S = 5.0


class Holder:
    """One lease_holder.py process; its stdout lines are collected by a thread."""

    def __init__(self, control_plane: ControlPlane, lease: str, identity: str, pod: str = "", pod_ip: str = "",
                 service: str = "") -> None:
        self.identity = identity
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, str(HOLDER), control_plane.kubeconfig, NAMESPACE, lease, identity, pod, pod_ip, service],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, word: str) -> bool:
        return any(line.startswith(word) for line in self.lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@pytest.fixture
def lease(control_plane: ControlPlane) -> str:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with control_plane.api_client() as api:
        try:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
        except ApiException as exc:
            if exc.status != 409:
                raise
    return f"lease-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def holders(control_plane: ControlPlane, lease: str) -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


def _spec(control_plane: ControlPlane, lease: str) -> Any:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with control_plane.api_client() as api:
        try:
            return client.CoordinationV1Api(api).read_namespaced_lease(lease, NAMESPACE).spec
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def _wait_holder(control_plane: ControlPlane, lease: str, wanted: set[str], timeout: float) -> tuple[str, float]:
    """Poll the Lease every 20 ms until its holder is one of `wanted`; (holder, when)."""
    deadline = time.monotonic() + timeout
    while True:
        spec = _spec(control_plane, lease)
        holder = (spec.holder_identity or "") if spec else ""
        if holder in wanted:
            return holder, time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"Lease holder {holder!r}, wanted one of {sorted(wanted)} within {timeout}s")
        time.sleep(0.02)


def _wait_said(holder: Holder, word: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not holder.said(word):
        assert time.monotonic() < deadline, f"{holder.identity} never said {word}: {holder.lines}"
        time.sleep(0.02)


def test_one_of_two_leads_and_a_sigkill_hands_over_within_5s(
        control_plane: ControlPlane, lease: str, holders: list[Holder]) -> None:
    by_name = {}
    for name in ("a", "b"):
        by_name[name] = Holder(control_plane, lease, name)
        holders.append(by_name[name])
    leader, _ = _wait_holder(control_plane, lease, {"a", "b"}, timeout=30)
    _wait_said(by_name[leader], "LEADING", timeout=5)
    # Several renewal periods later: still the same leader, and only one ever led.
    time.sleep(3.5)
    assert (_spec(control_plane, lease).holder_identity or "") == leader
    assert [h.identity for h in holders if h.said("LEADING")] == [leader]

    takeovers: list[float] = []
    for round_ in range(3):
        follower = next(h for h in holders if h.popen.poll() is None and h.identity != leader)
        transitions = _spec(control_plane, lease).lease_transitions or 0
        by_name[leader].popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        new, at = _wait_holder(control_plane, lease, {follower.identity}, timeout=TAKEOVER_GOAL_S + 5)
        takeovers.append(at - killed)
        _wait_said(follower, "LEADING", timeout=2)
        assert (_spec(control_plane, lease).lease_transitions or 0) == transitions + 1
        # A replacement replica joins as follower; it must not take over from a live leader.
        replacement = Holder(control_plane, lease, f"r{round_}")
        by_name[replacement.identity] = replacement
        holders.append(replacement)
        leader = new
    time.sleep(2.0)
    assert not holders[-1].said("LEADING"), "a new replica took the Lease from a live leader"
    print(f"takeover after SIGKILL: {', '.join(f'{t:.2f}s' for t in takeovers)}")
    assert max(takeovers) < TAKEOVER_GOAL_S, takeovers
    # Nobody lost leadership on the way: each SIGKILLed leader was the only one.
    assert not any(h.said("LOST") for h in holders), [h.lines for h in holders]


def test_a_graceful_stop_releases_the_lease_at_once(
        control_plane: ControlPlane, lease: str, holders: list[Holder]) -> None:
    first = Holder(control_plane, lease, "first")
    holders.append(first)
    _wait_holder(control_plane, lease, {"first"}, timeout=30)
    second = Holder(control_plane, lease, "second")
    holders.append(second)
    time.sleep(1.5)  # the follower has read the Lease and is standing by
    first.popen.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert first.popen.wait(10) == 0
    assert first.said("RELEASED"), first.lines
    _, at = _wait_holder(control_plane, lease, {"second"}, timeout=TAKEOVER_GOAL_S)
    handover = at - stopped
    print(f"handover after a graceful stop: {handover:.2f}s")
    # Well under the 3 s lease duration: no waiting for expiry.
    assert handover < 1.5


def test_a_leader_that_could_not_renew_exits_when_it_wakes(
        control_plane: ControlPlane, lease: str, holders: list[Holder]) -> None:
    """SIGSTOP stands in for a leader cut off from the apiserver: the follower takes
    over after the lease duration, and the old leader exits as soon as it runs again,
    before writing anything (its watchdog or its next read sees the loss)."""
    old = Holder(control_plane, lease, "old")
    holders.append(old)
    _wait_holder(control_plane, lease, {"old"}, timeout=30)
    _wait_said(old, "LEADING", timeout=5)
    new = Holder(control_plane, lease, "new")
    holders.append(new)
    time.sleep(1.0)
    old.popen.send_signal(signal.SIGSTOP)
    _wait_holder(control_plane, lease, {"new"}, timeout=TAKEOVER_GOAL_S + 2)
    old.popen.send_signal(signal.SIGCONT)
    assert old.popen.wait(5) == 3, old.lines
    assert old.said("LOST"), old.lines
    time.sleep(1.5)
    assert (_spec(control_plane, lease).holder_identity or "") == "new"
    assert new.popen.poll() is None


def test_the_leader_routes_its_service_to_its_own_pod(
        control_plane: ControlPlane, lease: str, holders: list[Holder]) -> None:
    """The socket Service has no selector: the leader writes its own pod IP into its Endpoints,
    the next leader overwrites them, and a replica letting go empties them only while they
    still name it (never the new leader's). RBAC needs patch on those Endpoints alone."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    service = f"socket-{uuid.uuid4().hex[:6]}"
    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_service(NAMESPACE, {"metadata": {"name": service},
                                                   "spec": {"ports": [{"name": "zmq", "port": 7700}]}})
        core.create_namespaced_endpoints(NAMESPACE, {"metadata": {"name": service}, "subsets": []})

        def routed() -> list[tuple[str, str, int]]:
            try:
                body = core.read_namespaced_endpoints(service, NAMESPACE)
            except ApiException:
                return []
            return [(a.ip, (a.target_ref.name if a.target_ref else ""), port.port)
                    for s in body.subsets or () for a in s.addresses or () for port in s.ports or ()]

        def wait_routed(expected: list[tuple[str, str, int]]) -> None:
            deadline = time.monotonic() + 5
            while routed() != expected:
                assert time.monotonic() < deadline, f"Endpoints {routed()}, expected {expected}"
                time.sleep(0.05)

        a = Holder(control_plane, lease, "a", "pod-a", "10.0.0.1", service)
        holders.append(a)
        _wait_holder(control_plane, lease, {"a"}, timeout=30)
        wait_routed([("10.0.0.1", "pod-a", 7700)])
        b = Holder(control_plane, lease, "b", "pod-b", "10.0.0.2", service)
        holders.append(b)
        time.sleep(1.0)  # b follows: it must not touch the leader's Endpoints
        assert routed() == [("10.0.0.1", "pod-a", 7700)]
        a.popen.send_signal(signal.SIGTERM)
        assert a.popen.wait(10) == 0
        _wait_holder(control_plane, lease, {"b"}, timeout=5)
        wait_routed([("10.0.0.2", "pod-b", 7700)])
        # A restarted "a" (same pod IP, now a follower) must leave b's Endpoints alone.
        again = Holder(control_plane, lease, "a2", "pod-a", "10.0.0.1", service)
        holders.append(again)
        time.sleep(1.0)
        assert routed() == [("10.0.0.2", "pod-b", 7700)]
        b.popen.send_signal(signal.SIGTERM)
        assert b.popen.wait(10) == 0
        _wait_holder(control_plane, lease, {"a2"}, timeout=5)
        wait_routed([("10.0.0.1", "pod-a", 7700)])
        core.delete_namespaced_service(service, NAMESPACE, _preload_content=False)
