"""Data plane: job-sized messages over the CURVE socket vs plain ZeroMQ vs raw TCP.

An echo server on loopback returns each message; we measure round-trip latency and
throughput (bytes each way / time) for 64 KiB, 1 MiB and 8 MiB messages. The ratio
shows what CURVE encryption costs against plain ZeroMQ and against raw sockets.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from typing import Any

import zmq

from bench.common import row, summary_ms
from gpuroute.curve_keys import KeyPair

SIZES = {"64KiB": 64 * 1024, "1MiB": 1024 * 1024, "8MiB": 8 * 1024 * 1024}


def _zmq_echo(curve: bool, size: int, rounds: int) -> list[float]:
    context = zmq.Context()
    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    # Short, so the echo thread notices the stop flag promptly.
    router.setsockopt(zmq.RCVTIMEO, 100)
    if curve:
        # No ZAP handler: libzmq then accepts any client key, which isolates the crypto cost.
        router.curve_server = True
        router.curve_secretkey, router.curve_publickey = server_keys.secret, server_keys.public
        dealer.curve_secretkey, dealer.curve_publickey = client_keys.secret, client_keys.public
        dealer.curve_serverkey = server_keys.public
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                frames = router.recv_multipart(copy=False)
            except zmq.Again:
                continue
            router.send_multipart(frames, copy=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = b"x" * size
    timings = []
    try:
        for i in range(rounds + 2):
            started = time.perf_counter()
            dealer.send_multipart([b"JOB", b"{}", payload], copy=False)
            dealer.recv_multipart(copy=False)
            if i >= 2:  # the first round trips include the handshake
                timings.append(time.perf_counter() - started)
    finally:
        stop.set()
        thread.join(12)
        router.close()
        dealer.close()
        context.term()
    return timings


def _recv_exact(conn: socket.socket, n: int, buffer: bytearray) -> None:
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        chunk = conn.recv_into(view[got:], n - got)
        if not chunk:
            raise ConnectionError("peer closed")
        got += chunk


def _tcp_echo(size: int, rounds: int) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buffer = bytearray(size)
            for _ in range(rounds + 2):
                _recv_exact(conn, 4, buffer)
                n = struct.unpack("!I", buffer[:4])[0]
                _recv_exact(conn, n, buffer)
                conn.sendall(struct.pack("!I", n))
                conn.sendall(memoryview(buffer)[:n])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * size
    buffer = bytearray(size)
    timings = []
    try:
        for i in range(rounds + 2):
            started = time.perf_counter()
            client.sendall(struct.pack("!I", size) + payload)
            _recv_exact(client, 4, buffer)
            _recv_exact(client, size, buffer)
            if i >= 2:
                timings.append(time.perf_counter() - started)
    finally:
        client.close()
        thread.join(10)
        listener.close()
    return timings


def run(*, rounds: dict[str, int] | None = None) -> dict[str, Any]:
    rounds = rounds or {"64KiB": 400, "1MiB": 100, "8MiB": 20}
    results: dict[str, Any] = {"sizes": {}, "rows": []}
    for label, size in SIZES.items():
        n = rounds[label]
        transports = {"curve": _zmq_echo(True, size, n), "zmq": _zmq_echo(False, size, n), "tcp": _tcp_echo(size, n)}
        entry = {}
        for name, timings in transports.items():
            # Both directions carry the message: 2 x size per round trip.
            mbps = 2 * size * len(timings) / sum(timings) / 1e6
            entry[name] = {**summary_ms(timings), "throughput_MBps": round(mbps, 1)}
        results["sizes"][label] = entry
        for baseline in ("zmq", "tcp"):
            results["rows"].append(row("dataplane", f"{label} throughput, CURVE", entry["curve"]["throughput_MBps"],
                                       "MB/s", f"{'plain ZeroMQ' if baseline == 'zmq' else 'raw TCP'}",
                                       entry[baseline]["throughput_MBps"], higher_is_better=True))
        results["rows"].append(row("dataplane", f"{label} round trip p50, CURVE", entry["curve"]["p50_ms"], "ms",
                                   "raw TCP", entry["tcp"]["p50_ms"], higher_is_better=False))
    return results


if __name__ == "__main__":
    out = run()
    for label, entry in out["sizes"].items():
        print(label, {k: (v["p50_ms"], v["throughput_MBps"]) for k, v in entry.items()})
    sys.exit(0)
