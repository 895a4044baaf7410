"""The autoscale loop: every AUTOSCALE_PERIOD_S, each pool with spec.scaling is reconciled.

It runs as its own task so a slow GPU-cluster API never delays heartbeats or dispatch.
The decisions are the Autoscaler's; this loop feeds it the dispatcher's queue figures
and reports what happened as Events (one per distinct failure, not one per attempt).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gpuroute_operator import metrics
from gpuroute_operator.core.dispatcher import Dispatcher
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.kube.status_writer import StatusWriter
from gpuroute_operator.scaling.autoscaler import Autoscaler

log = logging.getLogger(__name__)

AUTOSCALE_PERIOD_S = 2.0
"""How often pools with spec.scaling are looked at (the autoscaler rate-limits each to 5 s)."""


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
