"""The worker's persistent, CURVE-encrypted link to the operator (a DEALER socket).

Paranoid Pirate on the worker side: announce with READY, heartbeat every
HEARTBEAT_INTERVAL_S, count the operator as gone after HEARTBEAT_LIVENESS silent
intervals, then close the socket and dial again with exponential backoff. Answers
produced while the link was down, or just before it went down, are sent again after
the new READY; the operator accepts each job's result once.

For pools whose WorkerPool lists `endpoints` the roles of the transport flip and
nothing else does: the worker binds, the operator dials in (still the CURVE server,
so ZAP still decides), and the worker speaks first with READY as soon as a
handshake completes (a bound DEALER becomes writable only then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio

from gpuroute import protocol
from gpuroute.protocol import Kind, Message, ProtocolError
from gpuroute.zmqsend import send_now
from gpuroute_worker import metrics
from gpuroute_worker.config import WorkerConfig
from gpuroute_worker.runtime import JobRunner

log = logging.getLogger(__name__)

_LIVENESS_WINDOW_S = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS

REBIND_TIMEOUT_S = 5.0
"""How long a listening worker retries binding its port again: libzmq releases the
previous socket's listener asynchronously, so an immediate re-bind can see EADDRINUSE."""


def make_dealer(context: zmq.asyncio.Context, config: WorkerConfig) -> zmq.asyncio.Socket:
    """The worker's socket, dialing the operator, or bound when config.listen_endpoint is set."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.RECONNECT_IVL, int(protocol.RECONNECT_INITIAL_S * 1000))
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, int(protocol.RECONNECT_MAX_S * 1000))
    socket.curve_secretkey = config.secret_key
    socket.curve_publickey = zmq.curve_public(config.secret_key)
    # Pinning: the handshake fails unless the server proves it holds this key.
    socket.curve_serverkey = config.server_public_key
    # The operator only accepts a routing id that starts with this worker's own key; the
    # nonce keeps anyone else from connecting under it once this connection drops.
    socket.setsockopt(zmq.ROUTING_ID, protocol.routing_id_for(zmq.curve_public(config.secret_key).decode(),
                                                              config.worker_id, config.routing_nonce))
    if not config.listen_endpoint:
        socket.connect(config.operator_endpoint)
        return socket
    # A bound DEALER spreads sends over every connected peer: transport heartbeats drop a
    # silently dead operator connection so no answer goes down it once a new one is up.
    socket.setsockopt(zmq.HEARTBEAT_IVL, int(protocol.HEARTBEAT_INTERVAL_S * 1000))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(_LIVENESS_WINDOW_S * 1000))
    try:
        socket.bind(config.listen_endpoint)
    except zmq.ZMQError:
        socket.close()
        raise
    return socket


async def open_dealer(context: zmq.asyncio.Context, config: WorkerConfig) -> zmq.asyncio.Socket:
    """make_dealer, retrying a listening worker's bind while the previous listener is released."""
    deadline = time.monotonic() + REBIND_TIMEOUT_S
    while True:
        try:
            return make_dealer(context, config)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class OperatorLink:
    """Keeps one live connection to the operator and routes its messages to the runner."""

    def __init__(self, config: WorkerConfig, context: zmq.asyncio.Context) -> None:
        self.config = config
        self.context = context
        self.runner: JobRunner | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._stopping = asyncio.Event()
        self._last_contact = 0.0
        self._rtt_ms: float | None = None
        self._registered = False
        self._announced = False
        self.connected = asyncio.Event()

    @property
    def peer(self) -> str:
        return f"listening on {self.config.listen_endpoint}" if self.config.listen_endpoint \
            else f"dialing {self.config.operator_endpoint}"

    def send(self, kind: Kind | protocol.Body, header: Mapping[str, Any] | None = None) -> None:
        """Queue a message to the operator; while disconnected it is re-sent after READY."""
        if self._socket is None or not self._announced:
            return
        error = send_now(self._socket, protocol.encode(kind, header))
        if isinstance(error, zmq.Again):
            # High-water mark reached: the operator is unreachable; answers are re-sent later.
            log.warning("operator link full, %s deferred", getattr(kind, "name", type(kind).__name__))
        elif error is not None:
            raise error

    def stop(self) -> None:
        self._stopping.set()

    def _answered(self, announced: set[protocol.AttemptId]) -> list[protocol.AttemptId]:
        out = []
        for job in self.runner.cached_jobs() if self.runner else []:
            try:
                attempt = protocol.AttemptId.parse(job)
            except ProtocolError:
                continue
            if attempt not in announced:
                out.append(attempt)
        return out[-4096:]

    def _ready(self, resending: list[str]) -> protocol.Ready:
        running = self.runner.running_jobs() if self.runner else []
        jobs = []
        for job in dict.fromkeys(running + resending):
            try:
                jobs.append(protocol.AttemptId.parse(job))
            except ProtocolError:
                log.warning("not announcing malformed job id %r", job)
        return protocol.Ready(pool=self.config.pool, worker=self.config.worker_id, capacity=self.config.capacity,
                              device=self.config.gpu_name, models=tuple(sorted(self.config.models)),
                              # Jobs this worker still owns: the operator follows them instead of re-queueing.
                              jobs=tuple(jobs), answered=tuple(self._answered(set(jobs))))

    async def run(self) -> None:
        backoff = protocol.RECONNECT_INITIAL_S
        while not self._stopping.is_set():
            ended, registered = await self._session()
            if self._stopping.is_set():
                break
            metrics.RECONNECTS.inc()
            if registered:
                backoff = protocol.RECONNECT_INITIAL_S
                if ended == "disconnect":
                    continue  # a known operator asked us to re-register (it restarted): no reason to wait
            if ended == "disconnect":
                log.warning("operator refused this worker; trying again in %.2fs", backoff)
            else:
                log.warning("operator silent for %.1fs; reconnecting in %.2fs", _LIVENESS_WINDOW_S, backoff)
            try:
                # asyncio.timeout: on 3.11 wait_for can turn a racing cancellation into TimeoutError.
                async with asyncio.timeout(backoff):
                    await self._stopping.wait()
            except TimeoutError:
                pass
            backoff = min(backoff * 2, protocol.RECONNECT_MAX_S)
        await self._goodbye()

    async def _goodbye(self) -> None:
        if self._socket is not None:
            self.send(protocol.Disconnect("shutdown"))
            # Give the final message a moment on the wire; linger is 0 by design.
            await asyncio.sleep(0.05)
            self._socket.close()
            self._socket = None

    def _announce(self) -> None:
        """READY, then the answers the operator may have missed while the link was down."""
        self._announced = True
        resend_since = self._last_contact - _LIVENESS_WINDOW_S if self._last_contact else 0.0
        resend = self.runner.answers_since(resend_since) if self.runner is not None and resend_since else []
        self.send(self._ready([str(a.header["job"]) for a in resend]))
        for answer in resend:
            self.send(answer.kind, answer.header)

    async def _session(self) -> tuple[str, bool]:
        """One socket's lifetime: why it ended ('silent', 'disconnect' or 'stopping'), and
        whether the operator accepted this worker (heartbeated it) during it."""
        self._announced = False
        self._registered = False
        socket = await open_dealer(self.context, self.config)
        self._socket = socket
        poller = zmq.asyncio.Poller()
        if self.config.listen_endpoint:
            # Nobody to talk to until the operator dials in and passes the handshake; no
            # liveness is counted meanwhile (an operator that never dials is not a fault here).
            poller.register(socket, zmq.POLLIN | zmq.POLLOUT)
        else:
            self._announce()
            poller.register(socket, zmq.POLLIN)
        liveness = protocol.HEARTBEAT_LIVENESS
        next_beat = time.monotonic() + protocol.HEARTBEAT_INTERVAL_S
        try:
            while not self._stopping.is_set():
                if not self._announced:
                    events = dict(await poller.poll(timeout=protocol.HEARTBEAT_INTERVAL_S * 1000))
                    if events.get(socket, 0) & zmq.POLLOUT:
                        poller.modify(socket, zmq.POLLIN)
                        self._announce()
                        next_beat = time.monotonic() + protocol.HEARTBEAT_INTERVAL_S
                    continue
                timeout_ms = max(0.0, (next_beat - time.monotonic()) * 1000.0)
                events = dict(await poller.poll(timeout=timeout_ms))
                if socket in events:
                    frames = await socket.recv_multipart()
                    liveness = protocol.HEARTBEAT_LIVENESS
                    self._last_contact = time.monotonic()
                    if not self.connected.is_set():
                        self.connected.set()
                        metrics.CONNECTED.set(1)
                        log.info("connected to operator (%s)", self.peer)
                    if self._dispatch(frames) == "disconnect":
                        return "disconnect", self._registered
                if time.monotonic() >= next_beat:
                    if not events:
                        liveness -= 1
                        if liveness <= 0:
                            return "silent", self._registered
                    self.send(protocol.Heartbeat())
                    next_beat = time.monotonic() + protocol.HEARTBEAT_INTERVAL_S
            return "stopping", self._registered
        finally:
            self.connected.clear()
            metrics.CONNECTED.set(0)
            if self._stopping.is_set():
                self._socket = socket  # _goodbye closes it after saying DISCONNECT
            else:
                socket.close()
                self._socket = None

    def _dispatch(self, frames: list[bytes]) -> str | None:
        try:
            message: Message = protocol.decode(frames)
        except ProtocolError as exc:
            metrics.REJECTED_MESSAGES.labels("malformed").inc()
            log.warning("dropped a malformed message from the operator: %s", exc)
            return None
        if message.kind is Kind.HEARTBEAT:
            self._registered = True  # the operator only heartbeats workers it accepted
            beat: protocol.Heartbeat = message.body
            if beat.ping is not None:
                self.send(protocol.Heartbeat(pong=beat.ping))
            if beat.rtt_ms is not None:
                self._rtt_ms = beat.rtt_ms
        elif message.kind is Kind.JOB and self.runner is not None:
            self.runner.handle_job(message)
        elif message.kind is Kind.CANCEL and self.runner is not None:
            self.runner.cancel(str(message.header["job"]))
        elif message.kind is Kind.DISCONNECT:
            log.info("operator asked this worker to re-register")
            return "disconnect"
        else:
            metrics.REJECTED_MESSAGES.labels("unexpected_kind").inc()
            log.warning("dropped unexpected %s from the operator", message.kind.name)
        return None
