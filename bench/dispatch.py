"""Dispatch overhead: one small job over the persistent CURVE socket vs HTTPS per job.

Socket side: a real `gpuroute worker` process dialing a ROUTER with the operator's ZAP
handler; the bench sends JOB messages with an inline 256x256 PNG and waits for RESULT.
HTTPS side: a minimal server written here around the same worker pipeline (decode,
run_pipeline, encode, upload), called with a NEW TLS connection per job: the pattern
the socket design replaces. Both upload the output to the same local PUT sink.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
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
from gpuroute.localenv.stack import free_port
from gpuroute.ops_catalog import normalize_steps
from gpuroute.protocol import Kind

STEPS = [{"op": "invert"}]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _Sink(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return


def _serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def https_side(jobs: int, sink_url: str, folder: Path) -> list[float]:
    import torch

    from gpuroute_worker.codec import decode_image, encode_image
    from gpuroute_worker.ops import run_pipeline
    from gpuroute_worker.transfer import upload

    torch.set_num_threads(1)  # as the worker process runs in the socket case
    steps = normalize_steps(STEPS)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            data = self.rfile.read(int(self.headers["Content-Length"]))
            pixels = decode_image(data, max_bytes=64 << 20, max_pixels=64_000_000)
            out = run_pipeline(pixels.unsqueeze(0).float().div(255.0), steps)
            encoded = encode_image(out.mul(255).round().to(torch.uint8)[0], fmt="png", quality=90)
            upload(f"{sink_url}/https.png", encoded.data, headers={"Content-Type": "image/png"}, timeout_s=10)
            body = encoded.sha256.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    cert, key = _self_signed(folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    url = f"https://127.0.0.1:{server.server_address[1]}/job"
    png = _png()
    timings = []
    try:
        for i in range(jobs + 3):
            started = time.perf_counter()
            with requests.Session() as session:  # a new TCP + TLS connection per job
                response = session.post(url, data=png, verify=str(cert), timeout=30)
            response.raise_for_status()
            if i >= 3:
                timings.append(time.perf_counter() - started)
    finally:
        server.shutdown()
    return timings


async def _socket_jobs(jobs: int, sink_url: str, folder: Path) -> list[float]:
    from gpuroute_operator.zap import ZapHandler

    server_keys, worker_keys = KeyPair.generate(), KeyPair.generate()
    write_key_file(folder / "w.key_secret", worker_keys.secret)
    (folder / "server.key").write_bytes(server_keys.public)
    context = zmq.asyncio.Context()
    zap = ZapHandler(context)
    zap.set_pool_keys("bench", [worker_keys.public], ())
    zap.start()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.curve_server = True
    router.curve_secretkey, router.curve_publickey = server_keys.secret, server_keys.public
    router.setsockopt(zmq.ZAP_DOMAIN, b"gpuroute")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = subprocess.Popen(
        [sys.executable, "-m", "gpuroute.cli", "worker", "--operator", f"tcp://127.0.0.1:{port}", "--pool", "bench",
         "--id", "w", "--key-file", str(folder / "w.key_secret"), "--server-public-key-file", str(folder / "server.key"),
         "--health-port", "0", "--threads", "1", "--device", "cpu", "--max-batch", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ}, start_new_session=True)
    png = _png()
    timings: list[float] = []
    try:
        frames = await asyncio.wait_for(router.recv_multipart(), timeout=60)  # READY
        routing_id = frames[0]

        async def beat() -> None:
            while True:
                await router.send_multipart([routing_id, *protocol.encode(Kind.HEARTBEAT, {"ping": time.monotonic()})])
                await asyncio.sleep(protocol.HEARTBEAT_INTERVAL_S)

        beater = asyncio.get_running_loop().create_task(beat())
        for i in range(jobs + 3):
            header = {"job": f"bench/{i}", "steps": STEPS, "input": {"inline": True},
                      "output": {"url": f"{sink_url}/socket.png", "headers": {}, "format": "png", "quality": 90},
                      "timeoutS": 30}
            started = time.perf_counter()
            await router.send_multipart([routing_id, *protocol.encode(Kind.JOB, header, png)])
            while True:
                reply = await asyncio.wait_for(router.recv_multipart(), timeout=30)
                message = protocol.decode(reply[1:])
                if message.kind in (Kind.RESULT, Kind.ERROR) and message.header.get("job") == header["job"]:
                    break
            if message.kind is Kind.ERROR:
                raise RuntimeError(f"worker failed the bench job: {message.header}")
            if i >= 3:
                timings.append(time.perf_counter() - started)
        beater.cancel()
    finally:
        worker.terminate()
        worker.wait(10)
        router.close()
        await zap.stop()
        context.term()
    return timings


def run(*, jobs: int = 200) -> dict[str, Any]:
    sink = ThreadingHTTPServer(("127.0.0.1", free_port()), _Sink)
    _serve(sink)
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    try:
        with tempfile.TemporaryDirectory(prefix="gpuroute-bench-dispatch-") as tmp:
            socket_times = asyncio.run(_socket_jobs(jobs, sink_url, Path(tmp)))
            https_times = https_side(jobs, sink_url, Path(tmp))
    finally:
        sink.shutdown()
    ours, base = summary_ms(socket_times), summary_ms(https_times)
    return {"socket": ours, "https_new_connection": base, "jobs": jobs, "rows": [
        row("dispatch", "round trip p50, persistent CURVE socket", ours["p50_ms"], "ms",
            "HTTPS, new TLS connection per job", base["p50_ms"], higher_is_better=False),
        row("dispatch", "round trip p95, persistent CURVE socket", ours["p95_ms"], "ms",
            "HTTPS, new TLS connection per job", base["p95_ms"], higher_is_better=False),
    ]}


if __name__ == "__main__":
    out = run(jobs=int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    print({k: v for k, v in out.items() if k != "rows"})
