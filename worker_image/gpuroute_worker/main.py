"""Start a worker: load models once, join the pool, serve until told to stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import torch
import zmq.asyncio

from gpuroute_worker.config import WorkerConfig
from gpuroute_worker.connection import OperatorLink
from gpuroute_worker.executor import BatchExecutor, device_name, pick_device
from gpuroute_worker.health import serve_health
from gpuroute_worker.runtime import JobRunner
from gpuroute_worker.sr.registry import ModelRegistry, ModelSource

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 25.0
"""On SIGTERM, in-flight jobs get this long to finish (pods get 30 s by default)."""


async def serve(config: WorkerConfig) -> None:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = pick_device(config.device)
    config = dataclasses.replace(config, gpu_name=device_name(device))
    models = ModelRegistry({name: ModelSource(m.uri, m.sha256) for name, m in config.models.items()})
    # Verify checksums and read architectures once, before joining: a bad weights file
    # stops the worker at start-up, not at its first job, and no job hashes files on the loop.
    await asyncio.to_thread(models.prepare)
    executor = BatchExecutor(device, models, max_batch=config.max_batch, max_wait_ms=config.max_batch_wait_ms,
                             max_working_bytes=config.max_working_bytes)
    context = zmq.asyncio.Context()
    link = OperatorLink(config, context)
    runner = JobRunner(config, executor, link.send)
    link.runner = runner
    health = serve_health(config.health_port, link.connected.is_set) if config.health_port else None

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("worker %s of pool %s on %s, capacity %d, %s",
             config.worker_id, config.pool, config.gpu_name, config.capacity, link.peer)
    link_task = loop.create_task(link.run(), name="operator-link")
    await stopping.wait()
    log.info("stopping: draining %d in-flight jobs", runner.in_flight)
    await runner.drain(DRAIN_TIMEOUT_S)
    link.stop()
    await link_task
    executor.close()
    if health is not None:
        health.shutdown()
    context.term()
