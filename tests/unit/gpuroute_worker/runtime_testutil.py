"""A real JobRunner on the CPU executor against a real HTTP object store on 127.0.0.1:
GET serves objects by path, PUT stores them. The runtime tests drive whole jobs through it.

Not a test module (no test_ prefix).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from gpuroute import protocol
from gpuroute.protocol import Kind, Message
from gpuroute_worker.config import WorkerConfig
from gpuroute_worker.executor import BatchExecutor
from gpuroute_worker.runtime import JobRunner

Sent = list[tuple[Kind, Mapping[str, Any]]]


class Storage:
    """GET serves `objects` by path (404 otherwise; a path in `slow` answers after `slow_s`),
    PUT stores the body under its path."""

    def __init__(self, objects: dict[str, bytes], slow: set[str] | None = None, slow_s: float = 0.0) -> None:
        self.objects = dict(objects)
        self.slow = slow or set()
        self.puts: list[str] = []
        """Paths PUT to, in order."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path in outer.slow:
                    time.sleep(slow_s)
                body = outer.objects.get(path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                outer.objects[path] = body
                outer.puts.append(path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@contextmanager
def storage(objects: dict[str, bytes], **kwargs: Any) -> Iterator[Storage]:
    store = Storage(objects, **kwargs)
    try:
        yield store
    finally:
        store.server.shutdown()
        store.server.server_close()


def cpu_config(**overrides: Any) -> WorkerConfig:
    """A CPU worker's settings for the tests (no operator, no health server)."""
    fields: dict[str, Any] = {"operator_endpoint": "tcp://127.0.0.1:1", "pool": "p", "worker_id": "w",
                              "secret_key": b"", "server_public_key": b"", "device": "cpu",
                              "health_port": None, "capacity": 2, **overrides}
    return WorkerConfig(**fields)


def wire(header: Mapping[str, Any]) -> Message:
    """The JOB as the operator's encoder and the worker's decoder see it."""
    return Message(Kind.JOB, protocol.decode(protocol.encode(Kind.JOB, dict(header))).header)


def with_runner(script: Callable[[JobRunner], Awaitable[None]], **config: Any) -> Sent:
    """Run `script` against a fresh JobRunner on a CPU executor; every message it sent.
    The executor is closed (its thread joined) before this returns."""
    sent: Sent = []
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0.0)
    try:
        runner = JobRunner(cpu_config(**config), executor, lambda kind, h: sent.append((kind, h)))
        asyncio.run(script(runner))
    finally:
        executor.close(timeout=60.0)
    return sent


def run_jobs(*headers: Mapping[str, Any], **config: Any) -> Sent:
    """Send each JOB in turn, waiting for its answer before the next."""

    async def script(runner: JobRunner) -> None:
        for header in headers:
            runner.handle_job(wire(header))
            await runner.drain(60.0)

    return with_runner(script, **config)
