"""A WorkerPool's status, rendered from what the dispatcher knows, and when it is worth a write.

Rendering is pure. `PoolStatusPublisher` decides when a pool's status changed enough to
be patched: a change of who is connected or whether the pool is available is written at
once; counters (in flight, queued, throughput) at most every POOL_STATUS_MIN_S; heartbeat
churn (RTT, timestamps) alone at most every POOL_STATUS_EVERY_S. Under load the counters
change on every tick, and a write per tick would be a write every 0.5 s per pool.
"""

from __future__ import annotations

from typing import Any

from gpuroute_operator import metrics
from gpuroute_operator.core.dispatcher import Dispatcher
from gpuroute_operator.core.jobs import Place
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.pools import PoolState
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.timestamps import now_rfc3339
from gpuroute_operator.kube.status_writer import StatusWriter

POOL_STATUS_EVERY_S = 10.0
"""Pool status is re-written at least this often while it changes only in heartbeat details."""
POOL_STATUS_MIN_S = 3.0
"""Counter-only changes (in flight, queued, throughput) are written at most this often."""
SUBSTANTIVE = ("phase", "connectedWorkers", "workerIds", "available", "scaling", "observedGeneration")
"""Fields of the comparison key whose change is written at once."""
MAX_PIPELINES_SHOWN = 20
"""Cost classes listed on a WorkerPool's status, most used first (the object must stay small)."""


def pool_status(pool: PoolState, *, problem: str = "", scaling_problem: str = "", now: float) -> dict[str, Any]:
    """The WorkerPool status subresource for `pool` as it is at `now`; `scaling_problem` is why
    its remote autoscaling last failed ("" when it works or the pool has no spec.scaling)."""
    view = pool.view()
    available = view.workers > 0 and not problem
    phase = "Available" if available else ("Degraded" if view.workers > 0 else "Unavailable")
    reason = "WorkersConnected" if available else ("KeysProblem" if problem else "NoWorkers")
    message = problem or f"{view.workers} workers connected"
    if not problem and not view.workers and pool.spec.endpoints:
        message = f"no worker answered yet; dialing {', '.join(pool.spec.endpoints)}"
    last = max((w.last_seen for w in pool.workers.values()), default=None)
    return {
        "phase": phase,
        "connectedWorkers": view.workers,
        "workers": [{"id": w.worker, "key": w.principal.key, "gpu": w.device, "capacity": w.capacity,
                     "inFlight": len(w.attempts), "rttMs": round(w.rtt_ms, 3) if w.rtt_ms is not None else None,
                     "lastHeartbeat": now_rfc3339(w.last_seen)} for w in pool.workers.values()],
        "inFlight": view.busy,
        "queued": view.queued,
        "rttMs": round(view.rtt_ms, 3) if view.rtt_ms is not None else None,
        "throughputMpixPerS": round(pool.mpix_per_s, 3) if pool.mpix_per_s is not None else None,
        "pipelines": pipeline_status(pool),
        "lastHeartbeat": now_rfc3339(last) if last else None,
        "conditions": [{"type": "Available", "status": "True" if available else "False", "reason": reason,
                        "message": message, "lastTransitionTime": now_rfc3339(now)},
                       *_scaling_condition(pool, scaling_problem, now)],
        "observedGeneration": pool.spec.generation,
    }


def _scaling_condition(pool: PoolState, problem: str, now: float) -> list[dict[str, Any]]:
    """ScalingReady, for pools with spec.scaling: False with the reason (a refused kubeconfig
    entry, an unreachable GPU-cluster API) until the autoscaler succeeds again."""
    if pool.spec.scaling is None:
        return []
    return [{"type": "ScalingReady", "status": "False" if problem else "True",
             "reason": "ScaleFailed" if problem else "Reconciling", "message": problem,
             "lastTransitionTime": now_rfc3339(now)}]


def pipeline_status(pool: PoolState) -> list[dict[str, Any]]:
    """What the router has learned of the pool's speed, per pipeline."""
    rows = []
    for name, fit in sorted(pool.fits.items(), key=lambda item: -item[1].samples)[:MAX_PIPELINES_SHOWN]:
        line = fit.line()
        if line is None:
            continue
        rows.append({"costClass": name, "jobs": fit.samples, "overheadMs": round(line[0], 3),
                     "msPerMpix": round(line[1], 3)})
    return rows


class PoolStatusPublisher:
    """Writes pool statuses when they change in substance, and exports the gauges."""

    def __init__(self, writer: StatusWriter) -> None:
        self._writer = writer
        self._sent: dict[str, tuple[dict[str, Any], float, str]] = {}

    def publish(self, dispatcher: Dispatcher, problems: dict[str, str], now: float,
                scaling_problems: dict[str, str] | None = None) -> None:
        metrics.UNROUTED.set(len(dispatcher.unrouted))
        metrics.STORAGE_WAITING.set(dispatcher.held_count())
        by_phase = {phase: 0 for phase in (Phase.QUEUED, Phase.DISPATCHED, Phase.PROCESSING)}
        for job in dispatcher.jobs.values():
            if job.place is not Place.DONE:
                by_phase[job.phase] = by_phase.get(job.phase, 0) + 1
        for phase, count in by_phase.items():
            metrics.JOBS_ACTIVE.labels(phase.value).set(count)
        for name, pool in dispatcher.pools.items():
            status = pool_status(pool, problem=problems.get(name, ""),
                                 scaling_problem=(scaling_problems or {}).get(name, ""), now=now)
            for priority in ("realtime", "batch"):
                metrics.QUEUE_DEPTH.labels(name, priority).set(pool.queue.count(priority))
            metrics.IN_FLIGHT.labels(name).set(status["inFlight"])
            if status["rttMs"] is not None:
                metrics.RTT_SECONDS.labels(name).set(status["rttMs"] / 1000.0)
            # Compare without the fields that change every heartbeat.
            key = {k: v for k, v in status.items()
                   if k not in ("lastHeartbeat", "conditions", "workers", "rttMs", "pipelines")}
            key["workerIds"] = sorted(w["id"] for w in status["workers"])
            key["available"] = status["conditions"][0]["status"]
            key["scaling"] = [(c["status"], c["message"]) for c in status["conditions"][1:]]
            previous = self._sent.get(name)
            if previous and previous[0] == key and now - previous[1] < POOL_STATUS_EVERY_S:
                continue
            substantive = previous is None or any(previous[0].get(f) != key.get(f) for f in SUBSTANTIVE)
            if previous is not None and not substantive and now - previous[1] < POOL_STATUS_MIN_S:
                continue
            if previous and previous[0].get("available") == key["available"]:
                status["conditions"][0]["lastTransitionTime"] = previous[2]
            self._sent[name] = (key, now, status["conditions"][0]["lastTransitionTime"])
            self._writer.update(ObjectRef("WorkerPool", name), status, urgent=substantive)

    def forget(self, name: str) -> None:
        self._sent.pop(name, None)
