"""Data plane: job-sized messages over CURVE-encrypted ZeroMQ vs plain ZeroMQ vs raw TCP.

An echo server on loopback returns every message unchanged. For 64 KiB, 1 MiB and 8 MiB
messages we measure, on the same machine in the same run:

- round-trip latency: one message at a time (send, wait for the echo);
- throughput: a stream of messages with WINDOW of them in flight at once, counting the
  bytes carried in both directions per second (each message crosses loopback twice);
  the best of `trials` interleaved streams.

Transports: ZeroMQ DEALER -> ROUTER with CURVE (what the operator and workers use),
the same sockets without CURVE, and raw TCP with a 4-byte length prefix. Server and
client have separate ZeroMQ contexts, so each side has its own I/O thread, as two
processes would: CURVE encryption runs on those threads. No ZAP handler is installed,
so libzmq accepts any client key; that isolates the cost of the encryption itself.
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
DEFAULT_ROUNDS = {"64KiB": 400, "1MiB": 100, "8MiB": 20}
"""Round trips timed one at a time, per size."""
DEFAULT_STREAM = {"64KiB": 3000, "1MiB": 300, "8MiB": 40}
"""Messages streamed for the throughput figure, per size."""
WINDOW = 4
"""Messages in flight at once in the throughput stream."""
WARMUP = 2
"""Untimed round trips first: they include the connect and the CURVE handshake."""
TIMEOUT_MS = 15_000


class _ZmqPair:
    """A DEALER client and a ROUTER echo server on loopback, in separate contexts."""

    def __init__(self, curve: bool) -> None:
        self.server_context, self.client_context = zmq.Context(), zmq.Context()
        self.router = self.server_context.socket(zmq.ROUTER)
        self.dealer = self.client_context.socket(zmq.DEALER)
        for sock in (self.router, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        self.dealer.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        # Short, so the echo thread notices the stop flag promptly.
        self.router.setsockopt(zmq.RCVTIMEO, 100)
        if curve:
            server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
            self.router.curve_server = True
            self.router.curve_secretkey, self.router.curve_publickey = server_keys.secret, server_keys.public
            self.dealer.curve_secretkey, self.dealer.curve_publickey = client_keys.secret, client_keys.public
            self.dealer.curve_serverkey = server_keys.public
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.dealer.connect(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zmq-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                frames = self.router.recv_multipart(copy=False)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            self.router.send_multipart(frames, copy=False)

    def send(self, payload: bytes) -> None:
        # The shape of a JOB message: kind, header, payload.
        self.dealer.send_multipart([b"JOB", b"\x80", payload], copy=False)

    def recv(self) -> None:
        self.dealer.recv_multipart(copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.router.close()
        self.dealer.close()
        self.server_context.term()
        self.client_context.term()


def _recv_exact(conn: socket.socket, n: int, buffer: bytearray) -> None:
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        chunk = conn.recv_into(view[got:], n - got)
        if not chunk:
            raise ConnectionError("peer closed")
        got += chunk


class _TcpPair:
    """A client and a length-prefixed echo server over a raw TCP connection on loopback."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT_MS / 1000)
        self._thread = threading.Thread(target=self._serve, name="tcp-echo", daemon=True)
        self._thread.start()
        self.client = socket.create_connection(self.listener.getsockname()[:2], timeout=TIMEOUT_MS / 1000)
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray(size)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT_MS / 1000)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = bytearray(self.size)
            while True:
                try:
                    _recv_exact(conn, 4, buffer)
                except (ConnectionError, OSError):
                    return  # the client closed: the run is over
                n = struct.unpack("!I", buffer[:4])[0]
                _recv_exact(conn, n, buffer)
                conn.sendall(struct.pack("!I", n))
                conn.sendall(memoryview(buffer)[:n])

    def send(self, payload: bytes) -> None:
        self.client.sendall(struct.pack("!I", len(payload)))
        self.client.sendall(payload)

    def recv(self) -> None:
        _recv_exact(self.client, 4, self._buffer)
        _recv_exact(self.client, struct.unpack("!I", self._buffer[:4])[0], self._buffer)

    def close(self) -> None:
        self.client.close()
        self._thread.join(5)
        self.listener.close()


def _round_trips(pair: _ZmqPair | _TcpPair, payload: bytes, rounds: int) -> list[float]:
    timings = []
    for i in range(rounds + WARMUP):
        started = time.perf_counter()
        pair.send(payload)
        pair.recv()
        if i >= WARMUP:
            timings.append(time.perf_counter() - started)
    return timings


def _stream_zmq(pair: _ZmqPair, payload: bytes, messages: int) -> float:
    """Seconds to echo `messages` with WINDOW in flight; one thread, libzmq queues the rest."""
    started = time.perf_counter()
    sent = received = 0
    while sent < min(WINDOW, messages):
        pair.send(payload)
        sent += 1
    while received < messages:
        pair.recv()
        received += 1
        if sent < messages:
            pair.send(payload)
            sent += 1
    return time.perf_counter() - started


def _stream_tcp(pair: _TcpPair, payload: bytes, messages: int) -> float:
    """As _stream_zmq; a sender thread, because a blocking sendall of a large message
    while the echoes are not being read would deadlock both socket buffers."""
    slots = threading.Semaphore(WINDOW)
    failure: list[BaseException] = []

    def sender() -> None:
        try:
            for _ in range(messages):
                if not slots.acquire(timeout=TIMEOUT_MS / 1000):
                    raise TimeoutError("echoes stopped coming back")
                pair.send(payload)
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=sender, name="tcp-stream", daemon=True)
    thread.start()
    for _ in range(messages):
        pair.recv()
        slots.release()
    elapsed = time.perf_counter() - started
    thread.join(5)
    if failure:
        raise failure[0]
    return elapsed


def _stream(pair: _ZmqPair | _TcpPair, payload: bytes, messages: int) -> float:
    if isinstance(pair, _ZmqPair):
        return _stream_zmq(pair, payload, messages)
    return _stream_tcp(pair, payload, messages)


def _measure_size(size: int, rounds: int, messages: int, trials: int) -> dict[str, Any]:
    """All three transports for one size, interleaved trial by trial.

    The cores are shared with other work: interleaving spreads any interference over
    the transports alike, and the best trial's throughput is the least disturbed one.
    """
    payload = b"x" * size
    pairs: dict[str, _ZmqPair | _TcpPair] = {}
    timings: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    try:
        pairs["curve"], pairs["zmq"], pairs["tcp"] = _ZmqPair(True), _ZmqPair(False), _TcpPair(size)
        for name, pair in pairs.items():
            _round_trips(pair, payload, 0)  # connect and handshake, untimed
            timings[name], rates[name] = [], []
        for trial in range(trials):
            share = max(1, rounds // trials + (1 if trial < rounds % trials else 0))
            for name, pair in pairs.items():
                timings[name] += _round_trips(pair, payload, share)
                count = max(1, messages // trials)
                rates[name].append(2 * size * count / _stream(pair, payload, count) / 1e6)
    finally:
        for pair in pairs.values():
            pair.close()
    return {name: {**summary_ms(timings[name]), "stream_messages": max(1, messages // trials) * trials,
                   "throughput_MBps": round(max(rates[name]), 1),
                   "throughput_trials_MBps": [round(r, 1) for r in rates[name]]} for name in pairs}


def run(*, rounds: dict[str, int] | None = None, stream: dict[str, int] | None = None,
        trials: int = 3) -> dict[str, Any]:
    rounds = {**DEFAULT_ROUNDS, **(rounds or {})}
    stream = {**DEFAULT_STREAM, **(stream or {})}
    results: dict[str, Any] = {"window": WINDOW, "trials": trials, "sizes": {}, "rows": []}
    for label, size in SIZES.items():
        entry = _measure_size(size, rounds[label], stream[label], trials)
        results["sizes"][label] = entry
        for baseline, name in (("zmq", "plain ZeroMQ"), ("tcp", "raw TCP")):
            results["rows"].append(row("dataplane", f"{label} throughput, CURVE", entry["curve"]["throughput_MBps"],
                                       "MB/s", name, entry[baseline]["throughput_MBps"], higher_is_better=True))
        for baseline, name in (("zmq", "plain ZeroMQ"), ("tcp", "raw TCP")):
            results["rows"].append(row("dataplane", f"{label} round trip p50, CURVE", entry["curve"]["p50_ms"], "ms",
                                       name, entry[baseline]["p50_ms"], higher_is_better=False))
    return results


if __name__ == "__main__":
    out = run()
    for label, entry in out["sizes"].items():
        print(label, {k: (v["p50_ms"], v["throughput_MBps"]) for k, v in entry.items()})
    sys.exit(0)
