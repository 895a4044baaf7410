"""Dispatch overhead: one small job over the persistent CURVE socket vs HTTPS per job.

Socket side: a real `gpuroute worker` process dials a ROUTER that runs the operator's
ZAP handler (gpuroute_operator.link.zap) and CURVE server keys; the bench speaks the wire
protocol (gpuroute.protocol) itself: JOB with an inline 256x256 PNG and an output URL,
wait for RESULT. HTTPS side: a minimal server written here around the same worker code
(decode_image, run_pipeline with the executor's uint8/float conversions, encode_image,
upload), called with a NEW TCP + TLS connection per job, the pattern the socket design
replaces (self-signed certificate from the `cryptography` package). A third series
reuses one HTTPS keep-alive connection, to show which part of the gap is the
connection set-up. Every side uploads its output to the same local PUT sink, and both
servers compute on one torch thread.

The series are interleaved job by job (socket, HTTPS new connection, HTTPS keep-alive),
so load from other work on the shared cores falls on all of them alike.

The link is a simulated cross-cloud one: a userspace delay proxy (TcpProxy, 35 ms each
way, 70 ms RTT) sits between the worker and the operator's ROUTER, and between the
HTTPS client and server. Loopback would hide what the persistent socket saves: each new
connection pays a TCP and a TLS round trip before its request's own round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests
import zmq
import zmq.asyncio
from PIL import Image

from bench.common import row, summary_ms
from gpuroute import protocol
from gpuroute.curve_keys import KeyPair, write_key_file
from gpuroute.ops_catalog import normalize_steps
from gpuroute.protocol import Kind
from gpuroute_dev.localenv.tcpproxy import TcpProxy
from gpuroute_dev.localenv.tls import self_signed

STEPS = [{"op": "invert"}]
ONE_WAY_DELAY_S = 0.035
"""Added by the proxy in each direction: 70 ms RTT, as between two clouds' regions."""
WARMUP = 3
"""Untimed jobs first: they pay torch's first-call costs on each side."""


def _png() -> bytes:
    try:
        from skimage import data

        image = Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC)
    except ImportError:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class _Sink(BaseHTTPRequestHandler):
    """Accepts PUTs and discards them: the output target of every series."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return


@contextlib.contextmanager
def _serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _https_server(sink_url: str, cert: Path, key: Path) -> ThreadingHTTPServer:
    import torch

    from gpuroute_worker.codec import decode_image, encode_image
    from gpuroute_worker.ops import run_pipeline
    from gpuroute_worker.transfer import upload

    steps = normalize_steps(STEPS)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive possible; the per-job client closes anyway
        disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            pixels = decode_image(data, max_bytes=64 << 20, max_pixels=64_000_000).pixels
            with torch.inference_mode():
                out = run_pipeline(pixels.unsqueeze(0).to(torch.float32).div_(255.0), steps)
                quantized = out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)[0]
            encoded = encode_image(quantized, fmt="png", quality=90)
            upload(f"{sink_url}/https.png", encoded.data, headers={"Content-Type": "image/png"}, timeout_s=10)
            body = encoded.sha256.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


class _SocketSide:
    """A ROUTER with CURVE + ZAP, as the operator binds it, and one real worker process."""

    def __init__(self, folder: Path, delay_s: float) -> None:
        from gpuroute_operator.link.zap import ZapHandler

        self.folder = folder
        server_keys, worker_keys = KeyPair.generate(), KeyPair.generate()
        write_key_file(folder / "w.key_secret", worker_keys.secret)
        (folder / "server.key").write_bytes(server_keys.public + b"\n")
        self.context = zmq.asyncio.Context()
        self.zap = ZapHandler(self.context)
        self.zap.set_pool_keys("bench", {"bench-worker": worker_keys.public}, ())
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.router.curve_server = True
        self.router.curve_secretkey, self.router.curve_publickey = server_keys.secret, server_keys.public
        self.router.setsockopt(zmq.ZAP_DOMAIN, b"gpuroute")
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        # The worker dials the ROUTER through the delay proxy, as it would across clouds.
        self.proxy = TcpProxy("127.0.0.1", self.port, delay_s=delay_s).start()
        self.worker: subprocess.Popen[bytes] | None = None
        self.routing_id = b""
        self._beater: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.zap.start()
        log = (self.folder / "worker.log").open("wb")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "gpuroute.cli", "worker", "--operator", f"tcp://127.0.0.1:{self.proxy.port}",
             "--pool", "bench", "--id", "bench-worker", "--key-file", str(self.folder / "w.key_secret"),
             "--server-public-key-file", str(self.folder / "server.key"), "--health-port", "0", "--threads", "1",
             "--device", "cpu", "--max-batch", "1", "--capacity", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        log.close()
        try:
            while True:
                frames = await asyncio.wait_for(self.router.recv_multipart(), timeout=90)
                if protocol.decode(frames[1:]).kind is Kind.READY:
                    self.routing_id = frames[0]
                    break
        except TimeoutError as exc:
            raise RuntimeError(f"the bench worker never sent READY:\n{self.log_tail()}") from exc
        self._beater = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        # The worker treats a silent operator as gone after HEARTBEAT_LIVENESS beats.
        while True:
            await self.router.send_multipart([self.routing_id, *protocol.encode(Kind.HEARTBEAT, {})])
            await asyncio.sleep(protocol.HEARTBEAT_INTERVAL_S)

    async def job(self, index: int, png: bytes, sink_url: str) -> tuple[float, float]:
        """(round trip seconds, the worker's own workerMs / 1000) for one JOB."""
        header = {"job": f"bench-{index}/1", "steps": STEPS, "input": {"inline": True},
                  "output": {"url": f"{sink_url}/socket.png", "headers": {}, "format": "png", "quality": 90},
                  "timeoutS": 30}
        started = time.perf_counter()
        await self.router.send_multipart([self.routing_id, *protocol.encode(Kind.JOB, header, png)])
        while True:
            reply = await asyncio.wait_for(self.router.recv_multipart(), timeout=30)
            message = protocol.decode(reply[1:])
            if message.kind in (Kind.RESULT, Kind.ERROR) and message.header.get("job") == header["job"]:
                break
        elapsed = time.perf_counter() - started
        if message.kind is Kind.ERROR:
            raise RuntimeError(f"worker failed the bench job: {dict(message.header)}")
        return elapsed, message.body.timing.worker_ms / 1000.0

    def log_tail(self) -> str:
        try:
            return "\n".join((self.folder / "worker.log").read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""

    async def close(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)  # its own session: started by us, so ours to end
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(10)
        self.router.close()
        self.proxy.stop()
        await self.zap.stop()
        self.context.term()


async def _interleaved(jobs: int, folder: Path, sink_url: str, https_url: str, cert: Path,
                       delay_s: float) -> dict[str, list[float]]:
    png = _png()
    series: dict[str, list[float]] = {"socket": [], "worker_ms": [], "https_new": [], "https_keepalive": []}
    side = _SocketSide(folder, delay_s)
    keepalive = requests.Session()

    def https_new() -> float:
        started = time.perf_counter()
        with requests.Session() as session:  # a new TCP + TLS connection for this job only
            response = session.post(https_url, data=png, verify=str(cert), timeout=30)
        response.raise_for_status()
        return time.perf_counter() - started

    def https_reused() -> float:
        started = time.perf_counter()
        response = keepalive.post(https_url, data=png, verify=str(cert), timeout=30)
        response.raise_for_status()
        return time.perf_counter() - started

    call: Callable[[], float]
    try:
        await side.start()
        for i in range(jobs + WARMUP):
            socket_s, worker_s = await side.job(i, png, sink_url)
            # The HTTPS calls block the loop for ~10 ms; heartbeats are 1 s apart, so harmless.
            figures = {"socket": socket_s, "worker_ms": worker_s}
            for name, call in (("https_new", https_new), ("https_keepalive", https_reused)):
                figures[name] = call()
            if i >= WARMUP:
                for name, value in figures.items():
                    series[name].append(value)
    finally:
        keepalive.close()
        await side.close()
    return series


def run(*, jobs: int = 100, delay_s: float = ONE_WAY_DELAY_S) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the HTTPS server computes on one thread, as the worker process does
    try:
        with tempfile.TemporaryDirectory(prefix="gpuroute-bench-dispatch-") as tmp, \
                _serving(ThreadingHTTPServer(("127.0.0.1", 0), _Sink)) as sink:
            folder = Path(tmp)
            sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
            cert, key = self_signed(folder)
            with _serving(_https_server(sink_url, cert, key)) as https, \
                    TcpProxy("127.0.0.1", https.server_address[1], delay_s=delay_s) as link:
                https_url = f"https://127.0.0.1:{link.port}/job"
                series = asyncio.run(_interleaved(jobs, folder, sink_url, https_url, cert, delay_s))
    finally:
        torch.set_num_threads(threads)
    ours, new, reused = summary_ms(series["socket"]), summary_ms(series["https_new"]), summary_ms(series["https_keepalive"])
    link = f"{round(2 * delay_s * 1000):g} ms RTT link"
    overhead = summary_ms([s - w for s, w in zip(series["socket"], series["worker_ms"], strict=True)])
    return {
        "jobs": jobs, "one_way_delay_ms": delay_s * 1000, "socket": ours, "socket_minus_worker_time": overhead,
        "worker_time": summary_ms(series["worker_ms"]),
        "https_new_connection": new, "https_keepalive": reused,
        "rows": [
            row("dispatch", f"small job round trip p50, {link}, persistent CURVE socket", ours["p50_ms"], "ms",
                "HTTPS, new TLS connection per job", new["p50_ms"], higher_is_better=False),
            row("dispatch", f"small job round trip p95, {link}, persistent CURVE socket", ours["p95_ms"], "ms",
                "HTTPS, new TLS connection per job", new["p95_ms"], higher_is_better=False),
            row("dispatch", f"small job round trip p50, {link}, persistent CURVE socket", ours["p50_ms"], "ms",
                "HTTPS, one keep-alive connection", reused["p50_ms"], higher_is_better=False),
        ],
    }


if __name__ == "__main__":
    out = run(jobs=int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    print({k: v for k, v in out.items() if k != "rows"})
