"""The operator's ROUTER socket: CURVE server, one persistent connection per worker.

Transport only: frames in, decoded Messages out to a handler, and sends by routing id.
Malformed messages are dropped and counted; nothing a peer sends can stop the loop.
Workers dial the bound socket; for pools that list `endpoints` the same socket also
dials out to them. Either way the operator is the CURVE server and ZAP admits the peer,
so routing, authentication and the protocol are the same for both topologies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket as socket_module
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import zmq
import zmq.asyncio
import zmq.utils.monitor

from gpuroute import protocol
from gpuroute.aio import stop_tasks
from gpuroute.protocol import Body, Disconnect, Kind, Message, ProtocolError
from gpuroute.zmqsend import send_now
from gpuroute_operator import metrics

log = logging.getLogger(__name__)

REGISTER_WITHIN_S = 5.0
DRAIN_MAX = 64
"""Messages read without waiting after each awaited one, before the loop yields."""
"""A connection that has not sent READY this long after it was accepted is closed: a silent
connection would otherwise hold its routing id, keeping the worker that owns it out."""


class MessageHandler(Protocol):
    def on_message(self, routing_id: bytes, user_id: str, message: Message, address: str = "") -> None:
        """A decoded message; `address`: the peer's IP address (READY only; "" otherwise or unknown)."""

    def on_disconnected(self, routing_id: bytes) -> None:
        """The connection that registered `routing_id` (sent READY on it) has closed."""


@dataclass(frozen=True)
class _Peer:
    """The TCP connection behind a routing id, so the operator can close it."""

    fd: int
    """File descriptor libzmq reads the connection from (ZMQ_SRCFD of its READY)."""
    address: str
    """Peer address at READY; a reused descriptor of another peer is never closed."""


class WorkerServer:
    def __init__(self, context: zmq.asyncio.Context, *, bind: str, secret_key: bytes, handler: MessageHandler,
                 plaintext: bool = False) -> None:
        self._context = context
        self._bind = bind
        self._secret_key = secret_key
        self._handler = handler
        self._plaintext = plaintext
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._dialed: set[str] = set()
        self._peers: dict[bytes, _Peer] = {}
        self._unregistered: dict[int, tuple[float, str]] = {}
        """Descriptors of accepted or dialed connections that have not sent READY: (since, peer)."""
        self._monitor_task: asyncio.Task[None] | None = None
        self.endpoint = ""

    def start(self) -> None:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        # A live routing id is never handed to a second connection: that would give it the
        # first one's jobs. A worker that reconnects gets its id back once libzmq has dropped
        # the dead connection, which the transport heartbeats below bound to a few seconds.
        socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(protocol.HEARTBEAT_INTERVAL_S * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS * 1000))
        # Sends to a vanished worker raise EHOSTUNREACH instead of disappearing.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # For dialed workers: libzmq re-dials on its own, backing off to the protocol's
        # ceiling while a worker is down (a refused handshake is retried every interval).
        socket.setsockopt(zmq.RECONNECT_IVL, int(protocol.RECONNECT_INITIAL_S * 1000))
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, int(protocol.RECONNECT_MAX_S * 1000))
        if not self._plaintext:
            socket.curve_server = True
            socket.curve_secretkey = self._secret_key
            socket.curve_publickey = zmq.curve_public(self._secret_key)
            socket.setsockopt(zmq.ZAP_DOMAIN, b"gpuroute")
        socket.bind(self._bind)
        self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = socket
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="worker-server")
        # ACCEPTED and CONNECTED carry the descriptor (HANDSHAKE_SUCCEEDED does not).
        monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._monitor_task = asyncio.get_running_loop().create_task(self._watch(monitor), name="worker-server-monitor")
        log.info("listening for workers on %s (%s)", self.endpoint, "PLAINTEXT, dev only" if self._plaintext else "CURVE")

    async def stop(self) -> None:
        await stop_tasks(self._task, self._monitor_task)
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close()

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Track connections from accept to READY; cut those that stay silent."""
        try:
            while True:
                if await monitor.poll(timeout=int(REGISTER_WITHIN_S * 1000 / 2)):
                    event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
                    fd = int(event["value"])
                    if event["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                        self._unregistered[fd] = (time.monotonic(), _fd_peer(fd))
                    else:
                        self._unregistered.pop(fd, None)
                        self._disconnected(fd)
                self._cut_silent(time.monotonic())
        finally:
            monitor.close()

    def _disconnected(self, fd: int) -> None:
        """A connection closed: the session registered on it ends now, not after missed heartbeats,
        so its routing id holds no jobs once libzmq has freed it for another connection. The
        descriptor may already serve a new connection: a peer whose address is still the one
        behind it is that new connection, and stays."""
        current = _fd_peer(fd)
        for routing_id, peer in list(self._peers.items()):
            if peer.fd == fd and peer.address != current:
                del self._peers[routing_id]
                try:
                    self._handler.on_disconnected(routing_id)
                except Exception:  # a handler bug must not stop the monitor
                    log.exception("handling the disconnect of %r failed", routing_id[:64])

    def _cut_silent(self, now: float) -> None:
        for fd, (since, peer) in list(self._unregistered.items()):
            if now - since < REGISTER_WITHIN_S:
                continue
            del self._unregistered[fd]
            if _shutdown(fd, peer):
                metrics.REJECTED_CONNECTIONS.labels("no READY").inc()
                log.warning("closed a connection from %s that sent no READY within %.0f s", peer, REGISTER_WITHIN_S)

    def dial(self, endpoints: Iterable[str]) -> None:
        """Keep outgoing connections to exactly these worker endpoints (tcp://host:port)."""
        assert self._socket is not None
        wanted = set(endpoints)
        for endpoint in sorted(self._dialed - wanted):
            try:
                self._socket.disconnect(endpoint)
            except zmq.ZMQError as exc:  # ENOENT: libzmq had already dropped it
                log.debug("disconnect %s: %s", endpoint, exc)
            self._dialed.discard(endpoint)
            log.info("stopped dialing worker endpoint %s", endpoint)
        for endpoint in sorted(wanted - self._dialed):
            try:
                self._socket.connect(endpoint)
            except zmq.ZMQError as exc:
                # The CRD pattern and the pool parser make this rare; skip it, keep the others.
                log.error("cannot dial worker endpoint %s: %s", endpoint, exc)
                continue
            self._dialed.add(endpoint)
            log.info("dialing worker endpoint %s", endpoint)

    @property
    def dialed(self) -> frozenset[str]:
        return frozenset(self._dialed)

    def send(self, routing_id: bytes, body: Body, payload: bytes | None = None) -> bool:
        """Send without blocking; False if the worker is gone or its queue is full."""
        assert self._socket is not None
        frames = protocol.encode(body, payload=payload)
        error = send_now(self._socket, [routing_id, *frames])
        if error is not None:
            if error.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise error
        metrics.labelled(metrics.MESSAGES, "out", frames[0].decode()).inc()
        return True

    def kick(self, routing_id: bytes, reason: str) -> None:
        """Say DISCONNECT, then close the connection: a peer that ignores the message is cut all the same."""
        self.send(routing_id, Disconnect(reason))
        peer = self._peers.pop(routing_id, None)
        if peer is not None:
            _shutdown(peer.fd, peer.address)

    def _remember_peer(self, routing_id: bytes, frame: zmq.Frame) -> None:
        try:
            fd = int(frame.get(zmq.SRCFD))
            self._unregistered.pop(fd, None)
            self._peers[routing_id] = _Peer(fd, _fd_peer(fd))
        except (OSError, zmq.ZMQError, ValueError) as exc:  # inproc/ipc peers have no TCP socket to close
            log.debug("no descriptor for %r: %s", routing_id[:64], exc)

    async def _receive(self) -> None:
        socket = self._socket
        assert socket is not None
        while True:
            self._handle(await socket.recv_multipart(copy=False))
            # What else has arrived is read without waiting: a pyzmq Future and an event-loop pass
            # per message cost more than handling it (the NOBLOCK read completes at once). Bounded,
            # and then the loop yields, so that a flood cannot starve the API writers.
            for _ in range(DRAIN_MAX):
                try:
                    # pyzmq types it as an Awaitable; with NOBLOCK it is a Future already done.
                    ready = cast("asyncio.Future[list[zmq.Frame]]", socket.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                    frames = ready.result()
                except zmq.Again:
                    break
                self._handle(frames)
            else:
                await asyncio.sleep(0)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        routing_id = frames[0].bytes
        try:
            # Sizes first, from the frame lengths alone: nothing oversized is copied.
            protocol.check_sizes(frames[1:])
            user_id = "" if self._plaintext else str(frames[1].get("User-Id"))
            message = protocol.decode([f.bytes for f in frames[1:]])
        except ProtocolError as exc:
            metrics.REJECTED_MESSAGES.labels("malformed").inc()
            log.warning("dropped malformed message from %r: %s", routing_id[:64], exc)
            return
        metrics.labelled(metrics.MESSAGES, "in", message.kind.name).inc()
        address = ""
        if message.kind is Kind.READY:
            self._remember_peer(routing_id, frames[1])
            address = _peer_address(frames[1])
        try:
            self._handler.on_message(routing_id, user_id, message, address)
        except Exception:  # a handler bug must not take the socket loop down
            metrics.REJECTED_MESSAGES.labels("handler_error").inc()
            log.exception("handling %s from %r failed", message.kind.name, routing_id[:64])


def _peer_address(frame: zmq.Frame) -> str:
    """The IP address libzmq reports for the frame's connection ("" for inproc and ipc)."""
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return ""


def _fd_peer(fd: int) -> str:
    """The peer address of libzmq's descriptor `fd` ("" when it is not a connected socket)."""
    try:
        with socket_module.socket(fileno=os.dup(fd)) as conn:
            return str(conn.getpeername())
    except OSError:
        return ""


def _shutdown(fd: int, peer: str) -> bool:
    """End the TCP connection behind libzmq's descriptor, if it still is the one from `peer`.

    shutdown() on a duplicate ends the connection for libzmq too, which then drops the pipe
    and frees the routing id; the address check keeps a reused descriptor of another
    connection safe."""
    if not peer:
        return False
    try:
        with socket_module.socket(fileno=os.dup(fd)) as conn:
            if str(conn.getpeername()) != peer:
                return False
            conn.shutdown(socket_module.SHUT_RDWR)
            return True
    except OSError as exc:  # already closed by the peer or by libzmq
        log.debug("closing connection %d: %s", fd, exc)
        return False
