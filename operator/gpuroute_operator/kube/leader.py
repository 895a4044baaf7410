"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Two operator replicas run; only the one holding the Lease serves the ZeroMQ socket and
writes status. The rules are a pure function (`decide`) with both clocks passed in, so
they are unit-tested in milliseconds; `LeaderElector` carries them out against the
apiserver with the `kubernetes` client.

As in client-go, a follower never compares the Lease's renewTime with its own wall
clock (the replicas' clocks may disagree): it notes, on its own monotonic clock, when
it first saw the current version of the record, and takes over once that version has
stayed unchanged for leaseDurationSeconds. The leader, for its part, gives up after
RENEW_DEADLINE_S without a successful renewal, measured from the moment it *sent*
that renewal, which is before any follower could have seen it: so the old leader is
gone before a follower may take over, and two leaders never write at once.

Writes use the Lease's resourceVersion (optimistic concurrency): when two replicas
race, the apiserver accepts one and answers the other 409 Conflict.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import urllib3

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("gpuroute.leader")

LEASE_DURATION_S = 3
"""How long a follower waits, after it last saw the Lease change, before taking over.
With RETRY_PERIOD_S polling this bounds takeover at about 4 s after a leader's SIGKILL
(its last renewal was at most RENEW_PERIOD_S before the kill), inside the 5 s goal.
An integer: the Lease stores whole seconds."""

RENEW_DEADLINE_S = 2.0
"""A leader that has not renewed successfully for this long exits. Strictly less than
LEASE_DURATION_S, with a margin for the watchdog's tick and a request already on the
wire, so a partitioned leader stops before any follower can take the Lease over."""

RENEW_PERIOD_S = 1.0
"""How often the leader renews: two tries fit in RENEW_DEADLINE_S, so one slow or
failed request does not cost the leadership."""

RETRY_PERIOD_S = 0.5
"""How often a follower reads the Lease: the granularity of noticing expiry or release."""

REQUEST_TIMEOUT_S = 1.0
"""Connect and read timeout of each Lease request; a hung request must not outlast
the renew deadline by much (the watchdog exits regardless)."""

WATCHDOG_TICK_S = 0.1
"""How often the leader checks its renew deadline, independently of request threads."""

@dataclass(frozen=True)
class LeaderService:
    """A selector-less Service whose Endpoints the leader points at its own pod, so that workers
    (and status-page callers) reach only the leader while followers stay Ready for the
    PodDisruptionBudget. Writing one named Endpoints object needs `patch` on that name alone;
    labelling its own pod, as before, needed `patch` on every pod of the namespace (and a pod
    patch can change a container's image)."""

    name: str
    """The Service's (and its Endpoints') name."""
    ports: tuple[tuple[str, int], ...]
    """(port name, port number) the Service forwards to, as the container listens."""


def default_identity() -> str:
    """Hostname plus pid: unique per process, like client-go's hostname_uuid."""
    return f"{socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Which Lease to contend for, as whom, and how fast."""

    name: str
    """Lease name (metadata.name)."""
    namespace: str
    """Lease namespace: the operator's own."""
    identity: str
    """This replica's holderIdentity; unique per replica (the pod name in a cluster)."""
    pod_name: str = ""
    """Own pod, named in the Endpoints' targetRef."""
    pod_ip: str = ""
    """Own pod's IP ($POD_IP from the downward API); empty outside a cluster: no Endpoints are written."""
    services: tuple[LeaderService, ...] = ()
    """Services routed to the leader: their Endpoints name this pod while it leads."""
    lease_duration_s: int = LEASE_DURATION_S
    """leaseDurationSeconds written to the Lease."""
    renew_deadline_s: float = RENEW_DEADLINE_S
    """Give up leadership (exit) after this long without a successful renewal."""
    renew_period_s: float = RENEW_PERIOD_S
    """Interval between the leader's renewals."""
    retry_period_s: float = RETRY_PERIOD_S
    """Interval between a follower's reads of the Lease."""
    request_timeout_s: float = REQUEST_TIMEOUT_S
    """Timeout of each Lease request."""

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election needs a non-empty identity")
        if not self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(f"renew deadline {self.renew_deadline_s}s must be shorter than the lease "
                             f"duration {self.lease_duration_s}s, or two leaders could overlap")
        if not 0 < self.renew_period_s < self.renew_deadline_s:
            raise ValueError("the renew period must be positive and shorter than the renew deadline")


# ------------------------------------------------------------------------- pure rules


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease spec fields leader election uses."""

    holder: str
    """spec.holderIdentity; empty when released."""
    duration_s: int
    """spec.leaseDurationSeconds."""
    transitions: int = 0
    """spec.leaseTransitions: how often the holder changed."""
    acquire_time: dt.datetime | None = None
    """spec.acquireTime (informational: never compared with a local clock)."""
    renew_time: dt.datetime | None = None
    """spec.renewTime (informational: never compared with a local clock)."""


@dataclass(frozen=True)
class Observation:
    """A record as this replica last saw it, and when, on its own monotonic clock."""

    record: LeaseRecord
    """The record read."""
    version: str
    """metadata.resourceVersion: every write changes it."""
    observed_at: float
    """Monotonic time this version was first seen."""


def observe(previous: Observation | None, record: LeaseRecord, version: str, now: float) -> Observation:
    """Keep the first-seen time while the Lease has not changed; restart it when it has."""
    if previous is not None and previous.version == version and previous.record == record:
        return previous
    return Observation(record, version, now)


class Action(enum.Enum):
    ACQUIRE = "acquire"
    """Write the Lease with this replica as holder (create it when absent)."""
    RENEW = "renew"
    """This replica leads: write a fresh renewTime."""
    WAIT = "wait"
    """Another replica holds a valid Lease."""
    LOST = "lost"
    """This replica believed it led, but the Lease names someone else: stop at once."""


@dataclass(frozen=True)
class Decision:
    """What to do with the Lease next."""

    action: Action
    """The step to take."""
    record: LeaseRecord | None
    """The record to write for ACQUIRE and RENEW; None otherwise."""
    reason: str
    """Why, for the log."""


def decide(seen: Observation | None, *, identity: str, leading: bool, now: float, wall: dt.datetime,
           lease_duration_s: int) -> Decision:
    """client-go's tryAcquireOrRenew as a pure function.

    `seen` is the Lease as last read (None: it does not exist), `leading` whether this
    replica currently holds it by its own account, `now` the monotonic clock and `wall`
    the UTC time written into acquireTime/renewTime.
    """
    if seen is None:
        return Decision(Action.ACQUIRE, LeaseRecord(identity, lease_duration_s, 0, wall, wall), "no Lease yet")
    current = seen.record
    if current.holder == identity:
        if leading:
            return Decision(Action.RENEW, replace(current, duration_s=lease_duration_s, renew_time=wall), "renewal")
        # A restarted process with the same identity (same pod): the old one is gone,
        # so nobody else can be leading under this name.
        return Decision(Action.ACQUIRE, replace(current, duration_s=lease_duration_s, acquire_time=wall,
                                                renew_time=wall), "the Lease already names this identity")
    if leading:
        return Decision(Action.LOST, None, f"the Lease is now held by {current.holder!r}")
    taken = LeaseRecord(identity, lease_duration_s, current.transitions + 1, wall, wall)
    if not current.holder:
        return Decision(Action.ACQUIRE, taken, "the Lease was released")
    # The holder's own duration, as client-go does: a replica configured differently
    # must not cut a leader's term short.
    elapsed = now - seen.observed_at
    if elapsed >= current.duration_s:
        return Decision(Action.ACQUIRE, taken,
                        f"{current.holder!r} has not renewed for {elapsed:.1f}s (lease {current.duration_s}s)")
    return Decision(Action.WAIT, None, f"held by {current.holder!r}")


def renew_overdue(last_renewed: float, now: float, renew_deadline_s: float) -> bool:
    """True once the leader has gone renew_deadline_s without a successful renewal;
    `last_renewed` is when that renewal was sent, not when its answer arrived."""
    return now - last_renewed >= renew_deadline_s


# ------------------------------------------------------------------------- apiserver side


class LeaderElectionError(RuntimeError):
    """The Lease could not be read or written for a reason other than a lost race."""


# What the kubernetes client raises when the apiserver is unreachable or slow:
# urllib3's errors (timeouts, refused connections, retries exhausted) and socket errors.
_TRANSIENT: tuple[type[Exception], ...] = (urllib3.exceptions.HTTPError, OSError)


def _micro_time(moment: dt.datetime) -> dt.datetime:
    # The client serialises with isoformat(), which drops the fraction when it is
    # zero, and the apiserver's MicroTime parser then rejects the value.
    return moment if moment.microsecond else moment.replace(microsecond=1)


def _record_of(lease: Any) -> LeaseRecord:
    spec = lease.spec
    return LeaseRecord(
        holder=spec.holder_identity or "",
        duration_s=int(spec.lease_duration_seconds or 0),
        transitions=int(spec.lease_transitions or 0),
        acquire_time=spec.acquire_time,
        renew_time=spec.renew_time,
    )


def kube_api_client(kubeconfig: str | None) -> ApiClient:
    """A kubernetes ApiClient from a kubeconfig file, $KUBECONFIG, or the pod's service account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class LeaderElector:
    """Contends for one Lease: blocks until leading, then renews from background threads.

    `wait_until_leading()` then `start_renewing(on_lost)`; `release()` on a graceful stop.
    `on_lost` is called from a background thread when leadership is lost (renew deadline
    passed, or the Lease names another holder); it must stop the process: by then a
    follower may be about to take over.
    """

    def __init__(self, api: ApiClient, config: LeaderElectionConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        from kubernetes import client

        self.config = config
        self._api = api
        self._leases = client.CoordinationV1Api(api)
        self._core = client.CoreV1Api(api)
        self._clock = clock
        self._wall = wall
        self._seen: Observation | None = None
        self.took_over = False
        """Whether this replica took the Lease from another that had not released it."""
        self._leading = False
        self._last_renewed = 0.0
        self._routed = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lost_reason = ""
        self._on_lost: Callable[[str], None] = lambda reason: None

    @property
    def leading(self) -> bool:
        return self._leading

    @property
    def holder(self) -> str:
        """The holder as last read ("" when none or unknown)."""
        return self._seen.record.holder if self._seen else ""

    # ---- one round ---------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease, decide, write if needed; True when this replica leads afterwards."""
        from kubernetes.client.rest import ApiException

        started = self._clock()
        timeout = self.config.request_timeout_s
        try:
            lease = self._leases.read_namespaced_lease(self.config.name, self.config.namespace,
                                                       _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise LeaderElectionError(f"reading Lease {self._where()}: {exc.status} {exc.reason}") from exc
            lease = None
        if lease is not None:
            version = lease.metadata.resource_version if lease.metadata else None
            self._seen = observe(self._seen, _record_of(lease), version or "", started)
        else:
            self._seen = None
        if not self._leading:
            # Who held it before us: another replica that did not hand it back means work
            # may be in flight that its last status writes do not show yet.
            previous = self._seen.record.holder if self._seen else ""
            self.took_over = bool(previous) and previous != self.config.identity
        decision = decide(self._seen, identity=self.config.identity, leading=self._leading, now=started,
                          wall=_micro_time(self._wall()), lease_duration_s=self.config.lease_duration_s)
        if decision.action is Action.WAIT:
            return False
        if decision.action is Action.LOST:
            self._lose(decision.reason)
            return False
        assert decision.record is not None
        if not self._write(lease, decision.record, timeout):
            # Another replica's write won. A leader stays leader by its own account until
            # the next read says otherwise (LOST) or the renew deadline passes.
            return False
        if not self._leading:
            log.info("leader election: %s now leads Lease %s (%s)", self.config.identity, self._where(), decision.reason)
        self._leading = True
        self._last_renewed = started
        return True

    def _write(self, lease: Any, record: LeaseRecord, timeout: float) -> bool:
        """Create or replace the Lease; False when another replica's write won (409)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        spec = client.V1LeaseSpec(
            holder_identity=record.holder, lease_duration_seconds=record.duration_s,
            lease_transitions=record.transitions, acquire_time=record.acquire_time, renew_time=record.renew_time)
        try:
            if lease is None:
                body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.config.name, namespace=self.config.namespace),
                                      spec=spec)
                written = self._leases.create_namespaced_lease(self.config.namespace, body, _request_timeout=timeout)
            else:
                # resourceVersion makes this a compare-and-swap: a concurrent writer gets 409.
                body = client.V1Lease(metadata=client.V1ObjectMeta(
                    name=self.config.name, namespace=self.config.namespace,
                    resource_version=lease.metadata.resource_version), spec=spec)
                written = self._leases.replace_namespaced_lease(self.config.name, self.config.namespace, body,
                                                                _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:
                log.debug("leader election: lost a race for Lease %s", self._where())
                return False
            raise LeaderElectionError(f"writing Lease {self._where()}: {exc.status} {exc.reason}") from exc
        version = written.metadata.resource_version if written.metadata else None
        self._seen = Observation(_record_of(written), version or "", self._clock())
        return True

    # ---- follower ----------------------------------------------------------------

    def wait_until_leading(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica holds the Lease (True), or until `stop` is set (False)."""
        self.clear_own_routing()
        logged = ""
        while stop is None or not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    self._route_to_self()
                    return True
            except LeaderElectionError as exc:
                log.warning("leader election: %s; retrying", exc)
            except _TRANSIENT as exc:
                log.warning("leader election: Lease %s unreachable (%s: %s); retrying", self._where(),
                            type(exc).__name__, exc)
            if self.holder and self.holder != logged:
                logged = self.holder
                log.info("leader election: standing by, Lease %s is held by %s", self._where(), logged)
            (stop or self._stop).wait(self.config.retry_period_s)
        return False

    # ---- leader ------------------------------------------------------------------

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew every renew_period_s on a thread; a watchdog thread calls `on_lost` once
        the renew deadline passes or the Lease names someone else."""
        if not self._leading:
            raise RuntimeError("start_renewing() before this replica leads")
        fired = threading.Lock()

        def lost(reason: str) -> None:
            if fired.acquire(blocking=False) and not self._stop.is_set():
                on_lost(reason)

        self._on_lost = lost
        renewer = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        watchdog = threading.Thread(target=self._watchdog_loop, name="lease-watchdog", daemon=True)
        self._threads = [renewer, watchdog]
        for thread in self._threads:
            thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.renew_period_s):
            try:
                if self.try_acquire_or_renew() and not self._routed:
                    self._route_to_self()
            except (LeaderElectionError, urllib3.exceptions.HTTPError, OSError) as exc:
                # Not fatal by itself: the watchdog decides when too long has passed.
                log.warning("leader election: renewing Lease %s failed (%s: %s)", self._where(),
                            type(exc).__name__, exc)
            if self._lost_reason:
                return

    def _watchdog_loop(self) -> None:
        while not self._stop.wait(WATCHDOG_TICK_S):
            if self._lost_reason:
                self._on_lost(self._lost_reason)
                return
            now = self._clock()
            if renew_overdue(self._last_renewed, now, self.config.renew_deadline_s):
                self._lose(f"no successful renewal for {now - self._last_renewed:.1f}s "
                           f"(deadline {self.config.renew_deadline_s}s)")
                self._on_lost(self._lost_reason)
                return

    def _lose(self, reason: str) -> None:
        self._leading = False
        self._lost_reason = reason

    def release(self) -> None:
        """Stop renewing and, if still the holder, hand the Lease back at once
        (client-go's ReleaseOnCancel): a follower takes over without waiting for expiry."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        self._stop.set()
        for thread in self._threads:
            thread.join(self.config.request_timeout_s * 3)
        if not self._leading:
            return
        self._leading = False
        self.clear_own_routing()
        timeout = self.config.request_timeout_s
        try:
            lease = self._leases.read_namespaced_lease(self.config.name, self.config.namespace, _request_timeout=timeout)
            if lease.spec is None or (lease.spec.holder_identity or "") != self.config.identity:
                return
            now = _micro_time(self._wall())
            lease.spec = client.V1LeaseSpec(holder_identity="", lease_duration_seconds=1,
                                            lease_transitions=lease.spec.lease_transitions or 0,
                                            acquire_time=now, renew_time=now)
            self._leases.replace_namespaced_lease(self.config.name, self.config.namespace, lease,
                                                  _request_timeout=timeout)
        except ApiException as exc:
            # 409: someone wrote meanwhile, so it is no longer ours to release.
            if exc.status != 409:
                log.warning("leader election: releasing Lease %s failed: %s %s", self._where(), exc.status, exc.reason)
            return
        except _TRANSIENT as exc:
            # Shutting down either way: expiry hands the Lease over a few seconds later.
            log.warning("leader election: releasing Lease %s failed (%s: %s); it expires in %ss", self._where(),
                        type(exc).__name__, exc, self.config.lease_duration_s)
            return
        log.info("leader election: %s released Lease %s", self.config.identity, self._where())

    # ---- routing the Services to the leader ---------------------------------------------

    def _route_to_self(self) -> None:
        self._routed = all(self._patch_endpoints(service, self._subsets(service)) for service in self.config.services)

    def clear_own_routing(self) -> None:
        """Empty the Endpoints that still name this pod (a restarted container keeps its pod's IP,
        and a released Lease should not keep receiving workers); never another leader's."""
        for service in self.config.services:
            current = self._read_endpoints(service)
            if current is None:
                continue
            ips = {a.get("ip") for s in current.get("subsets") or () for a in s.get("addresses") or ()}
            if self.config.pod_ip in ips:
                # resourceVersion makes the patch conditional: a new leader's write in between wins.
                self._patch_endpoints(service, [], resource_version=current["metadata"]["resourceVersion"])
        self._routed = False

    def _subsets(self, service: LeaderService) -> list[dict[str, Any]]:
        target = {"kind": "Pod", "name": self.config.pod_name, "namespace": self.config.namespace}
        return [{"addresses": [{"ip": self.config.pod_ip, **({"targetRef": target} if self.config.pod_name else {})}],
                 "ports": [{"name": name, "port": port, "protocol": "TCP"} for name, port in service.ports]}]

    def _read_endpoints(self, service: LeaderService) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        if not self.config.pod_ip:
            return None
        try:
            body = self._core.read_namespaced_endpoints(service.name, self.config.namespace,
                                                        _request_timeout=self.config.request_timeout_s)
        except ApiException as exc:
            log.warning("leader election: cannot read Endpoints %s: %s %s", service.name, exc.status, exc.reason)
            return None
        except _TRANSIENT as exc:
            log.warning("leader election: cannot read Endpoints %s (%s: %s)", service.name, type(exc).__name__, exc)
            return None
        result: dict[str, Any] = self._api.sanitize_for_serialization(body)
        return result

    def _patch_endpoints(self, service: LeaderService, subsets: list[dict[str, Any]], *,
                         resource_version: str | None = None) -> bool:
        from kubernetes.client.rest import ApiException

        if not self.config.pod_ip:
            return False
        patch: dict[str, Any] = {"subsets": subsets}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        try:
            self._core.patch_namespaced_endpoints(service.name, self.config.namespace, patch,
                                                  _request_timeout=self.config.request_timeout_s)
        except ApiException as exc:
            if exc.status != 409:  # 409: another leader wrote them since; theirs stands
                log.warning("leader election: cannot write Endpoints %s: %s %s", service.name, exc.status, exc.reason)
            return False
        except _TRANSIENT as exc:
            # Retried on the next renewal.
            log.warning("leader election: cannot write Endpoints %s (%s: %s)", service.name, type(exc).__name__, exc)
            return False
        return True

    def _where(self) -> str:
        return f"{self.config.namespace}/{self.config.name}"
