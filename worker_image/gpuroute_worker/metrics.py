"""Prometheus metrics of a worker process (one worker per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("gpuroute_worker_jobs_total", "Jobs finished by this worker, by outcome (completed or an error code).",
               ["outcome"])
STAGE_SECONDS = Histogram(
    "gpuroute_worker_stage_seconds", "Time per job stage.", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPUTE_SECONDS = Histogram(
    "gpuroute_worker_batch_compute_seconds", "Wall time of one executed batch on the device.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OP_SECONDS = Histogram(
    "gpuroute_worker_op_seconds", "Compute time of one pipeline step for a whole batch, by op.", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram("gpuroute_worker_batch_size", "Requests per executed batch.", buckets=(1, 2, 4, 8, 16, 32, 64))
ANSWERED_AGAIN = Counter("gpuroute_worker_answered_again_total",
                         "JOBs answered without computing: from the result cache, or joined while running.", ["how"])
IN_FLIGHT = Gauge("gpuroute_worker_in_flight", "Jobs accepted and not yet answered.")
GPU_MEMORY_BYTES = Gauge("gpuroute_worker_gpu_memory_bytes", "GPU memory allocated by torch after the last batch.")
REJECTED_MESSAGES = Counter("gpuroute_worker_rejected_messages_total", "Messages dropped because they did not parse.", ["reason"])
DECODES = Counter("gpuroute_worker_decodes_total", "Inputs decoded, by where: device (nvJPEG) or host (Pillow).",
                  ["where"])
RECONNECTS = Counter("gpuroute_worker_reconnects_total", "Times the worker re-created its socket to the operator.")
CONNECTED = Gauge("gpuroute_worker_connected", "1 while the operator answers heartbeats.")
