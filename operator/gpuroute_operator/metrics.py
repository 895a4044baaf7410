"""Prometheus metrics of the operator process."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS_FINISHED = Counter("gpuroute_jobs_finished_total", "ImageJobs that reached a terminal phase.", ["phase", "reason"])
JOBS_ACTIVE = Gauge("gpuroute_jobs_active", "Non-terminal ImageJobs the operator follows, by phase.", ["phase"])
JOBS_ADMITTED = Counter("gpuroute_jobs_admitted_total", "ImageJobs admitted into the scheduler.", ["priority"])
JOBS_REQUEUED = Counter("gpuroute_jobs_requeued_total", "Attempts re-queued after a lost worker or a retryable error.",
                        ["reason"])
QUEUE_DEPTH = Gauge("gpuroute_queue_depth", "Jobs waiting in a pool's queue.", ["pool", "priority"])
UNROUTED = Gauge("gpuroute_unrouted_jobs", "Jobs with no eligible pool right now.")
STORAGE_WAITING = Gauge("gpuroute_storage_waiting_jobs",
                        "Jobs waiting because the operator cannot sign for their storage right now.")
IN_FLIGHT = Gauge("gpuroute_pool_in_flight", "Jobs dispatched to a pool and not yet answered.", ["pool"])
DESIRED_REPLICAS = Gauge("gpuroute_pool_desired_replicas", "Worker replicas the autoscaler last asked the GPU cluster for.",
                         ["pool"])
WORKERS = Gauge("gpuroute_pool_connected_workers", "Workers connected per pool.", ["pool"])
RTT_SECONDS = Gauge("gpuroute_pool_rtt_seconds", "Moving average of heartbeat round trips per pool.", ["pool"])
DISPATCH_SECONDS = Histogram("gpuroute_dispatch_latency_seconds", "Admission to first dispatch of a job.",
                             buckets=_LATENCY_BUCKETS)
E2E_SECONDS = Histogram("gpuroute_job_duration_seconds", "Admission to Completed.", ["pool"], buckets=_LATENCY_BUCKETS)
MESSAGES = Counter("gpuroute_socket_messages_total", "Protocol messages on the worker socket.", ["direction", "kind"])
REJECTED_MESSAGES = Counter("gpuroute_socket_rejected_messages_total",
                            "Messages dropped: malformed, unauthenticated, from unregistered peers, or for attempts "
                            "not sent on that connection.", ["reason"])
REJECTED_CONNECTIONS = Counter("gpuroute_socket_rejected_connections_total", "CURVE handshakes refused by ZAP.", ["reason"])
WORKER_DISCONNECTS = Counter("gpuroute_worker_disconnects_total", "Workers lost or gone.", ["pool", "reason"])
STATUS_PATCHES = Counter("gpuroute_status_patches_total", "ImageJob status patches sent to the API server.", ["outcome"])

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Counter | Gauge | Histogram, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: prometheus_client validates and looks the labels up
    under a lock on every call, a few microseconds that the socket loop pays per message."""
    entry = (id(metric), values)
    child = _children.get(entry)
    if child is None:
        if len(_children) >= 4096:  # label values come from pool names and reasons: bounded, but never trust it
            _children.clear()
        child = _children[entry] = metric.labels(*values)
    return child
