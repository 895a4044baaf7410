"""Item groups on a worker: one JOB carrying several batch items through the real JobRunner
(CPU executor, real HTTP server for the inputs and outputs), answered by one RESULT with one
answer per item, in order; an item fails alone, with its own code."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image
from prometheus_client import REGISTRY

from gpuroute import protocol
from gpuroute.protocol import ErrorCode, Kind, Message
from gpuroute_worker.config import WorkerConfig
from gpuroute_worker.executor import BatchExecutor
from gpuroute_worker.runtime import JobRunner


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 9, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class Storage:
    """GET serves `objects` by path (404 otherwise; a path in `slow` answers after `slow_s`),
    PUT stores the body under its path."""

    def __init__(self, objects: dict[str, bytes], slow: set[str] | None = None, slow_s: float = 0.0) -> None:
        self.objects = dict(objects)
        self.slow = slow or set()
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
                outer.objects[self.path.split("?")[0]] = body
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


def _run(header: dict[str, Any], *, repeat: int = 1) -> list[tuple[Kind, Mapping[str, Any]]]:
    sent: list[tuple[Kind, Mapping[str, Any]]] = []
    config = WorkerConfig(operator_endpoint="tcp://127.0.0.1:1", pool="p", worker_id="w", secret_key=b"",
                          server_public_key=b"", device="cpu", health_port=None, capacity=2)
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0.0)
    try:
        runner = JobRunner(config, executor, lambda kind, h: sent.append((kind, h)))
        # The header as the operator's encoder and the worker's decoder see it.
        message = protocol.decode(protocol.encode(Kind.JOB, header))

        async def main() -> None:
            for _ in range(repeat):
                runner.handle_job(Message(Kind.JOB, message.header))
                await runner.drain(30.0)

        asyncio.run(main())
    finally:
        executor.close()
    return sent


def _group(store: Storage, names: list[str], **extra: Any) -> dict[str, Any]:
    return {"job": "grp/1", "steps": [{"op": "invert"}], "timeoutS": 30.0, "output": {"format": "png"},
            "items": [{"input": f"{store.url}/in/{n}?sig=1", "output": f"{store.url}/out/{n}?sig=2",
                       "headers": {"x-amz-meta-item": n}} for n in names], **extra}


def test_every_item_is_answered_in_order_and_fails_alone() -> None:
    objects = {"/in/a.png": _png(1), "/in/b.png": b"\x89PNG\r\n\x1a\n" + b"junk" * 20, "/in/d.png": _png(4)}
    with storage(objects) as store:
        sent = _run(_group(store, ["a.png", "b.png", "c.png", "d.png"]))
        stored = dict(store.objects)
    assert [kind for kind, _ in sent] == [Kind.ACCEPTED, Kind.RESULT], sent
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert isinstance(result, protocol.Result) and result.output is None and len(result.items) == 4
    a, b, c, d = result.items
    assert a.ok and d.ok and (a.input_width, a.input_height) == (9, 6)
    assert b.code is ErrorCode.INVALID_INPUT and "not a readable image" in b.message
    assert c.code is ErrorCode.INVALID_INPUT and "404" in c.message  # a missing object will not appear on a retry
    for name, answer in (("a.png", a), ("d.png", d)):
        written = stored[f"/out/{name}"]
        assert answer.output is not None and hashlib.sha256(written).hexdigest() == answer.output.sha256
        expected = 255 - np.asarray(Image.open(io.BytesIO(objects[f"/in/{name}"])))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(written))), expected)
        assert answer.timing.download_ms > 0 and answer.timing.encode_ms > 0
    assert "/out/b.png" not in stored and "/out/c.png" not in stored


def test_an_item_past_its_own_timeout_fails_alone_and_retryably() -> None:
    objects = {"/in/a.png": _png(1), "/in/slow.png": _png(2)}
    with storage(objects, slow={"/in/slow.png"}, slow_s=2.0) as store:
        sent = _run(_group(store, ["a.png", "slow.png"], itemTimeoutS=0.5))
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert result.items[0].ok
    assert result.items[1].code is ErrorCode.TIMEOUT and result.items[1].code.retryable
    assert "itemTimeoutSeconds" in result.items[1].message


def test_a_group_sent_again_is_answered_from_the_cache() -> None:
    with storage({"/in/a.png": _png(1), "/in/b.png": _png(2)}) as store:
        sent = _run(_group(store, ["a.png", "b.png"]), repeat=2)
    kinds = [kind for kind, _ in sent]
    assert kinds == [Kind.ACCEPTED, Kind.RESULT, Kind.RESULT], kinds
    first, again = sent[1][1], sent[2][1]
    assert again.get("cached") is True and again["items"] == first["items"]


def test_a_bad_pipeline_fails_every_item_with_the_same_reason() -> None:
    with storage({"/in/a.png": _png(1)}) as store:
        sent = _run({**_group(store, ["a.png", "a.png"]), "steps": [{"op": "no-such-op"}]})
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert [item.code for item in result.items] == [ErrorCode.INVALID_INPUT] * 2


def _steps_run(op: str) -> float:
    """Pipeline steps of `op` the executor has run in this process (its per-op histogram)."""
    value = REGISTRY.get_sample_value("gpuroute_worker_op_seconds_count", {"op": op})
    return value or 0.0


def test_an_item_cut_off_by_its_timeout_stops_computing() -> None:
    # 16 steps on a 2048x2048 image (3x up, then down): seconds of CPU unbounded. Cut off
    # after 0.5 s, the pipeline stops at its next step instead of holding the executor.
    gradient = np.tile(np.arange(2048, dtype=np.uint16)[None, :] // 8, (2048, 1)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gradient] * 3, axis=2)).save(buffer, "PNG")
    steps = [{"op": "upscale", "scale": 3.0, "method": "lanczos"}, {"op": "resize", "width": 2048, "method": "lanczos"}] * 8
    before = _steps_run("upscale")
    with storage({"/in/big.png": buffer.getvalue()}) as store:
        sent = _run({**_group(store, ["big.png"], itemTimeoutS=0.5), "steps": steps})
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert result.items[0].code is ErrorCode.TIMEOUT and "itemTimeoutSeconds (0.5 s)" in result.items[0].message
    # _run closes the executor, which waits for its thread: every step it ran is counted by now.
    assert _steps_run("upscale") - before <= 2, _steps_run("upscale") - before
