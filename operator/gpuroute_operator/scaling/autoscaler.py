"""The Autoscaler: where a pool's worker Deployment in the GPU cluster is scaled.

A WorkerPool with ``spec.scaling`` (:mod:`gpuroute_operator.core.scaling_spec`) names a
Secret holding a kubeconfig for the GPU cluster and the worker Deployment there. Every
AUTOSCALE_PERIOD_S :func:`autoscale_loop` hands each such pool's queue depth and jobs in
flight to :meth:`Autoscaler.reconcile`, which reads the Deployment's replica count
through the GPU cluster's own API (:mod:`gpuroute_operator.scaling.remote`), asks the
policy (:func:`gpuroute_operator.scaling.policy.desired_replicas`) for the count between
minReplicas and maxReplicas, and writes it when it differs. The loop runs as its own task
so a slow GPU-cluster API never delays heartbeats or dispatch, and reports what happened
as Events (one per distinct failure, not one per attempt).

Per pool the Autoscaler keeps when demand last reached zero (scale-to-zero waits
scaleDownIdleSeconds from then), its rate limit and the GPU-cluster client, rebuilt when
the Secret changes. Everything that blocks runs in worker threads; errors (unreachable
API, bad kubeconfig, missing Secret, RBAC refusals) end at :meth:`Autoscaler.reconcile`,
which logs them and returns a decision with ``applied=False``: they never reach the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpuroute_operator import metrics
from gpuroute_operator.core.dispatcher import Dispatcher
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.scaling_spec import ScalingSpec
from gpuroute_operator.kube.status_writer import StatusWriter
from gpuroute_operator.scaling.policy import ScaleDecision, desired_replicas
from gpuroute_operator.scaling.remote import (
    RemoteCluster,
    TokenCredential,
    cluster_from_secret,
    describe_error,
    is_unauthorized,
)

log = logging.getLogger(__name__)

AUTOSCALE_PERIOD_S = 2.0
"""How often pools with spec.scaling are looked at (the autoscaler rate-limits each to 5 s)."""


@dataclass
class _PoolState:
    idle_since: float | None = None
    last_attempt: float | None = None
    cluster: RemoteCluster | None = None
    fingerprint: str | None = None


class Autoscaler:
    """Scales each pool's remote worker Deployment; one instance per operator.

    ``read_secret(namespace, name)`` returns a Secret's base64 ``data`` (the engine
    passes ``Kube.read_secret_data``); it is called in a worker thread.
    ``credential_factory`` builds the Azure AD credential (default
    DefaultAzureCredential); ``allowed_scopes`` are the Azure AD scopes besides the AKS
    one that a Secret may ask the operator's token for (the operator's own configuration).
    Each pool talks to its GPU cluster at most once per ``min_interval_s``; calls in
    between only track idleness and return None.
    """

    def __init__(
        self,
        read_secret: Callable[[str, str], dict[str, str]],
        *,
        min_interval_s: float = 5.0,
        credential_factory: Callable[[], TokenCredential] | None = None,
        allowed_scopes: frozenset[str] = frozenset(),
    ) -> None:
        self._read_secret = read_secret
        self.min_interval_s = min_interval_s
        self._credential_factory = credential_factory
        self._allowed_scopes = allowed_scopes
        self._pools: dict[str, _PoolState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def remote(self, pool: str) -> RemoteCluster | None:
        """The cached GPU-cluster client of a pool, if one was built."""
        state = self._pools.get(pool)
        return state.cluster if state is not None else None

    async def reconcile(
        self, pool_name: str, scaling: ScalingSpec, *, queued: int, in_flight: int, now: float
    ) -> ScaleDecision | None:
        """One autoscaling step for ``pool_name``; None when rate-limited (nothing was read).

        ``now`` is a monotonic clock reading (the engine's tick time); idleness and the
        rate limit are measured on it. Never raises for remote or credential problems:
        those come back as ``applied=False`` with the reason.
        """
        state = self._pools.setdefault(pool_name, _PoolState())
        # Idleness is tracked on every call, also rate-limited ones, so the idle clock
        # starts when demand really reached zero.
        if queued + in_flight > 0:
            state.idle_since = None
        elif state.idle_since is None:
            state.idle_since = now
        if state.last_attempt is not None and now - state.last_attempt < self.min_interval_s:
            return None
        lock = self._locks.setdefault(pool_name, asyncio.Lock())
        if lock.locked():
            # A previous step is still talking to the GPU cluster (slow apiserver).
            return None
        async with lock:
            state.last_attempt = now
            return await self._step(pool_name, state, scaling, queued=queued, in_flight=in_flight, now=now)

    async def _step(
        self, pool: str, state: _PoolState, scaling: ScalingSpec, *, queued: int, in_flight: int, now: float
    ) -> ScaleDecision:
        namespace, name = scaling.deployment_namespace, scaling.deployment_name
        current: int | None = None
        desired: int | None = None
        try:
            cluster = await self._cluster(state, scaling)
            current = await asyncio.to_thread(cluster.get_scale, namespace, name)
            desired, reason = desired_replicas(
                scaling, queued=queued, in_flight=in_flight, current=current, idle_since=state.idle_since, now=now
            )
            if desired == current:
                return ScaleDecision(pool, current, desired, reason, applied=False)
            written = await asyncio.to_thread(cluster.patch_scale, namespace, name, desired)
        except Exception as exc:
            # The boundary this module promises: remote API down, bad kubeconfig,
            # missing Secret (whatever read_secret raises), RBAC refusal, Azure AD
            # failure. The engine keeps running; the reason goes to the pool.
            if is_unauthorized(exc) and state.cluster is not None:
                state.cluster.invalidate_token()
            reason = describe_error(exc)
            log.warning("autoscaling pool %s (%s/%s): %s", pool, namespace, name, reason)
            return ScaleDecision(pool, current, desired, reason, applied=False)
        log.info("pool %s: scaled %s/%s from %d to %d (%s)", pool, namespace, name, current, written, reason)
        return ScaleDecision(pool, current, written, reason, applied=True)

    async def _cluster(self, state: _PoolState, scaling: ScalingSpec) -> RemoteCluster:
        secret_ns, secret_name = scaling.kubeconfig_secret
        where = f"Secret {secret_ns}/{secret_name}"
        data = await asyncio.to_thread(self._read_secret, secret_ns, secret_name)
        # Only a digest is kept, so the Secret's content does not linger in memory twice.
        # The pinned API server is part of it: changing it on the pool rebuilds the client.
        fingerprint = hashlib.sha256(json.dumps(
            {"key": scaling.kubeconfig_key, "data": dict(data), "apiServer": scaling.api_server}, sort_keys=True,
        ).encode()).hexdigest()
        if state.cluster is not None and state.fingerprint == fingerprint:
            return state.cluster
        cluster = await asyncio.to_thread(
            cluster_from_secret, data, scaling.kubeconfig_key, where, api_server=scaling.api_server,
            allowed_scopes=self._allowed_scopes, credential_factory=self._credential_factory,
        )
        old, state.cluster, state.fingerprint = state.cluster, cluster, fingerprint
        if old is not None:
            old.close()
        return cluster

    def forget(self, pool: str) -> None:
        """Drop a pool's state and client (the WorkerPool or its scaling was removed)."""
        state = self._pools.pop(pool, None)
        self._locks.pop(pool, None)
        if state is not None and state.cluster is not None:
            state.cluster.close()

    def close(self) -> None:
        """Close every GPU-cluster client."""
        for pool in list(self._pools):
            self.forget(pool)


# -- the periodic loop --------------------------------------------------------------


async def autoscale_loop(autoscaler: Autoscaler, dispatcher: Dispatcher, writer: StatusWriter,
                         failures: dict[str, str]) -> None:
    """Runs forever; `failures` (pool -> why its scaling last failed) is shared with the pool
    status, which shows it as the ScalingReady condition."""
    while True:
        await asyncio.sleep(AUTOSCALE_PERIOD_S)
        try:
            await _reconcile_all(autoscaler, dispatcher, writer, failures)
        except Exception:  # one bad pass must not end autoscaling for good
            log.exception("autoscale pass failed")


async def _reconcile_all(autoscaler: Autoscaler, dispatcher: Dispatcher, writer: StatusWriter,
                         failures: dict[str, str]) -> None:
    now = time.monotonic()
    for name, pool in list(dispatcher.pools.items()):
        if pool.spec.scaling is None:
            autoscaler.forget(name)  # scaling removed from the spec: close its client
            failures.pop(name, None)
            continue
        queued = dispatcher.demand(pool, time.time())
        decision = await autoscaler.reconcile(name, pool.spec.scaling, queued=queued, in_flight=pool.busy, now=now)
        if decision is None:
            continue
        ref = ObjectRef("WorkerPool", name)
        if decision.applied:
            metrics.DESIRED_REPLICAS.labels(name).set(decision.desired or 0)
            writer.event(ref, "Scaled", f"{decision.current} -> {decision.desired} replicas: {decision.reason}")
        if decision.desired is None:
            if failures.get(name) != decision.reason:
                failures[name] = decision.reason
                writer.event(ref, "ScaleFailed", decision.reason, warning=True)
        else:
            failures.pop(name, None)
