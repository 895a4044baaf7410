"""Storage transfers over TLS: the worker's pooled client against a new connection per
transfer, in the same run.

moto's S3 server runs in its own process over HTTPS with a self-signed certificate, on
127.0.0.1. One "job" is what the worker does with storage: a presigned GET of its input
and a presigned PUT of its output (INPUT_BYTES each). Two series, interleaved in blocks
so drift on the shared machine hits both alike:
- gpuroute: one TransferClient (urllib3 pool, one TLS context, keep-alive), as a worker
  holds it for its whole life;
- baseline: `requests.get` / `requests.put` with no Session, which is what the worker did
  before: a TCP and TLS handshake and a CA-bundle load per transfer.
Both trust the same bundle: certifi's public CAs (what a worker loads in production)
plus the server's certificate.

Reported per job: the worker process's CPU time (time.process_time over the series; the
server's CPU is in another process) and the wall time of GET + PUT (p50). Loopback has
no round-trip time: across clouds every new connection also pays a TCP and a TLS round
trip (≈ 2 x RTT), which the pooled client pays once.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import row
from gpuroute_dev.localenv.tls import self_signed

INPUT_BYTES = 200 * 1024
BLOCK = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not start on port {port}")


def _series(job: Callable[[], None], jobs: int) -> tuple[list[float], float]:
    walls: list[float] = []
    cpu_started = time.process_time()
    for _ in range(jobs):
        started = time.perf_counter()
        job()
        walls.append(time.perf_counter() - started)
    return walls, time.process_time() - cpu_started


def run(*, jobs: int = 200) -> dict[str, Any]:
    import boto3
    import requests
    from botocore.config import Config

    from gpuroute_worker.transfer import TransferClient, TransferConfig

    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-tls-") as folder:
        own, own_key = self_signed(Path(folder))
        # Trust what a worker trusts in production (the public CA bundle requests ships)
        # plus this server's certificate: loading that bundle is the per-connection cost.
        import certifi

        cert = Path(folder) / "bundle.pem"
        cert.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + own.read_bytes())
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port),
                                   "-c", str(own), "-k", str(own_key)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        try:
            _wait_for(port, 30.0)
            s3 = boto3.client("s3", endpoint_url=f"https://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench", verify=str(cert),
                              config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
            s3.create_bucket(Bucket="bench")
            payload = os.urandom(INPUT_BYTES)
            s3.put_object(Bucket="bench", Key="in.bin", Body=payload)
            get_url = s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": "in.bin"},
                                                ExpiresIn=3600)
            put_url = s3.generate_presigned_url("put_object", Params={"Bucket": "bench", "Key": "out.bin"},
                                                ExpiresIn=3600)

            client = TransferClient(TransferConfig(ca_file=str(cert)))

            def pooled() -> None:
                data = client.download(get_url, max_bytes=1 << 24, untrusted=False)
                client.upload(put_url, data, headers={})

            def per_transfer() -> None:
                response = requests.get(get_url, timeout=30, verify=str(cert))
                response.raise_for_status()
                requests.put(put_url, data=response.content, timeout=30, verify=str(cert)).raise_for_status()

            pooled()
            per_transfer()  # warm-up: imports, moto's first-request set-up
            walls: dict[str, list[float]] = {"pooled": [], "new": []}
            cpu: dict[str, float] = {"pooled": 0.0, "new": 0.0}
            for _ in range(max(1, jobs // BLOCK)):
                for name, job in (("pooled", pooled), ("new", per_transfer)):
                    w, c = _series(job, BLOCK)
                    walls[name] += w
                    cpu[name] += c
            client.close()
        finally:
            server.terminate()
            server.wait(10)

    n = len(walls["pooled"])
    figures = {name: {"jobs": n, "cpu_ms_per_job": round(cpu[name] * 1000 / n, 3),
                      "p50_ms": round(statistics.median(walls[name]) * 1000, 3),
                      "mean_ms": round(statistics.fmean(walls[name]) * 1000, 3)}
               for name in walls}
    rows = [
        row("transfers (TLS, moto)", f"worker CPU per job (GET + PUT of {INPUT_BYTES // 1024} KiB)",
            figures["pooled"]["cpu_ms_per_job"], "ms", "requests, new connection per transfer",
            figures["new"]["cpu_ms_per_job"], higher_is_better=False),
        row("transfers (TLS, moto)", "transfer time per job, p50", figures["pooled"]["p50_ms"], "ms",
            "requests, new connection per transfer", figures["new"]["p50_ms"], higher_is_better=False),
    ]
    return {"input_bytes": INPUT_BYTES, **figures, "rows": rows}


if __name__ == "__main__":
    result = run(jobs=int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    print({k: v for k, v in result.items() if k != "rows"})
